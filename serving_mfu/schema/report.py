"""The MFU report (DESIGN §6): pydantic models served at /metrics/mfu, built from `Counters`.

Each section's raw sums are the counter table's rows that name it (serving_mfu.cost.counters); the
hand-written part of a section is its derived figures.  `make_report_types` builds the models of a table.

MFU = useful FLOPs / (time × peak × devices); HFU the same with executed FLOPs; MBU =
bytes / (time × bandwidth × devices).  A figure is null when its time or peak is unknown.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, Field, create_model

from serving_mfu.cost.counters import PHASES, TYPES, Counter, CounterTypes
from serving_mfu.schema.verdict import peak_verdict


class Waterfall(BaseModel):
    """Where the time went, as fractions that sum to 1 (DESIGN §11): per phase over its attributed time,
    overall over the engines' wall time (summed over engines, as it accrues at each step's end) with `idle`."""

    useful: float = Field(description="useful work at peak: the MFU")
    waste: float = Field(description="executed work users did not keep, at peak: HFU − MFU (by cause: waste_by_cause)")
    memory_bound: float = Field(description="time the memory explains: roofline time above compute time")
    beyond_roofline: float = Field(description="time the roofline does not explain (Python, launches, sync); "
                                   "negative where steps ran faster than their roofline (then the peak or "
                                   "bandwidth is not credible)")
    idle: float | None = Field(default=None, description="overall only: wall time with no step running")


class Lever(BaseModel):
    """The largest part of the waterfall other than useful work, and for waste its largest cause."""

    part: Literal["waste", "memory_bound", "beyond_roofline", "idle"]
    cause: str | None = Field(default=None, description="for waste: its largest cause (a waste_by_cause key)")
    text: str = Field(description="the lever in one sentence")


class PhaseBase(BaseModel):
    """One phase (prefill or decode): utilization; its sums are the table's `phase.*` rows."""

    mfu: float | None = Field(description="useful FLOPs / (time_s × peak × devices); null without a peak")
    hfu: float | None = Field(description="executed FLOPs / (time_s × peak × devices); null without a peak")
    mbu: float | None = Field(description="bytes / (time_s × peak bandwidth × devices); null without a peak")
    useful_flops_per_s: float | None
    sol: float | None = Field(default=None, description="speed-of-light attainment: roofline time / time, where "
                              "roofline = max(executed FLOPs / peak, bytes / bandwidth) per step; null without a "
                              "peak and a bandwidth")
    waterfall: Waterfall | None = Field(default=None, description="where the time went (null without a roofline)")
    waste_by_cause: dict[str, float] = Field(default_factory=dict, description="waste FLOPs by cause; they sum to "
                                             "executed − useful FLOPs")
    lever: Lever | None = Field(default=None, description="the largest loss, and what to do about it")


class OverallBase(BaseModel):
    """Both phases together, over busy time; `wall_mfu` over wall time (idle included)."""

    wall_mfu: float | None
    mixed_time_fraction: float | None = Field(
        description="share of busy time from mixed prefill+decode iterations, whose split is modelled"
    )


class SpecDecodeBase(BaseModel):
    """Speculative decoding: drafts verified, accepted and rejected, and the drafter's FLOPs."""

    acceptance_rate: float | None


class MoEReport(BaseModel):
    active_experts_per_layer: list[float] = Field(description="mean distinct experts hit per iteration, per MoE layer")
    mean_active_experts: float
    source: Literal["measured", "expected", "mixed"] = Field(
        description="measured from routing, or expected under uniform routing"
    )
    imbalance: float | None = Field(description="mean over iterations and layers of max/mean tokens per expert")


class PrefixCacheBase(BaseModel):
    """Local prefix-cache hits: positions not computed, and what they would have cost."""


class KVTransferBase(BaseModel):
    """KV that crossed the engines' KV connectors (disaggregated prefill/decode, offloading): prompt
    positions neither computed here nor local prefix-cache hits, from vLLM's own PrefillStats."""

    roles: list[str] = Field(default_factory=list, description="KV roles of the engines counted (producer, "
                             "consumer, both, none)")


