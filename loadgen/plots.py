"""PNG plots of a sweep (matplotlib, Agg backend): utilization and latency against load."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from loadgen.results import SweepSummary  # noqa: E402
from serving_mfu.files import write_figure

LABELS = {"request_rate": "request rate (req/s)", "concurrency": "concurrency (requests in flight)"}


def _values(summary: SweepSummary, key: str) -> list[float]:
    return [float("nan") if p.utilization.get(key) is None else 100 * p.utilization[key] for p in summary.points]


def plot_mfu(summary: SweepSummary, path: str | Path) -> None:
    """Prefill and decode MFU, HFU and MBU (percent) against load, one panel per phase."""
    loads = [p.load for p in summary.points]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for ax, phase in zip(axes, ("prefill", "decode")):
        for k, style in (("mfu", "o-"), ("hfu", "s--"), ("mbu", "^:")):
            ax.plot(loads, _values(summary, f"{phase}_{k}"), style, label=k.upper())
        ax.set_title(f"{phase}")
        ax.set_xlabel(LABELS[summary.mode])
        ax.set_ylabel("% of peak")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    if all(p.utilization.get("prefill_mfu") is None for p in summary.points):
        fig.suptitle("no MFU: the server has no /metrics/mfu/counters")
    fig.tight_layout()
    write_figure(fig, path, dpi=100)
    plt.close(fig)


def plot_latency(summary: SweepSummary, path: str | Path) -> None:
    """TTFT, TPOT, ITL and end-to-end latency p50 and p99 (ms) against load."""
    loads = [p.load for p in summary.points]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for ax, (name, attr) in zip(axes.flat, (("TTFT", "ttft_s"), ("TPOT", "tpot_s"), ("ITL (per chunk)", "itl_s"),
                                            ("end-to-end", "e2e_s"))):
        for q, style in (("p50", "o-"), ("p99", "s--")):
            ys = [float("nan") if getattr(getattr(p, attr), q) is None else 1000 * getattr(getattr(p, attr), q)
                  for p in summary.points]
            ax.plot(loads, ys, style, label=q)
        ax.set_title(name)
        ax.set_ylabel("ms")
        ax.set_ylim(bottom=0)
        ax.set_xlabel(LABELS[summary.mode])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    write_figure(fig, path, dpi=100)
    plt.close(fig)
