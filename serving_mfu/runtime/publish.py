"""Engine side: publish a tracker's cumulative state as a snapshot file (DESIGN §8, §10).

An engine process (one per data-parallel rank) writes `engine-<pid>-<rank>.json` into a private
folder (ours, mode 0700; a folder another user owns or may write to is refused), atomically (a fresh
exclusive temporary renamed over it), from a background thread at most every `interval_s`: its
cumulative counters, one cumulative point per second for the last `history_s` seconds, its recent
iterations, and each tenant label's cumulative sums (finished requests go to their own append-only log,
serving_mfu.runtime.request_log).  Because every snapshot is cumulative, a dropped or late write loses no totals.  The
engine thread only marks the writer dirty; it never waits on I/O.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import msgspec

from serving_mfu.cost.counters import Counters
from serving_mfu.files import FolderRefused, private_folder, write_atomic
from serving_mfu.runtime.settings import load_settings
from serving_mfu.runtime.tracker import COST_ADAPTER
from serving_mfu.schema.report import GpuUtilStatus, ModelReport, PeakReport
from serving_mfu.schema.requests import TenantTotals
from serving_mfu.schema.snapshot import EngineSnapshot, encode_snapshot

log = logging.getLogger(__name__)

FOLDER_FIX = ("Fix: set SERVING_MFU_DIR to a folder of your own with mode 0700 (the same for the engines and the "
              "API server), or make this one yours: chown {user} {folder} && chmod 700 {folder}.")


def default_dir() -> Path:
    """Where engines publish: SERVING_MFU_DIR (Settings.dir), else a per-user folder under the temp dir."""
    return load_settings()[0].snapshot_dir()


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
                 files: "LocalFiles | None" = None, kv_role: str = "none", kv_connector: str | None = None,
                 tenants: Callable[[], list[TenantTotals]] | None = None):
        self.source = source
        self.tenants = tenants  # each tenant label's cumulative sums (DESIGN §12), with every snapshot
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
        self._history: deque[tuple[float, msgspec.Raw]] = deque(maxlen=history_s)
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
            counters_json = msgspec.Raw(msgspec.json.encode(counters))
            if not self._history or now - self._history[-1][0] >= 1.0:
                self._history.append((now, counters_json))
            gpu = self.gpu_status() if self.gpu_status is not None else None
            # pieces serialized once before (history points, iteration costs) go in as raw JSON
            tenants = self.tenants() if self.tenants is not None else []
            snap = EngineSnapshot(**self._static, updated_at=now, as_of=as_of, gpu=gpu, counters=counters_json,
                                  tenants=tenants,
                                  history=list(self._history),
                                  recent=[msgspec.Raw(js) for js in self._recent_json(recent)])
            self._publish(encode_snapshot(snap))
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
