"""`serving-mfu` command line: flops, spec, peak, calibrate, replay, bench-accounting, demo.

Errors in the user's input (a config missing a field, an unknown device, an unreadable
trace) print one line on stderr and exit with status 2; nothing prints a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from serving_mfu.format import pct as _pct
from serving_mfu.format import peak_warning
from serving_mfu.format import si as _si
from serving_mfu.model.lora import load_adapter, lora_flops
from serving_mfu.model.spec import ConfigError, ModelSpec

console = Console()
err_console = Console(stderr=True)

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    def deco(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = fn
        return fn

    return deco


def _print_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


# ------------------------------------------------------------------------- flops / spec
@command("flops")
def cmd_flops(args: argparse.Namespace) -> int:
    from serving_mfu.cost.flops import FlopModel
    from serving_mfu.derived import load_spec
    from serving_mfu.model.parallel import Parallelism, per_device_breakdown

    spec = load_spec(args.config)
    breakdown = FlopModel(spec).slice_breakdown(args.new_tokens, args.context_len, args.logits_tokens)
    if args.lora:
        lf = lora_flops(load_adapter(args.lora), spec)
        breakdown["lora"] = args.new_tokens * lf.per_token + args.logits_tokens * lf.per_logit
    out: dict[str, object] = {"total": sum(breakdown.values()), "breakdown": breakdown, "flop_model": spec.flop_model}
    par = Parallelism(args.tp, args.pp, args.ep)
    if par.devices > 1 or par.ep > 1:
        per_dev = per_device_breakdown(breakdown, spec, par)
        out["per_device"] = {"total": sum(per_dev.values()), "breakdown": per_dev,
                             "tp": par.tp, "pp": par.pp, "ep": par.ep}
    if spec.approximate:
        out["approximate"] = True
    if spec.warnings:
        out["warnings"] = list(spec.warnings)
    if args.json:
        _print_json(out)
        return 0
    table = Table(title=f"FLOPs of one forward: {args.new_tokens} new tokens, context {args.context_len}"
                        f" ({spec.model_type}, {spec.flop_model})")
    table.add_column("component")
    table.add_column("FLOPs", justify="right")
    table.add_column("share", justify="right")
    total = out["total"] or 1
    for name, v in breakdown.items():
        table.add_row(name, _si(v), f"{100 * v / total:.1f}%")
    table.add_row("total", _si(out["total"]), "100%", style="bold")
    console.print(table)
    return 0


@command("spec")
def cmd_spec(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from serving_mfu.derived import load_spec

    spec = load_spec(args.config)
    _print_json(asdict(spec))
    return 0


@command("counters")
def cmd_counters(args: argparse.Namespace) -> int:
    from serving_mfu.cost.counters import COUNTERS, docs_table

    if args.markdown:
        print(docs_table(), end="")
        return 0
    table = Table(title="serving-mfu counters (serving_mfu.cost.counters.COUNTERS)")
    for col in ("counter", "unit", "per phase", "report", "Prometheus"):
        table.add_column(col, no_wrap=True)
    table.add_column("what it counts", overflow="fold")
    for r in COUNTERS:
        table.add_row(r.name, r.unit, "yes" if r.phased else "", r.report or "—",
                      f"{r.prom}_total" if r.prom else "—", r.help)
    console.print(table)
    return 0


# ------------------------------------------------------------------------- peaks
@command("peak")
def cmd_peak(args: argparse.Namespace) -> int:
    from serving_mfu.peaks.table import known_devices, lookup_peak, peak_json

    if args.list:
        for name in known_devices():
            console.print(name)
        return 0
    if not args.device or not args.dtype:
        raise ValueError("peak needs --device and --dtype (or --list)")
    if args.json:
        _print_json(peak_json(args.device, args.dtype))
        return 0
    p = lookup_peak(args.device, args.dtype)
    console.print(f"{p.device} {p.dtype}: {_si(p.flops_per_s, 'FLOP/s')}, "
                  f"{_si(p.bandwidth_bytes_per_s, 'B/s')}\nsource: {p.source}")
    return 0


@command("calibrate")
def cmd_calibrate(args: argparse.Namespace) -> int:
    from serving_mfu.peaks.calibrate import cache_path, calibrate, save_calibration
    from serving_mfu.runtime.settings import read_settings
    from serving_mfu.tools.progress import calibration_progress

    with calibration_progress(enabled=not args.json) as on_event:
        peak = calibrate(dtype=args.dtype, duration_s=args.duration, device=args.device, on_event=on_event,
                         include_vllm=not args.no_vllm)
    saved = []
    if args.out:
        saved.append(save_calibration(peak, args.out))
    on_cpu = peak.device.startswith("cpu")
    if on_cpu and not args.no_cache:
        saved.append(save_calibration(peak, cache_path(peak.dtype, read_settings().calibration_cache_dir())))
    if args.json:
        _print_json(peak.model_dump())
        return 0
    table = Table(title=f"serving-mfu calibrate: {peak.dtype} on {peak.device}")
    for col in ("kernel", "dtype", "shape", "GFLOP/s"):
        table.add_column(col, justify="right" if col == "GFLOP/s" else "left")
    for r in sorted(peak.measurements or [], key=lambda r: -r.flops_per_s)[:8]:
        table.add_row(r.kernel, r.dtype, r.shape, f"{r.flops_per_s / 1e9:,.1f}")
    console.print(table)
    console.print(f"peak (max of {len(peak.measurements or [])} measurements): "
                  f"{_si(peak.flops_per_s, 'FLOP/s')} ({peak.dtype})   bandwidth: {_si(peak.bandwidth_bytes_per_s, 'B/s')}")
    if peak.isa_flops_per_s:
        ratio = peak.flops_per_s / peak.isa_flops_per_s
        style = "bold red" if ratio > 1 else "green"
        console.print(f"[{style}]ISA peak (physical limit): {_si(peak.isa_flops_per_s, 'FLOP/s')}; measured = "
                      f"{100 * ratio:.0f}% of it{' — ABOVE the physical limit: the CPU table or clock is wrong' if ratio > 1 else ''}[/{style}]")
    console.print(f"source: {escape(peak.source)}")
    for path in saved:
        console.print(f"saved to {path}")
    if on_cpu and not args.no_cache:
        console.print("a CPU engine with no SERVING_MFU_* setting now uses this peak (delete the file to go back to "
                      "the ISA peak)")
    return 0


def _peak_from_args(args: argparse.Namespace, spec: ModelSpec):
    """The peak the flags give, each flag left out taken from SERVING_MFU_* (Settings)."""
    from serving_mfu.peaks.resolve import resolve_peak
    from serving_mfu.runtime.settings import read_settings

    inputs = read_settings().peak_inputs()
    given = dict(device=args.device, flops_per_s=args.peak_flops, bandwidth_bytes_per_s=args.peak_bandwidth,
                 calibration_file=args.calibration)
    inputs.update({k: v for k, v in given.items() if v is not None})
    return resolve_peak(args.dtype or spec.compute_dtype, **inputs)


# ------------------------------------------------------------------------- replay
def print_report(report, title: str = "serving-mfu") -> None:
    """The per-phase table people read (the JSON form is the report model itself)."""
    table = Table(title=title)
    for col in ("phase", "MFU", "HFU", "MBU", "SOL", "useful FLOPs", "executed FLOPs", "tokens", "time"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    for name in ("prefill", "decode", "overall"):
        ph = getattr(report, name)
        table.add_row(name, _pct(ph.mfu), _pct(ph.hfu), _pct(ph.mbu), _pct(ph.sol), _si(ph.useful_flops),
                      _si(ph.executed_flops), str(ph.tokens), f"{ph.time_s:.3f} s")
    console.print(table)
    for name in ("prefill", "decode", "overall"):
        ph = getattr(report, name)
        if ph.lever is not None:
            console.print(f"largest loss, {name}: {ph.lever.text} (`serving-mfu explain` for the waterfall)",
                          highlight=False)
    o = report.overall
    lines = [f"busy {o.busy_s:.3f} s of wall {o.wall_s:.3f} s; wall MFU {_pct(o.wall_mfu)}; "
             f"mixed iterations {_pct(o.mixed_time_fraction)} of busy time (split: {report.time_split})"]
    if report.spec_decode:
        s = report.spec_decode
        lines.append(f"spec decode: {s.accepted_tokens}/{s.draft_tokens} drafts accepted "
                     f"({_pct(s.acceptance_rate)}), rejected {_si(s.rejected_flops, 'FLOPs')}, "
                     f"drafter {_si(s.drafter_flops, 'FLOPs')}")
    if report.moe:
        m = report.moe
        lines.append(f"MoE: {m.mean_active_experts:.1f} experts active per layer ({m.source})"
                     + (f", imbalance {m.imbalance:.2f}" if m.imbalance else ""))
    lines.append(f"prefix cache: {report.prefix_cache.hit_tokens} hit tokens, saved "
                 f"{_si(report.prefix_cache.saved_flops, 'FLOPs')}; recompute: {report.recompute.tokens} tokens")
    kv = report.kv_transfer
    if kv.received_tokens or kv.sent_tokens or any(r != "none" for r in kv.roles):
        lines.append(f"KV connector ({', '.join(kv.roles)}): received {kv.received_tokens} tokens "
                     f"({_si(kv.received_bytes, 'B')}, saved {_si(kv.received_flops, 'FLOPs')}), sent "
                     f"{kv.sent_tokens} tokens ({_si(kv.sent_bytes, 'B')})")
    pk = report.peak
    lines.append(f"peak: {_si(pk.flops_per_s, 'FLOP/s')} × {pk.devices} ({pk.dtype}, {pk.device}) — "
                 f"{escape(pk.source or 'no peak: MFU unavailable')}")
    if pk.credible is False:
        lines.append(f"[bold red]{escape(peak_warning(pk.verdict, pk.fix))}[/bold red]")
    an = report.anomalies
    if an.hfu_over_1_iterations or an.counts or an.unknown_architecture or an.missing_peak:
        lines.append(f"[yellow]anomalies: HFU>1 in {an.hfu_over_1_iterations} iterations; "
                     f"{an.counts}; unknown architecture={an.unknown_architecture}; "
                     f"missing peak={an.missing_peak}[/yellow]")
    for line in lines:
        console.print(line)


@command("replay")
def cmd_replay(args: argparse.Namespace) -> int:
    from serving_mfu.derived import load_spec
    from serving_mfu.runtime.trace import read_trace, replay

    spec = load_spec(args.config) if args.config else None
    if spec is None:
        header, _ = read_trace(args.trace)
        if header is None or header.hf_config is None:
            raise ValueError(f"{args.trace}: no header with the model config; pass --config")
        spec = load_spec(header.hf_config)
    explicit = any(v is not None for v in (args.device, args.peak_flops, args.peak_bandwidth, args.calibration))
    peak = _peak_from_args(args, spec) if explicit else None

    def on_error(e) -> None:
        err_console.print(f"[yellow]{args.trace}: line {e.line}: skipped malformed record: {e.error}[/yellow]")

    report, errors = replay(args.trace, spec=spec, peak=peak, devices=args.devices,
                            time_split=args.time_split, window_s=args.window, on_error=on_error)
    if errors:
        err_console.print(f"[yellow]{len(errors)} malformed line(s) skipped[/yellow]")
    if args.json:
        sys.stdout.write(report.model_dump_json(indent=2) + "\n")
    else:
        print_report(report, title=f"serving-mfu replay of {args.trace}")
    return 0


@command("explain")
def cmd_explain(args: argparse.Namespace) -> int:
    from pathlib import Path

    from serving_mfu.tools.explain import explain, fetch_report

    if bool(args.url) == bool(args.trace):
        raise ValueError("give exactly one of --url URL (a server with the plugin) or --trace FILE")
    if args.url:
        report = fetch_report(args.url, args.window)
        title = f"where the time went: {args.url}" + (f", last {args.window:g} s" if args.window else "")
    else:
        from serving_mfu.runtime.trace import replay

        report, errors = replay(args.trace, window_s=args.window)
        if errors:
            err_console.print(f"[yellow]{len(errors)} malformed line(s) skipped[/yellow]")
        title = f"where the time went: {args.trace}"
    if args.json:
        print(json.dumps({s: {"sol": getattr(report, s).sol, "waterfall": getattr(report, s).waterfall
                                  and getattr(report, s).waterfall.model_dump(),
                              "waste_by_cause": getattr(report, s).waste_by_cause,
                              "lever": getattr(report, s).lever and getattr(report, s).lever.model_dump()}
                          for s in ("prefill", "decode", "overall")}, indent=2))
        return 0
    explain(report, title, console, Path(args.png) if args.png else None)
    return 0


@command("bench-soak")
def cmd_bench_soak(args: argparse.Namespace) -> int:
    from serving_mfu.tools.soak import soak, soak_requests

    points = soak(iterations=args.iterations, batch=args.batch, read_every=args.read_every, progress=not args.json)
    req_points = soak_requests(args.requests, progress=not args.json) if args.requests > 0 else []
    ok = all(p.reader_matches for p in points) and all(p.reader_matches for p in req_points)
    if args.json:
        _print_json({"iterations": [p.model_dump() for p in points],
                     "requests": [p.model_dump() for p in req_points]})
        return 0 if ok else 1
    table = Table(title=f"soak: tracker → snapshot writer → reader, decode batches of {args.batch}")
    for col in ("iterations", "wall s", "peak RSS MiB", "snapshot KiB", "publishes", "read ms p50", "publish ms",
                "reader = tracker"):
        table.add_column(col, justify="right")
    for p in points:
        table.add_row(f"{p.iterations:,}", f"{p.wall_s:.1f}", f"{p.peak_rss_mib:.1f}", f"{p.snapshot_bytes / 1024:.1f}",
                      str(p.publishes), f"{p.snapshot_read_ms_p50:.2f}", f"{p.publish_ms:.2f}",
                      "yes" if p.reader_matches else "[red]NO[/red]")
    console.print(table)
    if req_points:
        _print_request_soak(req_points)
    return 0 if ok else 1


def _print_request_soak(points: list) -> None:
    table = Table(title="soak: requests through the ledger, tenant table, request log and reader (10^5 tenants)")
    for col in ("requests", "wall s", "peak RSS MiB", "ledger slots", "tenant labels", "log KiB", "reader ring",
                "newest intact"):
        table.add_column(col, justify="right")
    for p in points:
        table.add_row(f"{p.requests:,}", f"{p.wall_s:.1f}", f"{p.peak_rss_mib:.1f}", str(p.ledger_slots),
                      str(p.tenant_labels), f"{p.log_bytes / 1024:.0f}", str(p.reader_ring),
                      "yes" if p.reader_matches else "[red]NO[/red]")
    console.print(table)


@command("bench-accounting")
def cmd_bench_accounting(args: argparse.Namespace) -> int:
    from serving_mfu.tools.bench import bench_accounting

    rows = bench_accounting(batches=args.batches, repeats=args.repeats, progress=not args.json)
    if args.json:
        _print_json([r.model_dump() for r in rows])
        return 0
    table = Table(title="accounting cost per iteration (mixed prefill / decode / spec-decode slices)")
    for col in ("slices", "model", "µs / iteration", "µs / slice"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r.slices), r.model, f"{r.us_per_iteration:.1f}", f"{r.us_per_slice:.2f}")
    console.print(table)
    return 0


@command("serve")
def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from serving_mfu.runtime.aggregate import SnapshotReader
    from serving_mfu.serve.api import build_app

    app = build_app(lambda: SnapshotReader(args.dir))
    console.print(f"serving-mfu: reading engine snapshots from {args.dir or 'the default folder'}; "
                  f"http://{args.host}:{args.port}/metrics/mfu")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


@command("bench-overhead")
def cmd_bench_overhead(args: argparse.Namespace) -> int:
    from serving_mfu.tools.bench_overhead import bench_overhead, print_overhead

    try:
        report = bench_overhead(model=args.model, requests=args.requests, prompt_len=args.prompt_len,
                                output_len=args.output_len, repeats=args.repeats, batches=args.batches,
                                engines=args.engines,
                                passes=args.passes, kv_cache_mib=args.kv_cache_mib, min_run_s=args.min_run_seconds,
                                accounting=not args.no_accounting, concurrent=not args.one_engine_at_a_time,
                                progress=not args.json)
    except KeyboardInterrupt:
        err_console.print("[yellow]bench-overhead: interrupted; engines shut down[/yellow]")
        return 130
    if args.json:
        sys.stdout.write(report.model_dump_json(indent=2) + "\n")
    else:
        print_overhead(report, console)
    return 0


@command("example")
def cmd_example(args: argparse.Namespace) -> int:
    from serving_mfu.tools.worked_example import worked_example_markdown

    sys.stdout.write(worked_example_markdown() + "\n")
    return 0


@command("demo")
def cmd_demo(args: argparse.Namespace) -> int:
    from serving_mfu.tools.demo import main_demo

    return main_demo(args.out_dir, args.model, args.short, recalibrate=args.recalibrate)


@command("compare-estimators")
def cmd_compare_estimators(args: argparse.Namespace) -> int:
    from serving_mfu.tools.compare import (
        DEFAULT_POINTS,
        compare_estimators,
        comparison_markdown,
        parse_points,
        print_comparison,
        quiet_vllm_logs,
    )

    quiet_vllm_logs()
    points = parse_points(args.points) if args.points else list(DEFAULT_POINTS)
    cmp = compare_estimators(args.configs, points, oracle=not args.no_oracle, use_vllm=not args.no_vllm,
                             prompt_len=args.prompt_len)
    if args.json:
        sys.stdout.write(cmp.model_dump_json(indent=2) + "\n")
    elif args.markdown:
        sys.stdout.write(comparison_markdown(cmp) + "\n")
    else:
        print_comparison(cmp, console)
    return 0


@command("reference-run")
def cmd_reference_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from serving_mfu.tools.reference_run import (
        check_plot,
        plot_reference_run,
        print_reference_run,
        reference_run,
        resolve_options,
    )

    check_plot(args.plot)
    opts = resolve_options(device=args.device, quick=args.quick, shape=args.shape, config=args.config,
                           batch=args.batch, prompt_len=args.prompt_len, decode_steps=args.decode_steps,
                           dtype=args.dtype, calibrate_s=args.calibrate_seconds)
    run = reference_run(opts, progress=not args.json)
    png = plot_reference_run(run, Path(args.plot)) if args.plot else None
    if args.json:
        sys.stdout.write(run.model_dump_json(indent=2) + "\n")
    else:
        print_reference_run(run, console)
        if png is not None:
            console.print(f"plot: {png}")
    return 0 if run.oracle.prefill.equal and run.oracle.decode.equal else 1


# ------------------------------------------------------------------------- parser
def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value
    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    """`flops` and `spec`: what the FLOP model computes for one config."""
    f = sub.add_parser("flops", help="FLOPs of one forward pass over one slice, by component")
    f.add_argument("config", help="config.json or a folder holding one")
    f.add_argument("--new-tokens", type=_positive_int, required=True, help="q: new positions in the slice")
    f.add_argument("--context-len", type=_positive_int, required=True, help="c: KV context after the step (>= q)")
    f.add_argument("--logits-tokens", type=_non_negative_int, default=1,
                   help="positions producing logits (default 1; 0 for a prefill chunk that is not the last)")
    f.add_argument("--lora", metavar="ADAPTER_DIR", help="a peft LoRA adapter (folder with adapter_config.json): "
                   "adds its FLOPs as the `lora` component")
    f.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (adds per_device)")
    f.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree")
    f.add_argument("--ep", type=int, default=1, help="expert-parallel degree")
    f.add_argument("--json", action="store_true")

    s = sub.add_parser("spec", help="print the parsed model spec as JSON")
    s.add_argument("config")

    c = sub.add_parser("counters", help="every counter: unit, report field, Prometheus series (the counter table)")
    c.add_argument("--markdown", action="store_true", help="as the Markdown table of docs/counters.md")


def _add_peak_commands(sub: argparse._SubParsersAction) -> None:
    """`peak` and `calibrate`: the datasheet peak, and a measured one."""
    k = sub.add_parser("peak", help="datasheet peak FLOP/s and bandwidth of a device")
    k.add_argument("--device")
    k.add_argument("--dtype")
    k.add_argument("--list", action="store_true", help="list known devices")
    k.add_argument("--json", action="store_true")

    c = sub.add_parser("calibrate", help="measure achievable matmul FLOP/s and copy bandwidth here")
    c.add_argument("--dtype", default="bf16")
    c.add_argument("--duration", type=float, default=5.0, help="seconds to spend timing (default 5)")
    c.add_argument("--device", help="torch device (default cuda if available, else cpu)")
    c.add_argument("--out", help="also write the result as JSON, usable as --calibration")
    c.add_argument("--no-cache", action="store_true",
                   help="do not cache it as this machine's CPU peak (SERVING_MFU_CACHE_DIR, ~/.cache/serving-mfu)")
    c.add_argument("--no-vllm", action="store_true", help="leave out vLLM's CPU GEMM (saves importing vLLM)")
    c.add_argument("--json", action="store_true")


def _add_replay_command(sub: argparse._SubParsersAction) -> None:
    """`replay`: an iteration trace turned into the MFU report, with the peak flags `_peak_from_args` reads."""
    r = sub.add_parser("replay", help="replay an iteration trace (JSONL) and print the MFU report")
    r.add_argument("trace")
    r.add_argument("--config", help="model config (default: the trace header's)")
    r.add_argument("--device", help="peak-table device (e.g. h100-sxm)")
    r.add_argument("--dtype", help="compute dtype (default: from the model config)")
    r.add_argument("--peak-flops", type=float, help="override peak FLOP/s per device")
    r.add_argument("--peak-bandwidth", type=float, help="override peak bytes/s per device")
    r.add_argument("--calibration", help="JSON written by `serving-mfu calibrate --out`")
    r.add_argument("--devices", type=int, help="devices per engine (default: header's, else 1)")
    r.add_argument("--window", type=float, help="report only the last WINDOW seconds")
    r.add_argument("--time-split", default="shapley", choices=["shapley", "flop_proportional"])
    r.add_argument("--json", action="store_true")


def _add_explain_command(sub: argparse._SubParsersAction) -> None:
    """`explain`: the loss waterfall per phase and the lever, from a server or a trace."""
    e = sub.add_parser("explain", help="why the MFU is what it is: the loss waterfall per phase, and the lever")
    e.add_argument("--url", help="a server with the plugin (e.g. http://localhost:8000)")
    e.add_argument("--trace", help="an iteration trace (SERVING_MFU_TRACE) to replay instead")
    e.add_argument("--window", type=float, help="only the last WINDOW seconds")
    e.add_argument("--png", help="also draw the waterfall to this PNG")
    e.add_argument("--json", action="store_true", help="sol, waterfall, waste by cause and lever per phase")


def _add_in_process_bench_commands(sub: argparse._SubParsersAction) -> None:
    """`bench-soak` and `bench-accounting`: in-process benchmarks that start no engine."""
    k = sub.add_parser("bench-soak", help="a long in-process run through tracker, writer and reader: peak RSS, "
                                          "snapshot size and publish latency at 10^4, 10^5, 10^6 iterations")
    k.add_argument("--iterations", type=_positive_int, default=1_000_000)
    k.add_argument("--batch", type=_positive_int, default=64, help="decodes per iteration (default 64)")
    k.add_argument("--read-every", type=_positive_int, default=1000, help="reader polls every N iterations")
    k.add_argument("--requests", type=int, default=1_000_000,
                   help="then this many requests through per-request attribution: ledger, tenant table, request "
                        "log and its reader (default 10^6; 0: skip)")
    k.add_argument("--json", action="store_true")

    b = sub.add_parser("bench-accounting", help="cost of the accounting per iteration at several batch sizes")
    b.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256, 1024])
    b.add_argument("--repeats", type=int, default=200)
    b.add_argument("--json", action="store_true")


def _add_serve_command(sub: argparse._SubParsersAction) -> None:
    """`serve`: the standalone metrics server over the engines' snapshots."""
    v = sub.add_parser("serve", help="standalone /metrics/mfu and Prometheus /metrics over the engines' snapshots")
    v.add_argument("--dir", help="snapshot folder (default: $SERVING_MFU_DIR or the per-user temp folder)")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8801)


