"""Speed of light: where a step's busy time went against its roofline (DESIGN §11).

The roofline time of some work is `R = max(F_exec / peak, B / bandwidth)` (the same executed FLOPs and
bytes as the report).  A step's busy time splits exactly into compute time `F_exec / peak` (useful and
waste), memory-bound time `R − F_exec / peak`, and time beyond the roofline `busy − R` (overheads the
roofline does not explain: Python, launches, synchronisation; negative where the step ran faster than
its roofline, which is reported as it is, never clamped).

Per phase, the time the split attributed to it is divided the same way: its compute time, and the rest
(`t_phase − F_phase / peak`) split between memory-bound and beyond-roofline in the step's own ratio
`(R − F / peak) : (busy − R)` (both 0 when nothing remains).  So in a compute-bound mixed step a phase
gets no memory-bound time, even where its own bytes alone would have been the bound.
"""

from __future__ import annotations

from typing import NamedTuple


class RooflineParts(NamedTuple):
    """Seconds of one step by part: per phase (speed-of-light = compute + memory-bound), and the whole step."""

    prefill_sol_s: float
    prefill_memory_bound_s: float
    prefill_beyond_roofline_s: float
    decode_sol_s: float
    decode_memory_bound_s: float
    decode_beyond_roofline_s: float
    busy_sol_s: float
    busy_memory_bound_s: float
    busy_beyond_roofline_s: float


NONE = RooflineParts(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def roofline_parts(busy_s: float, prefill_s: float, decode_s: float, prefill_flops: float, decode_flops: float,
                   total_bytes: float, peak_flops_per_s: float | None,
                   bandwidth_bytes_per_s: float | None) -> RooflineParts:
    """The step's busy time and each phase's attributed time by part (module docstring); all zero
    without a peak or a bandwidth (no roofline to measure against)."""
    if not peak_flops_per_s or not bandwidth_bytes_per_s or busy_s <= 0:
        return NONE
    compute_p, compute_d = prefill_flops / peak_flops_per_s, decode_flops / peak_flops_per_s
    compute = compute_p + compute_d
    roof = max(compute, total_bytes / bandwidth_bytes_per_s)
    memory = roof - compute
    rest = busy_s - compute
    share = memory / rest if rest > 0 else 0.0  # of the time beyond compute, the part the memory explains
    rest_p, rest_d = prefill_s - compute_p, decode_s - compute_d
    mem_p = share * rest_p if prefill_s > 0 else 0.0
    mem_d = share * rest_d if decode_s > 0 else 0.0
    return RooflineParts(
        compute_p + mem_p if prefill_s > 0 else 0.0, mem_p, rest_p - mem_p if prefill_s > 0 else 0.0,
        compute_d + mem_d if decode_s > 0 else 0.0, mem_d, rest_d - mem_d if decode_s > 0 else 0.0,
        roof, memory, busy_s - roof)