class LoRABase(BaseModel):
    """LoRA adapter work, part of the phases' figures: useful at each adapter's own ranks over the
    positions users kept, executed at the serving kernels' padded rank (--max-lora-rank)."""


class RecomputeBase(BaseModel):
    """Positions recomputed after preemption: executed, not useful."""


class DiscardedBase(BaseModel):
    """Kept decode positions whose tokens were never delivered: a stop token or max_tokens ended the
    request inside a speculative verify step.  Executed, not useful."""


class PeakReport(BaseModel):
    device: str | None
    flops_per_s: float | None = Field(description="per device")
    bandwidth_bytes_per_s: float | None = Field(description="per device")
    dtype: str | None
    source: str | None = Field(description="datasheet, measurement (calibrate), ISA peak (CPU) or override")
    devices: int
    isa_flops_per_s: float | None = Field(
        default=None, description="CPU: theoretical ISA peak per device (cores × FLOPs/cycle × max clock), the "
        "physical limit the peak is held against")
    credible: bool | None = Field(
        default=None, description="false: executed work exceeded this peak in the window (HFU > 1), so it is not "
        "an upper bound and MFU/HFU are not trustworthy; null: no peak")
    verdict: str | None = Field(default=None, description="why the peak is not credible, with figures")
    fix: str | None = Field(default=None, description="what to change to get an honest peak")


class AnomalyBase(BaseModel):
    """Invariants that failed, shown loudly (never clamped), and other anomalies by kind."""

    unknown_architecture: bool
    missing_peak: bool
    counts: dict[str, int] = Field(default_factory=dict, description="other anomalies by kind (hook errors, bad records…)")


GPU_UTIL_NOTE = ("GPU-Util (nvidia-smi) is the fraction of time a kernel was running, not how much math it did: "
                 "a memory-bound decode keeps it near 100% at a few % MFU.  SM activity (NVML GPM, Hopper+) is "
                 "the fraction of SMs busy.  Both are means over all sampled time, idle included: compare them "
                 "with overall.wall_mfu.")


class GpuUtilStatus(BaseModel):
    """What an engine's GPU sampler measures, or why it does not (travels in snapshots and Totals)."""

    available: bool = Field(description="GPU-Util is sampled on at least one device")
    reason: str | None = Field(default=None, description="why GPU-Util is not sampled")
    devices: int = Field(default=0, description="devices whose GPU-Util is sampled")
    sm_active_devices: int = Field(default=0, description="devices whose SM activity (NVML GPM) is sampled")
    sm_active_reason: str | None = Field(default=None, description="why SM activity is missing (on some devices)")
    interval_s: float | None = Field(default=None, description="sampling interval")
    device_names: list[str] = Field(default_factory=list)


class GpuUtilBase(BaseModel):
    """GPU-Util and SM activity over the same window as the MFU figures (NVML, sampled on the engines).

    Means are device-time weighted: Σ(util × dt) / Σ dt over the sampled devices.  A null figure
    comes with its reason."""

    available: bool = Field(description="the engines sample GPU-Util (false: see reason)")
    reason: str | None = Field(description="why gpu_util is null")
    gpu_util: float | None = Field(description="mean GPU-Util (0-1): fraction of time a kernel was running")
    sm_active: float | None = Field(description="mean SM activity (0-1, NVML GPM SM_UTIL): fraction of SMs busy")
    sm_active_reason: str | None = Field(description="why sm_active is null, or covers only some devices")
    devices: int = Field(description="devices sampled")
    sm_active_devices: int
    note: str = GPU_UTIL_NOTE


class ModelReport(BaseModel):
    name: str
    model_type: str
    approximate: bool
    flop_model: Literal["formula", "derived", "approximate"] = Field(
        "formula", description="formula: the model_type's registered FLOP formula (checked against torch's "
        "FlopCounterMode); derived: linear FLOPs read off the model's modules built on the meta device; "
        "approximate: the generic reading of the standard config fields")


class MFUReportBase(BaseModel):
    """Everything /metrics/mfu serves, since start or over a window (sections: see REPORT_FIELDS)."""


