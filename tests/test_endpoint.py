"""`/metrics/mfu` on vLLM's own OpenAI-compatible server (the endpoint plugin), Prometheus series on
its `/metrics`, a hook that raises mid-run, and `serving-mfu serve` started late."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from serving_mfu.schema.report import MFUReport
from serving_mfu.tools.server import free_port, wait_http
from tests.conftest import FAIL_AT_STEP
from tests.engine_util import SERVER_COUNTERS, assert_invariants, prom_value, server_counters

pytestmark = pytest.mark.engine


@pytest.fixture
def server(plugin_server):
    return plugin_server


def test_report_served_with_its_schema(server) -> None:
    r = httpx.get(server["base"] + "/metrics/mfu", timeout=10)
    assert r.status_code == 200, r.text
    report = MFUReport.model_validate(r.json())
    assert report.prefill.tokens > 0 and report.decode.tokens > 0
    # no peak setting: the CPU default, the ISA peak of this machine, says where it came from
    assert report.peak.source.startswith("ISA peak of ") and report.peak.isa_flops_per_s == report.peak.flops_per_s
    assert report.peak.credible is True
    for phase in (report.prefill, report.decode):
        assert phase.mfu is not None and phase.mbu is not None and 0 < phase.mfu <= phase.hfu <= 1
    assert_invariants(report)
    schema = httpx.get(server["base"] + "/openapi.json", timeout=10).json()
    assert "/metrics/mfu" in schema["paths"] and "MFUReport" in schema["components"]["schemas"]


def test_tokens_agree_with_vllm_prometheus_counters(server) -> None:
    fresh = {"min_as_of": f"{time.time():.6f}", "timeout": "10"}  # every step finished so far (shared server)
    report = MFUReport.model_validate(httpx.get(server["base"] + "/metrics/mfu", params=fresh, timeout=20).json())
    prom = httpx.get(server["base"] + "/metrics", timeout=10).text
    assert report.prefill.tokens + report.prefix_cache.hit_tokens == prom_value(prom, "vllm:prompt_tokens_total")
    assert report.prefix_cache.hit_tokens == prom_value(prom, "vllm:prefix_cache_hits_total")
    # each finished prompt's first token is prefill's; the server is shared, so count its requests from vLLM
    requests = prom_value(prom, "vllm:request_success_total")
    assert requests >= 8
    assert report.decode.tokens == prom_value(prom, "vllm:generation_tokens_total") - requests
    assert report.spec_decode.draft_tokens == prom_value(prom, "vllm:spec_decode_num_draft_tokens_total")
    assert report.spec_decode.accepted_tokens == prom_value(prom, "vllm:spec_decode_num_accepted_tokens_total")
    # our own series sit beside vLLM's
    assert prom_value(prom, "serving_mfu_useful_flops_total") == pytest.approx(
        report.prefill.useful_flops + report.decode.useful_flops)


def test_window_and_iterations(server) -> None:
    w = httpx.get(server["base"] + "/metrics/mfu", params={"window": 600}, timeout=10)
    assert w.status_code == 200
    assert 0 < w.json()["window_s"] <= 600
    it = httpx.get(server["base"] + "/metrics/mfu/iterations", params={"limit": 5}, timeout=10).json()
    assert it["count"] == len(it["iterations"]) == 5
    assert all("prefill" in x and "decode" in x for x in it["iterations"])


@pytest.mark.parametrize("path,params", [
    ("/metrics/mfu", {"window": "-5"}),
    ("/metrics/mfu", {"window": "abc"}),
    ("/metrics/mfu", {"window": "1e12"}),
    ("/metrics/mfu", {"window": "nan"}),
    ("/metrics/mfu", {"window": "0"}),
    ("/metrics/mfu/iterations", {"limit": "0"}),
    ("/metrics/mfu/iterations", {"limit": "many"}),
    ("/metrics/mfu/iterations", {"limit": "99999999"}),
])
def test_bad_parameters_get_422_saying_what_is_accepted(server, path, params) -> None:
    r = httpx.get(server["base"] + path, params=params, timeout=10)
    assert r.status_code == 422, r.text
    detail = json.dumps(r.json())
    assert "must be an integer in" in detail or "must be a number in" in detail, detail


def test_injected_hook_failure_is_counted_and_engine_keeps_serving(server) -> None:
    report = MFUReport.model_validate(httpx.get(server["base"] + "/metrics/mfu", timeout=10).json())
    assert report.anomalies.counts.get("hook_errors") == 1
    assert report.overall.iterations > FAIL_AT_STEP  # steps after the failure were still recorded
    r = httpx.post(server["base"] + "/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": "still serving?", "max_tokens": 4})
    assert r.status_code == 200
    assert server["log"].read_text().count("InjectedFault") == 1  # logged once


def test_late_standalone_reader_reports_the_same_totals(server, tmp_path) -> None:
    time.sleep(1.0)
    plugin = httpx.get(server["base"] + "/metrics/mfu", timeout=10).json()
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("serving-mfu")), "serve", "--dir",
                                 str(server["publish"]), "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/metrics/mfu", proc, log, timeout_s=60)
        late = httpx.get(base + "/metrics/mfu", timeout=10).json()
        for section in ("prefill", "decode"):
            for key in ("useful_flops", "executed_flops", "tokens", "time_s"):
                assert late[section][key] == pytest.approx(plugin[section][key]), (section, key)
        prom = httpx.get(base + "/metrics", timeout=10).text
        assert "serving_mfu_capacity_flops_total" in prom
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_loadgen_run_against_the_real_server(server) -> None:
    """The load generator's run window, read with min_as_of at both ends (no fixed sleep): completed
    requests and every per-phase token count equal the increase of vLLM's own counters over the run,
    and the run's per-phase MFU lies in (0, HFU] with HFU ≤ 1."""
    from loadgen import LengthSpec, RunConfig, run_benchmark_sync

    base = server["base"]
    before = server_counters(base)
    result = run_benchmark_sync(RunConfig(base_url=base, model="tiny", num_prompts=8, request_rate=8.0,
                                          arrival="poisson", input=LengthSpec(mean=200), output=LengthSpec(mean=16),
                                          max_concurrency=4, quiet=True, seed=3,
                                          warmup_requests=0))  # vLLM's counters would count a warm-up too
    after = server_counters(base)
    delta = {name: after[name] - before[name] for name in SERVER_COUNTERS}
    assert result.failed == 0
    assert result.completed == 8 == delta["vllm:request_success_total"]
    assert result.mfu is not None, result.mfu_error
    m = result.mfu
    assert m.prefill.tokens + m.prefix_cache.hit_tokens == delta["vllm:prompt_tokens_total"]
    assert m.prefix_cache.hit_tokens == delta["vllm:prefix_cache_hits_total"]
    assert m.decode.tokens == delta["vllm:generation_tokens_total"] - result.completed
    assert m.spec_decode.draft_tokens == delta["vllm:spec_decode_num_draft_tokens_total"]
    assert m.spec_decode.accepted_tokens == delta["vllm:spec_decode_num_accepted_tokens_total"]
    assert result.mfu is not None, result.mfu_error
    for phase in (result.mfu.prefill, result.mfu.decode):
        assert 0 < phase.mfu <= phase.hfu <= 1
    assert result.mfu.prefill.tokens > 0 and result.mfu.decode.tokens > 0
    assert result.ttft_s.p50 is not None and result.ttft_s.p50 > 0
    # each request's cost, joined by its X-Request-Id: every one found, tokens as vLLM counted them
    costs = result.request_costs
    assert costs is not None, result.request_costs_error
    assert (costs.joined, costs.missing) == (8, 0)
    assert costs.prompt_tokens == delta["vllm:prompt_tokens_total"]
    assert costs.output_tokens == delta["vllm:generation_tokens_total"]


