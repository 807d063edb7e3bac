"""`serving-mfu demo` (`make demo`): the whole product on the embedded tiny model, in one command.

Builds the tiny local model if absent, measures this machine's peak with `calibrate`, starts a
vLLM server with the MFU scheduler, the endpoint plugin and n-gram speculation, runs a
prefill-heavy, a decode-heavy and a mixed scenario with the load generator, then a short
concurrency sweep, prints the per-phase table, writes results JSON, the iteration trace and
PNG plots (the analysis notebook's default input), and always stops the server it started.

Output folder: results.json (all scenarios), <scenario>.json (loadgen results), sweep/
(point-*.json, summary.json, PNGs), trace.jsonl (every engine iteration), peak.json,
phase_utilization.png, mfu_timeseries.png, server.log.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from rich.console import Console
from rich import box
from rich.table import Table

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


class Scenario(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="strings")  # an unlimited rate survives the JSON round trip

    name: str
    what: str
    dataset: str
    input_len: int
    output_len: int
    num_prompts: int
    request_rate: float
    max_concurrency: int


def scenarios(short: bool) -> list[Scenario]:
    """Three loads that stress prefill, decode, and both at once (short: the suite's quick form)."""
    n = 2 if short else 1
    return [
        Scenario(name="prefill-heavy", what="long prompts, 4 output tokens", dataset="synthetic",
                 input_len=768 // n, output_len=4, num_prompts=16 // n // n, request_rate=math.inf,
                 max_concurrency=4),
        Scenario(name="decode-heavy", what="short repetitive prompts, long outputs (n-gram drafts accept)",
                 dataset="repetitive", input_len=32, output_len=160 // n // n, num_prompts=8 // n,
                 request_rate=math.inf, max_concurrency=8),
        Scenario(name="mixed", what="Poisson arrivals, a shared system prompt (prefix cache), chunked prefill "
                 "beside running decodes", dataset="shared-prefix", input_len=384 // n, output_len=64 // n, num_prompts=16 // n // n,
                 request_rate=4.0, max_concurrency=8),
    ]


class ScenarioResult(BaseModel):
    scenario: Scenario
    result: dict


class DemoResult(BaseModel):
    model: str
    peak_source: str | None
    scenarios: list[ScenarioResult]
    seconds: float


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{1000 * x:.1f} ms"


def table(results: list[ScenarioResult]) -> Table:
    """Two rows per scenario, prefill then decode, so that it fits an 80-column terminal."""
    t = Table(title="serving-mfu demo, against this machine's calibrated peak", box=box.SIMPLE_HEAD,
              caption="acc.: speculative drafts accepted; TTFT and TPOT: medians")
    for col in ("scenario", "phase", "MFU", "HFU", "MBU", "acc.", "TTFT", "TPOT"):
        t.add_column(col, justify="left" if col in ("scenario", "phase") else "right")
    for sr in results:
        r = sr.result
        m = r.get("mfu") or {}
        spec = m.get("spec_decode") or {}
        for i, phase in enumerate(("prefill", "decode")):
            p = m.get(phase) or {}
            first = i == 0
            t.add_row(sr.scenario.name if first else "", phase, _pct(p.get("mfu")), _pct(p.get("hfu")),
                      _pct(p.get("mbu")), _pct(spec.get("acceptance_rate")) if first else "",
                      _ms(r["ttft_s"].get("p50")) if first else "", _ms(r["tpot_s"].get("p50")) if first else "",
                      end_section=not first)
    return t


def plot(results: list[ScenarioResult], out_dir: Path) -> list[Path]:
    """Bar chart of per-phase MFU/HFU/MBU by scenario, and each scenario's per-second MFU series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    names = [sr.scenario.name for sr in results]
    for ax, metric in zip(axes, ("mfu", "hfu", "mbu")):
        for offset, phase in ((-0.2, "prefill"), (0.2, "decode")):
            vals = [100 * (((sr.result.get("mfu") or {}).get(phase) or {}).get(metric) or 0.0) for sr in results]
            ax.bar([i + offset for i in range(len(names))], vals, width=0.4, label=phase)
        ax.set_xticks(range(len(names)), names, rotation=15)
        ax.set_title(metric.upper())
        ax.set_ylabel("% of peak")
        ax.legend()
    fig.suptitle("serving-mfu demo: prefill vs decode, by scenario")
    fig.tight_layout()
    paths.append(out_dir / "phase_utilization.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4))
    t0 = 0.0
    for sr in results:
        series = (sr.result.get("mfu") or {}).get("series") or []
        for phase, style in (("prefill", "-"), ("decode", "--")):
            xs = [t0 + p["t_s"] for p in series if p.get(f"{phase}_mfu") is not None]
            ys = [100 * p[f"{phase}_mfu"] for p in series if p.get(f"{phase}_mfu") is not None]
            if xs:
                ax.plot(xs, ys, style, marker="o", label=f"{sr.scenario.name} {phase}")
        t0 += max([p["t_s"] for p in series], default=0.0) + 1.0
    ax.set_xlabel("seconds (scenarios back to back)")
    ax.set_ylabel("MFU, % of peak")
    ax.set_title("per-second MFU during the demo")
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "mfu_timeseries.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def run_demo(out_dir: Path, model: str | None = None, short: bool = False, console: Console | None = None) -> DemoResult:
    """Run the demo; `model` None means the embedded tiny model on the vLLM CPU engine."""
    from loadgen import LengthSpec, RunConfig, run_benchmark_sync, run_sweep
    from scheduler_hooks.server import VLLMServer
    from serving_mfu.calibrate import calibrate, save_calibration
    from serving_mfu.engine_models import ensure_model

    console = console or Console()
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {"SERVING_MFU_DIR": str(out_dir / "snapshots"), "SERVING_MFU_TRACE": str(out_dir / "trace.jsonl")}
    cpu = model is None
    if cpu:
        with console.status("building the tiny local model (once)…"):
            model = str(ensure_model("tiny-llama-engine"))
        console.print(f"model: {model}")
        peak = calibrate(dtype="bf16", duration_s=1.0 if short else 3.0)
        save_calibration(peak, out_dir / "peak.json")
        env["SERVING_MFU_CALIBRATION"] = str(out_dir / "peak.json")
        console.print(f"peak (calibrated): {peak.flops_per_s / 1e12:.2f} TFLOP/s bf16, "
                      f"{peak.bandwidth_bytes_per_s / 1e9:.1f} GB/s copy")
    server = VLLMServer(model, out_dir / "server.log", env=env, speculative_config=NGRAM, cpu=cpu)
    results: list[ScenarioResult] = []
    try:
        with console.status("starting the vLLM server with the MFU scheduler (~30 s on a CPU)…"):
            server.start()
        console.print(f"server: {server.base_url} (log: {server.log_path})")
        for i, sc in enumerate(scenarios(short)):
            console.rule(f"{sc.name}: {sc.what}")
            cfg = RunConfig(base_url=server.base_url, model=server.served_name, dataset=sc.dataset,
                            input=LengthSpec(mean=sc.input_len), output=LengthSpec(mean=sc.output_len),
                            num_prompts=sc.num_prompts, request_rate=sc.request_rate,
                            max_concurrency=sc.max_concurrency, warmup_requests=2 if i == 0 else 0,
                            seed=i, out=str(out_dir / f"{sc.name}.json"), quiet=short)
            result = run_benchmark_sync(cfg)
            results.append(ScenarioResult(scenario=sc, result=json.loads(result.model_dump_json())))
        console.rule("sweep: decode-heavy load at rising concurrency")
        sweep_base = RunConfig(base_url=server.base_url, model=server.served_name, dataset="repetitive",
                               input=LengthSpec(mean=32), output=LengthSpec(mean=48 if short else 96),
                               num_prompts=4 if short else 8, seed=7, quiet=short)
        asyncio.run(run_sweep(sweep_base, "concurrency", [1, 4] if short else [1, 2, 4, 8], out_dir / "sweep"))
    finally:
        with console.status("stopping the server…"):
            server.stop()
    console.print(table(results))
    peak_source = None
    first = results[0].result.get("mfu") if results else None
    if first:
        peak_source = first["peak"]["source"]
    demo = DemoResult(model=model, peak_source=peak_source, scenarios=results, seconds=time.monotonic() - started)
    (out_dir / "results.json").write_text(demo.model_dump_json(indent=2))
    pngs = plot(results, out_dir)
    console.print(f"results: {out_dir / 'results.json'}; plots: {', '.join(str(p) for p in pngs)}; "
                  f"{demo.seconds:.0f} s in all")
    return demo


def main_demo(out_dir: str, model: str | None, short: bool) -> int:
    try:
        run_demo(Path(out_dir), model=model, short=short)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted: the server was stopped")
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main_demo(os.environ.get("DEMO_OUT", "demo-results"), None, False))
