"""`serving-mfu bench-overhead`, shortened: both throughput variants, both per-iteration estimators.

One run (three engine starts: plain, hooked, in-process hooked) feeds every test here.
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

REQUESTS, OUTPUT_LEN, CAPTURE_BATCH = 4, 8, 8


@pytest.fixture(scope="module")
def run():
    import vllm.envs as envs

    children = set(multiprocessing.active_children())
    cached, mp_env = envs._is_envs_cache_enabled(), os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    report = bench_overhead(requests=REQUESTS, output_len=OUTPUT_LEN, repeats=1, capture_batch=CAPTURE_BATCH,
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
    a = run["data"]["accounting"]
    assert a["iterations"] > 0
    assert a["ours_iterations"] == a["vllm_iterations"] == a["iterations"]
    assert a["ours_us_per_iteration"] > 0 and a["vllm_us_per_iteration"] > 0
    assert a["ours_in_engine_us_per_iteration"] > 0
    assert sum(g["iterations"] for g in a["groups"]) == a["iterations"]
    assert all(g["ours_us"] > 0 and g["vllm_us"] > 0 for g in a["groups"])
    # the wave of CAPTURE_BATCH requests gave iterations with that many requests
    assert max(g["batch"] for g in a["groups"]) == CAPTURE_BATCH
    assert {"prefill", "decode"} <= {g["kind"] for g in a["groups"]}


def test_replay_reproduces_the_engine_and_estimates_agree(run) -> None:
    a = run["data"]["accounting"]
    assert a["replay_matches_engine"]  # the timed path is exactly what the hook did in the engine
    assert a["scheduler_path"] == "llm.llm_engine.engine_core.engine_core.scheduler"
    ours, theirs = a["ours_totals"]["executed_flops"], a["vllm_totals"]["flops_per_gpu"]
    assert ours > 0 and theirs > 0
    assert 0.5 < ours / theirs < 2  # two FLOP models of the same steps, not the same formula
    expected_tokens = (REQUESTS + CAPTURE_BATCH) * 64  # prompts (some cached in the second wave)
    assert a["ours_totals"]["prefill_tokens"] + a["ours_totals"]["hit_tokens"] == expected_tokens


def test_engines_shut_down_and_environment_restored(run) -> None:
    assert not run["leftover"], run["leftover"]
    assert run["env_restored"]


def test_table_and_cli_options(run) -> None:
    console = Console(record=True, width=140)
    print_overhead(run["report"], console)
    text = console.export_text()
    assert "hooked / plain" in text and "ours/vLLM" in text and "MFUScheduler" in text
    args = build_parser().parse_args(["bench-overhead", "--requests", "4", "--output-len", "8", "--repeats", "1",
                                      "--model", "/m", "--json"])
    assert (args.requests, args.output_len, args.repeats, args.model, args.json) == (4, 8, 1, "/m", True)
    defaults = build_parser().parse_args(["bench-overhead"])
    assert (defaults.requests, defaults.output_len, defaults.repeats, defaults.model) == (16, 64, 2, None)
