"""Speed of light and the loss waterfall (DESIGN §11): the closed forms on hand-made numbers, and the
report's invariants on a tracker's real costing."""

from __future__ import annotations

import random

import msgspec
import pytest

from serving_mfu.cost.roofline import roofline_parts
from serving_mfu.model.spec import ModelSpec
from serving_mfu.peaks.table import lookup_peak
from serving_mfu.runtime.tracker import MFUTracker
from serving_mfu.tools.bench import synthetic_iteration
from serving_mfu.tools.public_configs import PUBLIC_CONFIGS


def test_a_memory_bound_step_by_hand() -> None:
    # 1 TFLOP/s and 100 GB/s; a decode-only step of 0.2 TFLOP and 30 GB in 0.5 s:
    # compute 0.2 s, roofline max(0.2, 0.3) = 0.3 s, so 0.1 s memory-bound and 0.2 s beyond the roofline
    p = roofline_parts(0.5, 0.0, 0.5, 0.0, 0.2e12, 30e9, 1e12, 100e9)
    assert p.busy_sol_s == pytest.approx(0.3) and p.busy_memory_bound_s == pytest.approx(0.1)
    assert p.busy_beyond_roofline_s == pytest.approx(0.2)
    assert (p.decode_sol_s, p.decode_memory_bound_s, p.decode_beyond_roofline_s) == pytest.approx((0.3, 0.1, 0.2))
    assert (p.prefill_sol_s, p.prefill_memory_bound_s, p.prefill_beyond_roofline_s) == (0.0, 0.0, 0.0)


def test_a_mixed_step_splits_the_rest_in_the_steps_own_ratio() -> None:
    # prefill 0.6 TFLOP in its 0.7 s, decode 0.1 TFLOP in its 0.3 s, 50 GB: compute 0.7 s, roofline 0.7 s
    # (compute-bound): nothing is memory-bound, so decode's 0.2 s beyond compute is all beyond the roofline
    p = roofline_parts(1.0, 0.7, 0.3, 0.6e12, 0.1e12, 50e9, 1e12, 100e9)
    assert p.busy_sol_s == pytest.approx(0.7) and p.busy_memory_bound_s == pytest.approx(0.0)
    assert p.decode_memory_bound_s == pytest.approx(0.0) and p.decode_beyond_roofline_s == pytest.approx(0.2)
    assert p.prefill_sol_s + p.decode_sol_s == pytest.approx(p.busy_sol_s)
    # a memory-bound mixed step (100 GB: roofline 1.0 s, 0.3 s memory-bound of the 0.3 s beyond compute)
    q = roofline_parts(1.0, 0.7, 0.3, 0.6e12, 0.1e12, 100e9, 1e12, 100e9)
    assert q.busy_memory_bound_s == pytest.approx(0.3) and q.busy_beyond_roofline_s == pytest.approx(0.0)
    assert q.prefill_memory_bound_s == pytest.approx(0.1) and q.decode_memory_bound_s == pytest.approx(0.2)


def test_faster_than_the_roofline_is_negative_not_clamped() -> None:
    p = roofline_parts(0.2, 0.0, 0.2, 0.0, 0.1e12, 30e9, 1e12, 100e9)  # roofline 0.3 s, ran in 0.2 s
    assert p.busy_beyond_roofline_s == pytest.approx(-0.1) and p.decode_beyond_roofline_s == pytest.approx(-0.1)
    assert roofline_parts(0.2, 0.0, 0.2, 0.0, 0.1e12, 30e9, 1e12, None).busy_sol_s == 0.0  # no bandwidth: none


@pytest.fixture(scope="module")
def report():
    rng = random.Random(0)
    tracker = MFUTracker(ModelSpec.from_hf_config(PUBLIC_CONFIGS["qwen3-30b-a3b"]), lookup_peak("h100-sxm", "bf16"),
                         devices=2, clock=None)
    for i in range(40):  # mixed prefill + decode steps with drafts, and idle gaps between steps
        rec = synthetic_iteration(i, 16 if i % 3 else 256, rng)
        tracker.record(msgspec.structs.replace(rec, step=i, t_sched_s=i * 0.05, t_end_s=i * 0.05 + 0.02 + 0.01 * (i % 2)))
    return tracker.report()


def test_the_waterfall_adds_up_and_matches_mfu_hfu(report) -> None:
    assert report.peak.credible is True
    for name in ("prefill", "decode"):
        phase = getattr(report, name)
        w = phase.waterfall
        parts = (w.useful, w.waste, w.memory_bound, w.beyond_roofline)
        assert min(parts) >= 0 and sum(parts) == pytest.approx(1, abs=1e-9), (name, w)
        assert w.useful == pytest.approx(phase.mfu, rel=1e-12)
        assert w.waste == pytest.approx(phase.hfu - phase.mfu, abs=1e-12)
        assert sum(phase.waste_by_cause.values()) == pytest.approx(phase.executed_flops - phase.useful_flops,
                                                                   rel=1e-12, abs=1.0)
        assert phase.sol == pytest.approx(w.useful + w.waste + w.memory_bound, rel=1e-12) and phase.sol >= phase.hfu
    o = report.overall
    assert max(o.hfu, o.mbu) <= o.sol + 1e-12 and o.sol <= o.hfu + o.mbu + 1e-12
    w = o.waterfall
    assert sum((w.useful, w.waste, w.memory_bound, w.beyond_roofline, w.idle)) == pytest.approx(1, abs=1e-9)
    assert w.idle == pytest.approx(1 - o.busy_s / o.wall_s, rel=1e-12) and w.idle > 0
    assert report.decode.waste_by_cause["rejected_drafts"] > 0  # a third of the decodes verify drafts
    assert o.lever is not None and o.lever.part in ("waste", "memory_bound", "beyond_roofline", "idle")


