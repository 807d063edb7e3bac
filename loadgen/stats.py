"""Figures of a run from its request records: percentiles, throughput, goodput, errors."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from loadgen.config import SLOs
from loadgen.records import RequestRecord
from loadgen.results import Concurrency, CostStats, LatencyStats

PERCENTILES = (50, 90, 95, 99)


def latency_stats(values: Iterable[float]) -> LatencyStats:
    """Mean, min, max and linear-interpolated percentiles (numpy's default) of the samples."""
    x = np.fromiter(values, dtype=float)
    if x.size == 0:
        return LatencyStats()
    p = np.percentile(x, PERCENTILES)
    return LatencyStats(count=int(x.size), mean=float(x.mean()), min=float(x.min()), max=float(x.max()),
                        **{f"p{q}": float(v) for q, v in zip(PERCENTILES, p)})


def cost_stats(values: Iterable[float]) -> CostStats:
    """`latency_stats` of per-request costs (FLOPs, device-seconds), and their sum."""
    x = list(values)
    return CostStats(**latency_stats(x).model_dump(), total=float(sum(x)))


def meets_slos(rec: RequestRecord, slos: SLOs) -> bool:
    """A completed request within every given bound (a one-token answer has no TPOT to miss)."""
    if not rec.ok:
        return False
    checks = ((slos.ttft_s, rec.ttft_s), (slos.tpot_s, rec.tpot_s), (slos.e2e_s, rec.e2e_s))
    return all(bound is None or value is None or value <= bound for bound, value in checks)


def error_counts(records: Sequence[RequestRecord]) -> dict[str, int]:
    return dict(sorted(Counter(r.error for r in records if not r.ok).items()))


def concurrency(records: Sequence[RequestRecord], duration_s: float) -> Concurrency:
    """Max requests in flight (sweep over send/finish events) and the time-average (Little's law)."""
    events = sorted([(r.sent_at_s, 1) for r in records if r.finished_at_s is not None]
                    + [(r.finished_at_s, -1) for r in records if r.finished_at_s is not None],
                    key=lambda e: (e[0], e[1]))
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    busy = sum(r.finished_at_s - r.sent_at_s for r in records if r.finished_at_s is not None)
    return Concurrency(max=peak, mean=busy / duration_s if duration_s > 0 else 0.0)


def achieved_rate(records: Sequence[RequestRecord]) -> float | None:
    """Issue rate over the issue span: (n − 1) / (last issue − first issue)."""
    if len(records) < 2:
        return None
    issued = [r.issued_at_s for r in records]
    span = max(issued) - min(issued)
    return (len(records) - 1) / span if span > 0 else math.inf


def length_mismatches(records: Sequence[RequestRecord], exact: bool) -> int | None:
    """Completed requests whose server-reported prompt length differs from the requested one
    (None when the requested lengths were only estimates, e.g. data-set text)."""
    if not exact:
        return None
    return sum(1 for r in records if r.ok and r.usage_from_server and r.prompt_tokens != r.input_len)


def tokens(records: Sequence[RequestRecord], field: str) -> list[int]:
    return [getattr(r, field) for r in records if r.ok and getattr(r, field) is not None]


def figures(records: Sequence[RequestRecord], slos: SLOs, duration_s: float) -> dict:
    """The RunResult fields computed from the records (all but config, timing and MFU)."""
    ok = [r for r in records if r.ok]
    ins, outs = tokens(records, "prompt_tokens"), tokens(records, "completion_tokens")
    chunks = sum(r.chunks for r in ok)
    good = sum(meets_slos(r, slos) for r in ok) if slos.any() else None
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    return dict(
        completed=len(ok), failed=len(records) - len(ok), errors=error_counts(records),
        ttft_s=latency_stats(r.ttft_s for r in ok if r.ttft_s is not None),
        tpot_s=latency_stats(r.tpot_s for r in ok if r.tpot_s is not None),
        itl_s=latency_stats(x for r in ok for x in r.itl_s),
        e2e_s=latency_stats(r.e2e_s for r in ok),
        lateness_s=latency_stats(r.lateness_s for r in records),
        queue_wait_s=latency_stats(r.queue_wait_s for r in records),
        request_throughput=per_s(len(ok)), output_throughput=per_s(sum(outs)),
        input_throughput=per_s(sum(ins)), total_token_throughput=per_s(sum(ins) + sum(outs)),
        achieved_rate=achieved_rate(records),
        goodput=None if good is None else per_s(good), good_requests=good,
        total_input_tokens=sum(ins), total_output_tokens=sum(outs),
        mean_input_tokens=sum(ins) / len(ins) if ins else None,
        mean_output_tokens=sum(outs) / len(outs) if outs else None,
        tokens_per_chunk=sum(outs) / chunks if chunks else None,
        usage_missing=sum(not r.usage_from_server for r in ok),
        concurrency=concurrency(records, duration_s),
    )
