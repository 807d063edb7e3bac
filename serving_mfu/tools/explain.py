"""`serving-mfu explain`: why the MFU is what it is — the loss waterfall per phase and the lever (DESIGN §11).

It reads a report from a running server (`/metrics/mfu`, over `--window`) or replays a trace, prints
where each phase's time went (useful, waste, memory-bound, beyond the roofline; overall also idle),
the waste by cause and one sentence per phase naming the largest loss; `--png` draws the waterfall.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from serving_mfu.files import write_figure
from serving_mfu.format import DASH, pct, si
from serving_mfu.schema.report import MFUReport

PARTS = ("useful", "waste", "memory_bound", "beyond_roofline", "idle")
LABELS = {"useful": "useful", "waste": "waste", "memory_bound": "memory-bound", "beyond_roofline": "beyond roofline",
          "idle": "idle"}
COLORS = {"useful": "#2e7d32", "waste": "#c62828", "memory_bound": "#1565c0", "beyond_roofline": "#9e9e9e",
          "idle": "#e0e0e0"}
SCOPES = ("prefill", "decode", "overall")


def fetch_report(url: str, window_s: float | None, timeout_s: float = 20.0) -> MFUReport:
    """The server's /metrics/mfu (over the last `window_s` seconds if given); ValueError says why not."""
    import httpx

    params = {"window": f"{window_s:g}"} if window_s else {}
    try:
        r = httpx.get(url.rstrip("/") + "/metrics/mfu", params=params, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise ValueError(f"cannot reach {url}: {exc}") from None
    if r.status_code != 200:
        raise ValueError(f"{url}/metrics/mfu answered {r.status_code}: {r.text[:300]}")
    return MFUReport.model_validate(r.json())


def waterfall_table(report: Any, title: str) -> Table:
    """One row per phase (and overall): each part of the waterfall, SOL, and the lever."""
    t = Table(title=title, caption="fractions of each phase's time (overall: of the engines' wall time)")
    t.add_column("", justify="left")
    for part in PARTS:
        t.add_column(LABELS[part], justify="right")
    t.add_column("SOL", justify="right")
    for scope in SCOPES:
        ph = getattr(report, scope)
        w = ph.waterfall
        cells = [pct(getattr(w, p), digits=1) if w is not None and getattr(w, p) is not None else DASH
                 for p in PARTS]
        t.add_row(scope, *cells, pct(ph.sol, digits=1))
    return t


def causes_table(report: Any) -> Table:
    t = Table(title="waste by cause (FLOPs)")
    t.add_column("cause", justify="left")
    for scope in ("prefill", "decode"):
        t.add_column(scope, justify="right")
    causes = sorted({c for s in ("prefill", "decode") for c in getattr(report, s).waste_by_cause})
    for cause in causes:
        t.add_row(cause.replace("_", " "), *(si(getattr(report, s).waste_by_cause.get(cause), "FLOP")
                                             if cause in getattr(report, s).waste_by_cause else DASH
                                             for s in ("prefill", "decode")))
    return t


def levers(report: Any) -> list[str]:
    """One sentence per phase and overall: its largest loss, or why there is no waterfall."""
    out = []
    for scope in SCOPES:
        ph = getattr(report, scope)
        if ph.waterfall is None:
            out.append(f"{scope}: no waterfall (it needs a peak and a bandwidth, and busy time)")
        elif ph.lever is None:
            out.append(f"{scope}: nothing lost")
        else:
            out.append(f"{scope}: {ph.lever.text}")
    return out


def plot(report: Any, path: Path, title: str) -> Path:
    """A stacked horizontal bar per phase and overall: the waterfall's parts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 2.6))
    for row, scope in enumerate(reversed(SCOPES)):
        w = getattr(report, scope).waterfall
        left = 0.0
        for part in PARTS:
            value = getattr(w, part) if w is not None else None
            if not value:
                continue
            ax.barh(row, value, left=left, color=COLORS[part], label=LABELS[part] if row == 2 else None,
                    edgecolor="white")
            if value > 0.06:
                ax.text(left + value / 2, row, f"{100 * value:.0f}%", ha="center", va="center", fontsize=8)
            left += value
    ax.set_yticks(range(len(SCOPES)), list(reversed(SCOPES)))
    ax.set_xlim(min(0.0, ax.get_xlim()[0]), max(1.0, ax.get_xlim()[1]))
    ax.set_xlabel("share of time")
    ax.set_title(title, fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles, labels, ncol=5, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.28))
    fig.tight_layout()
    write_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def explain(report: Any, title: str, console: Console, png: Path | None = None) -> None:
    console.print(waterfall_table(report, title))
    console.print(causes_table(report))
    for line in levers(report):
        console.print(line)
    if report.peak.credible is False:
        console.print(f"[bold red]peak not credible: {report.peak.verdict} — {report.peak.fix}[/bold red]")
    if png is not None:
        console.print(f"waterfall: {plot(report, png, title)}")