# ------------------------------------------------------------------------------ sections from the table
#: Each section of the report: the hand-written part (its derived figures) and its description in MFUReport.
#: Its raw sums are the counter table's rows whose `report` names it (serving_mfu.cost.counters).
SECTIONS: dict[str, tuple[str, type[BaseModel], str]] = {
    "phase": ("PhaseReport", PhaseBase, "One phase (prefill or decode): utilization and the sums behind it"),
    "overall": ("OverallReport", OverallBase, "both phases over busy time; wall_mfu over wall time"),
    "spec_decode": ("SpecDecodeReport", SpecDecodeBase, "speculative decoding (null: no drafts)"),
    "prefix_cache": ("PrefixCacheReport", PrefixCacheBase, "local prefix-cache hits"),
    "recompute": ("RecomputeReport", RecomputeBase, "recomputation after preemption"),
    "discarded": ("DiscardedReport", DiscardedBase, "kept decode positions never delivered"),
    "anomalies": ("AnomalyReport", AnomalyBase, "invariants that failed, and other anomalies by kind"),
    "kv_transfer": ("KVTransferReport", KVTransferBase, "KV received and sent through KV connectors "
                    "(prefix_cache counts local hits only)"),
    "lora": ("LoRAReport", LoRABase, "LoRA adapter work (included in the phases)"),
    "gpu_util": ("GpuUtilReport", GpuUtilBase, "GPU-Util and SM activity over the same window (NVML); "
                 "available=false with the reason where not sampled"),
}


class ReportTypes(NamedTuple):
    """The report types one counter table makes (the engine's, from COUNTERS; a test's, from its own)."""

    counters: CounterTypes
    sections: dict[str, type[BaseModel]]
    MFUReport: type[BaseModel]


def _section_rows(rows: tuple[Counter, ...]) -> dict[str, list[Counter]]:
    out: dict[str, list[Counter]] = {}
    for r in rows:
        if r.report is not None:
            out.setdefault(r.report.split(".")[0], []).append(r)
    return out


def make_report_types(types: CounterTypes = TYPES) -> ReportTypes:
    """Each section model (its hand-written figures plus a field per table row that names it) and
    MFUReport; a section the table names that has no hand-written part gets a plain model."""
    by_section = _section_rows(types.rows)
    models: dict[str, type[BaseModel]] = {}
    for section in [*SECTIONS, *(s for s in by_section if s not in SECTIONS)]:
        name, base, _ = SECTIONS.get(section, (f"{section.title().replace('_', '')}Report", BaseModel, ""))
        fields: dict[str, Any] = {r.report.split(".")[1]: (r.type, Field(r.type(), description=r.help))
                                  for r in by_section.get(section, ())}
        bases: Any = (models["phase"], base) if section == "overall" else base
        models[section] = create_model(name, __base__=bases, __module__=__name__, __doc__=base.__doc__, **fields)
    sec = models
    spec: Any = (sec["spec_decode"] | None, Field(description=SECTIONS["spec_decode"][2]))
    fields = {
        "window_s": (float | None, Field(description="null: since start")),
        "time_split": (str, ...),
        "prefill": (sec["phase"], ...), "decode": (sec["phase"], ...),
        "overall": (sec["overall"], Field(description=SECTIONS["overall"][2])),
        "spec_decode": spec,
        "moe": (MoEReport | None, ...),
        **{s: (sec[s], Field(description=SECTIONS[s][2])) for s in ("prefix_cache", "recompute", "discarded")},
        "peak": (PeakReport, ...), "model": (ModelReport, ...),
        "anomalies": (sec["anomalies"], Field(description=SECTIONS["anomalies"][2])),
        **{s: (sec[s], Field(default_factory=sec[s], description=SECTIONS[s][2])) for s in ("kv_transfer", "lora")},
        **{s: (m, Field(default_factory=m)) for s, m in sec.items() if s not in SECTIONS},
        "as_of": (float | None, Field(default=None, description="wall-clock seconds: every step the engines "
                                      "finished before then is counted (null: an in-process tracker's report)")),
        "age_s": (float | None, Field(default=None, description="seconds between as_of and this answer")),
        "gpu_util": (sec["gpu_util"] | None, Field(default=None, description=SECTIONS["gpu_util"][2])),
    }
    report = create_model("MFUReport", __base__=MFUReportBase, __module__=__name__, **fields)
    return ReportTypes(types, models, report)


