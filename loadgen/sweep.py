"""`mfu-loadgen sweep`: one run per request rate or concurrency, a summary, a table and plots.

A rate sweep keeps the configured open-loop arrival process (Poisson if it was closed or a
trace) and sets its rate; a concurrency sweep runs a closed loop with that many workers.
Files: DIR/point-<x>.json per point, DIR/summary.json, DIR/mfu_vs_load.png, DIR/latency_vs_load.png.
"""

from __future__ import annotations

from pathlib import Path

from loadgen.config import RunConfig
from loadgen.plots import plot_latency, plot_mfu
from loadgen.results import Mode, RunResult, SweepPoint, SweepSummary
from loadgen.runner import run_benchmark
from serving_mfu.files import write_atomic


def point_config(base: RunConfig, mode: Mode, load: float, out_dir: Path) -> RunConfig:
    name = f"point-{load:g}"
    update: dict = {"out": str(out_dir / f"{name}.json"),
                    "requests_out": str(out_dir / f"{name}-requests.jsonl") if base.requests_out else None}
    if mode == "concurrency":
        update.update(arrival="closed", max_concurrency=int(load))
    else:
        update.update(request_rate=load, arrival=base.arrival if base.arrival not in ("closed", "trace") else "poisson")
    return RunConfig.model_validate({**base.model_dump(), **update})


def summarize_point(load: float, config: RunConfig, r: RunResult) -> SweepPoint:
    util = {f"{ph}_{k}": (getattr(getattr(r.mfu, ph), k) if r.mfu else None)
            for ph in ("prefill", "decode") for k in ("mfu", "hfu", "mbu")}
    acc = r.mfu.spec_decode.acceptance_rate if r.mfu and r.mfu.spec_decode else None
    return SweepPoint(load=load, file=Path(config.out).name, completed=r.completed, failed=r.failed,
                      request_throughput=r.request_throughput, output_throughput=r.output_throughput,
                      goodput=r.goodput, ttft_s=r.ttft_s, tpot_s=r.tpot_s, itl_s=r.itl_s, e2e_s=r.e2e_s,
                      utilization=util, acceptance_rate=acc)


async def run_sweep(base: RunConfig, mode: Mode, loads: list[float], out_dir: str | Path,
                    plots: bool = True) -> tuple[SweepSummary, list[RunResult]]:
    """Run every point in order, then write summary.json and (unless plots=False) the PNGs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results, points = [], []
    for load in loads:
        config = point_config(base, mode, load, out)
        result = await run_benchmark(config)
        results.append(result)
        points.append(summarize_point(load, config, result))
    summary = SweepSummary(mode=mode, points=points)
    write_atomic(out / "summary.json", summary.model_dump_json(indent=2))
    if plots:
        plot_mfu(summary, out / "mfu_vs_load.png")
        plot_latency(summary, out / "latency_vs_load.png")
    return summary, results