def _add_bench_overhead_command(sub: argparse._SubParsersAction) -> None:
    """`bench-overhead`: the engine benchmark's many knobs, one per `bench_overhead` argument."""
    o = sub.add_parser("bench-overhead", help="engine throughput with and without the hook; per-iteration cost "
                                              "of our accounting vs vLLM's ModelMetrics on the same steps")
    o.add_argument("--model", help="local model folder (default: the embedded tiny model)")
    o.add_argument("--requests", type=int, default=16, help="requests in the workload (default 16)")
    o.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per request (default 64)")
    o.add_argument("--output-len", type=int, default=64, help="output tokens per request (default 64)")
    o.add_argument("--repeats", type=int, default=3, help="timed runs per variant, alternating (default 3)")
    o.add_argument("--batches", type=_positive_int, nargs="+", default=[1, 16, 256, 1024],
                   help="batch sizes (requests per step) the accounting cost is captured at (default 1 16 256 1024)")
    o.add_argument("--engines", nargs="+", choices=["dense", "spec", "moe"], default=["dense", "spec", "moe"],
                   help="engines captured: dense (prefill, decode, mixed), spec (n-gram, k=3), moe (routing "
                        "replayed); default all")
    o.add_argument("--passes", type=int, default=15, help="offline timing passes over the captured steps")
    o.add_argument("--min-run-seconds", type=float, default=5.0,
                   help="repeat the workload within each timed run until it lasts this long (default 5)")
    o.add_argument("--kv-cache-mib", type=int, default=512, help="KV cache per engine, MiB (default 512)")
    o.add_argument("--no-accounting", action="store_true", help="only the throughput comparison")
    o.add_argument("--one-engine-at-a-time", action="store_true",
                   help="start and stop an engine per run instead of keeping both alive")
    o.add_argument("--json", action="store_true")