REPORT = make_report_types()
PhaseReport = REPORT.sections["phase"]
OverallReport = REPORT.sections["overall"]
SpecDecodeReport = REPORT.sections["spec_decode"]
PrefixCacheReport = REPORT.sections["prefix_cache"]
RecomputeReport = REPORT.sections["recompute"]
DiscardedReport = REPORT.sections["discarded"]
AnomalyReport = REPORT.sections["anomalies"]
KVTransferReport = REPORT.sections["kv_transfer"]
LoRAReport = REPORT.sections["lora"]
GpuUtilReport = REPORT.sections["gpu_util"]
MFUReport = REPORT.MFUReport


# ------------------------------------------------------------------------------ building it
def _ratio(num: float, den: float | None) -> float | None:
    return num / den if den else None


def _raw_sums(c: Any, rows: tuple[Counter, ...]) -> dict[str, dict[str, Any]]:
    """{section: {field: value}} of every table row the report shows; `phase.*` rows per phase."""
    out: dict[str, dict[str, Any]] = {section: {} for section in (*PHASES, *SECTIONS)}
    for r in rows:
        if r.report is None:
            continue
        section, attr = r.report.split(".")
        if section == "phase":
            for phase, name in zip(PHASES, r.names()):
                out[phase][attr] = getattr(c, name)
        else:
            out.setdefault(section, {})[attr] = getattr(c, r.name)
    return out


def _utilization(sums: dict[str, Any], time_s: float, capacity_flops: float, capacity_bytes: float) -> dict:
    """MFU = useful / capacity, HFU = executed / capacity, MBU = bytes / byte capacity (DESIGN §6)."""
    return dict(mfu=_ratio(sums["useful_flops"], capacity_flops), hfu=_ratio(sums["executed_flops"], capacity_flops),
                mbu=_ratio(sums["bytes"], capacity_bytes), useful_flops_per_s=_ratio(sums["useful_flops"], time_s))


#: Waste by cause (DESIGN §11): each cause's counters; per phase, they sum to its executed − useful FLOPs.
WASTE_CAUSES: dict[str, dict[str, tuple[str, ...]]] = {
    "prefill": {"recompute": ("recompute_flops", "lora_recompute_flops"),
                "lora_padding": ("prefill_lora_padding_flops",), "graph_padding": ("prefill_graph_padding_flops",)},
    "decode": {"rejected_drafts": ("rejected_flops", "lora_rejected_flops"),
               "discarded": ("discarded_flops", "lora_discarded_flops"), "drafter": ("drafter_flops",),
               "lora_padding": ("decode_lora_padding_flops",), "graph_padding": ("decode_graph_padding_flops",)},
}
ADVICE = {
    "rejected_drafts": "fewer or better drafts (a lower num_speculative_tokens, or a better drafter)",
    "discarded": "stops that land inside verify steps; fewer drafts near max_tokens",
    "recompute": "preemption: more KV cache (gpu_memory_utilization) or fewer concurrent requests",
    "drafter": "a cheaper drafter, or fewer drafts",
    "lora_padding": "a --max-lora-rank closer to the adapters' own ranks",
    "graph_padding": "CUDA-graph capture sizes closer to the batch sizes served",
    "memory_bound": "more requests per step (larger batches) or fewer bytes per token (quantized weights or KV "
                    "cache) raise it",
    "beyond_roofline": "scheduling, Python and kernel launches between the math: larger steps or CUDA graphs "
                       "amortize them",
    "idle": "the engine waited for requests: more load, or fewer engines",
}


def _causes(c: Any, phase: str) -> dict[str, float]:
    return {cause: float(sum(getattr(c, name) for name in names)) for cause, names in WASTE_CAUSES[phase].items()}


