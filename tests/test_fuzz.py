"""The HTTP surface fuzzed from its own OpenAPI schema (schemathesis): the standalone app over a real
engine snapshot answers every generated request without a server error, within its schema, and every
4xx says what is accepted."""

from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from serving_mfu.runtime.aggregate import SnapshotReader
from serving_mfu.serve.api import CLOCK_SKEW_S, build_app
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
    future: list[int] = []  # the status of each request whose min_as_of lay beyond the server's clock
    for op, mode in [(op, mode) for op in operations for mode in schemathesis.GenerationMode]:
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case) -> None:
            asked_at = time.time()
            response = case.call()
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            # 503 only for a min_as_of the data could still reach: after the snapshot, and no later than the
            # server's clock plus its skew allowance (later is a 422); the fuzzed app's snapshot is not refreshed
            if response.status_code == 503:
                min_as_of = float((case.query or {})["min_as_of"])
                assert "older than min_as_of" in response.json()["detail"], response.text
                assert min_as_of <= time.time() + CLOCK_SKEW_S, (case.query, response.text)
            else:
                assert response.status_code < 500, (case.path, case.query, response.text)
            if _beyond_the_clock(case.query, asked_at):  # no data can ever be that new: a client error
                future.append(response.status_code)
                assert response.status_code == 422, (case.path, case.query, response.text)
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
    assert future, "the fuzzer sent no min_as_of beyond the server's clock"


def _beyond_the_clock(query: dict | None, asked_at: float) -> bool:
    """A min_as_of that parses and lies past the clock plus the skew allowance (0.5 s of margin)."""
    try:
        value = float((query or {}).get("min_as_of"))
    except (TypeError, ValueError):
        return False
    return value > asked_at + CLOCK_SKEW_S + 0.5
