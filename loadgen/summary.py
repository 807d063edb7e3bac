"""Rich tables: one run's summary, and a sweep's combined table."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from loadgen.results import CostStats, LatencyStats, MFUSection, RequestCostSection, RunResult, TenantCost
from serving_mfu.format import largest_loss, peak_warning, si
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


def _secs(x: float | None) -> str:
    return "—" if x is None else (_ms(x, unit=True) if abs(x) < 1 else f"{x:.4g} s")


def _usd(x: float | None) -> str:
    """Dollars to 4 significant digits (at least cents), never in e-notation: 8.278e-05 → '$0.00008278'."""
    if x is None:
        return "—"
    decimals = max(2, 3 - math.floor(math.log10(abs(x)))) if x else 2
    return f"${x:,.{decimals}f}"


def cost_table(c: RequestCostSection | None, error: str | None) -> Table | Group | Text:
    """Per-request FLOPs and device-seconds of the joined requests: distribution and totals, and the prices."""
    if c is None:
        return Text(f"per-request cost: not available ({error})")
    t = Table(title=f"per-request cost, from the server: {c.joined} of {c.looked_up} completed requests joined by "
                    f"X-Request-Id, {c.missing} missing")
    for col in ("", "mean", "p50", "p90", "p99", "total"):
        t.add_column(col, justify="right" if col else "left")
    rows: list[tuple[str, CostStats, object]] = [
        ("useful FLOPs", c.useful_flops, lambda x: si(x, "FLOP")),
        ("executed FLOPs", c.executed_flops, lambda x: si(x, "FLOP")),
        ("device-seconds", c.device_seconds, _secs), ("  prefill", c.prefill_device_seconds, _secs),
        ("  decode", c.decode_device_seconds, _secs)]
    for name, s, fmt in rows:
        t.add_row(name, fmt(s.mean), fmt(s.p50), fmt(s.p90), fmt(s.p99), fmt(s.total if s.count else None))
    if c.note:
        t.caption = c.note
    if c.device_hour_price is None:
        return t
    return Group(t, Text(f"at ${c.device_hour_price:g} per device-hour: {_usd(c.usd_per_1m_input_tokens)} per 1M "
                         f"input tokens ({c.prompt_tokens} tokens), {_usd(c.usd_per_1m_output_tokens)} per 1M output "
                         f"tokens ({c.output_tokens} tokens); {_usd(c.usd)} in all"))


def tenant_table(tenants: list[TenantCost], title: str) -> Table:
    """One row per tenant: requests, FLOPs, device-seconds, tokens, and the cost where a price was given."""
    t = Table(title=title)
    for col in ("tenant", "requests", "useful FLOPs", "executed FLOPs", "device-s", "prompt tok", "output tok",
                "USD", "USD / 1M tok"):
        t.add_column(col, justify="left" if col == "tenant" else "right")
    for x in tenants:
        t.add_row(x.tenant, str(x.requests), si(x.useful_flops, "FLOP"), si(x.executed_flops, "FLOP"),
                  _secs(x.device_seconds), str(x.prompt_tokens), str(x.output_tokens), _usd(x.usd),
                  _usd(x.usd_per_1m_tokens))
    return t


def tenants_part(tenants: list[TenantCost] | None, error: str | None, price: float | None) -> Table | Text:
    """`wrap`'s per-tenant table over the command, or one line saying why there is none."""
    if tenants is None:
        return Text(f"per-tenant cost: not available ({error})")
    if not tenants:
        return Text("per-tenant cost: no tenant finished a request or ran a step during the command")
    title = "what each tenant cost during the command, from the server's /metrics/mfu/tenants"
    table = tenant_table(tenants, title)
    if price is not None:
        table.caption = f"at ${price:g} per device-hour; USD / 1M tok: per 1M prompt + output tokens"
    return table


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
    parts = [overview_table(r), latency_table(r), mfu_table(r), cost_table(r.request_costs, r.request_costs_error)]
    if r.request_costs is not None and len(r.request_costs.tenants) > 1:
        parts.append(tenant_table(r.request_costs.tenants, "the run's requests by tenant"))
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
