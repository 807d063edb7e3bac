"""The MFU report (DESIGN §6): pydantic models served at /metrics/mfu, built from `Counters`.

MFU = useful FLOPs / (time × peak × devices); HFU the same with executed FLOPs; MBU =
bytes / (time × bandwidth × devices).  A figure is null when its time or peak is unknown.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from serving_mfu.runtime.counters import Counters
from serving_mfu.runtime.verdict import peak_verdict


class PhaseReport(BaseModel):
    """One phase (prefill or decode): utilization and the sums behind it."""

    mfu: float | None = Field(description="useful FLOPs / (time_s × peak × devices); null without a peak")
    hfu: float | None = Field(description="executed FLOPs / (time_s × peak × devices); null without a peak")
    mbu: float | None = Field(description="bytes / (time_s × peak bandwidth × devices); null without a peak")
    useful_flops: float
    executed_flops: float
    bytes: float
    tokens: int = Field(description="useful positions: first-time prompt positions (prefill), kept positions (decode)")
    time_s: float = Field(description="busy seconds attributed to this phase")
    useful_flops_per_s: float | None


class OverallReport(PhaseReport):
    """Both phases together, over busy time; `wall_mfu` over wall time (idle included)."""

    busy_s: float
    wall_s: float
    wall_mfu: float | None
    mixed_time_fraction: float | None = Field(
        description="share of busy time from mixed prefill+decode iterations, whose split is modelled"
    )
    iterations: int


class SpecDecodeReport(BaseModel):
    draft_tokens: int
    accepted_tokens: int
    acceptance_rate: float | None
    rejected_tokens: int
    rejected_flops: float
    drafter_flops: float


class MoEReport(BaseModel):
    active_experts_per_layer: list[float] = Field(description="mean distinct experts hit per iteration, per MoE layer")
    mean_active_experts: float
    source: Literal["measured", "expected", "mixed"] = Field(
        description="measured from routing, or expected under uniform routing"
    )
    imbalance: float | None = Field(description="mean over iterations and layers of max/mean tokens per expert")


class PrefixCacheReport(BaseModel):
    hit_tokens: int
    saved_flops: float = Field(description="FLOPs the cached prefixes would have cost")


class KVTransferReport(BaseModel):
    """KV that crossed the engines' KV connectors (disaggregated prefill/decode, offloading): prompt
    positions neither computed here nor local prefix-cache hits, from vLLM's own PrefillStats."""

    roles: list[str] = Field(default_factory=list, description="KV roles of the engines counted (producer, "
                             "consumer, both, none)")
    received_tokens: int = Field(default=0, description="prompt positions whose KV a connector loaded")
    received_flops: float = Field(default=0.0, description="FLOPs those positions would have cost here")
    received_bytes: float = Field(default=0.0, description="their KV bytes (all layers)")
    sent_tokens: int = Field(default=0, description="positions whose KV a connector stored or sent")
    sent_bytes: float = Field(default=0.0, description="their KV bytes (all layers)")


class LoRAReport(BaseModel):
    """LoRA adapter work, part of the phases' figures: useful at each adapter's own ranks over the
    positions users kept, executed at the serving kernels' padded rank (--max-lora-rank)."""

    tokens: int = Field(default=0, description="useful positions of requests that ran an adapter")
    useful_flops: float = Field(default=0.0, description="adapter FLOPs of those positions (in the phases' useful)")
    executed_flops: float = Field(default=0.0, description="adapter FLOPs the kernels ran (in the phases' executed)")


class RecomputeReport(BaseModel):
    tokens: int
    flops: float


class DiscardedReport(BaseModel):
    """Kept decode positions whose tokens were never delivered: a stop token or max_tokens ended the
    request inside a speculative verify step.  Executed, not useful."""

    tokens: int
    flops: float


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