def test_speed_of_light_and_the_waterfall_on_the_real_engine(server) -> None:
    """DESIGN §11 on the CPU engine: per phase the parts are ≥ 0 and sum to 1, useful = MFU, waste = HFU − MFU
    and its causes sum to the waste FLOPs, sol = useful + waste + memory-bound ≥ HFU; overall
    max(HFU, MBU) ≤ sol ≤ HFU + MBU and, on one engine, idle = 1 − busy/wall."""
    fresh = {"min_as_of": f"{time.time():.6f}", "timeout": "10"}
    report = MFUReport.model_validate(httpx.get(server["base"] + "/metrics/mfu", params=fresh, timeout=20).json())
    assert report.peak.credible is True
    for name in ("prefill", "decode"):
        phase = getattr(report, name)
        w = phase.waterfall
        parts = (w.useful, w.waste, w.memory_bound, w.beyond_roofline)
        assert min(parts) >= 0 and abs(sum(parts) - 1) <= 1e-9, (name, w)
        assert w.useful == pytest.approx(phase.mfu, rel=1e-12)
        assert w.waste == pytest.approx(phase.hfu - phase.mfu, abs=1e-12)
        assert sum(phase.waste_by_cause.values()) == pytest.approx(phase.executed_flops - phase.useful_flops,
                                                                   rel=1e-12, abs=1.0)
        assert phase.sol == pytest.approx(w.useful + w.waste + w.memory_bound, rel=1e-12)
        assert phase.sol >= phase.hfu - 1e-12 and phase.lever is not None
    assert report.decode.waste_by_cause["rejected_drafts"] > 0  # n-gram drafts on this server
    # the tiny model's weights fit in any last-level cache this machine reports: flagged (DESIGN §11)
    from serving_mfu.peaks.cpu import last_level_cache_bytes

    flagged = report.anomalies.counts.get("weights_fit_in_cache")
    assert flagged == (1 if last_level_cache_bytes() is not None else None), report.anomalies.counts
    o = report.overall
    assert max(o.hfu, o.mbu) <= o.sol + 1e-12 and o.sol <= o.hfu + o.mbu + 1e-12
    assert o.waterfall.idle == pytest.approx(1 - o.busy_s / o.wall_s, rel=1e-9)
    assert abs(sum(v for v in o.waterfall.model_dump().values()) - 1) <= 1e-9
