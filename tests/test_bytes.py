"""The byte model (DESIGN §4) against the weights transformers actually instantiates."""

from __future__ import annotations

import pytest

from serving_mfu.cost.accounting import CostModel, cost_iteration
from serving_mfu.cost.bytes import ByteModel, expected_active_experts
from serving_mfu.cost.records import IterationRecord, Slice
from serving_mfu.model.spec import ModelSpec
from serving_mfu.tools.tiny_models import build_hf_model, tiny_config

MODELS = ["tiny-llama", "tiny-llama-hd", "tiny-gemma", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-mixtral",
          "tiny-deepseek-v3"]


def _matrix_numel(model) -> tuple[int, int, int]:
    """(routed-expert weights, other matmul weights without embeddings, lm_head weights) of a HF model."""
    experts = other = lm = 0
    for name, p in model.named_parameters():
        if p.dim() < 2 or "embed_tokens" in name:
            continue
        if name.startswith("lm_head"):
            lm += p.numel()
        elif ".experts." in name or name.endswith(".experts.gate_up_proj") or name.endswith(".experts.down_proj"):
            experts += p.numel()
        else:
            other += p.numel()
    return experts, other, lm


@pytest.mark.parametrize("name", MODELS)
def test_weight_bytes_match_instantiated_parameters(name: str) -> None:
    cfg = tiny_config(name)
    model = build_hf_model(cfg)
    experts, other, lm = _matrix_numel(model)
    if cfg.get("tie_word_embeddings"):
        lm = cfg["vocab_size"] * cfg["hidden_size"]  # tied: the embedding matrix is the LM head
    spec = ModelSpec.from_hf_config(cfg)
    bm = ByteModel(spec)
    width = 4  # the tiny configs are float32
    assert bm.dense_weight_bytes == other * width
    assert bm.lm_head_bytes == lm * width
    n_moe = len(spec.moe_layer_indices)
    if n_moe:
        e = spec.layers[spec.moe_layer_indices[0]].moe.num_experts
        assert sum(bm.expert_bytes) * e == experts * width
    else:
        assert experts == 0


def test_kv_bytes_per_token_gqa_and_mla() -> None:
    llama = ByteModel(ModelSpec.from_hf_config(tiny_config("tiny-llama-hd")), kv_cache_dtype="fp8")
    c = tiny_config("tiny-llama-hd")
    assert llama.kv_bytes_per_token == c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * c["head_dim"] * 1
    ds = tiny_config("tiny-deepseek-v3")
    mla = ByteModel(ModelSpec.from_hf_config(ds))
    assert mla.kv_bytes_per_token == ds["num_hidden_layers"] * (ds["kv_lora_rank"] + ds["qk_rope_head_dim"]) * 4


def test_expected_experts_limits() -> None:
    assert expected_active_experts(64, 8, 1) == pytest.approx(8)
    assert expected_active_experts(64, 8, 10_000) == pytest.approx(64)
    assert expected_active_experts(64, 8, 0) == 0
    # monotone in tokens, between top_k and E
    vals = [expected_active_experts(64, 8, t) for t in range(1, 50)]
    assert vals == sorted(vals) and 8 <= vals[0] and vals[-1] <= 64


def test_decode_bytes_are_weights_plus_kv() -> None:
    cfg = tiny_config("tiny-llama")
    model = CostModel(ModelSpec.from_hf_config(cfg))
    bm = model.byte_model
    s = Slice(req_id="a", new_tokens=1, computed_before=99, prompt_len=10, hwm=99)
    rec = IterationRecord(step=0, t_sched_s=0, t_end_s=0.01, slices=[s])
    cost = cost_iteration(rec, model, 0.01, 0.01, 1e12, 1e11)
    assert cost.decode.bytes == pytest.approx(bm.dense_weight_bytes + bm.lm_head_bytes + 100 * bm.kv_bytes_per_token
                                              + bm.kv_bytes_per_token)
