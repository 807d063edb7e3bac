"""The peak credibility verdict: HFU > 1 turns it, on the report, in Prometheus, and in the words of each fix."""

from __future__ import annotations

import pytest

from serving_mfu.cost.counters import Counters
from serving_mfu.peaks.spec import PeakSpec
from serving_mfu.runtime.tracker import MFUTracker
from serving_mfu.schema.verdict import TOLERATED_SHARE, fix_for, peak_verdict
from tests.test_prometheus import FakeReader, _snapshot, _spec, _steps, scrape


def _peak(flops: float, source: str) -> PeakSpec:
    return PeakSpec(device="cpu (test)", dtype="bf16", flops_per_s=flops, bandwidth_bytes_per_s=1e12, source=source)


def _tracked(flops: float, source: str = "measured by serving-mfu calibrate on test") -> MFUTracker:
    tracker = MFUTracker(_spec("tiny-llama"), _peak(flops, source), devices=1, clock=None)
    for rec in _steps(offset=0.0):
        tracker.record(rec)
    return tracker


def test_a_peak_far_above_the_work_is_credible():
    report = _tracked(1e15).report()
    assert report.overall.hfu < 1 and report.peak.credible is True and report.peak.verdict is None


def test_a_peak_below_the_work_is_not_credible_and_never_clamped():
    report = _tracked(1e6).report()  # the tiny model's steps do ~1e7-1e8 FLOPs in 0.2-1 ms
    assert report.overall.hfu > 1 and report.prefill.hfu > 1  # shown as is
    assert report.peak.credible is False
    assert "prefill HFU" in report.peak.verdict and "not an upper bound" in report.peak.verdict
    assert "serving-mfu calibrate --dtype bf16" in report.peak.fix
    assert report.anomalies.hfu_over_1_iterations == report.overall.iterations


def test_the_share_of_iterations_over_1_alone_turns_the_verdict():
    c = Counters(iterations=100, prefill_executed_flops=1.0, prefill_capacity_flops=10.0, busy_capacity_flops=10.0)
    c.hfu_over_1_iterations = int(100 * TOLERATED_SHARE)  # at the tolerance: one jittery step is not a verdict
    assert peak_verdict(c, 1e12).credible is True
    c.hfu_over_1_iterations += 1
    v = peak_verdict(c, 1e12, "ISA peak of x", "bf16")
    assert v.credible is False and "2 of 100 iterations (2.0%)" in v.reason
    assert "FLOP model over-counts" in v.fix


def test_no_peak_is_neither_credible_nor_not():
    v = peak_verdict(Counters(), None)
    assert v.credible is None and "SERVING_MFU_PEAK_FLOPS" in v.fix


@pytest.mark.parametrize("source, words", [
    ("measured by serving-mfu calibrate on cpu", "re-run `serving-mfu calibrate --dtype fp16`"),
    ("ISA peak of AMD EPYC", "physical limit"),
    ("override", "raise SERVING_MFU_PEAK_FLOPS"),
    ("NVIDIA H100 Tensor Core GPU datasheet", "SERVING_MFU_DEVICE"),
])
def test_each_source_gets_its_own_fix(source, words):
    assert words in fix_for(source, "fp16")


def test_prometheus_exposes_the_verdict_per_engine():
    good, bad = _tracked(1e15), _tracked(1e6)
    samples = scrape(FakeReader([_snapshot(good, "1-0", 1), _snapshot(bad, "2-0", 2)]))
    credible = {dict(k[1])["engine"]: v for k, v in samples.items() if k[0] == "serving_mfu_peak_credible"}
    assert credible == {"1-0": 1.0, "2-0": 0.0}
