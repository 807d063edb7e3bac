"""`serving-mfu bench-overhead`, shortened: both throughput variants, both per-iteration estimators.

One run (five engine starts: plain, hooked, and the in-process hooked dense, n-gram and MoE engines)
feeds every test here.
"""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest
from rich.console import Console

from serving_mfu.tools.bench_overhead import OverheadReport, bench_overhead, print_overhead
from serving_mfu.tools.cli import build_parser

pytestmark = pytest.mark.engine

REQUESTS, OUTPUT_LEN, BATCHES = 4, 8, (1, 8)


@pytest.fixture(scope="module")
def run():
    import vllm.envs as envs

    children = set(multiprocessing.active_children())
    cached, mp_env = envs._is_envs_cache_enabled(), os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    report = bench_overhead(requests=REQUESTS, output_len=OUTPUT_LEN, repeats=1, batches=BATCHES,
                            passes=3, min_run_s=0.0, progress=False)
    leftover = [p for p in multiprocessing.active_children() if p not in children]
    return {"report": report, "data": json.loads(report.model_dump_json()), "leftover": leftover,
            "env_restored": (envs._is_envs_cache_enabled(), os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING"))
            == (cached, mp_env)}


def test_json_round_trips(run) -> None:
    assert OverheadReport.model_validate(run["data"]) == run["report"]
    machine = run["data"]["machine"]
    assert machine["cpu_model"] and machine["logical_cores"] >= 1
    assert machine["python"] and machine["vllm"] and machine["torch"]


def test_both_variants_have_positive_throughput(run) -> None:
    t = run["data"]["throughput"]
    assert [r["variant"] for r in t["runs"]] == ["plain", "hooked"]  # alternating, plain first
    for r in t["runs"]:
        assert r["tokens_per_s"] > 0
        assert r["rounds"] == t["rounds_per_run"] == 1  # min_run_s=0: one round of the workload per run
        assert r["output_tokens"] == REQUESTS * OUTPUT_LEN  # ignore_eos: every request ran to the end
        assert r["tokens_per_s"] == pytest.approx(r["output_tokens"] / r["seconds"])
    assert t["plain"]["mean_tokens_per_s"] > 0 and t["hooked"]["mean_tokens_per_s"] > 0
    assert t["plain"]["scheduler"].endswith(".Scheduler") and t["hooked"]["scheduler"].endswith("MFUScheduler")


def test_ratio_is_hooked_over_plain(run) -> None:
    t = run["data"]["throughput"]
    assert t["ratio"] == pytest.approx(t["hooked"]["mean_tokens_per_s"] / t["plain"]["mean_tokens_per_s"])
    plain = [r["tokens_per_s"] for r in t["runs"] if r["variant"] == "plain"]
    hooked = [r["tokens_per_s"] for r in t["runs"] if r["variant"] == "hooked"]
    assert t["ratio_per_repeat"] == pytest.approx([h / p for p, h in zip(plain, hooked)])
    assert t["ratio_min"] <= t["ratio"] <= t["ratio_max"] or len(plain) > 1


def test_both_estimators_timed_on_the_same_iterations(run) -> None:
    from serving_mfu.tools.bench_overhead import CAPTURE_OUTPUT_LEN, waves_for

    a = run["data"]["accounting"]
    assert a["engines"] == ["dense", "spec", "moe"]
    assert sum(g["iterations"] for g in a["groups"]) == a["iterations"] > 0
    for g in a["groups"]:
        assert g["ours_us"] > 0 and g["vllm_us"] > 0 and g["vllm_live_us"] > 0
        assert g["engine_cpu_us"] > 0 and g["accounting_cpu_us"] > 0
        assert 0 < g["engine_hot_us"] < g["ours_us"]  # the capture callbacks are part of the whole replay
        assert g["live_cpu_us"] == pytest.approx(g["engine_cpu_us"] + g["accounting_cpu_us"])
        assert g["live_over_vllm"] == pytest.approx(g["live_cpu_us"] / g["vllm_live_us"])
        assert g["ours_over_vllm"] == pytest.approx(g["ours_us"] / g["vllm_us"])
    rows = {(g["kind"], g["batch"]): g for g in a["groups"]}
    # every wave of each batch size starts with one prefill step of that many requests, then decodes
    for batch in BATCHES:
        waves = waves_for(batch)
        assert rows[("prefill", batch)]["iterations"] == waves
        assert rows[("decode", batch)]["iterations"] == waves * (CAPTURE_OUTPUT_LEN - 1)
        assert rows[("moe prefill", batch)]["iterations"] == waves
    # the n-gram engine verified drafts on some steps (its prompts repeat a phrase)
    assert any(kind == "spec decode" for kind, _ in rows)
    assert a["ours_totals"]["draft_tokens"] > 0
    # the targets are computed from the rows, whichever way they come out on this machine
    at = [g for g in a["groups"] if g["at_requested_batch"]]
    assert a["worst_live_over_vllm"] == max(g["live_over_vllm"] for g in at)
    assert set(a["engine_growth"]) <= {g["kind"] for g in at}
    for kind, growth in a["engine_growth"].items():
        assert growth == pytest.approx(rows[(kind, 8)]["engine_cpu_us"] / rows[(kind, 1)]["engine_cpu_us"])
    for kind, growth in a["engine_hot_growth"].items():
        assert growth == pytest.approx(rows[(kind, 8)]["engine_hot_us"] / rows[(kind, 1)]["engine_hot_us"])


def test_replay_reproduces_the_engine_and_estimates_agree(run) -> None:
    from serving_mfu.tools.bench_overhead import CAPTURE_PROMPT_LEN, waves_for

    a = run["data"]["accounting"]
    # the timed path is exactly what the hook did in the engine (MoE: but for the replayed routing)
    assert a["replay_matches_engine"] == {"dense": True, "spec": True, "moe": True}
    assert a["scheduler_path"] == "llm.llm_engine.engine_core.engine_core.scheduler"
    ours, theirs = a["ours_totals"]["executed_flops"], a["vllm_totals"]["flops_per_gpu"]
    assert ours > 0 and theirs > 0
    assert 0.5 < ours / theirs < 2  # two FLOP models of the same steps, not the same formula
    # prefix caching is off in the captures: every prompt token is prefilled, on each of the three engines
    expected_tokens = 3 * sum(b * waves_for(b) for b in BATCHES) * CAPTURE_PROMPT_LEN
    assert a["ours_totals"]["prefill_tokens"] == expected_tokens
    assert a["ours_totals"]["hit_tokens"] == 0


def test_engines_shut_down_and_environment_restored(run) -> None:
    assert not run["leftover"], run["leftover"]
    assert run["env_restored"]


def test_table_and_cli_options(run) -> None:
    console = Console(record=True, width=140)
    print_overhead(run["report"], console)
    text = console.export_text()
    assert "hooked / plain" in text and "live ×" in text and "MFUScheduler" in text
    assert "target 1" in text and "target 2" in text and "throughput, hooked / plain" in text
    args = build_parser().parse_args(["bench-overhead", "--requests", "4", "--output-len", "8", "--repeats", "1",
                                      "--model", "/m", "--batches", "1", "64", "--engines", "dense", "--json"])
    assert (args.requests, args.output_len, args.repeats, args.model, args.json) == (4, 8, 1, "/m", True)
    assert (args.batches, args.engines) == ([1, 64], ["dense"])
    defaults = build_parser().parse_args(["bench-overhead"])
    assert (defaults.requests, defaults.output_len, defaults.repeats, defaults.model) == (16, 64, 3, None)
    assert (defaults.batches, defaults.engines) == ([1, 16, 256, 1024], ["dense", "spec", "moe"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench-overhead", "--engines", "eagle"])
    with pytest.raises(ValueError, match="--batches"):
        bench_overhead(batches=[0], progress=False)