def _add_showcase_commands(sub: argparse._SubParsersAction) -> None:
    """`example`, `compare-estimators` and `demo`: the worked example, estimator comparison and end-to-end demo."""
    sub.add_parser("example", help="the worked example of docs/estimators.md (Llama-3-70B at 4k context) as markdown")
    ce = sub.add_parser("compare-estimators", help="FLOPs per token by serving-mfu, 2N, s² attention and vLLM's "
                                                    "estimator on public model shapes; oracle check of ours")
    ce.add_argument("--configs", help="comma-separated public configs (default: all): "
                                      "llama-3-8b,llama-3-70b,qwen3-30b-a3b,mixtral-8x7b,glm-4.5-air,deepseek-v3")
    ce.add_argument("--points", help="NEW_TOKENS:CONTEXT,... (default 4096:4096,1:4096,1:32768)")
    ce.add_argument("--no-oracle", action="store_true", help="skip the FlopCounterMode check on scaled-down shapes")
    ce.add_argument("--no-vllm", action="store_true", help="leave vLLM's estimator out (n/a)")
    ce.add_argument("--prompt-len", type=int, default=13, help="oracle prefill length (default 13)")
    ce.add_argument("--markdown", action="store_true", help="print the markdown tables of docs/estimators.md")
    ce.add_argument("--json", action="store_true")
    d = sub.add_parser("demo", help="end-to-end demo: vLLM + the plugin + five load scenarios (one on MoE), "
                                    "prefill/decode MFU")
    d.add_argument("--out-dir", default="demo-results", help="results JSON, plots, server log (default demo-results/)")
    d.add_argument("--recalibrate", action="store_true", help="measure the CPU peak again instead of using the cache")
    d.add_argument("--model", help="serve this model instead of the embedded tiny one (on a GPU machine)")
    d.add_argument("--short", action="store_true", help="a quicker, smaller run (used by the test suite)")


