"""`mfu-loadgen` (also `python -m loadgen`): run, sweep, wrap, stub, bench-client."""

from __future__ import annotations

import argparse
import json
import sys

from pydantic import ValidationError
from rich.console import Console

from loadgen.config import RunConfig


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_run_args(p: argparse.ArgumentParser, with_out: bool = True) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--base-url", default="http://127.0.0.1:8000")
    g.add_argument("--model", default="default", help="model name sent in each request")
    g.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    g.add_argument("--request-timeout-s", type=float, default=600.0, help="whole-request deadline")
    g.add_argument("--max-connections", type=int, help="HTTP pool size (default: --max-concurrency or unlimited)")
    g.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="do not send vLLM's ignore_eos (for other servers; output lengths then vary)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--extra-body", type=json.loads, default={}, help="JSON object merged into every request body")
    g.add_argument("--prompt-format", choices=["auto", "token-ids", "text"], default="auto",
                   help="auto (default): token IDs of the served model, so --input-len N is exactly N tokens on any "
                        "tokenizer (from the server's /tokenize or --tokenizer), text where that is impossible "
                        "(chat, ShareGPT); token-ids: fail instead; text: words, about one token each")
    g.add_argument("--tokenizer",
                   help="local Hugging Face tokenizer for the token IDs (default: the server's /tokenize)")
    g.add_argument("--tenant", help="sent as vllm_xargs.tenant in every request body (a trace line's own "
                   "\"tenant\" wins): the server charges the requests' FLOPs and device-seconds to it")
    g = p.add_argument_group("traffic")
    g.add_argument("--num-prompts", type=int, help="measured requests (default 100; all of a trace)")
    g.add_argument("--duration", dest="duration_s", type=float, help="stop issuing after S seconds")
    g.add_argument("--arrival", choices=["poisson", "gamma", "constant", "closed", "trace"],
                   help="default: trace with --trace, else poisson")
    g.add_argument("--request-rate", type=float, default=float("inf"), help="req/s (inf: all at once)")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape (1 = Poisson, <1 burstier)")
    g.add_argument("--max-concurrency", type=int, help="cap on requests in flight; closed loop: its workers")
    g.add_argument("--trace", dest="trace_path",
                   help="JSONL of {timestamp, [prompt|input_len], [output_len], [tenant]}")
    g.add_argument("--trace-time-scale", type=float, default=1.0)
    g.add_argument("--warmup-requests", type=int, default=1, help="sent first, excluded from all results (default 1)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("workload")
    g.add_argument("--dataset", choices=["synthetic", "sharegpt", "shared-prefix", "repetitive"], default="synthetic")
    g.add_argument("--dataset-path", help="ShareGPT JSON/JSONL file")
    g.add_argument("--sharegpt-output", choices=["dataset", "config"], default="dataset",
                   help="ShareGPT output length: the reply's estimated length, or --output-len")
    for kind, default in (("input", 128), ("output", 128)):
        g.add_argument(f"--{kind}-len", type=int, default=default, help=f"mean {kind} tokens")
        g.add_argument(f"--{kind}-dist", choices=["fixed", "uniform", "normal", "lognormal"], default="fixed")
        g.add_argument(f"--{kind}-spread", type=float, default=0.0,
                       help="uniform half-width / normal std as a fraction of the mean; lognormal sigma")
    g.add_argument("--prefix-len", type=int, default=256, help="shared-prefix: common system prompt tokens")
    g.add_argument("--num-prefixes", type=int, default=1, help="shared-prefix: distinct common prompts")
    g = p.add_argument_group("results")
    g.add_argument("--slo-ttft-s", type=float)
    g.add_argument("--slo-tpot-s", type=float)
    g.add_argument("--slo-e2e-s", type=float)
    g.add_argument("--no-mfu", dest="mfu", action="store_false", help="do not read /metrics/mfu/counters")
    g.add_argument("--mfu-interval-s", type=float, default=1.0)
    g.add_argument("--mfu-fresh-timeout-s", type=float, default=10.0,
                   help="longest wait for the server's counters to cover the run's start and end (default 10)")
    add_cost_args(g)
    if with_out:
        g.add_argument("--out", help="results JSON")
    g.add_argument("--requests-out", help="per-request JSONL" + ("" if with_out else " (sweep: any value saves them)"))
    g.add_argument("--quiet", action="store_true", help="no progress bar")


PRICE_HELP = ("USD per device-hour (one GPU, or one chip of a multi-device engine). Prices the server's "
              "device-seconds: per 1M input tokens = Σ prefill device-seconds / 3600 × USD / Σ prompt tokens × 1e6, "
              "per 1M output tokens the same from decode device-seconds and output tokens")


def add_cost_args(g: argparse._ArgumentGroup) -> None:
    """Per-request cost lookups after the run (the server's /metrics/mfu/requests/{X-Request-Id})."""
    g.add_argument("--device-hour-price", type=float, metavar="USD", help=PRICE_HELP)
    g.add_argument("--no-request-costs", dest="request_costs", action="store_false",
                   help="do not look the requests' FLOPs and device-seconds up on the server after the run")
    g.add_argument("--cost-timeout-s", type=float, default=10.0, help="longest wait for the server to publish "
                   "the run's finished requests (default 10; engines publish about every 0.5 s)")
    g.add_argument("--cost-concurrency", type=int, default=16, help="request-cost lookups in flight (default 16)")


def config_from_args(a: argparse.Namespace) -> RunConfig:
    arrival = a.arrival or ("trace" if a.trace_path else "poisson")
    return RunConfig(
        base_url=a.base_url, model=a.model, endpoint=a.endpoint, num_prompts=a.num_prompts,
        duration_s=a.duration_s, arrival=arrival, request_rate=a.request_rate, burstiness=a.burstiness,
        max_concurrency=a.max_concurrency, trace_path=a.trace_path, trace_time_scale=a.trace_time_scale,
        dataset=a.dataset, dataset_path=a.dataset_path, sharegpt_output=a.sharegpt_output,
        input={"dist": a.input_dist, "mean": a.input_len, "spread": a.input_spread},
        output={"dist": a.output_dist, "mean": a.output_len, "spread": a.output_spread},
        prefix_len=a.prefix_len, num_prefixes=a.num_prefixes, seed=a.seed, warmup_requests=a.warmup_requests,
        ignore_eos=a.ignore_eos, temperature=a.temperature, extra_body=a.extra_body,
        prompt_format=a.prompt_format, tokenizer=a.tokenizer,
        request_timeout_s=a.request_timeout_s, max_connections=a.max_connections,
        slos={"ttft_s": a.slo_ttft_s, "tpot_s": a.slo_tpot_s, "e2e_s": a.slo_e2e_s},
        mfu=a.mfu, mfu_interval_s=a.mfu_interval_s, mfu_fresh_timeout_s=a.mfu_fresh_timeout_s,
        tenant=a.tenant, request_costs=a.request_costs, cost_timeout_s=a.cost_timeout_s,
        cost_concurrency=a.cost_concurrency, device_hour_price=a.device_hour_price,
        out=getattr(a, "out", None), requests_out=a.requests_out, quiet=a.quiet)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mfu-loadgen", description="Load generator for LLM serving that reports "
                                "the MFU of each run (from the server's /metrics/mfu counters).")
    sub = p.add_subparsers(dest="command", required=True)
    add_run_args(sub.add_parser("run", help="one benchmark run"))
    sw = sub.add_parser("sweep", help="one run per request rate or concurrency, a table and PNG plots")
    loads = sw.add_mutually_exclusive_group(required=True)
    loads.add_argument("--request-rates", type=_floats)
    loads.add_argument("--concurrencies", type=_floats)
    sw.add_argument("--out-dir", required=True)
    sw.add_argument("--no-plots", action="store_true")
    add_run_args(sw, with_out=False)
    st = sub.add_parser("stub", help="stub OpenAI server streaming tokens at a set pace (with fault injection)")
    st.add_argument("--host", default="127.0.0.1")
    st.add_argument("--port", type=int, default=8000)
    st.add_argument("--config-json", help="a whole StubConfig as JSON (overrides the options below)")
    st.add_argument("--log-level", default="warning")
    from loadgen.stub import StubConfig
    for name, field in StubConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            st.add_argument(flag, action="store_true", help=field.description)
        else:
            st.add_argument(flag, type=field.annotation, default=field.default, help=field.description)
    wp = sub.add_parser("wrap", help="the MFU of any command (vllm bench serve, guidellm, a script) from the "
                        "server's counters", description="Read the server's serving-mfu counters, run COMMAND, read "
                        "them again once the engines have published past its end; print the per-phase MFU, write "
                        "the `mfu` section to --out, exit with COMMAND's status.",
                        usage="mfu-loadgen wrap --base-url URL [--out FILE] -- COMMAND [ARGS...]")
    wp.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server with the serving-mfu plugin")
    wp.add_argument("--out", help="JSON: the command, its status and timing, and the `mfu` section")
    wp.add_argument("--mfu-interval-s", type=float, default=1.0, help="per-second series sampling")
    wp.add_argument("--mfu-fresh-timeout-s", type=float, default=10.0,
                    help="longest wait for the server's counters to cover the command's start and end")
    wp.add_argument("--device-hour-price", type=float, metavar="USD", help="USD per device-hour: each tenant's "
                    "cost over the command (its device-seconds / 3600 × USD) and per 1M of its prompt + output tokens")
    wp.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command and its arguments")
    bc = sub.add_parser("bench-client", help="the generator's own rate accuracy and lateness against the stub")
    bc.add_argument("--rates", type=_floats, default=[200.0, 500.0, 1000.0])
    bc.add_argument("--duration-s", type=float, default=5.0, help="seconds per rate")
    bc.add_argument("--output-len", type=int, default=4)
    bc.add_argument("--stub", choices=["subprocess", "thread"], default="subprocess")
    bc.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    return p


