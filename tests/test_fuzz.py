"""The HTTP surface fuzzed from its own OpenAPI schema (schemathesis): the standalone app over a real
engine snapshot answers every generated request without a server error, within its schema, and every
4xx says what is accepted."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from serving_mfu.runtime.transport import SnapshotReader
from serving_mfu.serve.api import build_app
from tests.test_reliability import _tracker, _writer


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    folder = tmp_path_factory.mktemp("snapshots")
    writer = _writer(_tracker(30), folder)
    writer.write_now()
    yield build_app(lambda: SnapshotReader(folder))
    writer.close()


def test_every_endpoint_survives_generated_requests(app) -> None:
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/metrics/mfu", "/metrics/mfu/counters", "/metrics/mfu/iterations"}
    seen: dict[int, int] = {}
    for op, mode in [(op, mode) for op in operations for mode in schemathesis.GenerationMode]:
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case) -> None:
            response = case.call()
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            # 503 only for data older than min_as_of (the fuzzed app's one snapshot is not refreshed)
            assert response.status_code < 500 or (
                response.status_code == 503 and "min_as_of" in response.json()["detail"]), \
                (case.path, case.query, response.text)
            if response.status_code < 400:
                case.validate_response(response)
            if response.status_code == 422:  # says what is accepted
                detail = str(response.json().get("detail"))
                assert "accept" in detail or "must" in detail or "expected" in detail, detail

        try:
            run()
        except Unsatisfiable:  # a negative case for an operation without parameters: there is none
            assert mode == schemathesis.GenerationMode.NEGATIVE
    assert seen.get(200, 0) > 0 and seen.get(422, 0) > 0, seen
