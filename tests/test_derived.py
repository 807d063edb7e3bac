"""The derived path: linear FLOPs read from a model's modules on the meta device, checked against
FlopCounterMode on a tiny copy of each architecture's own default config (tests/any_architecture.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from serving_mfu.cost.flops import RECURRENT_STATE, FlopModel
from serving_mfu.derived import derive_spec
from tests.any_architecture import build, oracle_decode_counts, oracle_linear_flops, tiny_config

TOKENS = 8
# Built by the derived path whether or not a formula is registered; hybrids (linear attention, Mamba-2, SSM), sparse-attention indexers, MoE,
# and an encoder-decoder's decoder (its idle cross-attention left out).
FAMILIES = ("qwen3_next", "qwen3_5_moe", "deepseek_v32", "jamba", "granitemoehybrid", "mamba2", "kimi_linear",
            "falcon_h1", "gemma4_text", "ministral3", "bart")


@pytest.mark.parametrize("model_type", FAMILIES)
def test_derived_linear_flops_equal_flop_counter(model_type: str) -> None:
    config = tiny_config(model_type)
    spec = derive_spec(config)
    assert spec.flop_model == "derived"
    oracle = oracle_linear_flops(build(config), TOKENS)
    assert oracle > 0
    weights = {k: v for k, v in FlopModel(spec).linear_flops_per_token.items() if k != RECURRENT_STATE}
    assert sum(weights.values()) * TOKENS == oracle


# Decode through transformers' cached / recurrent path.  FlopCounterMode's `bmm` of one decode step
# is the softmax attention's scores over every cached key, a sparse-attention indexer's scoring and a
# Mamba mixer's state readout y = C·h; ours is score_flops(c, c + 1) plus the recurrent-state matmuls.
# Linear attention (gated DeltaNet, Kimi delta attention) reads its state with elementwise products:
# nothing for either side.  Mamba-2 (falcon_h1), Mamba (jamba), gated DeltaNet (qwen3_next,
# qwen3_5_text), Kimi delta attention + MLA (kimi_linear), MLA + indexer (deepseek_v32).
DECODE_FAMILIES = ("qwen3_next", "qwen3_5_text", "jamba", "falcon_h1", "kimi_linear", "deepseek_v32")


@pytest.mark.parametrize("model_type", DECODE_FAMILIES)
def test_decode_attention_and_state_equal_flop_counter_at_two_contexts(model_type: str) -> None:
    config = tiny_config(model_type)
    model = build(config)
    fm = FlopModel(derive_spec(config))
    per_token = []
    for context in (64, 512):
        counts = oracle_decode_counts(model, context)
        ours = fm.score_flops(context, context + 1) + fm.linear_flops_per_token.get(RECURRENT_STATE, 0)
        assert counts["Global"].get("aten.bmm", 0) == ours, f"context {context}"
        per_token.append(fm.linear_flops_per_token.get(RECURRENT_STATE, 0))
    recurrent = [layer for layer in fm.spec.layers if layer.attention.state_elements]
    assert bool(recurrent) == (model_type != "deepseek_v32")  # the hybrids keep state in some layers
    if model_type in ("jamba", "falcon_h1"):
        assert per_token[0] == per_token[1] > 0  # the Mamba readout: the same per token at any context


def test_recurrent_layers_cost_the_same_per_token_at_any_context() -> None:
    """A hybrid's decode cost grows only through its softmax-attention layers: the recurrent layers
    add state matmuls per token and state bytes per step, independent of the context."""
    from serving_mfu.cost.bytes import ByteModel

    config = tiny_config("jamba")
    spec = derive_spec(config)
    fm, bm = FlopModel(spec), ByteModel(spec)
    attn = [i for i, layer in enumerate(spec.layers) if layer.attention.num_heads]
    a = spec.layers[attn[0]].attention
    growth = 2 * a.num_heads * (a.head_dim + a.v_head_dim) * len(attn)  # FLOPs per extra cached key
    assert fm.run_flops(1024, 1025) - fm.run_flops(64, 65) == growth * (1024 - 64)
    kv_per_key = a.num_kv_heads * (a.head_dim + a.v_head_dim) * 2 * len(attn)  # bf16 K and V
    assert bm.kv_read_bytes(1025, 1) - bm.kv_read_bytes(65, 1) == kv_per_key * (1024 - 64)
    mamba = [layer.attention for layer in spec.layers if not layer.attention.num_heads]
    # Jamba's Mamba mixer: d_inner × N recurrent state and (kernel − 1) inputs per channel of its convolution
    d_inner = config.mamba_expand * spec.hidden_size
    n, kernel = config.mamba_d_state, config.mamba_d_conv
    assert all(m.state_elements == d_inner * n + d_inner * (kernel - 1) for m in mamba)
    assert bm.state_bytes_per_slice == 2 * 2 * sum(m.state_elements for m in mamba)  # read + write, bf16


def test_sparse_attention_attends_top_k_keys_and_its_indexer_scores_all() -> None:
    """DeepSeek-V3.2: each query attends min(context, index_topk) keys; the indexer scores every causal
    key with index_n_heads heads of index_head_dim (q·k, then the weighted sum over heads)."""
    config = tiny_config("deepseek_v32")
    config.index_topk = 16
    spec = derive_spec(config)
    fm = FlopModel(spec)
    layers = spec.num_layers
    mla = 2 * config.num_attention_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
    indexer = 2 * config.index_n_heads * (config.index_head_dim + 1)
    for c in (8, 15, 64, 1024):
        assert fm.score_flops(c, c + 1) == layers * (mla * min(c + 1, 16) + indexer * (c + 1))


def test_chunked_attention_sees_the_keys_transformers_mask_lets_through() -> None:
    """Llama 4's chunked layers: a query sees the keys of its own chunk (transformers' chunked mask);
    the NoPE layers (every 4th) attend to everything."""
    from transformers.masking_utils import chunked_causal_mask_function

    config = tiny_config("llama4_text")
    config.attention_chunk_size = 16
    spec = derive_spec(config)
    kinds = [(layer.attention.chunk_size, t) for layer, t in zip(spec.layers, config.layer_types)]
    assert kinds == [(16 if t == "chunked_attention" else None, t) for t in config.layer_types]
    mask = chunked_causal_mask_function(16, torch.zeros(1, dtype=torch.long))
    seen = [sum(bool(mask(0, 0, torch.tensor(q), torch.tensor(k))) for k in range(q + 1)) for q in range(70)]
    rule = FlopModel(spec).attention_groups
    chunked = next(g for g in rule if g.rule.kind == "chunk")
    assert [chunked.rule.pairs(p + 1) - chunked.rule.pairs(p) for p in range(70)] == seen


# Published sizes (billions of parameters, total and active per token) of the models transformers'
# default configs describe: Qwen3-Next-80B-A3B (its config docstring names it), DeepSeek-V3.2 (671B,
# 37B activated: DeepSeek-V3 report), Llama 4 Scout (109B, 17B active: Meta's model card), Jamba
# v0.1 (52B, 12B active: arXiv 2403.19887), Kimi-Linear-48B-A3B.
PUBLISHED = {"qwen3_next": (80, 3), "deepseek_v32": (671, 37), "llama4_text": (109, 17), "jamba": (52, 12),
             "kimi_linear": (48, 3)}


@pytest.mark.parametrize("model_type", sorted(PUBLISHED))
def test_full_size_default_configs_build_on_meta_and_match_published_sizes(model_type: str) -> None:
    """The derived path on a full-size config costs no memory (meta device) and its weights add up to
    the vendor's published total and active counts (rounded figures: total within 3 %, active between
    0.9 × without and 1.1 × with the embeddings)."""
    from serving_mfu.model.components import layer_matmuls
    from tests.any_architecture import default_text_config

    spec = derive_spec(default_text_config(model_type))
    active = sum(a for layer in spec.layers for _, a, _, _ in layer_matmuls(layer, spec))
    stored = sum(s for layer in spec.layers for _, _, s, _ in layer_matmuls(layer, spec))
    emb = spec.hidden_size * spec.vocab_size * (1 if spec.tie_word_embeddings else 2)
    total_b, active_b = PUBLISHED[model_type]
    assert abs((stored + emb) / 1e9 - total_b) / total_b < 0.03
    assert 0.9 * active / 1e9 <= active_b <= 1.1 * (active + emb) / 1e9


def test_a_derived_spec_reports_its_path() -> None:
    """The report's model.flop_model says `derived` for a spec the derived path built (it used to be
    refused by the report schema, which knew only formula and approximate)."""
    from serving_mfu.model.spec import ModelSpec
    from serving_mfu.runtime.tracker import MFUTracker

    spec = ModelSpec.from_hf_config({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                                     "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100})
    derived = dataclasses.replace(spec, derived=True)
    assert derived.flop_model == "derived"
    assert MFUTracker(derived).model_report().flop_model == "derived"
    assert MFUTracker(spec).report().model.flop_model == "formula"
