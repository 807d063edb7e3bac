"""`serving-mfu demo` (`make demo`): the whole product on locally built models, in one command.

Builds the demo's models if absent (a 137 M-parameter Llama and a 165 M-parameter Qwen3-MoE, random
weights: big enough that the CPU is the bottleneck, so prefill is compute-bound and decode
memory-bound; `--short`, the suite's form, uses the 2-layer tiny ones), calibrates this machine's peak
once (cached, where a CPU engine with no setting finds it), starts a vLLM server with the MFU
scheduler, the endpoint plugin and n-gram speculation, runs a prefill-heavy, a decode-heavy, a mixed
and a sampled scenario (whose drafts are often rejected: decode MFU below HFU) with the load
generator, a short concurrency sweep, then one scenario on the MoE model (experts per layer); prints
the per-phase table (with SOL and the largest loss) and the waterfall plot, with
the peak and its credibility, writes results JSON, the iteration trace and PNG plots (the analysis
notebook's default input), and always stops the servers it started.

Output folder: results.json (all scenarios), <scenario>.json (loadgen results), sweep/
(point-*.json, summary.json, PNGs), trace.jsonl (every iteration of the dense engine), peak.json,
phase_utilization.png, waterfall.png, mfu_timeseries.png, server.log, server-moe.log.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from loadgen import LengthSpec, RunConfig, run_benchmark_sync, run_sweep
from serving_mfu.files import write_atomic, write_figure
from serving_mfu.format import largest_loss, ms, pct, peak_warning
from serving_mfu.peaks.calibrate import cache_path, cached_calibration, calibrate, save_calibration
from serving_mfu.runtime.settings import read_settings
from serving_mfu.tools.engine_models import ensure_model
from serving_mfu.tools.progress import calibration_progress
from serving_mfu.tools.server import VLLMServer

# prompt_lookup_min=1: drafts from single-token matches, so sampled decoding rejects many of them.
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 1}
MOE_MODEL = "tiny-qwen3-moe-engine"
TABLE_WIDTH = 118  # the demo table's columns, unwrapped
# the full demo's models, and the short (suite) form's: (dense, MoE)
DEMO_MODELS = {False: ("small-llama-engine", "small-qwen3-moe-engine"), True: ("tiny-llama-engine", MOE_MODEL)}


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
    temperature: float = 0.0
    model: str = "dense"  # "dense" (tiny Llama) or "moe" (tiny Qwen3-MoE, its own server)


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
        Scenario(name="sampled", what="temperature 1: n-gram drafts are often rejected, so decode MFU < HFU",
                 dataset="repetitive", input_len=32, output_len=96 // n, num_prompts=8 // n, request_rate=math.inf,
                 max_concurrency=8, temperature=1.0),
        Scenario(name="moe", what="the Qwen3-MoE model: experts activated per layer",
                 dataset="synthetic", input_len=256 // n, output_len=32 // n, num_prompts=8 // n,
                 request_rate=math.inf, max_concurrency=4, model="moe"),
    ]


class ScenarioResult(BaseModel):
    scenario: Scenario
    result: dict


class DemoResult(BaseModel):
    model: str
    moe_model: str | None = None
    peak_flops_per_s: float | None = None
    peak_source: str | None
    isa_flops_per_s: float | None = None
    scenarios: list[ScenarioResult]
    seconds: float


def _pct(x: float | None) -> str:
    return pct(x, digits=1)


def _ms(x: float | None) -> str:
    return ms(x, unit=True)


def table(results: list[ScenarioResult], title: str = "serving-mfu demo") -> Table:
    """Two rows per scenario, prefill then decode, so that it fits an 80-column terminal."""
    t = Table(title=title, box=box.SIMPLE_HEAD,
              caption="SOL: roofline time / time; largest loss: the biggest part of the waterfall after useful "
                    "work (memory: memory-bound, overhead: beyond the roofline); acc.: speculative drafts accepted; "
                    "TTFT and TPOT: medians")
    for col in ("scenario", "phase", "MFU", "HFU", "MBU", "SOL", "largest loss", "acc.", "TTFT", "TPOT"):
        t.add_column(col, justify="left" if col in ("scenario", "phase", "largest loss") else "right")
    for sr in results:
        r = sr.result
        m = r.get("mfu") or {}
        spec = m.get("spec_decode") or {}
        for i, phase in enumerate(("prefill", "decode")):
            p = m.get(phase) or {}
            first = i == 0
            t.add_row(sr.scenario.name if first else "", phase, _pct(p.get("mfu")), _pct(p.get("hfu")),
                      _pct(p.get("mbu")), _pct(p.get("sol")), largest_loss(p.get("waterfall"), p.get("lever")),
                      _pct(spec.get("acceptance_rate")) if first else "",
                      _ms(r["ttft_s"].get("p50")) if first else "", _ms(r["tpot_s"].get("p50")) if first else "",
                      end_section=not first)
    return t


def notes(results: list[ScenarioResult]) -> list[str]:
    """Lines under the table: MoE experts per layer, and a red verdict per scenario whose peak is not credible."""
    out = []
    for sr in results:
        m = sr.result.get("mfu") or {}
        moe = m.get("moe")
        if moe:
            per_layer = ", ".join(f"{x:.1f}" for x in moe["active_experts_per_layer"])
            out.append(f"{sr.scenario.name}: experts activated per MoE layer per iteration [{per_layer}] "
                       f"({moe['source']}{' under uniform routing' if moe['source'] == 'expected' else ''})")
        over = (m.get("anomalies") or {}).get("hfu_over_1_iterations") or 0
        peak = m.get("peak") or {}
        if peak.get("credible") is False or over:
            warning = peak_warning(peak.get("verdict"), peak.get("fix"), f" ({over} iterations with HFU > 1)")
            out.append(f"[bold red]{escape(f'{sr.scenario.name}: {warning}')}[/bold red]")
    return out


WATERFALL_PARTS = (("useful", "#2e7d32"), ("waste", "#c62828"), ("memory_bound", "#1565c0"),
                   ("beyond_roofline", "#9e9e9e"))


def plot_waterfalls(results: list[ScenarioResult], path: Path, plt: Any) -> Path:
    """One stacked bar per scenario and phase: where its time went (DESIGN §11)."""
    fig, ax = plt.subplots(figsize=(11, 4))
    labels = []
    for i, (sr, phase) in enumerate((sr, ph) for sr in results for ph in ("prefill", "decode")):
        w = (((sr.result.get("mfu") or {}).get(phase) or {}).get("waterfall")) or {}
        bottom = 0.0
        for part, color in WATERFALL_PARTS:
            value = 100 * (w.get(part) or 0.0)
            ax.bar(i, value, bottom=bottom, color=color, label=part.replace("_", " ") if i == 0 else None)
            bottom += value
        labels.append(f"{sr.scenario.name}\n{phase}")
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("% of the phase's time")
    ax.set_title("where each phase's time went: useful, waste, memory-bound, beyond the roofline")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    write_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


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
    write_figure(fig, paths[-1], dpi=110)
    plt.close(fig)

    paths.append(plot_waterfalls(results, out_dir / "waterfall.png", plt))

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
    write_figure(fig, paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _peak_line(peak: dict) -> str:
    isa = peak.get("isa_flops_per_s")
    beside = f"; ISA peak (physical limit) {isa / 1e9:,.1f} GFLOP/s" if isa else ""
    return f"peak used: {peak['flops_per_s'] / 1e9:,.1f} GFLOP/s {peak['dtype']}{beside}"


def _cpu_peak(console: Console, short: bool, out_dir: Path, recalibrate: bool) -> None:
    """This machine's calibration, measured once and cached where the engine's default finds it."""

    cache = read_settings().calibration_cache_dir()
    cached = None if recalibrate else cached_calibration("bf16", cache)
    if cached is not None:
        peak, path = cached
        console.print(f"peak: cached calibration {path} ({peak.flops_per_s / 1e9:,.1f} GFLOP/s bf16; "
                      "--recalibrate to measure again)")
    else:
        console.print("calibrating this machine's bf16 peak once (max over the engine's kernels and sizes)…")
        with calibration_progress(console) as on_event:
            peak = calibrate(dtype="bf16", duration_s=2.0 if short else 4.0, on_event=on_event)
        path = save_calibration(peak, cache_path("bf16", cache))
        console.print(f"peak: {peak.flops_per_s / 1e9:,.1f} GFLOP/s bf16, cached in {path}")
    save_calibration(peak, out_dir / "peak.json")


def _run_scenarios(server, scs: list[Scenario], out_dir: Path, short: bool, console: Console,
                   first: bool) -> list[ScenarioResult]:

    results = []
    for i, sc in enumerate(scs):
        console.rule(f"{sc.name}: {sc.what}")
        cfg = RunConfig(base_url=server.base_url, model=server.served_name, dataset=sc.dataset,
                        input=LengthSpec(mean=sc.input_len), output=LengthSpec(mean=sc.output_len),
                        num_prompts=sc.num_prompts, request_rate=sc.request_rate,
                        max_concurrency=sc.max_concurrency, warmup_requests=2 if i == 0 else 0,
                        temperature=sc.temperature, seed=i, out=str(out_dir / f"{sc.name}.json"), quiet=short)
        result = run_benchmark_sync(cfg)
        results.append(ScenarioResult(scenario=sc, result=json.loads(result.model_dump_json())))
    return results


def run_demo(out_dir: Path, model: str | None = None, short: bool = False, console: Console | None = None,
             recalibrate: bool = False) -> DemoResult:
    """Run the demo; `model` None means the embedded tiny models on the vLLM CPU engine."""

    console = console or Console(width=max(Console().width, TABLE_WIDTH))  # the table has 10 columns
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {"SERVING_MFU_DIR": str(out_dir / "snapshots"), "SERVING_MFU_TRACE": str(out_dir / "trace.jsonl")}
    cpu = model is None
    moe_model = None
    if cpu:
        with console.status("building the local models (once)…"):
            dense_name, moe_name = DEMO_MODELS[short]
            model = str(ensure_model(dense_name))
            moe_model = str(ensure_model(moe_name))
        console.print(f"model: {model}")
        _cpu_peak(console, short, out_dir, recalibrate)
    scs = scenarios(short)
    dense = [sc for sc in scs if sc.model == "dense"]
    moe = [sc for sc in scs if sc.model == "moe"] if moe_model else []
    results: list[ScenarioResult] = []
    server = VLLMServer(model, out_dir / "server.log", env=env, speculative_config=NGRAM, cpu=cpu)
    try:
        with console.status("starting the vLLM server with the MFU scheduler (~30 s on a CPU)…"):
            server.start()
        console.print(f"server: {server.base_url} (log: {server.log_path})")
        results += _run_scenarios(server, dense, out_dir, short, console, first=True)
        console.rule("sweep: decode-heavy load at rising concurrency")
        sweep_base = RunConfig(base_url=server.base_url, model=server.served_name, dataset="repetitive",
                               input=LengthSpec(mean=32), output=LengthSpec(mean=48 if short else 64),
                               num_prompts=4 if short else 8, seed=7, quiet=short)
        asyncio.run(run_sweep(sweep_base, "concurrency", [1, 4] if short else [1, 4, 8], out_dir / "sweep"))
    finally:
        with console.status("stopping the server…"):
            server.stop()
    if moe:
        moe_env = {"SERVING_MFU_DIR": str(out_dir / "snapshots-moe")}
        moe_server = VLLMServer(moe_model, out_dir / "server-moe.log", env=moe_env, speculative_config=NGRAM,
                                cpu=cpu, extra_args=["--max-num-batched-tokens", "256"])
        try:
            with console.status("starting the MoE server (~30 s on a CPU)…"):
                moe_server.start()
            results += _run_scenarios(moe_server, moe, out_dir, short, console, first=False)
        finally:
            with console.status("stopping the MoE server…"):
                moe_server.stop()
    first = results[0].result.get("mfu") if results else None
    peak = (first or {}).get("peak") or {}
    title = "serving-mfu demo"
    if peak.get("flops_per_s"):
        title += f" — {_peak_line(peak)}"
    console.print(table(results, title=title))
    for line in notes(results):
        console.print(line)
    if peak:
        console.print(f"peak source: {escape(str(peak.get('source')))}", overflow="fold")
    demo = DemoResult(model=model, moe_model=moe_model, peak_flops_per_s=peak.get("flops_per_s"),
                      peak_source=peak.get("source"), isa_flops_per_s=peak.get("isa_flops_per_s"),
                      scenarios=results, seconds=time.monotonic() - started)
    write_atomic(out_dir / "results.json", demo.model_dump_json(indent=2))
    pngs = plot(results, out_dir)
    console.print(f"results: {out_dir / 'results.json'}; plots: {', '.join(str(p) for p in pngs)}; "
                  f"{demo.seconds:.0f} s in all")
    return demo


def main_demo(out_dir: str, model: str | None, short: bool, recalibrate: bool = False) -> int:
    try:
        run_demo(Path(out_dir), model=model, short=short, recalibrate=recalibrate)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted: the server was stopped")
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main_demo(os.environ.get("DEMO_OUT", "demo-results"), None, False))
