"""Engine → reader transport: each engine publishes cumulative snapshots; readers add them up.

An engine process (one per data-parallel rank) writes `engine-<pid>-<rank>.json` into a
private folder (ours, mode 0700; a folder another user owns or may write to is refused: DESIGN §10),
atomically (a fresh exclusive temporary renamed over it), from a background thread at most every
`interval_s`: its cumulative counters, one cumulative point per second for the last
`history_s` seconds, and its recent iterations.  Because every snapshot is cumulative, a
dropped or late write loses no totals, and a reader that starts late or restarts reads the
same totals.  The engine thread only marks the tracker dirty; it never waits on I/O.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import msgspec
from pydantic import BaseModel, Field

from serving_mfu.files import FolderRefused, ForeignFile, folder_refusal, private_folder, read_own, write_atomic
from serving_mfu.runtime.counters import Counters
from serving_mfu.runtime.gpu_util import aggregate_status
from serving_mfu.runtime.report import GpuUtilStatus, MFUReport, ModelReport, PeakReport, build_report
from serving_mfu.runtime.settings import load_settings
from serving_mfu.runtime.tracker import COST_ADAPTER

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = "serving-mfu-snapshot/1"


FOLDER_FIX = ("Fix: set SERVING_MFU_DIR to a folder of your own with mode 0700 (the same for the engines and the "
              "API server), or make this one yours: chown {user} {folder} && chmod 700 {folder}.")


def default_dir() -> Path:
    """Where engines publish: SERVING_MFU_DIR (Settings.dir), else a per-user folder under the temp dir."""
    return load_settings()[0].snapshot_dir()


class EngineSnapshot(BaseModel):
    """One engine's published state (the file's content)."""

    format: str = SNAPSHOT_FORMAT
    engine_id: str
    pid: int
    ppid: int
    started_at: float = Field(description="wall-clock seconds")
    updated_at: float = Field(description="wall-clock seconds")
    as_of: float | None = Field(default=None, description="wall-clock seconds: every step the engine finished "
                                "before then is in these counters (null: a writer that predates it; use updated_at)")
    model: ModelReport
    peak: PeakReport
    time_split: str
    kv_role: str = Field(default="none", description="the engine's KV-connector role: producer, consumer, both "
                         "or none")
    kv_connector: str | None = Field(default=None, description="the KV connector's class name (null: none)")
    counters: dict[str, Any]
    history: list[tuple[float, dict[str, Any]]] = Field(default_factory=list,
                                                         description="(wall time, cumulative counters)")
    recent: list[dict[str, Any]] = Field(default_factory=list)
    gpu: GpuUtilStatus | None = Field(default=None, description="the engine's GPU sampler (null: none reported); "
                                      "its sums are in the counters (gpu_*)")

    def peak_total_flops(self) -> float:
        return (self.peak.flops_per_s or 0.0) * self.peak.devices


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Totals(BaseModel):
    """Cumulative counters over all engines at one moment: subtract two to report any interval."""

    at: float = Field(description="wall-clock seconds when read")
    updated_at: float = Field(description="oldest engine snapshot time among those added up")
    as_of: float | None = Field(default=None, description="wall-clock seconds: every step any engine finished "
                                "before then is counted (the oldest engine's); null from servers that predate it")
    age_s: float | None = Field(default=None, description="at − as_of: how old the newest complete data is")
    engines: int
    counters: dict[str, Any]
    peak: PeakReport
    model: ModelReport
    time_split: str
    gpu: GpuUtilStatus | None = Field(default=None, description="the engines' GPU sampling (null: not reported)")
    kv_roles: list[str] = Field(default_factory=list, description="the engines' KV-connector roles")

    def report_since(self, earlier: "Totals") -> MFUReport:
        """The report of what happened between `earlier` and this reading (e.g. one benchmark run)."""
        diff = Counters.from_dict(self.counters) - Counters.from_dict(earlier.counters)
        span = max(self.updated_at - earlier.updated_at, 0.0)
        cap = (self.peak.flops_per_s or 0.0) * self.peak.devices * span
        return build_report(diff, self.peak, self.model, self.time_split, window_s=span, wall_s=span,
                            wall_capacity_flops=cap, gpu=self.gpu, kv_roles=self.kv_roles)


class LocalFiles:
    """The writer's file system (a seam: tests inject EACCES or ENOSPC, which root cannot provoke)."""

    def private_folder(self, path: Path) -> Path:
        return private_folder(path, "snapshot folder", FOLDER_FIX)

    def write_atomic(self, path: Path, data: bytes) -> None:
        write_atomic(path, data, mode=0o600)