def _lever(scope: str, w: Waterfall, causes: dict[str, float]) -> Lever | None:
    """The largest non-useful part (and for waste its largest cause), in one sentence."""
    parts = {"waste": w.waste, "memory_bound": w.memory_bound, "beyond_roofline": w.beyond_roofline,
             **({"idle": w.idle} if w.idle is not None else {})}
    part = max(parts, key=lambda k: parts[k])
    if parts[part] <= 0:
        return None
    share = f"{100 * parts[part]:.0f}% of {scope} time"
    if part == "waste":
        cause = max(causes, key=lambda k: causes[k]) if causes and max(causes.values()) > 0 else None
        text = f"{share} ran work users did not keep" + (
            f", mostly {cause.replace('_', ' ')}: {ADVICE[cause]}" if cause else "")
        return Lever(part=part, cause=cause, text=text)
    what = {"memory_bound": "was bound by memory bandwidth", "beyond_roofline": "went beyond the roofline",
            "idle": "had no step running"}[part]
    return Lever(part=part, text=f"{share} {what}: {ADVICE[part]}")


def _phase_roofline(c: Any, phase: str, sums: dict[str, Any]) -> dict[str, Any]:
    """sol, the waterfall over the phase's attributed time, waste by cause and the lever."""
    t, cap_f, cap_b = sums["time_s"], getattr(c, f"{phase}_capacity_flops"), getattr(c, f"{phase}_capacity_bytes")
    causes = _causes(c, phase)
    if not (t > 0 and cap_f > 0 and cap_b > 0):
        return {"waste_by_cause": causes}
    w = Waterfall(useful=sums["useful_flops"] / cap_f,
                  waste=(sums["executed_flops"] - sums["useful_flops"]) / cap_f,
                  memory_bound=getattr(c, f"{phase}_memory_bound_s") / t,
                  beyond_roofline=getattr(c, f"{phase}_beyond_roofline_s") / t)
    return {"sol": getattr(c, f"{phase}_sol_s") / t, "waterfall": w, "waste_by_cause": causes,
            "lever": _lever(phase, w, causes)}


def _overall_roofline(c: Any, both: dict[str, Any]) -> dict[str, Any]:
    """sol over busy time; the waterfall over the engines' wall time as their counters accrued it (busy +
    idle between steps, summed over engines, the capacity alike), so the parts sum to 1 and a recording
    rule over the same counters gives the same figure; the lever."""
    causes: dict[str, float] = {}
    for phase in PHASES:
        for cause, flops in _causes(c, phase).items():
            causes[cause] = causes.get(cause, 0.0) + flops
    if not (c.busy_s > 0 and c.busy_capacity_flops > 0 and c.busy_capacity_bytes > 0 and c.wall_capacity_flops > 0
            and c.wall_s > 0):
        return {"waste_by_cause": causes}
    w = Waterfall(useful=both["useful_flops"] / c.wall_capacity_flops,
                  waste=(both["executed_flops"] - both["useful_flops"]) / c.wall_capacity_flops,
                  memory_bound=c.busy_memory_bound_s / c.wall_s, beyond_roofline=c.busy_beyond_roofline_s / c.wall_s,
                  idle=c.idle_s / c.wall_s)
    return {"sol": c.busy_sol_s / c.busy_s, "waterfall": w, "waste_by_cause": causes,
            "lever": _lever("wall", w, causes)}


def _moe(c: Any) -> MoEReport | None:
    if not c.moe_iterations:
        return None
    per_layer = [s / c.moe_iterations for s in c.moe_active_experts_sum]
    measured = c.moe_measured_iterations
    return MoEReport(active_experts_per_layer=per_layer,
                     mean_active_experts=sum(per_layer) / len(per_layer) if per_layer else 0.0,
                     source="measured" if measured == c.moe_iterations else "expected" if measured == 0 else "mixed",
                     imbalance=_ratio(c.moe_imbalance_sum, measured))


