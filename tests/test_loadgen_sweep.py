"""Sweeps write a file per point, a summary and PNG plots; bench-client runs and reports numbers."""

from __future__ import annotations

import json

import pytest

from loadgen import RunConfig, SweepSummary, run_sweep
from loadgen.cli import main
from loadgen.stub import StubConfig
from loadgen.stub_server import StubThread

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def stub():
    with StubThread(StubConfig(ttft_s=0.01, tokens_per_s=500, fake_mfu=True)) as s:
        yield s


async def test_rate_sweep_writes_points_summary_and_plots(stub, tmp_path):
    base = RunConfig(base_url=stub.url, num_prompts=6, output={"mean": 3}, mfu_fresh_timeout_s=1, quiet=True,
                     requests_out="yes")
    summary, results = await run_sweep(base, "request_rate", [50, 100.5], tmp_path)
    assert [p.load for p in summary.points] == [50, 100.5]
    for name in ("point-50.json", "point-100.5.json", "point-50-requests.jsonl", "summary.json"):
        assert (tmp_path / name).exists(), name
    point = json.loads((tmp_path / "point-100.5.json").read_text())
    assert point["config"]["request_rate"] == 100.5 and point["completed"] == 6
    assert point["mfu"]["prefill"]["tokens"] == 6 * 128
    saved = SweepSummary.model_validate_json((tmp_path / "summary.json").read_text())
    assert saved.points[0].utilization["prefill_mfu"] is not None
    for png in ("mfu_vs_load.png", "latency_vs_load.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG


def test_concurrency_sweep_from_the_cli(stub, tmp_path, capsys):
    out = tmp_path / "sw"
    rc = main(["sweep", "--base-url", stub.url, "--concurrencies", "1,3", "--num-prompts", "6",
               "--output-len", "2", "--out-dir", str(out), "--no-mfu", "--quiet"])
    assert rc == 0
    summary = SweepSummary.model_validate_json((out / "summary.json").read_text())
    assert summary.mode == "concurrency" and [p.completed for p in summary.points] == [6, 6]
    assert json.loads((out / "point-3.json").read_text())["config"]["arrival"] == "closed"
    assert (out / "mfu_vs_load.png").read_bytes()[:8] == PNG  # drawn even without MFU (says so)
    assert "sweep over concurrency" in capsys.readouterr().out


@pytest.mark.parametrize("stub_mode", ["thread", "subprocess"])
def test_bench_client_reports_rates_and_lateness(stub_mode, capsys):
    rc = main(["bench-client", "--rates", "100,200", "--duration-s", "0.5", "--stub", stub_mode, "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["stub"] == stub_mode and len(res["points"]) == 2
    for p, rate in zip(res["points"], (100, 200)):
        assert p["requested_rate"] == rate and p["failed"] == 0
        assert p["achieved_rate"] == pytest.approx(rate, rel=0.2)  # short runs on a shared machine
        assert p["lateness_p50_s"] < 0.02 and p["cpu_s_per_request"] > 0
