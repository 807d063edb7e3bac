"""Rich tables: one run's summary, and a sweep's combined table."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from loadgen.results import LatencyStats, MFUSection, RunResult
from serving_mfu.format import largest_loss, peak_warning
from serving_mfu.format import ms as _ms
from serving_mfu.format import pct as _pct
from serving_mfu.schema.report import PeakReport


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "—" if x is None else format(x, fmt)


def overview_table(r: RunResult) -> Table:
    t = Table(title="mfu-loadgen run", show_header=False)
    t.add_column(style="bold")
    t.add_column(justify="right")
    errors = ", ".join(f"{k}: {v}" for k, v in r.errors.items()) or "none"
    rows = [("completed / failed", f"{r.completed} / {r.failed}"), ("errors", errors),
            ("duration", f"{r.duration_s:.2f} s"),
            ("requested / achieved rate", f"{_num(r.requested_rate)} / {_num(r.achieved_rate)} req/s"),
            ("request throughput", f"{r.request_throughput:.2f} req/s"),
            ("output throughput", f"{r.output_throughput:.1f} tok/s"),
            ("total token throughput", f"{r.total_token_throughput:.1f} tok/s"),
            ("goodput", "—" if r.goodput is None else f"{r.goodput:.2f} req/s ({r.good_requests} good)"),
            ("mean prompt / output tokens",
             f"{_num(r.mean_input_tokens, '.1f')} / {_num(r.mean_output_tokens, '.1f')}"),
            ("tokens per chunk", _num(r.tokens_per_chunk)),
            ("concurrency max / mean", f"{r.concurrency.max} / {r.concurrency.mean:.2f}"),
            ("issue lateness p50 / p99", f"{_ms(r.lateness_s.p50)} / {_ms(r.lateness_s.p99)} ms")]
    for row in rows:
        t.add_row(*row)
    return t


def latency_table(r: RunResult) -> Table:
    t = Table(title="latency (ms)")
    for col in ("", "mean", "p50", "p90", "p99", "n"):
        t.add_column(col, justify="right" if col else "left")
    stats: list[tuple[str, LatencyStats]] = [("TTFT", r.ttft_s), ("TPOT", r.tpot_s), ("ITL (per chunk)", r.itl_s),
                                             ("E2E", r.e2e_s)]
    for name, s in stats:
        t.add_row(name, _ms(s.mean), _ms(s.p50), _ms(s.p90), _ms(s.p99), str(s.count))
    return t


def mfu_table(r: RunResult) -> Table | str:
    return section_table(r.mfu, r.mfu_error)


def section_table(m: MFUSection | None, error: str | None, what: str = "the run") -> Table | str:
    """Per-phase MFU, HFU, MBU, tokens and busy seconds of a run's `mfu` section (or why there is none)."""
    if m is None:
        return f"MFU: not available ({error})"
    if m.peak.flops_per_s:
        origin = (m.peak.source or "").split(" on ")[0].split(",")[0].split(":")[0][:48]
        peak = f"peak {m.peak.flops_per_s / 1e12:.3g} TFLOP/s × {m.peak.devices} ({m.peak.dtype}, {origin})"
    else:
        peak = "no peak known: utilization needs one"
    t = Table(title=f"MFU of {what}, from the server's counters — {peak}")
    for col in ("phase", "MFU", "HFU", "MBU", "SOL", "largest loss", "tokens", "busy s"):
        t.add_column(col, justify="right" if col not in ("phase", "largest loss") else "left")
    for name, p in (("prefill", m.prefill), ("decode", m.decode), ("overall", m.overall)):
        loss = largest_loss(p.waterfall.model_dump() if p.waterfall else None,
                            p.lever.model_dump() if p.lever else None)
        t.add_row(name, _pct(p.mfu), _pct(p.hfu), _pct(p.mbu), _pct(p.sol), loss, str(p.tokens), f"{p.time_s:.2f}")
    if m.spec_decode is not None:
        t.caption = f"spec decode acceptance rate {_pct(m.spec_decode.acceptance_rate)}"
    return t


def verdict_text(peak: PeakReport) -> Text | None:
    """A red line when the peak is not an upper bound (HFU > 1): MFU against it is not trustworthy."""
    if peak.credible is not False:
        return None
    return Text(peak_warning(peak.verdict, peak.fix), style="bold red")


def shape_text(r: RunResult) -> Text | None:
    """A red line when prompts were not the requested length (the server's usage says so)."""
    if not r.prompt_len_mismatches:
        return None
    return Text(f"{r.prompt_len_mismatches} of {r.completed} prompts were not the requested length (server's "
                f"usage.prompt_tokens ≠ input_len): prompts were {r.prompt_source}", style="bold red")


def render(r: RunResult) -> Group:
    parts = [overview_table(r), latency_table(r), mfu_table(r)]
    if (shape := shape_text(r)) is not None:
        parts.append(shape)
    if r.mfu is not None and (line := verdict_text(r.mfu.peak)) is not None:
        parts.append(line)
    return Group(*parts)


def print_summary(r: RunResult, console: Console | None = None) -> None:
    (console or Console()).print(render(r))


def sweep_table(loads: Sequence[float], results: Sequence[RunResult], label: str) -> Table:
    """One row per load point: throughput, latency percentiles and per-phase utilization."""
    t = Table(title=f"mfu-loadgen sweep over {label}")
    cols = (label, "req/s", "out tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "ITL p99", "E2E p99", "failed",
            "prefill MFU", "decode MFU", "prefill HFU", "decode HFU", "prefill MBU", "decode MBU")
    for col in cols:
        t.add_column(col, justify="right")
    for x, r in zip(loads, results):
        p, d = (r.mfu.prefill, r.mfu.decode) if r.mfu else (None, None)
        util = [_pct(getattr(ph, k)) if ph else "—" for k in ("mfu", "hfu", "mbu") for ph in (p, d)]
        t.add_row(f"{x:g}", f"{r.request_throughput:.2f}", f"{r.output_throughput:.1f}", _ms(r.ttft_s.p50),
                  _ms(r.ttft_s.p99), _ms(r.tpot_s.p50), _ms(r.itl_s.p99), _ms(r.e2e_s.p99), str(r.failed), *util)
    return t
