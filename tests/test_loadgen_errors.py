"""Every error kind is recorded against the stub, and the run still completes."""

from __future__ import annotations

import json
import socket

import pytest

from loadgen import RunConfig, run_benchmark
from loadgen.stub import StubConfig
from loadgen.stub_server import StubThread


@pytest.fixture(scope="module")
def stub():
    with StubThread(StubConfig(ttft_s=0.005, tokens_per_s=1000, slow_s=2.0, cut_after_chunks=2)) as s:
        yield s


def _trace(tmp_path, prompts: list[str]) -> str:
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps({"timestamp": i * 0.01, "prompt": p, "output_len": 8})
                              for i, p in enumerate(prompts)))
    return str(path)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
async def test_each_fault_is_recorded_by_kind(stub, tmp_path, endpoint):
    prompts = ["fine one", "STUB_HTTP_500 please", "STUB_HTTP_429 please", "STUB_CUT here", "STUB_ABORT here",
               "STUB_SLOW here", "STUB_ERROR here", "fine two"]
    config = RunConfig(base_url=stub.url, endpoint=endpoint, arrival="trace", trace_path=_trace(tmp_path, prompts),
                       request_timeout_s=0.5, mfu=False, quiet=True)
    result = await run_benchmark(config)
    assert result.completed == 2 and result.failed == 6
    assert result.errors == {"http_500": 1, "http_429": 1, "dropped_stream": 2, "timeout": 1, "stream_error": 1}
    by_prompt = dict(zip(prompts, result.records))
    assert by_prompt["STUB_CUT here"].chunks == 2            # cut after two chunks, no [DONE]
    assert "ClientPayloadError" in by_prompt["STUB_ABORT here"].error_detail  # connection dropped mid-body
    assert "injected 500" in by_prompt["STUB_HTTP_500 please"].error_detail
    ok = [r for r in result.records if r.ok]
    assert [r.completion_tokens for r in ok] == [8, 8]
    assert result.ttft_s.count == 2 and result.e2e_s.count == 2  # failures never enter latencies


async def test_fault_by_request_field_and_fraction(tmp_path):
    with StubThread(StubConfig(fail_fraction=0.5, fail_status=503, seed=1)) as s:
        result = await run_benchmark(RunConfig(base_url=s.url, num_prompts=200, output={"mean": 2},
                                               mfu=False, quiet=True))
    # binomial(200, 0.5): sd ≈ 7; ±35 is 5 sd
    assert result.errors.keys() == {"http_503"} and abs(result.failed - 100) < 35
    assert result.completed + result.failed == 200
    with StubThread(StubConfig(cut_after_chunks=1)) as s:
        result = await run_benchmark(RunConfig(base_url=s.url, num_prompts=5, output={"mean": 4},
                                               extra_body={"stub": {"fault": "cut"}}, mfu=False, quiet=True))
    assert result.errors == {"dropped_stream": 5}


async def test_connection_errors_when_nothing_listens():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    result = await run_benchmark(RunConfig(base_url=f"http://127.0.0.1:{port}", num_prompts=4, quiet=True))
    assert result.errors == {"connection_error": 4} and result.completed == 0
    assert result.mfu is None and "cannot" in result.mfu_error
    assert result.ttft_s.count == 0 and result.ttft_s.p50 is None


async def test_timeouts_do_not_hold_up_the_others(stub, tmp_path):
    prompts = ["STUB_SLOW a", "quick b", "STUB_SLOW c", "quick d"]
    config = RunConfig(base_url=stub.url, arrival="trace", trace_path=_trace(tmp_path, prompts),
                       request_timeout_s=0.3, mfu=False, quiet=True)
    result = await run_benchmark(config)
    assert result.errors == {"timeout": 2} and result.completed == 2
    assert result.duration_s < 1.5  # the slow ones were abandoned at 0.3 s, not waited for (2 s)