def _run(a: argparse.Namespace, console: Console) -> int:
    from loadgen.runner import run_benchmark, run_sync
    from loadgen.summary import print_summary
    result = run_sync(run_benchmark(config_from_args(a)))
    print_summary(result, console)
    return 0


def _sweep(a: argparse.Namespace, console: Console) -> int:
    from loadgen.runner import run_sync
    from loadgen.summary import sweep_table
    from loadgen.sweep import run_sweep
    mode, loads = ("request_rate", a.request_rates) if a.request_rates else ("concurrency", a.concurrencies)
    summary, results = run_sync(run_sweep(config_from_args(a), mode, loads, a.out_dir, plots=not a.no_plots))
    console.print(sweep_table(loads, results, mode.replace("_", " ")))
    console.print(f"wrote {a.out_dir}/point-*.json, summary.json" + ("" if a.no_plots else
                  ", mfu_vs_load.png, latency_vs_load.png"))
    return 0


def _stub(a: argparse.Namespace, console: Console) -> int:
    from loadgen.stub import StubConfig
    from loadgen.stub_server import serve
    if a.config_json:
        config = StubConfig.model_validate_json(a.config_json)
    else:
        config = StubConfig(**{k: getattr(a, k) for k in StubConfig.model_fields})
    serve(config, a.host, a.port, a.log_level)
    return 0


