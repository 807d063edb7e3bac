"""Splitting a mixed iteration's busy time between prefill and decode (DESIGN §5).

Default: the Shapley split of the roofline cost `R(S) = max(F_S/peak, B_S/bandwidth)`
(weights counted once in `R(prefill+decode)`):

    t_p ∝ (R(p) + R(p+d) − R(d)) / 2,   t_d ∝ (R(d) + R(p+d) − R(p)) / 2

scaled so `t_p + t_d` is the measured busy time.  Alternative: FLOP-proportional.  Repair:
if a phase would run above peak (HFU > 1) while the whole iteration does not, the least
time needed to bring it to exactly peak is moved to it from the other phase.
"""

from __future__ import annotations

SPLIT_METHODS = ("shapley", "flop_proportional")


def roofline_s(flops: float, bytes_: float, engine_peak_flops_per_s: float,
               engine_bandwidth_bytes_per_s: float) -> float:
    """Roofline time of some work: max(FLOPs / peak, bytes / bandwidth)."""
    return max(flops / engine_peak_flops_per_s, bytes_ / engine_bandwidth_bytes_per_s)


def shapley_weights(
    f_p: float, f_d: float, b_p: float, b_d: float, b_pd: float, peak: float, bandwidth: float
) -> tuple[float, float]:
    """Shapley values of the two phases in the roofline cost game (they add up to R(p+d))."""
    r_p = roofline_s(f_p, b_p, peak, bandwidth)
    r_d = roofline_s(f_d, b_d, peak, bandwidth)
    r_pd = roofline_s(f_p + f_d, b_pd, peak, bandwidth)
    return (r_p + r_pd - r_d) / 2, (r_d + r_pd - r_p) / 2


def split_time(
    busy_s: float,
    f_p: float,
    f_d: float,
    b_p: float,
    b_d: float,
    b_pd: float,
    engine_peak_flops_per_s: float | None,
    engine_bandwidth_bytes_per_s: float | None,
    method: str = "shapley",
) -> tuple[float, float, float]:
    """Return (prefill seconds, decode seconds, seconds moved by the HFU repair)."""
    if method not in SPLIT_METHODS:
        raise ValueError(f"unknown time split {method!r}; choose one of {', '.join(SPLIT_METHODS)}")
    if busy_s <= 0:
        return 0.0, 0.0, 0.0
    if f_p == 0 and b_p == 0:
        return 0.0, busy_s, 0.0
    if f_d == 0 and b_d == 0:
        return busy_s, 0.0, 0.0
    if method == "shapley" and engine_peak_flops_per_s and engine_bandwidth_bytes_per_s:
        w_p, w_d = shapley_weights(f_p, f_d, b_p, b_d, b_pd, engine_peak_flops_per_s, engine_bandwidth_bytes_per_s)
    else:
        w_p, w_d = f_p, f_d
    total = w_p + w_d
    if total > 0:  # each share on its own, so neither can round below zero
        t_p, t_d = busy_s * (w_p / total), busy_s * (w_d / total)
    else:
        t_p = t_d = busy_s / 2
    moved = 0.0
    if engine_peak_flops_per_s and f_p + f_d <= busy_s * engine_peak_flops_per_s:
        need_p, need_d = f_p / engine_peak_flops_per_s, f_d / engine_peak_flops_per_s
        if t_p < need_p:
            moved, t_p, t_d = need_p - t_p, need_p, busy_s - need_p
        elif t_d < need_d:
            moved, t_d, t_p = need_d - t_d, need_d, busy_s - need_d
        # when both phases need all but nothing of the time, rounding can undercut the other one
        t_p, t_d = max(t_p, need_p), max(t_d, need_d)
    return t_p, t_d, moved
