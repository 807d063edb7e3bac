"""Reliability on the real components: concurrent readers through the app, and the snapshot folder's
faults (unwritable, deleted mid-run, full) — the engine side keeps its totals and publishes them all
once the fault clears; the reader's answer names the folder and the error."""

from __future__ import annotations

import errno
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from serving_mfu.cost.records import DecodeBatch, IterationRecord
from serving_mfu.model.spec import ModelSpec
from serving_mfu.peaks.spec import PeakSpec
from serving_mfu.runtime.aggregate import SnapshotReader
from serving_mfu.runtime.publish import LocalFiles, SnapshotWriter
from serving_mfu.runtime.tracker import MFUTracker
from serving_mfu.serve.api import build_app
from tests.test_accounting import LLAMA

PEAK = PeakSpec(device="t", dtype="bf16", flops_per_s=1e12, bandwidth_bytes_per_s=1e11, source="test")


def _tracker(steps: int, start: int = 0, tracker: MFUTracker | None = None) -> MFUTracker:
    tracker = tracker or MFUTracker(ModelSpec.from_hf_config(LLAMA), PEAK)
    now = time.monotonic()
    for step in range(start, start + steps):
        tracker.record(IterationRecord(step=step, t_sched_s=now + step * 0.01, t_end_s=now + step * 0.01 + 0.005,
                                       slices=[], decode=DecodeBatch(req_ids=["a", "b"],
                                                                     computed_before=[50 + step, 70 + step])))
    return tracker


def _writer(tracker: MFUTracker, directory: Path, **kw) -> SnapshotWriter:
    return SnapshotWriter(tracker.snapshot, "e1", tracker.model_report(), tracker.peak_report(), tracker.time_split,
                          directory=directory, interval_s=3600, **kw)


class _Clock:
    """Wall time that moves one second per reading: every poll of the reader adds a point to its ring."""

    def __init__(self, start: float) -> None:
        self.t = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self.t += 1.0
            return self.t


def test_concurrent_reads_through_the_app_never_fail(tmp_path) -> None:
    """Sync handlers run on a thread pool: 16 threads read windows longer than the engine's history (so
    the reader walks its own ring) while other reads append to it."""
    # an engine that started 1,000 s before its oldest history point: windows reaching back past that
    # point, but not past its start, come from the reader's own ring
    t0 = time.time()
    engine_clock = iter([t0] + [t0 + 1000 + i for i in range(1000)]).__next__
    tracker = _tracker(20)
    writer = _writer(tracker, tmp_path, clock=engine_clock)
    for _ in range(60):
        writer.write_now()
    reader = SnapshotReader(tmp_path, clock=_Clock(t0 + 1100), stale_after_s=None)
    client = TestClient(build_app(lambda: reader), raise_server_exceptions=False)
    paths = ["/metrics/mfu?window=600", "/metrics/mfu?window=900", "/metrics/mfu/counters", "/metrics/mfu",
             "/metrics/mfu/iterations?limit=5", "/metrics"]

    def read(i: int) -> int:
        return client.get(paths[i % len(paths)]).status_code

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch every few bytecodes: a walk of the ring gets interrupted
    try:
        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(read, range(1000)))
    finally:
        sys.setswitchinterval(interval)
    writer.close()
    assert set(codes) == {200}, {c: codes.count(c) for c in set(codes)}
    assert len(reader._ring) > 300  # the ring really grew under the readers


