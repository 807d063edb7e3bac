"""The plugin on a real vLLM CPU engine: n-gram speculation, prefix caching, chunked prefill.

Every token the tracker credits is checked against vLLM's own counters for the same requests.
"""

from __future__ import annotations

import json

import pytest

from serving_mfu.runtime.trace import read_trace
from serving_mfu.serve.monitor import MFUMonitor
from serving_mfu.tools.engine_models import CORPUS
from tests.engine_util import NGRAM, assert_invariants, llm_engine, measured_generate

pytestmark = pytest.mark.engine

LONG = [CORPUS[i * 200: i * 200 + 1400] for i in range(2)]          # ~300 tokens: several KV blocks
# The tiny model tends to repeat its last token; "X X Y ... X" makes n-gram drafting propose Y after
# "X X" (rejected) before it settles on proposing X (accepted).
SHORT = ["the engine engine and the engine", "decode decode prefill the decode", "a b c d a b c d a b"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One engine, two waves of requests; everything the tests compare is captured here."""
    from vllm import SamplingParams

    publish = tmp_path_factory.mktemp("publish")
    trace = publish / "trace.jsonl"
    with llm_engine(publish, env={"SERVING_MFU_TRACE": str(trace)}, speculative_config=NGRAM,
                    enable_prefix_caching=True, max_num_batched_tokens=128, max_num_seqs=8) as llm:
        params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
        waves = []
        for prompts in (SHORT + LONG, LONG):  # the second wave re-sends the long prompts: prefix hits
            report, delta, outputs, _ = measured_generate(llm, publish, prompts, params)
            waves.append((report, delta, len(prompts), outputs))
        total = MFUMonitor(publish).report()
        window = MFUMonitor(publish).report(window_s=5)
    header, records = read_trace(trace)
    return {"waves": waves, "total": total, "window": window, "trace": list(records), "header": header,
            "trace_path": trace}


def test_tokens_match_vllm_counters(run) -> None:
    for report, delta, n_requests, _ in run["waves"]:
        assert report.prefill.tokens + report.prefix_cache.hit_tokens == delta["vllm:prompt_tokens"]
        assert report.prefix_cache.hit_tokens == delta["vllm:prefix_cache_hits"]
        # the first token of each request comes from its prefill; decode delivers the rest
        assert report.decode.tokens == delta["vllm:generation_tokens"] - n_requests
        assert report.spec_decode.draft_tokens == delta["vllm:spec_decode_num_draft_tokens"]
        assert report.spec_decode.accepted_tokens == delta["vllm:spec_decode_num_accepted_tokens"]


def test_prefix_cache_hits_seen_and_saved(run) -> None:
    second = run["waves"][1][0]
    assert second.prefix_cache.hit_tokens > 0
    assert second.prefix_cache.saved_flops > 0


def test_speculation_wastes_rejected_work(run) -> None:
    total = run["total"]
    spec = total.spec_decode
    assert spec.draft_tokens > spec.accepted_tokens > 0  # some accepted, some rejected
    assert spec.rejected_flops > 0
    assert total.decode.executed_flops > total.decode.useful_flops
    assert total.decode.hfu > total.decode.mfu
    assert spec.drafter_flops == 0  # n-gram drafting does no matmuls


def test_chunked_prefill_produces_split_mixed_iterations(run) -> None:
    records = [r for _, r in run["trace"]]
    mixed = [r for r in records if any(s.computed_before + s.new_tokens < s.prompt_len for s in r.all_slices())
             and any(s.computed_before >= s.prompt_len for s in r.all_slices())]
    assert mixed, "expected iterations with a prefill chunk beside running decodes"
    total = run["total"]
    assert 0 < total.overall.mixed_time_fraction < 1
    assert total.prefill.time_s > 0 and total.decode.time_s > 0
    assert total.prefill.time_s + total.decode.time_s == pytest.approx(total.overall.busy_s, rel=1e-6)


def test_invariants_in_every_section_and_window(run) -> None:
    for report, *_ in run["waves"]:
        assert_invariants(report)
    assert_invariants(run["total"])
    assert_invariants(run["window"])
    assert run["total"].overall.iterations == len(run["trace"])


def test_trace_replays_to_the_same_totals(run) -> None:
    from serving_mfu.runtime.trace import replay

    assert run["header"] is not None and run["header"].hf_config["model_type"] == "llama"
    report, errors = replay(run["trace_path"])
    assert not errors
    total = run["total"]
    assert report.decode.useful_flops == total.decode.useful_flops
    assert report.prefill.tokens == total.prefill.tokens
    assert report.overall.busy_s == pytest.approx(total.overall.busy_s)


def test_report_is_json_serialisable(run) -> None:
    json.loads(run["total"].model_dump_json())