def build_report(
    c: Any,
    peak: PeakReport,
    model: ModelReport,
    time_split: str,
    window_s: float | None = None,
    wall_capacity_flops: float | None = None,
    wall_s: float | None = None,
    gpu: GpuUtilStatus | None = None,
    kv_roles: list[str] | None = None,
    types: ReportTypes = REPORT,
) -> Any:
    """Turn counters into the report: every raw sum the table shows, and the figures derived from them.

    Denominators are the counters' capacities (seconds × peak × devices, summed over the engines that
    spent them), so data-parallel engines aggregate correctly.  A live window passes its own `wall_s`
    and `wall_capacity_flops` (idle time at the end included).  `gpu` is the engines' GPU-sampler
    status; `kv_roles` their KV roles.
    """
    raw = _raw_sums(c, types.counters.rows)
    phases = {p: {**raw[p], **_utilization(raw[p], raw[p]["time_s"], getattr(c, f"{p}_capacity_flops"),
                                           getattr(c, f"{p}_capacity_bytes")), **_phase_roofline(c, p, raw[p])}
              for p in PHASES}
    both = {k: raw["prefill"][k] + raw["decode"][k] for k in raw["prefill"]}
    both["time_s"] = c.busy_s
    wall = c.wall_s if wall_s is None else wall_s
    wall_cap = c.wall_capacity_flops if wall_capacity_flops is None else wall_capacity_flops
    overall = {**both, **raw["overall"], "wall_s": wall,
               **_utilization(both, c.busy_s, c.busy_capacity_flops, c.busy_capacity_bytes),
               "wall_mfu": _ratio(both["useful_flops"], wall_cap),
               "mixed_time_fraction": _ratio(c.mixed_busy_s, c.busy_s),
               **_overall_roofline(c, both)}
    spec = ({**raw["spec_decode"], "acceptance_rate": _ratio(c.accepted_tokens, c.draft_tokens)}
            if c.draft_tokens or c.drafter_flops else None)
    v = peak_verdict(c, peak.flops_per_s, peak.source, peak.dtype)
    extra = {s: raw[s] for s in raw if s not in SECTIONS and s not in PHASES}
    return types.MFUReport(
        window_s=window_s, time_split=time_split, **phases, overall=overall, spec_decode=spec, moe=_moe(c),
        prefix_cache=raw["prefix_cache"], recompute=raw["recompute"], discarded=raw["discarded"],
        peak=peak.model_copy(update={"credible": v.credible, "verdict": v.reason, "fix": v.fix}), model=model,
        anomalies={**raw["anomalies"], "unknown_architecture": model.approximate,
                   "missing_peak": peak.flops_per_s is None, "counts": dict(c.anomalies)},
        gpu_util={**raw["gpu_util"], **_gpu_util_figures(c, gpu)},
        kv_transfer={**raw["kv_transfer"], "roles": sorted(set(kv_roles or ["none"]))},
        lora=raw["lora"], **extra,
    )


def gpu_util_report(c: Any, status: GpuUtilStatus | None, types: ReportTypes = REPORT) -> Any:
    """The window's GPU-Util section from its counters (differences of cumulative sums) and the status."""
    return types.sections["gpu_util"](**_raw_sums(c, types.counters.rows)["gpu_util"], **_gpu_util_figures(c, status))


def _gpu_util_figures(c: Any, status: GpuUtilStatus | None) -> dict[str, Any]:
    """The GPU-Util section's figures from a window's counters (differences of cumulative sums) and the
    engines' sampler status; its sums are the table's `gpu_util.*` rows."""
    sampled, sm_sampled = c.gpu_sampled_s, c.gpu_sm_sampled_s
    if status is None:
        status = (GpuUtilStatus(available=True) if sampled > 0 else
                  GpuUtilStatus(available=False, reason="not sampled: no engine reported GPU sampling"))
    util = c.gpu_util_s / sampled if sampled > 0 else None
    sm = c.gpu_sm_active_s / sm_sampled if sm_sampled > 0 else None
    reason = None
    if util is None:
        reason = status.reason if not status.available else "no GPU-Util samples in this window"
    if sm is None:
        if not status.available:
            sm_reason = status.sm_active_reason or status.reason
        elif status.sm_active_devices == 0:
            sm_reason = status.sm_active_reason or "SM activity not sampled"
        else:
            sm_reason = "no SM-activity samples in this window"
    elif status.sm_active_devices < status.devices:
        sm_reason = (f"SM activity of {status.sm_active_devices} of {status.devices} devices"
                     + (f": {status.sm_active_reason}" if status.sm_active_reason else ""))
    else:
        sm_reason = None
    return dict(available=status.available, reason=reason, gpu_util=util, sm_active=sm, sm_active_reason=sm_reason,
                devices=status.devices, sm_active_devices=status.sm_active_devices)