class SnapshotWriter:
    """Publishes a tracker's state from a daemon thread (engine side)."""

    def __init__(self, source: Callable[[], tuple[Counters, list[dict[str, Any]]]], engine_id: str,
                 model: ModelReport, peak: PeakReport, time_split: str, directory: str | Path | None = None,
                 interval_s: float = 0.5, history_s: int = 60,
                 gpu_status: Callable[[], GpuUtilStatus | None] | None = None,
                 before_write: Callable[[], None] | None = None, clock: Callable[[], float] = time.time,
                 files: "LocalFiles | None" = None, kv_role: str = "none", kv_connector: str | None = None):
        self.source = source
        self.clock = clock  # wall seconds: started_at, updated_at and the history points
        self.before_write = before_write  # e.g. wait for the engine's pending steps to be accounted
        self.gpu_status = gpu_status  # the engine's GPU sampler status, published with every snapshot
        self.files = files or LocalFiles()
        self.dir = Path(directory) if directory else default_dir()
        self.engine_id = engine_id
        self.path = self.dir / f"engine-{engine_id}.json"
        self.interval_s = interval_s
        self._static = dict(engine_id=engine_id, pid=os.getpid(), ppid=os.getppid(), started_at=clock(),
                            model=model, peak=peak, time_split=time_split, kv_role=kv_role,
                            kv_connector=kv_connector)
        # history points and iteration costs never change once made: each is serialized once
        self._history: deque[tuple[float, bytes]] = deque(maxlen=history_s)
        self._cost_json: dict[int, tuple[Any, str]] = {}
        self._dirty = threading.Event()
        self._write_lock = threading.Lock()  # the publisher thread and close()/write_now() callers
        self._stop = threading.Event()
        self.write_errors = 0
        self._logged: set[str] = set()
        self.last_error: str | None = None  # the latest failed write, "<folder>: <error>" (None once one succeeds)
        self._thread = threading.Thread(target=self._run, name="serving-mfu-writer", daemon=True)
        self._thread.start()

    def mark_dirty(self) -> None:
        self._dirty.set()

    def _run(self) -> None:
        self.write_now()  # readers see the engine (and its model and peak) before any request
        while not self._stop.is_set():
            self._stop.wait(self.interval_s)
            if self._dirty.is_set() or not self._history or self.clock() - self._history[-1][0] >= 1.0:
                self._dirty.clear()
                self.write_now()

    def write_now(self) -> None:
        """Write the snapshot file atomically; failures are counted and logged once."""
        with self._write_lock:
            self._write()

    def _write(self) -> None:
        try:
            as_of = self.clock()  # before the flush: every step handed over by now is accounted below
            if self.before_write is not None:
                self.before_write()
            counters, recent = self.source()
            now = self.clock()
            counters_json = msgspec.json.encode(counters.to_dict())
            if not self._history or now - self._history[-1][0] >= 1.0:
                self._history.append((now, counters_json))
            gpu = self.gpu_status() if self.gpu_status is not None else None
            head = EngineSnapshot(**self._static, updated_at=now, as_of=as_of, counters={}, gpu=gpu).model_dump(
                mode="json", exclude={"counters", "history", "recent"})
            # pieces serialized once before (history points, iteration costs) go in as raw JSON
            text = msgspec.json.encode({**head, "counters": msgspec.Raw(counters_json),
                                        "history": [(t, msgspec.Raw(js)) for t, js in self._history],
                                        "recent": [msgspec.Raw(js) for js in self._recent_json(recent)]})
            self._publish(text)
            self.last_error = None
        except Exception as exc:  # never let publishing hurt the engine: the next write carries every total
            self.write_errors += 1
            self.last_error = f"{self.dir}: {exc}"
            kind = type(exc).__name__
            if kind not in self._logged:  # once per kind of error: a refused folder after a full disk is news
                self._logged.add(kind)
                log.log(logging.ERROR if isinstance(exc, FolderRefused) else logging.WARNING,
                        "serving-mfu: cannot publish %s: %s (further errors are counted; totals are kept and "
                        "published once a write succeeds)", self.path, exc)

    def _publish(self, text: bytes) -> None:
        """Into a private folder (made 0700 if missing, e.g. after a temp-folder cleaner; refused if another
        user owns it or may write to it), as a fresh exclusive temporary renamed over the file."""
        self.files.private_folder(self.dir)
        self.files.write_atomic(self.path, text)

    def _recent_json(self, recent: list) -> list[str]:
        """JSON of each recent iteration (dicts as given; IterationCost objects serialized once)."""

        out, cache = [], {}
        for item in recent:
            if isinstance(item, dict):
                out.append(json.dumps(item))
                continue
            hit = self._cost_json.get(id(item))
            js = hit[1] if hit is not None and hit[0] is item else COST_ADAPTER.dump_json(item).decode()
            cache[id(item)] = (item, js)
            out.append(js)
        self._cost_json = cache
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.write_now()