def test_folder_under_a_regular_file_is_named_in_the_answer(tmp_path) -> None:
    """ENOTDIR (root cannot bypass it): the engine side goes on counting, the reader's 503 names the folder
    and the error instead of blaming the scheduler setting; once the folder exists every total arrives."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    folder = blocker / "snapshots"
    tracker = _tracker(10)
    writer = _writer(tracker, folder)  # does not raise
    writer.write_now()
    assert writer.write_errors >= 1 and "Not a directory" in writer.last_error
    client = TestClient(build_app(lambda: SnapshotReader(folder)))
    r = client.get("/metrics/mfu")
    assert r.status_code == 503
    detail = r.json()["detail"]
    assert str(folder) in detail and "Not a directory" in detail
    assert "--scheduler-cls" not in detail
    # the fault clears: the cumulative snapshot carries everything counted meanwhile
    blocker.unlink()
    _tracker(5, start=10, tracker=tracker)
    writer.write_now()
    writer.close()
    r = client.get("/metrics/mfu/counters")
    assert r.status_code == 200
    assert r.json()["counters"]["decode_tokens"] == tracker.counters.decode_tokens == 30


def test_folder_deleted_mid_run_is_recreated_with_totals_intact(tmp_path) -> None:
    folder = tmp_path / "snap"
    tracker = _tracker(10)
    writer = _writer(tracker, folder)
    writer.write_now()
    shutil.rmtree(folder)  # a temp-folder cleaner
    _tracker(7, start=10, tracker=tracker)
    writer.write_now()
    writer.close()
    totals = SnapshotReader(folder).totals()
    assert totals is not None and totals.counters.decode_tokens == 34 == tracker.counters.decode_tokens
    assert writer.write_errors == 0  # recreated on the spot, not counted as a lost write


class _FailingFiles(LocalFiles):
    """A filesystem seam whose writes fail with `err` until `healthy` is set (EACCES, ENOSPC)."""

    def __init__(self, err: int) -> None:
        self.err = err
        self.healthy = False
        self.failures = 0

    def write_atomic(self, path: Path, data: bytes) -> None:
        if not self.healthy:
            self.failures += 1
            raise OSError(self.err, f"injected {errno.errorcode[self.err]}", str(path))
        super().write_atomic(path, data)


@pytest.mark.parametrize("err,text", [(errno.EACCES, "EACCES"), (errno.ENOSPC, "ENOSPC")])
def test_write_faults_lose_no_totals_once_cleared(tmp_path, err: int, text: str) -> None:
    files = _FailingFiles(err)
    tracker = _tracker(4)
    writer = _writer(tracker, tmp_path, files=files)
    for start in (4, 8):
        _tracker(4, start=start, tracker=tracker)
        writer.write_now()
    assert files.failures >= 2 and writer.write_errors == files.failures
    assert text in writer.last_error
    assert not list(tmp_path.glob(".*tmp")), "a failed write leaves no temp file behind"
    assert SnapshotReader(tmp_path).totals() is None
    files.healthy = True
    writer.write_now()
    writer.close()
    assert SnapshotReader(tmp_path).totals().counters.decode_tokens == 24 == tracker.counters.decode_tokens


def test_min_as_of_waits_for_data_that_new_and_says_when_there_is_none(tmp_path) -> None:
    """Every answer says how new its data is; asking for data at least as new as a moment (a run's end)
    waits for the engines to publish it, or answers 503 with both times."""
    tracker = _tracker(5)
    writer = SnapshotWriter(tracker.snapshot, "e1", tracker.model_report(), tracker.peak_report(),
                            tracker.time_split, directory=tmp_path, interval_s=0.05)
    client = TestClient(build_app(lambda: SnapshotReader(tmp_path)))
    time.sleep(0.2)
    _tracker(3, start=5, tracker=tracker)  # the run's last steps, finished before `end`
    writer.mark_dirty()
    end = time.time()
    r = client.get("/metrics/mfu/counters", params={"min_as_of": end, "timeout": 5})
    assert r.status_code == 200
    body = r.json()
    assert body["as_of"] >= end and body["age_s"] >= 0
    assert body["counters"]["decode_tokens"] == 16  # all 8 steps of 2 decodes
    report = client.get("/metrics/mfu", params={"min_as_of": end, "timeout": 5}).json()
    assert report["as_of"] >= end and report["decode"]["tokens"] == 16
    writer.close()  # no more publishing: data newer than now never comes
    later = time.time() + 0.5
    time.sleep(0.5)
    r = client.get("/metrics/mfu/counters", params={"min_as_of": later, "timeout": 0.3})
    assert r.status_code == 503 and "older than min_as_of" in r.json()["detail"]
    # beyond the server's clock plus its 1 s skew allowance no data can ever answer: a client error naming
    # the server's time, on both endpoints, whatever the timeout
    for path in ("/metrics/mfu", "/metrics/mfu/counters"):
        asked = time.time() + 3600
        r = client.get(path, params={"min_as_of": asked, "timeout": 0})
        assert r.status_code == 422, r.text
        detail = r.json()["detail"][0]
        assert detail["loc"] == ["query", "min_as_of"]
        server_time = float(detail["msg"].split("server's time is ")[1].split(")")[0])
        assert abs(server_time - time.time()) < 5
    # within the allowance it is "not yet" (503), as before
    r = client.get("/metrics/mfu", params={"min_as_of": time.time() + 0.5, "timeout": 0})
    assert r.status_code == 503 and "older than min_as_of" in r.json()["detail"]
    r = client.get("/metrics/mfu", params={"timeout": 31})
    assert r.status_code == 422 and "timeout" in r.text


def test_soak_keeps_memory_bounded_and_the_reader_exact() -> None:
    """A shortened soak: the reader's totals equal the tracker's at every checkpoint, the snapshot file
    does not grow with the run, and RSS grows by less than a MiB per 10⁴ iterations once warm."""
    from serving_mfu.tools.soak import soak

    points = soak(iterations=30_000, batch=8, checkpoints=(5_000, 15_000), read_every=500, progress=False)
    assert [p.iterations for p in points] == [5_000, 15_000, 30_000]
    assert all(p.reader_matches for p in points)
    assert points[-1].snapshot_bytes <= points[0].snapshot_bytes * 1.1
    assert points[-1].peak_rss_mib - points[1].peak_rss_mib < 1.5
    assert points[-1].publish_ms > 0 and points[-1].publishes >= 1


def test_request_soak_keeps_memory_bounded() -> None:
    """Per-request attribution over many requests of far more tenants than labels: the ledger reuses its
    slots, the labels stop at the budget, the log keeps two segments, the reader a ring, RSS stays flat."""
    from serving_mfu.runtime.accounts import ledger_slots
    from serving_mfu.tools.soak import soak_requests

    points = soak_requests(requests=120_000, checkpoints=(20_000, 60_000), ring=5_000, segment_records=8_000,
                           progress=False)
    assert [p.requests for p in points] == [20_000, 60_000, 120_000]
    assert all(p.reader_matches for p in points)
    assert {p.ledger_slots for p in points} == {ledger_slots(128 + 16)}  # never grew: slots are reused
    assert {p.tenant_labels for p in points} == {21}
    assert {p.reader_ring for p in points} == {5_000}
    assert points[-1].log_bytes <= points[0].log_bytes * 2  # rotated: two segments at most, not 6× the history
    assert points[-1].peak_rss_mib - points[1].peak_rss_mib < 2.0  # warm (ring and segments full): flat


def _dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_an_engine_restart_never_takes_totals_backwards(tmp_path) -> None:
    """Engine e1 dies and comes back as e2 (new pid, counters from zero): the reader keeps e1's last
    totals, adds e2's, says an engine has gone, and a window over the restart counts nothing twice."""
    import json as json_

    a = _tracker(10)
    wa = _writer(a, tmp_path)
    wa.write_now()
    wa.close()
    reader = SnapshotReader(tmp_path)
    before = reader.totals().counters.decode_tokens
    assert before == 20
    path = tmp_path / "engine-e1.json"
    snap = json_.loads(path.read_text())
    snap["pid"] = _dead_pid()  # the engine process is gone; its last file stays behind
    path.write_text(json_.dumps(snap))
    b = _tracker(3)
    wb = SnapshotWriter(b.snapshot, "e2", b.model_report(), b.peak_report(), b.time_split, directory=tmp_path,
                        interval_s=3600)
    wb.write_now()
    wb.close()
    after = reader.totals()
    assert after.engines == 1 and after.counters.decode_tokens == 20 + 6
    report = reader.report()
    assert report.decode.tokens == 26 and report.anomalies.counts.get("engines_gone") == 1
    # a reader that starts after e1 died never saw it: its stale file is left out
    assert SnapshotReader(tmp_path).totals().counters.decode_tokens == 6
    # a foreign or half-written file in the folder is skipped and counted, not fatal
    (tmp_path / "engine-junk.json").write_text('{"format": "serving-mfu-snapshot/1", "engine_id": ')
    assert reader.totals().counters.decode_tokens == 26 and reader.read_errors >= 1


def test_an_engine_that_stops_publishing_is_aged_out(tmp_path) -> None:
    """A live pid whose file has not changed for longer than stale_after_s (a hung engine, or a pid reused
    by another process) is aged out: its last totals kept, an engines_gone anomaly."""
    now = [time.time()]
    tracker = _tracker(4)
    writer = _writer(tracker, tmp_path, clock=lambda: now[0])
    writer.write_now()
    reader = SnapshotReader(tmp_path, clock=lambda: now[0], stale_after_s=60)
    assert reader.totals().engines == 1
    now[0] += 61  # no write for a minute
    assert reader.totals() is None  # no engine left to follow ...
    assert reader.retired_counters().decode_tokens == 8  # ... but its totals are kept
    assert reader.retired_counters().anomalies == {"engines_gone": 1}
    writer.close()
