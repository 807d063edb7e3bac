"""`MFUTracker`: the only stateful part — cumulative counters, a sliding window, recent iterations.

Memory is bounded: the window keeps one `Counters` per `bucket_s` for at most
`max_window_s`, and the ring of recent iterations holds `recent_iterations` entries.
`record()` never raises: a record it cannot account for is counted as an anomaly and
logged once per kind.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from typing import Callable

from pydantic import TypeAdapter

from serving_mfu.cost.accounting import CostModel, IterationCost, cost_iteration
from serving_mfu.cost.counters import Counters
from serving_mfu.cost.records import IterationRecord
from serving_mfu.cost.time_split import SPLIT_METHODS
from serving_mfu.model.spec import ModelSpec
from serving_mfu.schema.report import MFUReport, ModelReport, PeakReport, build_report

log = logging.getLogger(__name__)

COST_ADAPTER = TypeAdapter(IterationCost)


def busy_and_wall_s(t_sched_s: float, t_end_s: float, prev_end_s: float | None) -> tuple[float, float]:
    """DESIGN §5: busy = t_end(N) − max(t_sched(N), t_end(N−1)); wall = t_end(N) − t_end(N−1)."""
    if prev_end_s is None:
        return t_end_s - t_sched_s, t_end_s - t_sched_s
    return max(0.0, t_end_s - max(t_sched_s, prev_end_s)), max(0.0, t_end_s - prev_end_s)


class MFUTracker:
    """Accumulates iteration records of one model and reports MFU/HFU/MBU per phase."""

    def __init__(
        self,
        spec: ModelSpec,
        peak: "PeakSpec | None" = None,  # noqa: F821 - serving_mfu.peaks.table.PeakSpec
        devices: int = 1,
        *,
        kv_cache_dtype: str | None = None,
        time_split: str = "shapley",
        bucket_s: float = 1.0,
        max_window_s: float = 3600.0,
        recent_iterations: int = 1024,
        clock: Callable[[], float] | None = time.monotonic,
        kv_role: str = "none",
    ):
        if time_split not in SPLIT_METHODS:
            raise ValueError(f"unknown time split {time_split!r}; choose one of {', '.join(SPLIT_METHODS)}")
        if devices < 1:
            raise ValueError(f"devices must be >= 1, got {devices}")
        if bucket_s <= 0 or max_window_s < bucket_s:
            raise ValueError("need 0 < bucket_s <= max_window_s")
        self.spec = spec
        self.kv_role = kv_role  # the engine's KV-connector role, in its reports
        self.cost_model = CostModel(spec, kv_cache_dtype)
        self.peak = peak
        self.devices = devices
        self.time_split = time_split
        self.bucket_s = bucket_s
        self.max_window_s = max_window_s
        self.clock = clock
        self._closed = Counters()  # everything but the current bucket (so each iteration is added once)
        self._buckets: deque[tuple[int, Counters]] = deque()
        self._recent: deque[IterationCost] = deque(maxlen=recent_iterations)
        self._last_end: dict[str, float] = {}
        self._first_t: float | None = None
        self._latest_t: float | None = None
        self._logged: set[str] = set()
        self._lock = threading.Lock()  # record() on the accounting thread; snapshot(), report(), recent() on readers
        self._peak_total = peak.flops_per_s * devices if peak else None
        self._bw_total = peak.bandwidth_bytes_per_s * devices if peak else None

    @property
    def engine_peak(self) -> tuple[float | None, float | None]:
        """Peak FLOP/s and bandwidth of the whole engine (one device's × devices), None without a peak."""
        return self._peak_total, self._bw_total

    # ---------------------------------------------------------------- recording
    def record(self, rec: IterationRecord) -> IterationCost | None:
        """Account one iteration; returns its cost, or None if it could not be accounted."""
        with self._lock:
            return self._record(rec)

    def _record(self, rec: IterationRecord) -> IterationCost | None:
        try:
            busy, wall = busy_and_wall_s(rec.t_sched_s, rec.t_end_s, self._last_end.get(rec.engine))
            cost = cost_iteration(rec, self.cost_model, busy, wall, self._peak_total, self._bw_total,
                                  self.time_split)
        except Exception as exc:  # never let one bad record stop the accounting
            self._count_anomaly("accounting_error", exc)
            return None
        self._last_end[rec.engine] = max(rec.t_end_s, self._last_end.get(rec.engine, rec.t_end_s))
        if self._first_t is None:
            self._first_t = rec.t_sched_s
        self._latest_t = rec.t_end_s if self._latest_t is None else max(self._latest_t, rec.t_end_s)
        bucket = math.floor(rec.t_end_s / self.bucket_s)
        if self._buckets and self._buckets[-1][0] >= bucket:
            self._buckets[-1][1].add_cost(cost, self._peak_total, self._bw_total)
        else:
            if self._buckets:
                self._closed.iadd(self._buckets[-1][1])
            fresh = Counters()
            fresh.add_cost(cost, self._peak_total, self._bw_total)
            self._buckets.append((bucket, fresh))
            oldest = bucket - math.ceil(self.max_window_s / self.bucket_s)
            while self._buckets and self._buckets[0][0] < oldest:
                self._buckets.popleft()
        self._recent.append(cost)
        for name in cost.anomalies:
            self._log_once(name, f"anomaly {name} at step {rec.step}")
        if cost.hfu_over_1:
            self._log_once("hfu_over_1", f"step {rec.step}: HFU {cost.hfu:.3f} > 1 — FLOP model, peak or clock is off")
        return cost

    def note_anomaly(self, kind: str, exc: BaseException | str | None = None) -> None:
        """Count an anomaly of `kind` (e.g. a hook error) and log the first of each kind."""
        with self._lock:
            self._count_anomaly(kind, exc)

    def _count_anomaly(self, kind: str, exc: BaseException | str | None) -> None:
        self._closed.count_anomaly(kind)
        self._log_once(kind, f"{kind}: {exc!r}")

    def snapshot(self, recent: int = 200, raw: bool = False) -> tuple[Counters, list]:
        """A consistent copy of the cumulative counters and the last `recent` iterations
        (as dicts, or with `raw` the IterationCost objects themselves, for a publisher that caches)."""
        with self._lock:
            totals, items = self._totals(), list(self._recent)[-recent:] if recent > 0 else []
        return totals, items if raw else [COST_ADAPTER.dump_python(c, mode="json") for c in items]

    def _log_once(self, kind: str, message: str) -> None:
        if kind not in self._logged:
            self._logged.add(kind)
            log.warning("serving-mfu: %s (further %s are counted, not logged)", message, kind)

    # ---------------------------------------------------------------- reading
    def _totals(self) -> Counters:
        total = self._closed.copy()
        if self._buckets:
            total.iadd(self._buckets[-1][1])
        return total

    @property
    def counters(self) -> Counters:
        """Cumulative counters since the tracker started (a copy)."""
        with self._lock:
            return self._totals()

    def now(self) -> float:
        if self.clock is not None:
            return self.clock()
        return self._latest_t if self._latest_t is not None else 0.0

    def window_counters(self, window_s: float) -> tuple[Counters, float]:
        """Counters of iterations that ended in the last `window_s` seconds, and the wall span covered.

        Resolution is one bucket: buckets that began before `now − window_s` are left out.
        """
        if not (0 < window_s <= self.max_window_s):
            raise ValueError(f"window must be in (0, {self.max_window_s:g}] seconds, got {window_s:g}")
        now = self.now()
        first = math.ceil((now - window_s) / self.bucket_s)
        total = Counters()
        with self._lock:
            for bucket, counters in self._buckets:
                if bucket >= first:
                    total.iadd(counters)
        covered = window_s if self._first_t is None else min(window_s, max(now - self._first_t, 0.0))
        return total, covered

    def peak_report(self) -> PeakReport:
        p = self.peak
        return PeakReport(
            device=p.device if p else None,
            flops_per_s=p.flops_per_s if p else None,
            bandwidth_bytes_per_s=p.bandwidth_bytes_per_s if p else None,
            dtype=p.dtype if p else self.spec.compute_dtype,
            source=p.source if p else None,
            devices=self.devices,
            isa_flops_per_s=p.isa_flops_per_s if p else None,
        )

    def model_report(self) -> ModelReport:
        return ModelReport(name=self.spec.name, model_type=self.spec.model_type, approximate=self.spec.approximate,
                           flop_model=self.spec.flop_model)

    def report(self, window_s: float | None = None) -> MFUReport:
        """The report since start, or over the last `window_s` seconds."""
        if window_s is None:
            return build_report(self.counters, self.peak_report(), self.model_report(), self.time_split,
                                kv_roles=[self.kv_role])
        counters, wall = self.window_counters(window_s)
        return build_report(counters, self.peak_report(), self.model_report(), self.time_split,
                            window_s=window_s, wall_s=wall,
                            wall_capacity_flops=wall * self._peak_total if self._peak_total else 0.0,
                            kv_roles=[self.kv_role])

    def recent(self, limit: int = 100) -> list[dict]:
        """The last `limit` iterations' costs, newest last, as plain dicts."""
        with self._lock:
            items = list(self._recent)[-limit:] if limit > 0 else []
        return [COST_ADAPTER.dump_python(c, mode="json") for c in items]
