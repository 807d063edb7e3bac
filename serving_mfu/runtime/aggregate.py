"""Reader side, second half: the engines' snapshots added up (API server, `serving-mfu serve`, monitor).

`SnapshotReader.refresh()` reads the folder (serving_mfu.runtime.collect), follows the live engines
and retires the ones that have gone, keeping their last totals so aggregated counters never go
backwards; `report()`, `totals()` and `recent()` answer from what it follows, over any window (the
engines' histories, then the reader's own ring of aggregated points); `tenants()` sums the engines'
tenant tables, and `requests` follows their logs of finished requests (DESIGN §12).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from serving_mfu.cost.counters import Counters
from serving_mfu.runtime.collect import collect, folder_problem, pid_alive
from serving_mfu.runtime.gpu_util import aggregate_status
from serving_mfu.runtime.publish import default_dir
from serving_mfu.runtime.request_log import RequestLogReader
from serving_mfu.runtime.settings import load_settings
from serving_mfu.schema.report import MFUReport, PeakReport, build_report
from serving_mfu.schema.requests import TenantTotals, merge_tenants
from serving_mfu.schema.snapshot import EngineSnapshot, Totals

log = logging.getLogger(__name__)


class SnapshotReader:
    """Reads and aggregates the engines' snapshots (API server, `serving-mfu serve`, in-process monitor).

    `parent_pid` prefers engines whose parent is that process (the API server or the
    `vllm.LLM` user); if none is, or without it, every live engine in the folder is read.  The reader keeps
    its own ring of aggregated cumulative points so windows longer than the engines'
    history become exact once it has run that long.
    """

    def __init__(self, directory: str | Path | None = None, parent_pid: int | None = None,
                 max_window_s: float = 3600.0, clock: Callable[[], float] = time.time,
                 stale_after_s: float | None = 120.0, requests_ring: int | None = None):
        self.dir = Path(directory) if directory else default_dir()
        if requests_ring is None:
            requests_ring = load_settings()[0].requests_ring
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
        self._retired_tenants: dict[str, list[TenantTotals]] = {}  # engines gone: their last tenant sums
        self.requests = RequestLogReader(self.dir, requests_ring)  # finished requests (DESIGN §12)

    def refresh(self) -> list[EngineSnapshot]:
        """Read the folder, retire the engines that have gone, and return the live ones this reader follows.

        An engine this reader saw alive whose process is gone (it stopped or restarted under a new pid)
        is retired: its last counters stay in the totals (`retired_counters`), so aggregated totals
        never go backwards and nothing is counted twice — a restarted engine starts from zero under a
        new id.  Files of engines that were dead before this reader saw them are left out.  A refused
        folder is read as nothing, and retires nothing.
        """
        found = collect(self.dir)
        if found.refused is not None and found.refused != self.refused:
            log.error("serving-mfu: %s", found.refused)
        self.refused = found.refused
        if found.refused is not None:
            return []
        for name, why in found.foreign.items():
            if name not in self.foreign_files:
                self.foreign_files.add(name)
                log.warning("serving-mfu: ignoring %s (anomaly foreign_files)", why)
        self.read_errors += len(found.unreadable)
        live = []
        for snap in found.snapshots:
            stale = self.stale_after_s is not None and self.clock() - snap.updated_at > self.stale_after_s
            if pid_alive(snap.pid) and not stale:
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
        self._retired[snap.engine_id] = snap.counters
        self._retired_tenants[snap.engine_id] = snap.tenants
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
        """Why no engine could have published here, if the folder says so (collect.folder_problem)."""
        return folder_problem(self.dir)

    @staticmethod
    def _at(snap: EngineSnapshot, t: float) -> Counters | None:
        """An engine's cumulative counters at wall time t from its history (None if unknown)."""
        if t >= snap.updated_at:
            return snap.counters
        if t < snap.started_at:
            return Counters()
        best = None
        for ts, data in snap.history:
            if ts <= t:
                best = data
            else:
                break
        return best

    def _poll(self, snaps: list[EngineSnapshot], now: float) -> Counters:
        total = self.retired_counters()
        for s in snaps:
            total = total + s.counters
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
        snaps = self.refresh()
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
        snaps = self.refresh()
        if not snaps:
            return None
        now = self.clock()
        as_of = data_as_of(snaps)
        return Totals(at=now, as_of=as_of, age_s=max(now - as_of, 0.0), engines=len(snaps),
                      counters=self._poll(snaps, now),
                      peak=aggregate_peak(snaps), model=snaps[0].model, time_split=snaps[0].time_split,
                      updated_at=min(s.updated_at for s in snaps), gpu=aggregate_status([s.gpu for s in snaps]),
                      kv_roles=sorted({s.kv_role for s in snaps}))

    def tenants(self) -> list[TenantTotals] | None:
        """Each tenant label's sums over every engine, those that have gone included; None if no engine."""
        snaps = self.refresh()
        if not snaps:
            return None
        return merge_tenants([s.tenants for s in snaps] + list(self._retired_tenants.values()))

    def recent(self, limit: int) -> list[dict[str, Any]]:
        """The most recent iterations over all engines, newest last."""
        items: list[dict[str, Any]] = []
        for s in self.refresh():
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
