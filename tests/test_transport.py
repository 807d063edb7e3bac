"""Engine → reader transport: cumulative snapshots survive lost writes, late readers and several engines."""

from __future__ import annotations

import json
import os
import time

import pytest

from serving_mfu.cost.records import IterationRecord, Slice
from serving_mfu.model.spec import ModelSpec
from serving_mfu.peaks.spec import PeakSpec
from serving_mfu.runtime.aggregate import SnapshotReader
from serving_mfu.runtime.publish import SnapshotWriter
from serving_mfu.runtime.tracker import MFUTracker
from tests.test_accounting import LLAMA

PEAK = PeakSpec(device="t", dtype="bf16", flops_per_s=1e12, bandwidth_bytes_per_s=1e11, source="test")


def _engine(tmp_path, engine_id: str, devices: int, steps: int):
    tracker = MFUTracker(ModelSpec.from_hf_config(LLAMA), PEAK, devices=devices)
    now = time.monotonic()
    for step in range(steps):
        tracker.record(IterationRecord(step=step, t_sched_s=now + step * 0.01, t_end_s=now + step * 0.01 + 0.005,
                                       slices=[Slice(req_id="a", new_tokens=1, computed_before=50 + step,
                                                     prompt_len=10, hwm=50 + step)]))
    writer = SnapshotWriter(tracker.snapshot, engine_id, tracker.model_report(), tracker.peak_report(),
                            tracker.time_split, directory=tmp_path, interval_s=0.05)
    writer.write_now()
    return tracker, writer


def test_two_engines_add_up_and_a_late_reader_agrees(tmp_path) -> None:
    t1, w1 = _engine(tmp_path, "e1", devices=1, steps=5)
    t2, w2 = _engine(tmp_path, "e2", devices=2, steps=3)
    try:
        report = SnapshotReader(tmp_path).report()
        assert report.decode.tokens == 8
        assert report.peak.devices == 3
        expected = (t1.counters.decode_useful_flops + t2.counters.decode_useful_flops) / (
            t1.counters.decode_capacity_flops + t2.counters.decode_capacity_flops)
        assert report.decode.mfu == pytest.approx(expected)
        late = SnapshotReader(tmp_path).report()  # a reader started afterwards sees the same totals
        assert late.decode.useful_flops == report.decode.useful_flops
    finally:
        w1.close()
        w2.close()


def test_a_lost_write_loses_no_totals(tmp_path) -> None:
    tracker, writer = _engine(tmp_path, "e1", devices=1, steps=2)
    writer.close()
    for step in range(2, 6):  # these iterations' own writes never happen…
        tracker.record(IterationRecord(step=step, t_sched_s=1e7 + step, t_end_s=1e7 + step + 0.5, slices=[
            Slice(req_id="a", new_tokens=1, computed_before=60 + step, prompt_len=10, hwm=60 + step)]))
    writer.write_now()  # …the next one carries them all
    assert SnapshotReader(tmp_path).report().decode.tokens == 6


def test_dead_and_malformed_engine_files_are_skipped(tmp_path) -> None:
    tracker, writer = _engine(tmp_path, "e1", devices=1, steps=2)
    writer.close()
    data = json.loads(writer.path.read_text())
    data["pid"] = 2 ** 22 + 12345  # no such process
    (tmp_path / "engine-dead.json").write_text(json.dumps(data))
    (tmp_path / "engine-bad.json").write_text("{not json")
    reader = SnapshotReader(tmp_path)
    assert [s.engine_id for s in reader.refresh()] == ["e1"]
    assert reader.read_errors == 1
    assert reader.report().decode.tokens == 2


def test_parent_pid_prefers_own_engines(tmp_path) -> None:
    _, writer = _engine(tmp_path, "e1", devices=1, steps=1)
    writer.close()
    assert SnapshotReader(tmp_path, parent_pid=os.getppid()).refresh()[0].engine_id == "e1"


def test_totals_difference_is_the_interval(tmp_path) -> None:
    tracker, writer = _engine(tmp_path, "e1", devices=1, steps=3)
    reader = SnapshotReader(tmp_path)
    start = reader.totals()
    base = time.monotonic() + 10  # after the engine's earlier steps
    for step in range(3, 7):
        tracker.record(IterationRecord(step=step, t_sched_s=base + step, t_end_s=base + step + 0.2, slices=[
            Slice(req_id="a", new_tokens=1, computed_before=60 + step, prompt_len=10, hwm=60 + step)]))
    time.sleep(0.01)
    writer.write_now()
    interval = reader.totals().report_since(start)
    assert interval.decode.tokens == 4
    assert interval.decode.time_s == pytest.approx(4 * 0.2)
    writer.close()


def test_bad_window_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="window must be"):
        SnapshotReader(tmp_path).report(window_s=0)
