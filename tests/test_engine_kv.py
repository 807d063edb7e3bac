"""KV connectors on the real engine: a `kv_both` engine with vLLM's disk-backed ExampleConnector
stores the KV of the prompts it computes and, asked the same prompts again, loads it.  The loaded
positions are neither prefill work nor local prefix-cache hits (vLLM's
`vllm:prompt_tokens_by_source{source=...}` counts each source apart, as we must)."""

from __future__ import annotations

import pytest

from serving_mfu.tools.engine_models import CORPUS
from tests.engine_util import assert_invariants, measured_generate

pytestmark = pytest.mark.engine

BLOCK = 32  # the engine's block size: the ExampleConnector stores whole blocks of a prompt but its last position


def _by_source(llm) -> dict[str, float]:
    """vLLM's prompt tokens by source (local_compute, local_cache_hit, external_kv_transfer)."""
    out: dict[str, float] = {}
    for m in llm.get_metrics():
        if m.name == "vllm:prompt_tokens_by_source":
            source = m.labels["source"]
            out[source] = out.get(source, 0.0) + m.value
    return out


@pytest.fixture(scope="module")
def run(connector_lora_engine):
    from vllm import SamplingParams

    llm, publish, _ = connector_lora_engine
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = [CORPUS[i * 60: i * 60 + 200 + 17 * i] for i in range(4)]
    runs = []
    for _ in range(2):  # the first computes and stores every prompt, the second loads them
        before = _by_source(llm)
        report, delta, outputs, _ = measured_generate(llm, publish, prompts, params)
        after = _by_source(llm)
        runs.append((report, delta, {k: after[k] - before.get(k, 0.0) for k in after}, outputs))
    return runs


def test_stored_then_loaded_kv_is_counted_apart(run) -> None:
    (first, d1, src1, _), (second, d2, src2, outputs) = run
    # first run: all computed here, all stored for others
    assert src1.get("external_kv_transfer", 0) == 0
    assert first.kv_transfer.received_tokens == 0
    assert first.prefill.tokens == d1["vllm:prompt_tokens"] == src1["local_compute"]
    prompt_lens = [len(o.prompt_token_ids) for o in outputs]
    stored = sum((n - 1) // BLOCK * BLOCK for n in prompt_lens)  # ExampleConnector: whole blocks but the last position
    assert first.kv_transfer.sent_tokens == stored > 0
    # second run: the stored blocks come back through the connector, the rest is computed
    assert src2["external_kv_transfer"] == stored
    assert second.kv_transfer.received_tokens == src2["external_kv_transfer"]
    assert second.prefix_cache.hit_tokens == src2.get("local_cache_hit", 0) == 0
    assert second.prefill.tokens == src2["local_compute"] == sum(prompt_lens) - stored
    assert second.kv_transfer.sent_tokens == 0  # already in the store
    assert d2["vllm:external_prefix_cache_hits"] == stored


def test_received_kv_saved_what_the_first_run_computed(run) -> None:
    (first, _, _, _), (second, _, _, _) = run
    # what the first run computed = what the second computed + what it loaded
    assert second.prefill.useful_flops + second.kv_transfer.received_flops == pytest.approx(
        first.prefill.useful_flops, rel=1e-9)
    assert second.kv_transfer.received_flops > 0
    assert second.kv_transfer.received_bytes == pytest.approx(
        second.kv_transfer.received_tokens * first.kv_transfer.sent_bytes / first.kv_transfer.sent_tokens)
    assert second.kv_transfer.roles == ["both"]
    for report in (first, second):
        assert_invariants(report)