class SnapshotReader:
    """Reads and aggregates the engines' snapshots (API server, `serving-mfu serve`, in-process monitor).

    `parent_pid` prefers engines whose parent is that process (the API server or the
    `vllm.LLM` user); if none is, or without it, every live engine in the folder is read.  The reader keeps
    its own ring of aggregated cumulative points so windows longer than the engines'
    history become exact once it has run that long.
    """

    def __init__(self, directory: str | Path | None = None, parent_pid: int | None = None,
                 max_window_s: float = 3600.0, clock: Callable[[], float] = time.time,
                 stale_after_s: float | None = 120.0):
        self.dir = Path(directory) if directory else default_dir()
        self.parent_pid = parent_pid
        self.max_window_s = max_window_s
        self.clock = clock  # wall seconds, as the engines' snapshots carry
        # a live engine publishes at least once a second, idle or not: a file this old belongs to a hung
        # engine or to a pid reused by another process, and is aged out (None: never)
        self.stale_after_s = stale_after_s
        self._ring: deque[tuple[float, Counters]] = deque()
        # the endpoints are sync handlers, run on a thread pool: the ring is appended to by one request
        # while another walks it (a window longer than the engines' history)
        self._ring_lock = threading.RLock()
        self._followed: dict[str, int] = {}  # engine id → the pid publishing it, while alive
        self._last: dict[str, EngineSnapshot] = {}
        self._retired: dict[str, Counters] = {}  # engines gone: their last counters, kept in the totals
        self.read_errors = 0
        self.refused: str | None = None  # why the folder is not trusted (folder_refusal), as of the last read
        self.foreign_files: set[str] = set()  # snapshot names ever skipped as links or other users' files

    def snapshots(self) -> list[EngineSnapshot]:
        """Current snapshots of the live engines this reader follows.

        An engine this reader saw alive whose process is gone (it stopped or restarted under a new pid)
        is retired: its last counters stay in the totals (`retired_counters`), so aggregated totals
        never go backwards and nothing is counted twice — a restarted engine starts from zero under a
        new id.  Files of engines that were dead before this reader saw them are left out.
        """
        live = []
        refusal = folder_refusal(self.dir, "snapshot folder", FOLDER_FIX)
        if refusal is not None:  # nothing in it is trusted, and nothing followed is retired for it
            if refusal != self.refused:
                log.error("serving-mfu: %s", refusal)
            self.refused = refusal
            return live
        self.refused = None
        if not self.dir.is_dir():
            return live
        for path in sorted(self.dir.glob("engine-*.json")):
            try:
                snap = EngineSnapshot.model_validate_json(read_own(path))
            except ForeignFile as exc:  # a link or another user's file: never added to the totals
                if path.name not in self.foreign_files:
                    self.foreign_files.add(path.name)
                    log.warning("serving-mfu: ignoring %s (anomaly foreign_files)", exc)
                continue
            except (OSError, ValueError) as exc:  # half-written by an old writer, or gone meanwhile
                self.read_errors += 1
                log.debug("serving-mfu: skipping unreadable %s: %s", path, exc)
                continue
            stale = self.stale_after_s is not None and self.clock() - snap.updated_at > self.stale_after_s
            if _pid_alive(snap.pid) and not stale:
                live.append(snap)
            elif self._followed.get(snap.engine_id) == snap.pid:  # the very process we followed is gone
                self._retire(snap, "stopped publishing" if stale else "exited")
        own = [s for s in live if s.ppid == self.parent_pid] if self.parent_pid is not None else []
        followed = own or live
        with self._ring_lock:
            for s in followed:
                self._followed[s.engine_id] = s.pid
            for engine_id in [e for e in self._followed if e not in {s.engine_id for s in followed}]:
                if engine_id not in self._retired:  # its file went away with it: keep what we last read
                    last = self._last.get(engine_id)
                    if last is not None:
                        self._retire(last, "left the folder")
            self._last.update((s.engine_id, s) for s in followed)
        return followed

    def _retire(self, snap: EngineSnapshot, why: str = "exited") -> None:
        if snap.engine_id in self._retired:
            return
        self._retired[snap.engine_id] = Counters.from_dict(snap.counters)
        self._followed.pop(snap.engine_id, None)
        self._last.pop(snap.engine_id, None)
        log.warning("serving-mfu: engine %s (pid %d) %s; its totals up to %.0f are kept (anomaly engines_gone)",
                    snap.engine_id, snap.pid, why, snap.updated_at)

    def retired_counters(self) -> Counters:
        """The summed last counters of engines this reader followed that have gone, with an
        `engines_gone` anomaly per engine, and a `foreign_files` anomaly per snapshot name this reader has
        skipped as a link or another user's file (both only grow, as Prometheus counters must)."""
        total = Counters()
        for c in list(self._retired.values()):
            total = total + c
        if self._retired:
            total.count_anomaly("engines_gone", len(self._retired))
        if self.foreign_files:
            total.count_anomaly("foreign_files", len(self.foreign_files))
        return total

    def folder_problem(self) -> str | None:
        """Why no engine could have published here, if the folder says so: refused (another user owns it or
        may write to it), missing, not a folder, or not writable (probed with an exclusive temporary, as the
        engines write; root passes permission bits but not these)."""
        refusal = folder_refusal(self.dir, "snapshot folder", FOLDER_FIX)
        if refusal is not None:
            return refusal
        try:
            mode = os.stat(self.dir).st_mode
        except OSError as exc:
            return f"the snapshot folder {self.dir} cannot be used: {exc.strerror} ({errno.errorcode.get(exc.errno, exc.errno)})"
        if not stat.S_ISDIR(mode):
            return f"the snapshot folder {self.dir} is not a directory"
        try:
            fd, probe = tempfile.mkstemp(dir=self.dir, prefix=".probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            return f"the snapshot folder {self.dir} is not writable: {exc}"
        return None

    @staticmethod
    def _at(snap: EngineSnapshot, t: float) -> Counters | None:
        """An engine's cumulative counters at wall time t from its history (None if unknown)."""
        if t >= snap.updated_at:
            return Counters.from_dict(snap.counters)
        if t < snap.started_at:
            return Counters()
        best = None
        for ts, data in snap.history:
            if ts <= t:
                best = data
            else:
                break
        return Counters.from_dict(best) if best is not None else None

    def _poll(self, snaps: list[EngineSnapshot], now: float) -> Counters:
        total = self.retired_counters()
        for s in snaps:
            total = total + Counters.from_dict(s.counters)
        with self._ring_lock:
            if not self._ring or now - self._ring[-1][0] >= 1.0:
                self._ring.append((now, total))
            while self._ring and now - self._ring[0][0] > self.max_window_s + 5:
                self._ring.popleft()
        return total

    def _baseline(self, snaps: list[EngineSnapshot], t: float) -> tuple[Counters, float] | None:
        """Aggregated counters at time t: from the engines' histories, else from the reader's ring (always
        once an engine has gone: its history went with it)."""
        parts = [self._at(s, t) for s in snaps]
        if not self._retired and all(p is not None for p in parts):
            total = Counters()
            for p in parts:
                total = total + p
            return total, t
        best = None
        with self._ring_lock:
            for ts, counters in self._ring:
                if ts > t:
                    break
                best = (counters, ts)
        return best

    def report(self, window_s: float | None = None) -> MFUReport | None:
        """Aggregated report since start or over the last `window_s` seconds; None if no engine."""
        if window_s is not None and not (0 < window_s <= self.max_window_s):
            raise ValueError(f"window must be in (0, {self.max_window_s:g}] seconds, got {window_s:g}")
        snaps = self.snapshots()
        if not snaps:
            return None
        now = self.clock()
        total = self._poll(snaps, now)
        peak = aggregate_peak(snaps)
        model = snaps[0].model
        split = snaps[0].time_split
        gpu = aggregate_status([s.gpu for s in snaps])
        roles = [s.kv_role for s in snaps]
        fresh = {"as_of": data_as_of(snaps)}
        fresh["age_s"] = max(now - fresh["as_of"], 0.0)
        if window_s is None:
            return build_report(total, peak, model, split, gpu=gpu, kv_roles=roles).model_copy(update=fresh)
        base = self._baseline(snaps, now - window_s)
        if base is None:  # neither history nor ring reaches back: use the oldest point known
            oldest = min((s.history[0][0] for s in snaps if s.history), default=now)
            base = self._baseline(snaps, oldest) or (Counters(), min(s.started_at for s in snaps))
        counters, t0 = base
        covered = max(now - t0, 0.0)
        capacity = sum(s.peak_total_flops() for s in snaps) * covered
        return build_report(total - counters, peak, model, split, window_s=covered,
                            wall_s=covered, wall_capacity_flops=capacity, gpu=gpu,
                            kv_roles=roles).model_copy(update=fresh)

    def totals(self) -> "Totals | None":
        """Aggregated cumulative counters with the peak and model they go with; None if no engine."""
        snaps = self.snapshots()
        if not snaps:
            return None
        now = self.clock()
        as_of = data_as_of(snaps)
        return Totals(at=now, as_of=as_of, age_s=max(now - as_of, 0.0), engines=len(snaps),
                      counters=self._poll(snaps, now).to_dict(),
                      peak=aggregate_peak(snaps), model=snaps[0].model, time_split=snaps[0].time_split,
                      updated_at=min(s.updated_at for s in snaps), gpu=aggregate_status([s.gpu for s in snaps]),
                      kv_roles=sorted({s.kv_role for s in snaps}))

    def recent(self, limit: int) -> list[dict[str, Any]]:
        """The most recent iterations over all engines, newest last."""
        items: list[dict[str, Any]] = []
        for s in self.snapshots():
            items.extend(s.recent)
        items.sort(key=lambda it: it.get("t_end_s", 0.0))
        return items[-limit:] if limit > 0 else []


def data_as_of(snaps: list[EngineSnapshot]) -> float:
    """Wall time up to which every engine's finished steps are counted: the oldest engine's `as_of`."""
    return min(s.as_of if s.as_of is not None else s.updated_at for s in snaps)


def aggregate_peak(snaps: list[EngineSnapshot]) -> PeakReport:
    """One peak line for several engines: devices add up; per-device peak is the device-weighted mean."""
    if len(snaps) == 1:
        return snaps[0].peak
    devices = sum(s.peak.devices for s in snaps)
    with_peak = [s for s in snaps if s.peak.flops_per_s]
    first = snaps[0].peak
    if not with_peak:
        return PeakReport(**{**first.model_dump(), "devices": devices})
    flops = sum(s.peak_total_flops() for s in with_peak) / devices
    bw = sum((s.peak.bandwidth_bytes_per_s or 0.0) * s.peak.devices for s in with_peak) / devices
    sources = sorted({s.peak.source or "" for s in with_peak})
    isa = [s for s in with_peak if s.peak.isa_flops_per_s]
    isa_flops = (sum(s.peak.isa_flops_per_s * s.peak.devices for s in isa) / sum(s.peak.devices for s in isa)
                 if len(isa) == len(with_peak) else None)
    return PeakReport(device=first.device, flops_per_s=flops, bandwidth_bytes_per_s=bw, dtype=first.dtype,
                      source="; ".join(sources), devices=devices, isa_flops_per_s=isa_flops)
