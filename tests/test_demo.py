"""`serving-mfu demo` (the main job, `make demo`) in its short form, end to end on the CPU engine."""

from __future__ import annotations

import json
import signal

import httpx
import pytest

pytestmark = pytest.mark.engine


def test_demo_short(demo_run) -> None:
    out, proc = demo_run
    assert "prefill" in proc.stdout.lower() and "MFU" in proc.stdout
    demo = json.loads((out / "results.json").read_text())
    names = [s["scenario"]["name"] for s in demo["scenarios"]]
    assert names == ["prefill-heavy", "decode-heavy", "mixed", "sampled", "moe"]
    # the peak: calibrated here, cached, found by the engine's default (no setting), below the physical limit
    assert demo["peak_source"].startswith("measured by serving-mfu calibrate") and "(cached in" in demo["peak_source"]
    assert 0 < demo["peak_flops_per_s"] <= demo["isa_flops_per_s"]
    assert "peak used:" in proc.stdout and "ISA peak" in proc.stdout
    for s in demo["scenarios"]:
        r = s["result"]
        assert r["failed"] == 0 and r["completed"] == s["scenario"]["num_prompts"]
        mfu = r["mfu"]
        for phase in ("prefill", "decode"):
            assert 0 < mfu[phase]["mfu"] <= mfu[phase]["hfu"] <= 1, (s["scenario"]["name"], phase, mfu[phase])
        assert mfu["anomalies"]["hfu_over_1_iterations"] == 0 and mfu["peak"]["credible"] is True
    assert "PEAK NOT CREDIBLE" not in proc.stdout
    by_name = {s["scenario"]["name"]: s["result"]["mfu"] for s in demo["scenarios"]}
    assert by_name["decode-heavy"]["spec_decode"]["accepted_tokens"] > 0
    # sampled decoding rejects drafts: acceptance well below 100 %, so decode MFU is visibly below HFU
    sampled = by_name["sampled"]
    assert sampled["spec_decode"]["acceptance_rate"] < 0.95
    assert sampled["decode"]["mfu"] < 0.97 * sampled["decode"]["hfu"]
    # the MoE scenario reports experts per layer
    moe = by_name["moe"]["moe"]
    assert moe and len(moe["active_experts_per_layer"]) > 0 and "experts activated per MoE layer" in proc.stdout
    for png in ("phase_utilization.png", "mfu_timeseries.png"):
        assert (out / png).stat().st_size > 1000
    # the server it started is gone
    log = (out / "server.log").read_text()
    port = next(line.split("127.0.0.1:")[1].split()[0].rstrip("/") for line in proc.stdout.splitlines()
                if line.startswith("server: http://127.0.0.1:"))
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    assert "MFUScheduler" in log or "serving-mfu" in log
    # the sweep and the iteration trace the analysis notebook reads
    summary = json.loads((out / "sweep" / "summary.json").read_text())
    assert [p["load"] for p in summary["points"]] == [1, 4]
    assert (out / "sweep" / "mfu_vs_load.png").exists()
    assert len((out / "trace.jsonl").read_text().splitlines()) > 10


def _interruptible() -> None:
    """In the child: SIGINT back to its default.  A suite started in the background by a shell without job
    control (`make test &`) ignores SIGINT, and a child inherits that: its Ctrl-C would never arrive."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_demo_stops_its_server_when_interrupted(tmp_path) -> None:
    """Ctrl-C while the demo runs its load: exit status 130 and no vLLM server left behind."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from serving_mfu.peaks.calibrate import CALIBRATION_METHOD, cache_path, save_calibration
    from serving_mfu.peaks.resolve import cpu_default_peak

    # a calibration already cached (as after a first `make demo`): the demo goes straight to the server
    env = {**os.environ, "SERVING_MFU_CACHE_DIR": str(tmp_path / "cache")}
    save_calibration(cpu_default_peak("bf16").model_copy(update={"method": CALIBRATION_METHOD}),
                     cache_path("bf16", tmp_path / "cache"))
    proc = subprocess.Popen([str(Path(sys.executable).with_name("serving-mfu")), "demo", "--short", "--out-dir",
                             str(tmp_path / "demo")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, preexec_fn=_interruptible)
    port = None
    deadline = time.time() + 600
    lines = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("server: http://127.0.0.1:"):
            port = line.split("127.0.0.1:")[1].split()[0].rstrip("/")
            break
    assert port, "".join(lines)[-3000:]
    time.sleep(1.0)  # the load is running now
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(lines)[-2000:] + rest[-2000:]
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
