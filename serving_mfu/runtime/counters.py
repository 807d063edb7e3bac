"""Additive counters: everything a report is computed from.

Counters only ever grow, so any window is a difference of two snapshots (a reader that
joins late, or a load-generator run, subtracts the snapshot at its start), and several
engines aggregate by addition.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from serving_mfu.cost.accounting import IterationCost


@dataclass(slots=True)
class Counters:
    """Cumulative sums over iterations (all FLOPs whole-model, all times in seconds)."""

    iterations: int = 0
    mixed_iterations: int = 0
    busy_s: float = 0.0
    wall_s: float = 0.0
    mixed_busy_s: float = 0.0
    prefill_useful_flops: float = 0.0
    prefill_executed_flops: float = 0.0
    prefill_bytes: float = 0.0
    prefill_tokens: int = 0
    prefill_time_s: float = 0.0
    decode_useful_flops: float = 0.0
    decode_executed_flops: float = 0.0
    decode_bytes: float = 0.0
    decode_tokens: int = 0
    decode_time_s: float = 0.0
    recompute_tokens: int = 0
    recompute_flops: float = 0.0
    rejected_tokens: int = 0
    rejected_flops: float = 0.0
    discarded_tokens: int = 0
    discarded_flops: float = 0.0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    drafter_flops: float = 0.0
    hit_tokens: int = 0
    saved_flops: float = 0.0
    kv_received_tokens: int = 0
    kv_received_flops: float = 0.0
    kv_received_bytes: float = 0.0
    kv_sent_tokens: int = 0
    kv_sent_bytes: float = 0.0
    lora_tokens: int = 0
    lora_useful_flops: float = 0.0
    lora_executed_flops: float = 0.0
    moe_iterations: int = 0
    moe_measured_iterations: int = 0
    moe_imbalance_sum: float = 0.0
    moe_active_experts_sum: list[float] = field(default_factory=list)
    # Peak capacity over the same seconds (time × peak FLOP/s or bytes/s × devices of the engine
    # that spent them): additive across data-parallel engines, the denominators of MFU and MBU.
    prefill_capacity_flops: float = 0.0
    decode_capacity_flops: float = 0.0
    busy_capacity_flops: float = 0.0
    wall_capacity_flops: float = 0.0
    prefill_capacity_bytes: float = 0.0
    decode_capacity_bytes: float = 0.0
    busy_capacity_bytes: float = 0.0
    hfu_over_1_iterations: int = 0
    repaired_iterations: int = 0
    time_repaired_s: float = 0.0
    anomalies: dict[str, int] = field(default_factory=dict)
    # GPU sampling (serving_mfu.runtime.gpu_util, NVML): device-seconds sampled and Σ utilization × seconds,
    # so a window's mean GPU-Util is Δgpu_util_s / Δgpu_sampled_s (SM activity likewise).
    gpu_sampled_s: float = 0.0
    gpu_util_s: float = 0.0
    gpu_sm_sampled_s: float = 0.0
    gpu_sm_active_s: float = 0.0
    gpu_sample_errors: int = 0

    def add_cost(self, cost: IterationCost, engine_peak_flops_per_s: float | None = None,
                 engine_bandwidth_bytes_per_s: float | None = None) -> None:
        """Accumulate one iteration (hot path: plain attribute arithmetic).

        The peaks are the engine's totals over its devices; without them no capacity accrues.
        """
        self.iterations += 1
        self.busy_s += cost.busy_s
        self.wall_s += cost.wall_s
        if cost.mixed:
            self.mixed_iterations += 1
            self.mixed_busy_s += cost.busy_s
        p, d = cost.prefill, cost.decode
        self.prefill_useful_flops += p.useful_flops
        self.prefill_executed_flops += p.executed_flops
        self.prefill_bytes += p.bytes
        self.prefill_tokens += p.tokens
        self.prefill_time_s += p.time_s
        self.decode_useful_flops += d.useful_flops
        self.decode_executed_flops += d.executed_flops
        self.decode_bytes += d.bytes
        self.decode_tokens += d.tokens
        self.decode_time_s += d.time_s
        if engine_peak_flops_per_s:
            self.prefill_capacity_flops += p.time_s * engine_peak_flops_per_s
            self.decode_capacity_flops += d.time_s * engine_peak_flops_per_s
            self.busy_capacity_flops += cost.busy_s * engine_peak_flops_per_s
            self.wall_capacity_flops += cost.wall_s * engine_peak_flops_per_s
        if engine_bandwidth_bytes_per_s:
            self.prefill_capacity_bytes += p.time_s * engine_bandwidth_bytes_per_s
            self.decode_capacity_bytes += d.time_s * engine_bandwidth_bytes_per_s
            self.busy_capacity_bytes += cost.busy_s * engine_bandwidth_bytes_per_s
        self.recompute_tokens += cost.recompute_tokens
        self.recompute_flops += cost.recompute_flops
        self.rejected_tokens += cost.rejected_tokens
        self.rejected_flops += cost.rejected_flops
        self.discarded_tokens += cost.discarded_tokens
        self.discarded_flops += cost.discarded_flops
        self.draft_tokens += cost.draft_tokens
        self.accepted_tokens += cost.accepted_tokens
        self.drafter_flops += cost.drafter_flops
        self.hit_tokens += cost.hit_tokens
        self.saved_flops += cost.saved_flops
        if cost.kv_received_tokens or cost.kv_sent_tokens:
            self.kv_received_tokens += cost.kv_received_tokens
            self.kv_received_flops += cost.kv_received_flops
            self.kv_received_bytes += cost.kv_received_bytes
            self.kv_sent_tokens += cost.kv_sent_tokens
            self.kv_sent_bytes += cost.kv_sent_bytes
        if cost.lora_tokens or cost.lora_executed_flops:
            self.lora_tokens += cost.lora_tokens
            self.lora_useful_flops += cost.lora_useful_flops
            self.lora_executed_flops += cost.lora_executed_flops
        if cost.moe_active_experts is not None:
            self.moe_iterations += 1
            acc = self.moe_active_experts_sum
            if len(acc) < len(cost.moe_active_experts):
                acc.extend([0.0] * (len(cost.moe_active_experts) - len(acc)))
            for i, n in enumerate(cost.moe_active_experts):
                acc[i] += n
            if cost.moe_measured:
                self.moe_measured_iterations += 1
                self.moe_imbalance_sum += cost.moe_imbalance or 0.0
        if cost.hfu_over_1:
            self.hfu_over_1_iterations += 1
        if cost.time_repaired_s:
            self.repaired_iterations += 1
            self.time_repaired_s += cost.time_repaired_s
        for name in cost.anomalies:
            self.count_anomaly(name)

    def count_anomaly(self, name: str, n: int = 1) -> None:
        self.anomalies[name] = self.anomalies.get(name, 0) + n

    def iadd(self, other: "Counters") -> None:
        """Add `other` into this one, in place (a bucket closing: once a second per engine)."""
        for name in _SCALARS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in _LISTS:
            a, b = getattr(self, name), getattr(other, name)
            if len(a) < len(b):
                a.extend([0.0] * (len(b) - len(a)))
            for i, y in enumerate(b):
                a[i] += y
        for name in _DICTS:
            a = getattr(self, name)
            for k, v in getattr(other, name).items():
                a[k] = a.get(k, 0) + v

    def _combine(self, other: "Counters", sign: int) -> "Counters":
        out = Counters()
        for name in _SCALARS:
            setattr(out, name, getattr(self, name) + sign * getattr(other, name))
        for name in _LISTS:
            a, b = getattr(self, name), getattr(other, name)
            n = max(len(a), len(b))
            a2, b2 = a + [0.0] * (n - len(a)), b + [0.0] * (n - len(b))
            setattr(out, name, [x + sign * y for x, y in zip(a2, b2)])
        for name in _DICTS:
            a, b = getattr(self, name), getattr(other, name)
            setattr(out, name, {k: a.get(k, 0) + sign * b.get(k, 0) for k in sorted(set(a) | set(b))})
        return out

    def __add__(self, other: "Counters") -> "Counters":
        return self._combine(other, 1)

    def __sub__(self, other: "Counters") -> "Counters":
        return self._combine(other, -1)

    def copy(self) -> "Counters":
        return self._combine(Counters(), 1)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Counters":
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown counter fields: {', '.join(sorted(unknown))}")
        out = cls()
        for k, v in data.items():
            setattr(out, k, list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
        return out


# Counters' fields by kind, read once for iadd (every bucket close) and _combine
_SCALARS = tuple(f.name for f in fields(Counters) if f.type in ("int", "float"))
_LISTS = tuple(f.name for f in fields(Counters) if f.type.startswith("list"))
_DICTS = tuple(f.name for f in fields(Counters) if f.type.startswith("dict"))
assert len(_SCALARS) + len(_LISTS) + len(_DICTS) == len(fields(Counters)), "a Counters field of a new kind"