class AnomalyReport(BaseModel):
    hfu_over_1_iterations: int = Field(description="iterations whose executed FLOPs exceed peak × time")
    repaired_iterations: int = Field(description="mixed iterations whose split moved time to keep a phase at HFU ≤ 1")
    time_repaired_s: float
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


class GpuUtilReport(BaseModel):
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
    sampled_s: float = Field(description="device-seconds sampled in the window (summed over devices)")
    sm_sampled_s: float = Field(description="device-seconds of SM-activity samples in the window")
    sample_errors: int = Field(description="NVML reads that failed in the window (their time is left out)")
    note: str = GPU_UTIL_NOTE


def gpu_util_report(c: Counters, status: GpuUtilStatus | None) -> GpuUtilReport:
    """The window's GPU-Util section from its counters (differences of cumulative sums) and the status."""
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
    return GpuUtilReport(available=status.available, reason=reason, gpu_util=util, sm_active=sm,
                         sm_active_reason=sm_reason, devices=status.devices,
                         sm_active_devices=status.sm_active_devices, sampled_s=sampled, sm_sampled_s=sm_sampled,
                         sample_errors=c.gpu_sample_errors)


class ModelReport(BaseModel):
    name: str
    model_type: str
    approximate: bool
    flop_model: Literal["formula", "approximate"] = Field(
        "formula", description="formula: the model_type's registered FLOP formula (checked against torch's "
        "FlopCounterMode); approximate: the generic reading of the standard config fields")


class MFUReport(BaseModel):
    """Everything /metrics/mfu serves, since start or over a window."""

    window_s: float | None = Field(description="null: since start")
    time_split: str
    prefill: PhaseReport
    decode: PhaseReport
    overall: OverallReport
    spec_decode: SpecDecodeReport | None
    moe: MoEReport | None
    prefix_cache: PrefixCacheReport
    recompute: RecomputeReport
    discarded: DiscardedReport
    peak: PeakReport
    model: ModelReport
    anomalies: AnomalyReport
    kv_transfer: KVTransferReport = Field(default_factory=KVTransferReport, description="KV received and sent "
                                          "through KV connectors (prefix_cache counts local hits only)")
    lora: LoRAReport = Field(default_factory=LoRAReport, description="LoRA adapter work (included in the phases)")
    as_of: float | None = Field(default=None, description="wall-clock seconds: every step the engines finished "
                                "before then is counted (null: an in-process tracker's report)")
    age_s: float | None = Field(default=None, description="seconds between as_of and this answer")
    gpu_util: GpuUtilReport | None = Field(
        default=None, description="GPU-Util and SM activity over the same window (NVML); available=false with "
        "the reason where not sampled")


def _ratio(num: float, den: float | None) -> float | None:
    return num / den if den else None


def _phase(useful: float, executed: float, bytes_: float, tokens: int, time_s: float,
           capacity_flops: float, capacity_bytes: float) -> dict:
    return dict(
        mfu=_ratio(useful, capacity_flops),
        hfu=_ratio(executed, capacity_flops),
        mbu=_ratio(bytes_, capacity_bytes),
        useful_flops=useful,
        executed_flops=executed,
        bytes=bytes_,
        tokens=tokens,
        time_s=time_s,
        useful_flops_per_s=_ratio(useful, time_s),
    )