def _bench_client(a: argparse.Namespace, console: Console) -> int:
    from loadgen.bench_client import bench_client, bench_table
    from loadgen.runner import run_sync
    res = run_sync(bench_client(a.rates, a.duration_s, a.output_len, a.stub))
    if a.json:
        print(res.model_dump_json(indent=2))
    else:
        console.print(bench_table(res))
    return 0


def _wrap(a: argparse.Namespace, console: Console) -> int:
    from rich.text import Text

    from loadgen.runner import run_sync
    from loadgen.summary import section_table, tenants_part, verdict_text
    from loadgen.wrap import wrap, write
    command = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    result = run_sync(wrap(a.base_url, command, a.mfu_interval_s, a.mfu_fresh_timeout_s, a.device_hour_price))
    table = section_table(result.mfu, result.mfu_error, "the command")
    console.print(Text(table) if isinstance(table, str) else table)
    if result.mfu is not None and (line := verdict_text(result.mfu.peak)) is not None:
        console.print(line)
    console.print(tenants_part(result.tenants, result.tenants_error, result.device_hour_price))
    if a.out:
        write(result, a.out)
        console.print(Text(f"wrote {a.out}"))
    return result.returncode if result.returncode >= 0 else 128 - result.returncode


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    console = Console()
    commands = {"run": _run, "sweep": _sweep, "stub": _stub, "bench-client": _bench_client, "wrap": _wrap}
    try:
        return commands[a.command](a, console)
    except (ValidationError, ValueError, OSError) as exc:
        Console(stderr=True).print(f"[red]mfu-loadgen {a.command}: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
