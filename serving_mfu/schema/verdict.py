"""Is the peak an upper bound?  The credibility verdict every surface shows (DESIGN §1, §6, §7, §11).

HFU ≤ 1 is physics: executed FLOPs cannot exceed peak × time.  When a window's executed work
does exceed it — in a phase, overall, or in more than `TOLERATED_SHARE` of its iterations (a
lone iteration can trip on clock jitter) — the peak is not an upper bound, MFU means nothing,
and the verdict says why and names the fix for the peak's source.  Nothing is clamped.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from serving_mfu.cost.counters import Counters

TOLERATED_SHARE = 0.01  # iterations with HFU > 1, as a share of all, before the verdict turns
EPS = 1e-9


class PeakVerdict(BaseModel):
    """Whether the peak divides honestly, and if not, why and what to do."""

    credible: bool | None = Field(
        description="false: executed work exceeded the peak, so MFU/HFU are not trustworthy; null: no peak")
    reason: str | None = Field(default=None, description="what exceeded the peak, with figures")
    fix: str | None = Field(default=None, description="what to change, for this peak's source")


def fix_for(source: str | None, dtype: str | None) -> str:
    """The remedy for a peak below the engine, by where the peak came from."""
    s = (source or "").lower()
    dt = dtype or "bf16"
    if s.startswith("measured"):
        return (f"the calibrated peak is below what the engine reached: re-run `serving-mfu calibrate --dtype {dt}` "
                "on an idle machine (it keeps the fastest engine kernel), or delete the cached calibration "
                "(its path is in peak.source) to fall back on the ISA peak")
    if s.startswith("isa peak"):
        return ("the ISA peak is a physical limit, so the FLOP model over-counts this model (see model.approximate) "
                "or the clock is off: please report it with the model config")
    if s.startswith("override"):
        return "the peak override is too low: raise SERVING_MFU_PEAK_FLOPS to the device's real dense peak"
    return ("check the device (SERVING_MFU_DEVICE), the compute dtype (quantization) and the devices per engine "
            "(TP x PP); an approximate FLOP model (model.approximate) can over-count")


def peak_verdict(c: Counters, flops_per_s: float | None, source: str | None = None,
                 dtype: str | None = None) -> PeakVerdict:
    """The verdict of a window's counters against its peak (null peak: credible is null)."""
    if not flops_per_s:
        return PeakVerdict(credible=None, reason="no peak: MFU and HFU are unavailable",
                           fix="set SERVING_MFU_PEAK_FLOPS and SERVING_MFU_PEAK_BANDWIDTH, SERVING_MFU_DEVICE, "
                               "or run `serving-mfu calibrate`")
    over = _over_capacity(c, "HFU", "executed_flops", "capacity_flops", "busy_capacity_flops")
    share = c.hfu_over_1_iterations / c.iterations if c.iterations else 0.0
    if share > TOLERATED_SHARE:
        over.append(f"{c.hfu_over_1_iterations} of {c.iterations} iterations ({100 * share:.1f}%) above HFU 1")
    moved = _over_bandwidth(c)
    if not over and not moved:
        return PeakVerdict(credible=True)
    if not over:  # the FLOP peak holds; the bandwidth does not (MBU > 1, or steps faster than their roofline)
        return PeakVerdict(
            credible=False,
            reason=("the engine moved more bytes than the peak bandwidth allows: " + "; ".join(moved)
                    + ". The bandwidth is not an upper bound, so MBU, SOL and the waterfall are not trustworthy"),
            fix=BANDWIDTH_FIX)
    return PeakVerdict(
        credible=False,
        reason=(f"executed work exceeds the peak ({flops_per_s / 1e9:,.1f} GFLOP/s per device): "
                + "; ".join(over) + ". The peak is not an upper bound, so MFU and HFU are not trustworthy"),
        fix=fix_for(source, dtype),
    )


BANDWIDTH_FIX = ("re-run `serving-mfu calibrate` (its bandwidth is the maximum over streaming read, copy and a GEMV "
                 "over a weight larger than the last-level cache) or raise SERVING_MFU_PEAK_BANDWIDTH; a model "
                 "whose weights fit in the last-level cache moves them from cache, not DRAM")


def _over_bandwidth(c: Counters) -> list[str]:
    """MBU > 1 in a phase or overall, and SOL > 1 (steps faster than their roofline), with figures."""
    out = _over_capacity(c, "MBU", "bytes", "capacity_bytes", "busy_capacity_bytes")
    if c.busy_s > 0 and c.busy_sol_s > c.busy_s * (1 + EPS):
        out.append(f"SOL {c.busy_sol_s / c.busy_s:.2f} (steps ran faster than their roofline)")
    return out


def _over_capacity(c: Counters, figure: str, work: str, capacity: str, busy_capacity: str) -> list[str]:
    """`<phase> <figure> x.xx` for each phase, and overall, whose work exceeds its capacity (figure > 1)."""
    out = []
    for name in ("prefill", "decode", "overall"):
        if name == "overall":
            done, cap = getattr(c, f"prefill_{work}") + getattr(c, f"decode_{work}"), getattr(c, busy_capacity)
        else:
            done, cap = getattr(c, f"{name}_{work}"), getattr(c, f"{name}_{capacity}")
        if cap > 0 and done > cap * (1 + EPS):
            out.append(f"{name} {figure} {done / cap:.2f}")
    return out
