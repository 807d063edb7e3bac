"""Figures of a run: percentiles on known latencies, usage-based token counts, goodput, the
results JSON and the run's MFU from the stub's fake counters."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loadgen import RunConfig, RunResult, run_benchmark
from loadgen.cli import main
from loadgen.config import SLOs
from loadgen.records import RequestRecord
from loadgen.stats import latency_stats, meets_slos
from loadgen.stub import StubConfig
from loadgen.stub_server import StubThread

TTFT_S, RATE = 0.1, 50.0  # stub pace: first token after 100 ms, then one every 20 ms


@pytest.fixture(scope="module")
def stub():
    with StubThread(StubConfig(ttft_s=TTFT_S, tokens_per_s=RATE, fake_mfu=True)) as s:
        yield s


def test_latency_stats_on_known_values():
    s = latency_stats(float(x) for x in range(1, 101))
    assert (s.count, s.mean, s.min, s.max) == (100, 50.5, 1.0, 100.0)
    assert (s.p50, s.p90, s.p99) == pytest.approx((50.5, 90.1, 99.01))  # linear interpolation
    assert latency_stats([]).p50 is None and latency_stats([]).count == 0


def test_slos_need_every_bound():
    rec = RequestRecord(index=0, scheduled_at_s=0, issued_at_s=0, sent_at_s=0, input_len=1, output_len=2, ok=True,
                        ttft_s=0.2, tpot_s=0.05, e2e_s=0.3)
    assert meets_slos(rec, SLOs(ttft_s=0.25, tpot_s=0.06, e2e_s=1))
    assert not meets_slos(rec, SLOs(ttft_s=0.1))
    assert not meets_slos(rec, SLOs(tpot_s=0.01))
    assert not meets_slos(rec.model_copy(update={"ok": False}), SLOs(ttft_s=1))


async def test_percentiles_match_the_stub_pace(stub):
    out = 6
    config = RunConfig(base_url=stub.url, arrival="constant", request_rate=40, num_prompts=40,
                       input={"mean": 20}, output={"mean": out}, mfu=False, quiet=True)
    r = await run_benchmark(config)
    assert r.completed == 40
    # the stub sleeps to absolute deadlines, so the client sees the pace plus loopback and
    # event-loop delays: a few ms, with slack for a loaded 2-core machine
    assert TTFT_S <= r.ttft_s.p50 < TTFT_S + 0.03
    assert r.itl_s.p50 == pytest.approx(1 / RATE, abs=0.006)
    assert r.itl_s.count == 40 * (out - 1)
    assert r.tpot_s.p50 == pytest.approx(1 / RATE, abs=0.006)
    assert r.e2e_s.p50 == pytest.approx(TTFT_S + (out - 1) / RATE, abs=0.03)
    assert r.ttft_s.p50 <= r.ttft_s.p90 <= r.ttft_s.p99 <= r.ttft_s.max


async def test_token_counts_come_from_usage_with_multi_token_chunks():
    with StubThread(StubConfig(tokens_per_chunk=3)) as s:
        config = RunConfig(base_url=s.url, endpoint="chat", num_prompts=10, input={"mean": 30},
                           output={"mean": 10}, mfu=False, quiet=True)
        r = await run_benchmark(config)
    # 10 tokens in chunks of 3,3,3,1: four chunks, three ITL gaps, usage says 10
    assert r.mean_output_tokens == 10 and r.total_output_tokens == 100
    assert all(rec.chunks == 4 and len(rec.itl_s) == 3 and rec.usage_from_server for rec in r.records)
    assert r.tokens_per_chunk == pytest.approx(2.5) and r.usage_missing == 0
    assert r.mean_input_tokens == 30  # the stub counts words: the prompt builder's 1 word ≈ 1 token


async def test_sharegpt_prompt_tokens_are_the_servers_count(stub, tmp_path):
    path = tmp_path / "sg.jsonl"
    convs = [{"conversations": [{"from": "human", "value": "one two three four"}, {"from": "gpt", "value": "x" * 40}]},
             {"conversations": [{"from": "gpt", "value": "no user turn first"}]},
             {"conversations": [{"from": "human", "value": "five six"}, {"from": "gpt", "value": "y" * 8}]}]
    path.write_text("\n".join(json.dumps(c) for c in convs))
    config = RunConfig(base_url=stub.url, dataset="sharegpt", dataset_path=str(path), num_prompts=4,
                       extra_body={"stub": {"ttft_s": 0, "tokens_per_s": 1e6}}, mfu=False, quiet=True)
    r = await run_benchmark(config)
    assert r.completed == 4
    assert {rec.prompt_tokens for rec in r.records} == {4, 2}  # server-side words, not the client estimate
    assert {rec.output_len for rec in r.records} == {10, 2}      # reply length estimate: 4 chars per token


async def test_goodput_counts_requests_within_every_slo(stub, tmp_path):
    path = tmp_path / "t.jsonl"
    lines = [{"timestamp": i * 0.01, "prompt": ("STUB_SLOW " if i % 3 == 0 else "") + "hi", "output_len": 2}
             for i in range(9)]
    path.write_text("\n".join(json.dumps(x) for x in lines))
    with StubThread(StubConfig(ttft_s=0.01, tokens_per_s=1000, slow_s=0.3)) as s:
        config = RunConfig(base_url=s.url, arrival="trace", trace_path=str(path), mfu=False, quiet=True,
                           slos=SLOs(ttft_s=0.2, e2e_s=1.0))
        r = await run_benchmark(config)
    assert r.completed == 9 and r.good_requests == 6
    assert r.goodput == pytest.approx(6 / r.duration_s)
    r2 = await run_benchmark(RunConfig(base_url=stub.url, num_prompts=2, output={"mean": 1}, mfu=False, quiet=True))
    assert r2.goodput is None and r2.good_requests is None


async def test_mfu_covers_exactly_the_measured_requests(stub):
    config = RunConfig(base_url=stub.url, num_prompts=8, warmup_requests=3, request_rate=100,
                       input={"mean": 50}, output={"mean": 4}, mfu_fresh_timeout_s=1, mfu_interval_s=0.1, quiet=True)
    r = await run_benchmark(config)
    assert r.mfu is not None and r.mfu_error is None
    # warm-up requests ran before the baseline reading: only the 8 measured ones count
    assert r.mfu.prefill.tokens == 8 * 50 == r.total_input_tokens
    assert r.mfu.decode.tokens == 8 * 3  # first token comes from the prefill step
    assert r.mfu.prefill.mfu is not None and r.mfu.decode.mbu is not None
    assert r.mfu.peak.device == "stub" and len(r.mfu.series) >= 1


def test_results_json_and_requests_jsonl_from_the_cli(stub, tmp_path, capsys):
    out, reqs = tmp_path / "r.json", tmp_path / "r.jsonl"
    rc = main(["run", "--base-url", stub.url, "--model", "stub", "--num-prompts", "6", "--request-rate", "60",
               "--input-len", "16", "--output-len", "3", "--max-concurrency", "4", "--out", str(out),
               "--requests-out", str(reqs), "--mfu-fresh-timeout-s", "1", "--slo-ttft-s", "1", "--quiet"])
    assert rc == 0
    data = json.loads(out.read_text())
    for key in ("completed", "failed", "request_throughput", "output_throughput", "mfu", "goodput", "errors"):
        assert key in data
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        assert {"mean", "p50", "p90", "p99"} <= data[key].keys()
    assert {"prefill", "decode", "overall", "spec_decode", "peak", "series"} <= data["mfu"].keys()
    assert data["completed"] == 6 and data["config"]["max_concurrency"] == 4
    assert RunResult.model_validate(data).completed == 6
    lines = [json.loads(x) for x in reqs.read_text().splitlines()]
    assert len(lines) == 6 and {"ttft_s", "itl_s", "lateness_s", "error"} <= lines[0].keys()
    text = capsys.readouterr().out
    assert "TTFT" in text and "prefill" in text and "MFU" in text


async def test_no_mfu_endpoint_gives_null_and_a_reason():
    with StubThread(StubConfig()) as s:
        r = await run_benchmark(RunConfig(base_url=s.url, num_prompts=2, output={"mean": 2}, quiet=True))
    assert r.mfu is None and "404" in r.mfu_error and r.completed == 2
    data = json.loads(r.model_dump_json())
    assert data["mfu"] is None and "records" not in data


def test_spec_decode_acceptance_shows_in_the_summary(stub):
    from rich.console import Console

    from loadgen.runner import run_benchmark_sync
    from loadgen.summary import print_summary
    with StubThread(StubConfig(tokens_per_chunk=4, fake_mfu=True)) as s:
        r = run_benchmark_sync(RunConfig(base_url=s.url, num_prompts=3, output={"mean": 9}, mfu_fresh_timeout_s=1,
                                         quiet=True))
    assert r.mfu.spec_decode is not None and 0 < r.mfu.spec_decode.acceptance_rate <= 1
    console = Console(record=True, width=160)
    print_summary(r, console)
    assert "acceptance rate" in console.export_text()
    assert np.isclose(r.tokens_per_chunk, 9 / 3)


def test_a_peak_below_the_work_turns_the_summary_red_and_says_the_fix():
    """The stub's fake engine against a peak of 1 kFLOP/s: HFU far above 1, shown as is, with the verdict."""
    from rich.console import Console

    from loadgen.runner import run_benchmark_sync
    from loadgen.summary import print_summary

    with StubThread(StubConfig(ttft_s=0.01, tokens_per_s=200, fake_mfu=True, fake_peak_flops_per_s=1e3)) as s:
        r = run_benchmark_sync(RunConfig(base_url=s.url, num_prompts=2, output={"mean": 4}, mfu_fresh_timeout_s=1,
                                         quiet=True))
    assert r.mfu.overall.hfu > 1  # never clamped
    assert r.mfu.peak.credible is False and "not an upper bound" in r.mfu.peak.verdict
    console = Console(record=True, width=200)
    print_summary(r, console)
    text = console.export_text()
    assert "PEAK NOT CREDIBLE" in text and "Fix:" in text
