"""The registered formulas of the families whose attention is not plain q·c (serving_mfu/model/families.py),
each held to FlopCounterMode on a tiny copy of its own default config and to the derived path."""

from __future__ import annotations

import pytest

from serving_mfu.cost.bytes import ByteModel
from serving_mfu.cost.flops import RECURRENT_STATE, FlopModel, key_rule
from serving_mfu.derived import derive_spec, has_formula
from serving_mfu.model.spec import ModelSpec
from tests.any_architecture import build, oracle_decode_counts, oracle_linear_flops, tiny_config

TOKENS = 8
FAMILIES = ("llama4_text", "qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "deepseek_v32", "granitemoehybrid")


@pytest.fixture(scope="module")
def models() -> dict:
    return {}


def _get(cache: dict, model_type: str):
    if model_type not in cache:
        config = tiny_config(model_type)
        data = {**config.to_dict(), "model_type": model_type}
        cache[model_type] = (config, ModelSpec.from_hf_config(data), build(config))
    return cache[model_type]


def _weights(fm: FlopModel) -> int:
    return sum(v for k, v in fm.linear_flops_per_token.items() if k != RECURRENT_STATE)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_formula_linear_flops_equal_flop_counter(model_type: str, models: dict) -> None:
    config, spec, model = _get(models, model_type)
    assert has_formula(model_type) and spec.flop_model == "formula" and not spec.warnings
    share = 0.0
    if model_type == "llama4_text":  # transformers runs every expert on every token (bmm); a server runs top_k
        share = config.num_experts_per_tok / config.num_local_experts
    assert _weights(FlopModel(spec)) * TOKENS == oracle_linear_flops(model, TOKENS, dense_experts=share)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_formula_matches_the_derived_path_layer_by_layer(model_type: str, models: dict) -> None:
    """Per layer: the same weights (active and stored), key rule, score and KV coefficients and state."""
    config, spec, _ = _get(models, model_type)
    derived = derive_spec(config, base=spec)  # the same dtypes
    assert spec.num_layers == derived.num_layers
    fa, bf = FlopModel(spec), ByteModel(spec)
    fd, bd = FlopModel(derived), ByteModel(derived)
    assert fa.linear_flops_per_token_total == fd.linear_flops_per_token_total
    assert [(g.rule, g.flops_per_pair) for g in fa.attention_groups] == \
        [(g.rule, g.flops_per_pair) for g in fd.attention_groups]
    assert dict(bf.kv_groups) == dict(bd.kv_groups)
    assert bf.dense_weight_bytes == bd.dense_weight_bytes and bf.expert_bytes == bd.expert_bytes
    assert bf.state_bytes_per_slice == bd.state_bytes_per_slice
    for i, (a, d) in enumerate(zip(spec.layers, derived.layers)):
        assert key_rule(a.attention) == key_rule(d.attention), i
        assert (a.attention.state_elements, a.attention.state_flops_per_token) == \
            (d.attention.state_elements, d.attention.state_flops_per_token), i


@pytest.mark.parametrize("model_type", ("qwen3_next", "deepseek_v32", "granitemoehybrid"))
def test_formula_decode_attention_and_state_equal_flop_counter(model_type: str, models: dict) -> None:
    if model_type == "granitemoehybrid":
        pytest.skip("transformers' GraniteMoeHybrid cannot decode with a cache of Mamba layers only "
                    "(get_seq_length raises); the derived test covers Mamba-2 decode via Falcon-H1")
    _, spec, model = _get(models, model_type)
    fm = FlopModel(spec)
    for context in (64, 512):
        bmm = oracle_decode_counts(model, context)["Global"].get("aten.bmm", 0)
        assert bmm == fm.score_flops(context, context + 1) + fm.linear_flops_per_token.get(RECURRENT_STATE, 0)


def test_llama4_chunks_the_rope_layers_and_attends_fully_on_nope_layers() -> None:
    """Llama 4 Scout's published layout: MoE on every layer, every 4th layer NoPE (full attention),
    the rest chunked at 8192 keys; 16 experts, top-1, one shared expert."""
    spec = ModelSpec.from_hf_config({
        "model_type": "llama4", "text_config": {
            "model_type": "llama4_text", "hidden_size": 5120, "intermediate_size": 8192,
            "intermediate_size_mlp": 16384, "num_hidden_layers": 48, "num_attention_heads": 40,
            "num_key_value_heads": 8, "head_dim": 128, "num_local_experts": 16, "num_experts_per_tok": 1,
            "interleave_moe_layer_step": 1, "attention_chunk_size": 8192, "vocab_size": 202048}})
    assert spec.flop_model == "formula" and spec.num_layers == 48
    assert [layer.attention.chunk_size for layer in spec.layers[:4]] == [8192, 8192, 8192, None]
    assert all(layer.moe and layer.moe.shared_intermediate_size == 8192 for layer in spec.layers)
