"""Preemption on the real engine: a KV cache too small for the batch forces recomputation, which
is counted as executed work, never as useful work."""

from __future__ import annotations

import pytest

from serving_mfu.tools.engine_models import CORPUS
from tests.engine_util import assert_invariants, llm_engine, measured_generate

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from vllm import SamplingParams

    publish = tmp_path_factory.mktemp("publish")
    # 12 blocks of 32 positions = 384 KV slots for 6 requests that grow to ~170 positions each
    with llm_engine(publish, block_size=32, num_gpu_blocks_override=12, max_num_seqs=6, max_model_len=320,
                    max_num_batched_tokens=256, enable_prefix_caching=False) as llm:
        prompts = [CORPUS[i * 40: i * 40 + 300] for i in range(6)]
        report, delta, outputs, _ = measured_generate(
            llm, publish, prompts, SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
    return report, delta, outputs


def test_preemption_recomputes_and_counts_it_as_waste(run) -> None:
    report, delta, outputs = run
    assert delta.get("vllm:num_preemptions", 0) > 0, "the KV cache was meant to force preemption"
    assert report.recompute.tokens > 0 and report.recompute.flops > 0
    assert report.prefill.executed_flops == pytest.approx(report.prefill.useful_flops + report.recompute.flops)
    assert report.prefill.hfu > report.prefill.mfu
    # recomputation does not inflate the useful token counts
    assert report.prefill.tokens == delta["vllm:prompt_tokens"]
    assert report.decode.tokens == delta["vllm:generation_tokens"] - len(outputs)
    assert all(len(o.outputs[0].token_ids) == 100 for o in outputs)
    assert_invariants(report)