def test_mbu_over_1_turns_the_verdict() -> None:
    """A bandwidth below what the engine moved is not an upper bound: said loudly, never clamped."""
    from serving_mfu.peaks.spec import PeakSpec

    tracker = MFUTracker(ModelSpec.from_hf_config(PUBLIC_CONFIGS["llama-3-70b"]),
                         PeakSpec(device="t", dtype="bf16", flops_per_s=1e18, bandwidth_bytes_per_s=1e6, source="test"),
                         clock=None)
    tracker.record(synthetic_iteration(0, 16, random.Random(1)))
    report = tracker.report()
    assert report.decode.mbu > 1 and report.peak.credible is False
    assert "MBU" in report.peak.verdict and "calibrate" in report.peak.fix
    assert report.overall.sol > 1 and report.overall.waterfall.beyond_roofline < 0


def test_explain_replays_a_trace_into_the_waterfall(tmp_path) -> None:
    """`serving-mfu explain --trace`: the table, the causes, one lever sentence per phase, the PNG, and
    --json parts that sum to 1."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from serving_mfu.runtime.trace import TraceHeader, TraceWriter

    peak = lookup_peak("h100-sxm", "bf16")
    trace = tmp_path / "trace.jsonl"
    rng = random.Random(2)
    with TraceWriter(trace, TraceHeader(hf_config=PUBLIC_CONFIGS["llama-3-70b"], peak=peak, devices=8)) as w:
        for i in range(12):
            rec = synthetic_iteration(i, 16, rng)
            w.write(msgspec.structs.replace(rec, step=i, t_sched_s=i * 0.05, t_end_s=i * 0.05 + 0.03))
    exe = str(Path(sys.executable).with_name("serving-mfu"))
    png = tmp_path / "waterfall.png"
    out = subprocess.run([exe, "explain", "--trace", str(trace), "--png", str(png)], capture_output=True, text=True,
                         timeout=120, env={"COLUMNS": "140", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    for text in ("memory-bound", "beyond roofline", "rejected drafts", "prefill:", "decode:", "overall:"):
        assert text in out.stdout, (text, out.stdout)
    assert png.stat().st_size > 5000
    got = json.loads(subprocess.run([exe, "explain", "--trace", str(trace), "--json"], capture_output=True,
                                    text=True, timeout=120, check=True).stdout)
    for scope in ("prefill", "decode", "overall"):
        parts = [v for v in got[scope]["waterfall"].values() if v is not None]
        assert abs(sum(parts) - 1) < 1e-9 and got[scope]["lever"]["text"], scope
    bad = subprocess.run([exe, "explain"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "exactly one of --url" in bad.stderr


def test_a_cpu_model_whose_weights_fit_in_the_cache_is_flagged() -> None:
    from types import SimpleNamespace

    from scheduler_hooks.hook import _flag_weights_in_cache
    from serving_mfu.peaks.spec import PeakSpec
    from tests.test_accounting import LLAMA

    cpu = PeakSpec(device="cpu", dtype="bf16", flops_per_s=1e12, bandwidth_bytes_per_s=2e10, source="ISA peak of t",
                   isa_flops_per_s=1e12)
    spec = ModelSpec.from_hf_config(LLAMA)
    for cache, peak, flagged in ((1 << 40, cpu, True), (1 << 10, cpu, False), (None, cpu, False),
                                 (1 << 40, lookup_peak("h100-sxm", "bf16"), False)):  # a GPU's HBM is the memory
        tracker = MFUTracker(spec, peak)
        _flag_weights_in_cache(tracker, SimpleNamespace(peak=peak), cache_bytes=lambda: cache)
        assert (tracker.counters.anomalies.get("weights_fit_in_cache") == 1) is flagged, (cache, peak.device)


def test_the_full_demo_runs_models_where_the_cpu_is_the_bottleneck() -> None:
    """`make demo` uses 100–200 M-parameter models (prefill compute-bound, decode memory-bound on a CPU);
    `--short`, the suite's form, keeps the tiny ones."""
    from serving_mfu.cost.bytes import ByteModel
    from serving_mfu.tools.demo import DEMO_MODELS
    from serving_mfu.tools.engine_models import ENGINE_CONFIGS

    for name in DEMO_MODELS[False]:
        bm = ByteModel(ModelSpec.from_hf_config({**ENGINE_CONFIGS[name], "_name_or_path": name}))
        params = bm.weight_bytes(True, True, [float(e) for e, _ in bm.moe_shape]) / 2  # bf16
        assert 100e6 <= params <= 200e6, (name, params)
    assert DEMO_MODELS[True] == ("tiny-llama-engine", "tiny-qwen3-moe-engine")
