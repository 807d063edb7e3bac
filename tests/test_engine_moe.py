"""A Qwen3-MoE-style model on the real engine: experts activated per layer, labelled with its source.

vLLM's routed-experts capture (`enable_return_routed_experts`) needs Model Runner V2, which the
CPU build cannot run (it needs Triton); here the count is the expected one under uniform routing.
The measured path is covered by test_hook_units.py with vLLM's own output types.
"""

from __future__ import annotations

import pytest

from serving_mfu.tools.engine_models import CORPUS, ENGINE_CONFIGS
from tests.engine_util import assert_invariants, llm_engine, measured_generate

pytestmark = pytest.mark.engine

CFG = ENGINE_CONFIGS["tiny-qwen3-moe-engine"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from vllm import SamplingParams

    publish = tmp_path_factory.mktemp("publish")
    with llm_engine(publish, model="tiny-qwen3-moe-engine", max_num_batched_tokens=256) as llm:
        prompts = [CORPUS[i * 50: i * 50 + 200] for i in range(4)]
        report, delta, outputs, mon = measured_generate(
            llm, publish, prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
        recent = mon.reader.recent(1000)
    return report, delta, outputs, recent


def test_experts_per_layer_between_top_k_and_e(run) -> None:
    report, delta, outputs, recent = run
    moe = report.moe
    assert moe is not None
    layers = CFG["num_hidden_layers"]
    assert len(moe.active_experts_per_layer) == layers
    k, e = CFG["num_experts_per_tok"], CFG["num_experts"]
    for n in moe.active_experts_per_layer:
        assert k <= n <= e
    assert moe.source == "expected"  # the CPU engine cannot capture routing (see the module docstring)
    if moe.source == "measured":
        assert moe.imbalance is not None and moe.imbalance >= 1.0
        # a single decode token per request hits exactly top_k experts per layer: a 1-slice iteration
        singles = [it for it in recent if it["decode"]["tokens"] + it["prefill"]["tokens"] == 1]
        for it in singles:
            assert all(n == k for n in it["moe_active_experts"])
    assert report.decode.tokens == delta["vllm:generation_tokens"] - len(outputs)
    assert report.prefill.tokens == delta["vllm:prompt_tokens"]
    assert_invariants(report)