def build_report(
    c: Counters,
    peak: PeakReport,
    model: ModelReport,
    time_split: str,
    window_s: float | None = None,
    wall_capacity_flops: float | None = None,
    wall_s: float | None = None,
    gpu: GpuUtilStatus | None = None,
    kv_roles: list[str] | None = None,
) -> MFUReport:
    """Turn counters into the report.

    Denominators are the counters' capacities (seconds × peak × devices, summed over the
    engines that spent them), so data-parallel engines aggregate correctly.  A live window
    passes its own `wall_s` and `wall_capacity_flops` (idle time at the end included).
    `gpu` is the engines' GPU-sampler status; the `gpu_util` section is always present (without a
    status and without samples it says "not sampled").  `kv_roles`: the engines' KV roles.
    """
    wall = c.wall_s if wall_s is None else wall_s
    wall_cap = c.wall_capacity_flops if wall_capacity_flops is None else wall_capacity_flops
    useful = c.prefill_useful_flops + c.decode_useful_flops
    overall = _phase(useful, c.prefill_executed_flops + c.decode_executed_flops,
                     c.prefill_bytes + c.decode_bytes, c.prefill_tokens + c.decode_tokens, c.busy_s,
                     c.busy_capacity_flops, c.busy_capacity_bytes)
    spec = None
    if c.draft_tokens or c.drafter_flops:
        spec = SpecDecodeReport(
            draft_tokens=c.draft_tokens,
            accepted_tokens=c.accepted_tokens,
            acceptance_rate=_ratio(c.accepted_tokens, c.draft_tokens),
            rejected_tokens=c.rejected_tokens,
            rejected_flops=c.rejected_flops,
            drafter_flops=c.drafter_flops,
        )
    moe = None
    if c.moe_iterations:
        per_layer = [s / c.moe_iterations for s in c.moe_active_experts_sum]
        if c.moe_measured_iterations == c.moe_iterations:
            source = "measured"
        elif c.moe_measured_iterations == 0:
            source = "expected"
        else:
            source = "mixed"
        moe = MoEReport(
            active_experts_per_layer=per_layer,
            mean_active_experts=sum(per_layer) / len(per_layer) if per_layer else 0.0,
            source=source,
            imbalance=_ratio(c.moe_imbalance_sum, c.moe_measured_iterations),
        )
    v = peak_verdict(c, peak.flops_per_s, peak.source, peak.dtype)
    peak = peak.model_copy(update={"credible": v.credible, "verdict": v.reason, "fix": v.fix})
    return MFUReport(
        window_s=window_s,
        time_split=time_split,
        prefill=PhaseReport(**_phase(c.prefill_useful_flops, c.prefill_executed_flops, c.prefill_bytes,
                                     c.prefill_tokens, c.prefill_time_s, c.prefill_capacity_flops,
                                     c.prefill_capacity_bytes)),
        decode=PhaseReport(**_phase(c.decode_useful_flops, c.decode_executed_flops, c.decode_bytes,
                                    c.decode_tokens, c.decode_time_s, c.decode_capacity_flops,
                                    c.decode_capacity_bytes)),
        overall=OverallReport(
            **overall,
            busy_s=c.busy_s,
            wall_s=wall,
            wall_mfu=_ratio(useful, wall_cap),
            mixed_time_fraction=_ratio(c.mixed_busy_s, c.busy_s),
            iterations=c.iterations,
        ),
        spec_decode=spec,
        moe=moe,
        prefix_cache=PrefixCacheReport(hit_tokens=c.hit_tokens, saved_flops=c.saved_flops),
        recompute=RecomputeReport(tokens=c.recompute_tokens, flops=c.recompute_flops),
        discarded=DiscardedReport(tokens=c.discarded_tokens, flops=c.discarded_flops),
        peak=peak,
        model=model,
        anomalies=AnomalyReport(
            hfu_over_1_iterations=c.hfu_over_1_iterations,
            repaired_iterations=c.repaired_iterations,
            time_repaired_s=c.time_repaired_s,
            unknown_architecture=model.approximate,
            missing_peak=peak.flops_per_s is None,
            counts=dict(c.anomalies),
        ),
        gpu_util=gpu_util_report(c, gpu),
        kv_transfer=KVTransferReport(
            roles=sorted(set(kv_roles or ["none"])), received_tokens=c.kv_received_tokens,
            received_flops=c.kv_received_flops, received_bytes=c.kv_received_bytes,
            sent_tokens=c.kv_sent_tokens, sent_bytes=c.kv_sent_bytes),
        lora=LoRAReport(tokens=c.lora_tokens, useful_flops=c.lora_useful_flops, executed_flops=c.lora_executed_flops),
    )
