"""Every counter, declared once: one `Counter` row per cumulative sum (DESIGN §6, §8).

A row says what the sum is (name, unit, one line of help), how one engine step adds to it, where
the report shows it and which Prometheus series exports it.  Everything else is derived from
`COUNTERS`: the per-step `IterationCost` and `PhaseCost` (the fields a step carries), `Counters`
(the cumulative sums; msgspec reads and writes it as a typed snapshot field) and its hot-path
`add_cost` (generated source, straight attribute adds: no loop over the table per step), the
report's raw fields (serving_mfu.schema), the Prometheus families (serving_mfu.serve.prometheus)
and the docs table (`docs_table`).  Adding a counter is one row here plus its cost formula.

Counters only ever grow, so any window is a difference of two readings and several engines add up.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, ClassVar, Iterable, Literal, NamedTuple

import msgspec

PHASES = ("prefill", "decode")
Unit = Literal["flops", "bytes", "seconds", "tokens", "iterations", "count", "ratio"]
INT_UNITS = frozenset({"tokens", "iterations", "count"})


class Counter(NamedTuple):
    """One cumulative sum.

    `step` is how one step adds to it: "cost" (the step's IterationCost carries a field of that name,
    in its PhaseCost when `phased`), an expression over `c` (the IterationCost) and the engine's
    `peak_flops` / `peak_bytes` (totals over its devices, 0 when unknown), with `{phase}` filled in
    when `phased`; or None (filled outside the accounting: the GPU sampler).  `report` is
    "section.field" in MFUReport ("phase.field": each phase's section); None: not shown as a raw sum.
    `prom` is the Prometheus family (without `_total`); None: not exported as a counter of its own.
    """

    name: str
    unit: Unit
    help: str
    step: str | None = "cost"
    report: str | None = None
    prom: str | None = None
    phased: bool = False
    guard: str | None = None  # a GUARDS key: the per-step add runs only when the guard holds (all zero otherwise)

    @property
    def type(self) -> type:
        return int if self.unit in INT_UNITS else float

    def names(self) -> tuple[str, ...]:
        """The Counters attributes of this row: `prefill_<name>`, `decode_<name>` when phased."""
        return tuple(f"{p}_{self.name}" for p in PHASES) if self.phased else (self.name,)


#: Conditions under which a group of counters can be non-zero in a step: `add_cost` skips the group's adds
#: otherwise (most steps have no KV connector, no LoRA, no graph padding, no MoE and no repair).
GUARDS: dict[str, str] = {
    "kv": "c.kv_received_tokens or c.kv_sent_tokens",
    "lora": "c.lora_executed_flops or c.lora_tokens",
    "graph": "c.prefill.graph_padding_flops or c.decode.graph_padding_flops",
    "moe": "c.moe_active_experts is not None",
    "repair": "c.time_repaired_s",
}

C = Counter
COUNTERS: tuple[Counter, ...] = (
    # ---- per phase: the MFU/HFU/MBU numerators and denominators
    C("useful_flops", "flops", "FLOPs of work the users kept (first-time prompt positions, accepted decode "
      "positions)", report="phase.useful_flops", prom="serving_mfu_useful_flops", phased=True),
    C("executed_flops", "flops", "FLOPs the hardware executed (useful + recompute, rejected, discarded, drafter)",
      report="phase.executed_flops", prom="serving_mfu_executed_flops", phased=True),
    C("bytes", "bytes", "Bytes moved to and from device memory (weights, KV reads and writes)",
      report="phase.bytes", prom="serving_mfu_moved_bytes", phased=True),
    C("tokens", "tokens", "Useful positions: first-time prompt positions (prefill), kept positions (decode)",
      report="phase.tokens", prom="serving_mfu_tokens", phased=True),
    C("time_s", "seconds", "Busy seconds attributed to the phase (mixed iterations split by the time-split model)",
      report="phase.time_s", prom="serving_mfu_attributed_seconds", phased=True),
    C("capacity_flops", "flops", "Peak FLOPs over the phase's seconds: seconds x peak FLOP/s x devices (MFU/HFU "
      "denominator)", step="c.{phase}.time_s * peak_flops", prom="serving_mfu_capacity_flops", phased=True),
    C("capacity_bytes", "bytes", "Peak bytes over the phase's seconds: seconds x bandwidth x devices (MBU "
      "denominator)", step="c.{phase}.time_s * peak_bytes", prom="serving_mfu_capacity_bytes", phased=True),
    # ---- speed of light (DESIGN §11; serving_mfu.cost.roofline): the phase's time by part
    C("sol_s", "seconds", "Speed-of-light seconds of the phase: its compute time (executed FLOPs / peak) plus its "
      "memory-bound time; sol = this / attributed seconds", prom="serving_mfu_sol_seconds", phased=True),
    C("memory_bound_s", "seconds", "Seconds of the phase the memory explains: its share of roofline time above "
      "compute time", prom="serving_mfu_memory_bound_seconds", phased=True),
    C("beyond_roofline_s", "seconds", "Seconds of the phase beyond its roofline (Python, launches, sync); negative "
      "where a step ran faster than its roofline", prom="serving_mfu_beyond_roofline_seconds", phased=True),
    # ---- waste by cause that no other counter holds (DESIGN §11)
    C("lora_padding_flops", "flops", "LoRA FLOPs the kernels ran beyond each adapter's own rank on useful "
      "positions (padding to --max-lora-rank): waste", prom="serving_mfu_lora_padding_flops", phased=True, guard="lora"),
    C("graph_padding_flops", "flops", "FLOPs of the positions a CUDA graph padded the step to: waste (0 on CPU)",
      prom="serving_mfu_graph_padding_flops", phased=True, guard="graph"),
    C("graph_padding_modelled_iterations", "iterations", "Iterations with graph padding whose padding came from "
      "the model of vLLM's cudagraph dispatch rules, not from its cudagraph_stats (--cudagraph-metrics off)",
      prom="serving_mfu_graph_padding_modelled_iterations", guard="graph"),
    # ---- the engine's time
    C("iterations", "iterations", "Engine iterations accounted", step="1", report="overall.iterations",
      prom="serving_mfu_iterations"),
    C("mixed_iterations", "iterations", "Iterations that mixed prefill and decode", step="c.mixed",
      prom="serving_mfu_mixed_iterations"),
    C("busy_s", "seconds", "Busy seconds (iteration time, idle excluded)", report="overall.busy_s",
      prom="serving_mfu_busy_seconds"),
    C("wall_s", "seconds", "Wall seconds between iteration ends (idle included)", report="overall.wall_s",
      prom="serving_mfu_wall_seconds"),
    C("mixed_busy_s", "seconds", "Busy seconds of mixed prefill+decode iterations (modelled split)",
      step="c.busy_s if c.mixed else 0.0", prom="serving_mfu_mixed_busy_seconds"),
    C("busy_capacity_flops", "flops", "Peak FLOPs over busy seconds (overall MFU/HFU denominator)",
      step="c.busy_s * peak_flops", prom="serving_mfu_busy_capacity_flops"),
    C("wall_capacity_flops", "flops", "Peak FLOPs over wall seconds, accrued at iteration ends",
      step="c.wall_s * peak_flops", prom="serving_mfu_wall_capacity_flops"),
    C("busy_capacity_bytes", "bytes", "Peak bytes over busy seconds (overall MBU denominator)",
      step="c.busy_s * peak_bytes", prom="serving_mfu_busy_capacity_bytes"),
    C("busy_sol_s", "seconds", "Roofline seconds of the steps: sum of max(executed FLOPs / peak, bytes / "
      "bandwidth); overall sol = this / busy seconds", prom="serving_mfu_busy_sol_seconds"),
    C("busy_memory_bound_s", "seconds", "Seconds of the steps the memory explains (roofline minus compute time)",
      prom="serving_mfu_busy_memory_bound_seconds"),
    C("busy_beyond_roofline_s", "seconds", "Busy seconds beyond the steps' roofline (negative where a step ran "
      "faster than its roofline)", prom="serving_mfu_busy_beyond_roofline_seconds"),
    C("idle_s", "seconds", "Wall seconds with no step running (wall minus busy)", step="c.wall_s - c.busy_s",
      prom="serving_mfu_idle_seconds"),
    # ---- work that is not useful, and work not done here
    C("recompute_tokens", "tokens", "Positions recomputed after preemption", report="recompute.tokens",
      prom="serving_mfu_recompute_tokens"),
    C("recompute_flops", "flops", "FLOPs of recomputation after preemption", report="recompute.flops",
      prom="serving_mfu_recompute_flops"),
    C("lora_recompute_flops", "flops", "LoRA adapter FLOPs of recomputed positions (waste, cause recompute)",
      prom="serving_mfu_lora_recompute_flops", guard="lora"),
    C("rejected_tokens", "tokens", "Speculative positions rejected (KV rolled back)",
      report="spec_decode.rejected_tokens", prom="serving_mfu_spec_rejected_tokens"),
    C("rejected_flops", "flops", "FLOPs of rejected speculative positions", report="spec_decode.rejected_flops",
      prom="serving_mfu_spec_rejected_flops"),
    C("discarded_tokens", "tokens", "Kept decode positions never delivered (stop or max_tokens inside a verify "
      "step)", report="discarded.tokens", prom="serving_mfu_discarded_tokens"),
    C("discarded_flops", "flops", "FLOPs of discarded decode positions", report="discarded.flops",
      prom="serving_mfu_discarded_flops"),
    C("lora_rejected_flops", "flops", "LoRA adapter FLOPs of rejected speculative positions (waste, cause "
      "rejected_drafts)", prom="serving_mfu_lora_rejected_flops", guard="lora"),
    C("lora_discarded_flops", "flops", "LoRA adapter FLOPs of discarded decode positions (waste, cause discarded)",
      prom="serving_mfu_lora_discarded_flops", guard="lora"),
    C("draft_tokens", "tokens", "Speculative draft tokens verified", report="spec_decode.draft_tokens",
      prom="serving_mfu_spec_draft_tokens"),
    C("accepted_tokens", "tokens", "Speculative draft tokens accepted", report="spec_decode.accepted_tokens",
      prom="serving_mfu_spec_accepted_tokens"),
    C("drafter_flops", "flops", "FLOPs of the speculative drafter", report="spec_decode.drafter_flops",
      prom="serving_mfu_spec_drafter_flops"),
    C("hit_tokens", "tokens", "Prompt positions served by the prefix cache", report="prefix_cache.hit_tokens",
      prom="serving_mfu_prefix_cache_hit_tokens"),
    C("saved_flops", "flops", "FLOPs the prefix-cache hits would have cost", report="prefix_cache.saved_flops",
      prom="serving_mfu_prefix_cache_saved_flops"),
    C("kv_received_tokens", "tokens", "Prompt positions whose KV a KV connector loaded (not computed here, not "
      "local prefix-cache hits)", report="kv_transfer.received_tokens", prom="serving_mfu_kv_received_tokens", guard="kv"),
    C("kv_received_flops", "flops", "FLOPs the positions loaded through a KV connector would have cost",
      report="kv_transfer.received_flops", prom="serving_mfu_kv_received_flops", guard="kv"),
    C("kv_received_bytes", "bytes", "KV bytes loaded through a KV connector (all layers)",
      report="kv_transfer.received_bytes", prom="serving_mfu_kv_received_bytes", guard="kv"),
    C("kv_sent_tokens", "tokens", "Positions whose KV a KV connector stored or sent for other engines",
      report="kv_transfer.sent_tokens", prom="serving_mfu_kv_sent_tokens", guard="kv"),
    C("kv_sent_bytes", "bytes", "KV bytes stored or sent through a KV connector (all layers)",
      report="kv_transfer.sent_bytes", prom="serving_mfu_kv_sent_bytes", guard="kv"),
    C("lora_tokens", "tokens", "Useful positions of requests that ran a LoRA adapter", report="lora.tokens",
      prom="serving_mfu_lora_tokens", guard="lora"),
    C("lora_useful_flops", "flops", "LoRA adapter FLOPs of useful positions (part of useful_flops)",
      report="lora.useful_flops", prom="serving_mfu_lora_useful_flops", guard="lora"),
    C("lora_executed_flops", "flops", "LoRA adapter FLOPs the kernels ran at the padded rank (part of "
      "executed_flops)", report="lora.executed_flops", prom="serving_mfu_lora_executed_flops", guard="lora"),
    # ---- MoE (exported as summaries, with the per-layer list below)
    C("moe_iterations", "iterations", "Iterations of an MoE model", step="c.moe_active_experts is not None", guard="moe"),
    C("moe_measured_iterations", "iterations", "MoE iterations whose routing was measured", step="c.moe_measured", guard="moe"),
    C("moe_imbalance_sum", "ratio", "Sum over measured iterations of max/mean routed tokens per expert",
      step="(c.moe_imbalance or 0.0) if c.moe_measured else 0.0", guard="moe"),
    # ---- invariants
    C("hfu_over_1_iterations", "iterations", "Iterations with HFU > 1 (FLOP model, peak or clock is off)",
      step="c.hfu_over_1", report="anomalies.hfu_over_1_iterations", prom="serving_mfu_hfu_over_1_iterations"),
    C("repaired_iterations", "iterations", "Mixed iterations whose split moved time to keep a phase at HFU <= 1",
      step="c.time_repaired_s != 0", report="anomalies.repaired_iterations",
      prom="serving_mfu_repaired_iterations", guard="repair"),
    C("time_repaired_s", "seconds", "Seconds moved between phases by those repairs",
      report="anomalies.time_repaired_s", prom="serving_mfu_repaired_seconds", guard="repair"),
    # ---- GPU sampling (serving_mfu.runtime.gpu_util, NVML): a window's mean is Δ(…_s) / Δ(sampled)
    C("gpu_sampled_s", "seconds", "Device-seconds over which NVML GPU-Util was sampled (summed over devices)",
      step=None, report="gpu_util.sampled_s", prom="serving_mfu_gpu_sampled_seconds"),
    C("gpu_util_s", "seconds", "GPU-Util x sampled seconds: device-seconds with a kernel running; GPU-Util = "
      "rate(this) / rate(serving_mfu_gpu_sampled_seconds_total)", step=None, prom="serving_mfu_gpu_util_seconds"),
    C("gpu_sm_sampled_s", "seconds", "Device-seconds over which SM activity (NVML GPM) was sampled", step=None,
      report="gpu_util.sm_sampled_s", prom="serving_mfu_gpu_sm_sampled_seconds"),
    C("gpu_sm_active_s", "seconds", "SM activity x sampled seconds; SM activity = rate(this) / "
      "rate(serving_mfu_gpu_sm_sampled_seconds_total)", step=None, prom="serving_mfu_gpu_sm_active_seconds"),
    C("gpu_sample_errors", "count", "NVML reads of the GPU sampler that failed", step=None,
      report="gpu_util.sample_errors", prom="serving_mfu_gpu_sample_errors"),
)
del C


def check_table(rows: Iterable[Counter]) -> None:
    """Refuse a table with a repeated name or Prometheus family, or a row that cannot work."""
    seen: dict[str, str] = {}
    for row in rows:
        for key in row.names() + ((row.prom,) if row.prom else ()):
            if key in seen:
                raise ValueError(f"counter {row.name!r}: {key!r} is already declared by {seen[key]!r}")
            seen[key] = row.name
        if row.step is not None and "{phase}" in row.step and not row.phased:
            raise ValueError(f"counter {row.name!r}: step {row.step!r} names a phase but the row is not phased")
        if row.guard is not None and row.guard not in GUARDS:
            raise ValueError(f"counter {row.name!r}: guard {row.guard!r} is not one of {', '.join(GUARDS)}")
        if row.report is not None and row.report.count(".") != 1:
            raise ValueError(f"counter {row.name!r}: report path {row.report!r} is not 'section.field'")


# ------------------------------------------------------------------------------ generated types
class CountersBase:
    """The arithmetic every generated Counters has besides its generated `add_cost`; besides the table's
    sums (`SCALARS`) a Counters holds two structured ones: `moe_active_experts_sum` (Σ over MoE
    iterations of the distinct experts hit, per MoE layer) and `anomalies` (counts by kind)."""

    __slots__ = ()
    SCALARS: ClassVar[tuple[str, ...]] = ()  # the table's attributes, set on each generated class
    moe_active_experts_sum: list[float]
    anomalies: dict[str, int]

    def _add_structured(self, cost: Any) -> None:
        experts = cost.moe_active_experts
        if experts is not None:
            acc = self.moe_active_experts_sum
            if len(acc) < len(experts):
                acc.extend([0.0] * (len(experts) - len(acc)))
            for i, n in enumerate(experts):
                acc[i] += n
        for name in cost.anomalies:
            self.count_anomaly(name)

    def count_anomaly(self, name: str, n: int = 1) -> None:
        self.anomalies[name] = self.anomalies.get(name, 0) + n

    def iadd(self, other: "CountersBase") -> None:
        """Add `other` into this one, in place (a bucket closing: once a second per engine)."""
        for name in self.SCALARS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        a, b = self.moe_active_experts_sum, other.moe_active_experts_sum
        if len(a) < len(b):
            a.extend([0.0] * (len(b) - len(a)))
        for i, y in enumerate(b):
            a[i] += y
        for k, v in other.anomalies.items():
            self.anomalies[k] = self.anomalies.get(k, 0) + v

    def _combine(self, other: "CountersBase", sign: int) -> Any:
        out = type(self)()
        for name in self.SCALARS:
            setattr(out, name, getattr(self, name) + sign * getattr(other, name))
        a, b = self.moe_active_experts_sum, other.moe_active_experts_sum
        n = max(len(a), len(b))
        a2, b2 = a + [0.0] * (n - len(a)), b + [0.0] * (n - len(b))
        out.moe_active_experts_sum = [x + sign * y for x, y in zip(a2, b2)]
        x, y = self.anomalies, other.anomalies
        out.anomalies = {k: x.get(k, 0) + sign * y.get(k, 0) for k in sorted(set(x) | set(y))}
        return out

    def __add__(self, other: Any) -> Any:
        return self._combine(other, 1)

    def __sub__(self, other: Any) -> Any:
        return self._combine(other, -1)

    def copy(self) -> Any:
        return self._combine(type(self)(), 1)

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        """From a plain mapping (a snapshot's JSON); ValueError naming unknown or mistyped fields."""
        try:
            return msgspec.convert(data, cls)
        except msgspec.ValidationError as exc:
            raise ValueError(f"counters: {exc}") from None


def _add_cost_source(rows: Iterable[Counter]) -> str:
    """The body of `add_cost`: one `self.<name> += <increment>` per row a step adds to."""
    lines = ["def add_cost(self, c, peak_flops=None, peak_bytes=None):",
             '    """Accumulate one iteration (generated from COUNTERS: plain attribute adds).  The peaks are',
             '    the engine\'s totals over its devices; without them no capacity accrues."""',
             "    peak_flops = peak_flops or 0.0",
             "    peak_bytes = peak_bytes or 0.0"]
    rows = [r for r in rows if r.step is not None]
    for guard in (None, *GUARDS):
        group = [r for r in rows if r.guard == guard]
        if not group:
            continue
        indent = "    " if guard is None else "        "
        if guard is not None:
            lines.append(f"    if {GUARDS[guard]}:")
        for row in group:
            for phase, name in zip(PHASES if row.phased else (None,), row.names()):
                expr = f"c.{phase}.{row.name}" if row.step == "cost" and phase else (
                    f"c.{row.name}" if row.step == "cost" else row.step.format(phase=phase))
                lines.append(f"{indent}self.{name} += {expr}")
    lines.append("    self._add_structured(c)")
    return "\n".join(lines) + "\n"


class CounterTypes(NamedTuple):
    """The types one table makes (the engine's, from COUNTERS; a test's, from its own rows)."""

    rows: tuple[Counter, ...]
    PhaseCost: type
    IterationCost: type
    Counters: type


def make_types(rows: Iterable[Counter], module: str = __name__) -> CounterTypes:
    """PhaseCost, IterationCost and Counters of a table of counters."""
    rows = tuple(rows)
    check_table(rows)
    per_phase = [(r.name, r.type, dataclasses.field(default=r.type())) for r in rows if r.step == "cost" and r.phased]
    phase_cost = dataclasses.make_dataclass("PhaseCost", per_phase, slots=True, kw_only=True)
    phase_cost.__doc__ = "One phase's share of an iteration (fields: COUNTERS rows with step='cost', phased)."
    per_step = [(r.name, r.type, dataclasses.field(default=r.type())) for r in rows
                if r.step == "cost" and not r.phased]
    facts = [  # what a step says besides its sums (the counters' step expressions read them)
        ("step", int), ("engine", str), ("t_end_s", float),
        ("prefill", phase_cost, dataclasses.field(default_factory=phase_cost)),
        ("decode", phase_cost, dataclasses.field(default_factory=phase_cost)),
        ("mixed", bool, dataclasses.field(default=False)),
        ("moe_active_experts", list[float] | None, dataclasses.field(default=None)),
        ("moe_measured", bool, dataclasses.field(default=False)),
        ("moe_imbalance", float | None, dataclasses.field(default=None)),
        ("hfu", float | None, dataclasses.field(default=None)),
        ("hfu_over_1", bool, dataclasses.field(default=False)),
        ("anomalies", list[str], dataclasses.field(default_factory=list)),
    ]
    iteration_cost = dataclasses.make_dataclass("IterationCost", facts[:3] + per_step + facts[3:], slots=True,
                                                kw_only=True)
    iteration_cost.__doc__ = "Everything the tracker accumulates from one iteration (sums: COUNTERS rows)."
    scalars = [name for r in rows for name in r.names()]
    fields: list[Any] = [(name, Annotated[r.type, msgspec.Meta(description=r.help)],
                          dataclasses.field(default=r.type())) for r in rows for name in r.names()]
    fields += [("moe_active_experts_sum", list[float], dataclasses.field(default_factory=list)),
               ("anomalies", dict[str, int], dataclasses.field(default_factory=dict))]
    namespace: dict[str, Any] = {}
    exec(_add_cost_source(rows), {}, namespace)  # noqa: S102 - source built from the table above
    # a slots dataclass, not a msgspec Struct: the per-step adds are 2x faster on it, and msgspec encodes
    # and decodes it as a typed snapshot field all the same (unknown fields of a newer engine ignored)
    counters = dataclasses.make_dataclass(
        "Counters", fields, bases=(CountersBase,), slots=True, kw_only=True,
        namespace={"add_cost": namespace["add_cost"], "SCALARS": tuple(scalars),
                   "__doc__": "Cumulative sums over iterations (fields: COUNTERS)."})
    for cls in (phase_cost, iteration_cost, counters):
        cls.__module__ = module
    return CounterTypes(rows, phase_cost, iteration_cost, counters)


TYPES = make_types(COUNTERS)
PhaseCost = TYPES.PhaseCost
IterationCost = TYPES.IterationCost
Counters = TYPES.Counters


def docs_table(rows: Iterable[Counter] = COUNTERS) -> str:
    """The Markdown table of every counter (docs): name, unit, per phase, report field, Prometheus series."""
    out = ["| counter | unit | per phase | report | Prometheus | what it counts |", "|---|---|---|---|---|---|"]
    for r in rows:
        report = r.report.replace("phase.", "prefill./decode.") if r.report else "—"
        prom = f"`{r.prom}_total`" if r.prom else "—"
        out.append(f"| `{r.name}` | {r.unit} | {'yes' if r.phased else ''} | {report} | {prom} | {r.help} |")
    return "\n".join(out) + "\n"