def _add_reference_run_command(sub: argparse._SubParsersAction) -> None:
    """`reference-run`: a Llama with random weights measured directly (no engine), on a CPU or a GPU."""
    r = sub.add_parser("reference-run", help="MFU/HFU/MBU/SOL of a Llama-shaped model run directly with transformers "
                                             "(no vLLM): static batches, FlopCounterMode oracle, NVML GPU-Util")
    r.add_argument("--device", help="cpu or cuda (default: cuda where torch sees a GPU)")
    r.add_argument("--quick", action="store_true", help="a tiny model, short prompts and a 1 s calibration "
                                                        "(the test suite's run; seconds on a CPU)")
    r.add_argument("--shape", help="tiny, 1b or 8b (Llama-3.2-1B / Llama-3-8B shapes; default 8b on cuda, else tiny)")
    r.add_argument("--config", help="a Llama config.json (or a folder holding one) instead of --shape")
    r.add_argument("--batch", help="batch sizes, comma-separated; each runs a prefill then the decode steps "
                                   "(default 1,16,64 on cuda)")
    r.add_argument("--prompt-len", type=_positive_int, help="tokens per prompt (default 2048 on cuda)")
    r.add_argument("--decode-steps", type=_positive_int, help="decode steps per batch (default 64 on cuda)")
    r.add_argument("--dtype", help="bf16, fp16 or fp32 (default bf16 on cuda, fp32 on cpu)")
    r.add_argument("--calibrate-seconds", type=float, help="seconds of matmul and bandwidth calibration held "
                                                           "against the peak (0: none; default 3 on cuda)")
    r.add_argument("--plot", help="also draw the figures to this PNG")
    r.add_argument("--json", action="store_true")


# The subcommands in the order `serving-mfu --help` lists them.
_SUBCOMMAND_GROUPS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_model_commands, _add_peak_commands, _add_replay_command, _add_explain_command,
    _add_in_process_bench_commands,
    _add_serve_command, _add_bench_overhead_command, _add_showcase_commands, _add_reference_run_command,
)


def build_parser() -> argparse.ArgumentParser:
    """The `serving-mfu` parser: each group of subcommands is added by its own `_add_*` function."""
    p = argparse.ArgumentParser(prog="serving-mfu", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for add_group in _SUBCOMMAND_GROUPS:
        add_group(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
