"""Tests for the alternative FLOP estimators (serving_mfu/tools/estimators.py).

Parameter counts are checked against transformers' real models built from tiny configs;
vLLM's estimator is checked to run and to match its documented shape (q * c attention,
no router, Qwen2-MoE shared expert dropped).
"""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from serving_mfu.tools.estimators import count_params, s2_attention_flops, six_nd_flops, vllm_perf_flops  # noqa: E402

BASE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=4,
    vocab_size=100,
    tie_word_embeddings=False,
)
MOE_CASES = {
    # mlp_only_layers: layer 0 is dense; head_dim override
    "qwen3_moe": dict(BASE, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                      head_dim=24, mlp_only_layers=[0]),
    # shared expert with its own size + sigmoid gate, qkv bias
    "qwen2_moe": dict(BASE, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                      shared_expert_intermediate_size=48, decoder_sparse_step=2),
    # MLA + shared experts + first_k_dense_replace
    "deepseek_v3": dict(BASE, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                        n_shared_experts=2, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=12,
                        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=10, n_group=1, topk_group=1),
    "deepseek_v2": dict(BASE, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=2, q_lora_rank=None, kv_lora_rank=12,
                        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=10, n_group=1, topk_group=1),
    # router bias, expert biases, attention sinks
    "gpt_oss": dict(BASE, num_local_experts=8, num_experts_per_tok=2, head_dim=16),
    "mixtral": dict(BASE, num_local_experts=8, num_experts_per_tok=2),
}


def _hf_model(model_type: str, **kwargs):
    cfg = transformers.AutoConfig.for_model(model_type, **kwargs)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    return cfg, model


def _hf_counts(model, top_k: int = 1) -> tuple[int, int]:
    """(non-embedding params incl. lm_head, same with only top_k experts) from the module tree."""
    total = active = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            continue
        total += p.numel()
        if ".experts." in name:  # fused expert tensors: [num_experts, ...]
            assert p.numel() * top_k % p.shape[0] == 0
            active += p.numel() * top_k // p.shape[0]
        else:
            active += p.numel()
    return total, active


# --- 2N per token ---------------------------------------------------------------------


def test_six_nd_dense_llama_matches_transformers_param_count():
    cfg, model = _hf_model("llama", **dict(BASE, head_dim=24))  # GQA + head_dim != hidden/heads
    total, active = _hf_counts(model)
    assert total == active
    for q, c in [(1, 1), (1, 500), (7, 7), (16, 300)]:
        assert six_nd_flops(cfg.to_dict(), q, c) == 2 * total * q
    assert six_nd_flops(cfg.to_dict(), 3, 3, logits_tokens=3) == six_nd_flops(cfg.to_dict(), 3, 3)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "gemma2", "gemma3_text"])
def test_param_count_dense_variants_match_transformers(model_type):
    cfg, model = _hf_model(model_type, **dict(BASE, head_dim=16))
    total, _ = _hf_counts(model)
    counts = count_params(cfg.to_dict())
    assert counts.body_total + counts.lm_head == total
    assert counts.embedding == BASE["vocab_size"] * BASE["hidden_size"]


def test_tied_embeddings_still_charge_the_lm_head():
    cfg, model = _hf_model("llama", **dict(BASE, tie_word_embeddings=True))
    body = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)  # tied: no lm_head
    lm_head = BASE["vocab_size"] * BASE["hidden_size"]
    assert six_nd_flops(cfg.to_dict(), 5, 5) == 2 * (body + lm_head) * 5


@pytest.mark.parametrize("model_type", sorted(MOE_CASES))
def test_six_nd_moe_uses_active_params_from_module_tree(model_type):
    kwargs = MOE_CASES[model_type]
    cfg, model = _hf_model(model_type, **kwargs)
    total, active = _hf_counts(model, top_k=kwargs["num_experts_per_tok"])
    counts = count_params(cfg.to_dict())
    assert counts.body_total + counts.lm_head == total
    assert counts.per_token == active < total
    assert six_nd_flops(cfg.to_dict(), 9, 40) == 2 * active * 9


def test_real_model_sizes():
    """Published sizes: Llama-3-8B 8.03B; DeepSeek-V3 671B total / ~37B active (without MTP)."""
    llama3 = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
    p = count_params(llama3)
    assert round((p.body_total + p.lm_head + p.embedding) / 1e9, 2) == 8.03
    dsv3 = dict(model_type="deepseek_v3", hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
                n_routed_experts=256, num_experts_per_tok=8, first_k_dense_replace=3, moe_layer_freq=1,
                q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                vocab_size=129280)
    p = count_params(dsv3)
    assert round((p.body_total + p.lm_head + p.embedding) / 1e9) == 671
    assert 37e9 <= p.per_token + p.embedding <= 38e9


# --- s^2 textbook ---------------------------------------------------------------------


def test_s2_attention_is_quadratic_for_a_prefill_and_linear_for_decode():
    cfg = transformers.LlamaConfig(**dict(BASE, head_dim=24)).to_dict()
    L, d = BASE["num_hidden_layers"], BASE["hidden_size"]

    def attn(q, c):
        return s2_attention_flops(cfg, q, c) - six_nd_flops(cfg, q, c)

    for s in (1, 64, 1000):
        assert attn(s, s) == 4 * L * d * s * s
    assert attn(2000, 2000) == 4 * attn(1000, 1000)  # quadratic
    assert attn(1, 2000) == 2 * attn(1, 1000)  # decode: linear in context
    assert attn(4, 1000) == 4 * attn(1, 1000)  # every new token sees the whole context
    # no causal discount: a full prefill costs more than the causal count q(q+1)/2 would
    heads_dim = BASE["num_attention_heads"] * 24
    causal = 2 * L * heads_dim * 2 * (1000 * 1001 // 2)
    assert attn(1000, 1000) > causal


# --- vLLM's own estimator -------------------------------------------------------------


def _vllm_or_skip(cfg, q, c, **kw):
    pytest.importorskip("vllm", reason="vllm not installed")
    out = vllm_perf_flops(cfg, q, c, **kw)
    if out is None:
        pytest.skip("vLLM could not build a VllmConfig for this config on this machine (see log)")
    return out


def test_vllm_perf_dense_llama_runs_and_matches_its_documented_formula():
    cfg = transformers.LlamaConfig(**dict(BASE, head_dim=24)).to_dict()
    L, d, inter, V = BASE["num_hidden_layers"], BASE["hidden_size"], BASE["intermediate_size"], BASE["vocab_size"]
    H, KV, hd = BASE["num_attention_heads"], BASE["num_key_value_heads"], 24

    def expected(q, c, logits):  # perf.py 596-604, 1226, 1430; attention charged q * c
        linear = 2 * q * d * (H + 2 * KV) * hd + 2 * q * H * hd * d + 2 * q * 3 * d * inter
        return L * (linear + 2 * 2 * H * hd * q * c) + 2 * d * V * logits

    decode = _vllm_or_skip(cfg, 1, 300)
    assert decode > 0
    assert decode == expected(1, 300, 1)
    # decode (not prefill) scales exactly linearly in q at fixed context
    for q in (2, 4, 8):
        assert vllm_perf_flops(cfg, q, 300, is_prefill=False) == q * decode
    # a prefill of the whole sequence: q * c = c^2 attention, one logit row
    assert vllm_perf_flops(cfg, 256, 256) == expected(256, 256, 1)
    # q > 1 on a running request is billed as prefill: one logit row (perf.py 1569, 185)
    assert vllm_perf_flops(cfg, 4, 300) == expected(4, 300, 1)
    # its weight FLOPs equal 2N per token up to norms and the LM head (1 row vs q rows)
    no_attn = vllm_perf_flops(cfg, 8, 0, is_prefill=False)  # c=0 removes the score term
    assert no_attn == pytest.approx(six_nd_flops(cfg, 8, 8), rel=0.01)


def test_vllm_perf_qwen2_moe_drops_router_and_own_size_shared_expert():
    cfg = transformers.AutoConfig.for_model("qwen2_moe", **MOE_CASES["qwen2_moe"]).to_dict()
    cfg["decoder_sparse_step"] = 1  # vLLM ignores it; keep every layer MoE for an exact formula
    L, d, V, mi, E = BASE["num_hidden_layers"], BASE["hidden_size"], BASE["vocab_size"], 32, 8
    H, KV, hd, k, shared = BASE["num_attention_heads"], BASE["num_key_value_heads"], 16, 2, 48
    q, c = 1, 50
    got = _vllm_or_skip(cfg, q, c)
    scores = L * 4 * H * hd * c
    attn_weights = L * (2 * d * (H + 2 * KV) * hd + 2 * H * hd * d)
    routed_only = L * 2 * 3 * d * mi * k  # no router (d x E), no 48-wide shared expert
    assert got == scores + attn_weights + routed_only + 2 * d * V
    # what the 2N rule adds on top of vLLM's weight FLOPs: router, shared expert + its gate,
    # q/k/v biases and norms -- nothing else
    extra_params = L * (d * E + 3 * d * shared + d + (H + 2 * KV) * hd + 2 * d) + d
    assert six_nd_flops(cfg, q, c) - (got - scores) == 2 * q * extra_params


def test_vllm_perf_qwen3_moe_ignores_mlp_only_layers():
    cfg = transformers.AutoConfig.for_model("qwen3_moe", **MOE_CASES["qwen3_moe"]).to_dict()
    L, d, V, H, KV, hd = BASE["num_hidden_layers"], BASE["hidden_size"], BASE["vocab_size"], 4, 2, 24
    q, c = 1, 10
    got = _vllm_or_skip(cfg, q, c)
    attn = L * (2 * d * (H + 2 * KV) * hd + 2 * H * hd * d + 4 * H * hd * c)
    all_routed = L * 2 * 3 * d * 32 * 2  # layer 0 is dense (intermediate 96) in the model
    assert got == attn + all_routed + 2 * d * V


def test_vllm_perf_returns_none_without_vllm(monkeypatch, caplog):
    import sys

    monkeypatch.setitem(sys.modules, "vllm.v1.metrics.perf", None)  # import raises ImportError
    cfg = transformers.LlamaConfig(**BASE).to_dict()
    with caplog.at_level("WARNING", logger="serving_mfu.tools.estimators"):
        assert vllm_perf_flops(cfg, 1, 10) is None
    assert "not importable" in caplog.text


def test_vllm_perf_leaves_transformers_config_classes_as_they_were() -> None:
    """vLLM renames DeepseekV3Config to "deepseek_v32" when it loads a V3.2 config; after our call every
    DeepSeek-V3 config still says deepseek_v3 and AutoConfig still maps deepseek_v32 to its own class."""
    pytest.importorskip("vllm")
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from serving_mfu.tools.public_configs import PUBLIC_CONFIGS

    before = CONFIG_MAPPING["deepseek_v32"]
    assert vllm_perf_flops(PUBLIC_CONFIGS["deepseek-v3.2"], 1, 4096) is not None
    assert transformers.DeepseekV3Config.model_type == "deepseek_v3"
    assert transformers.DeepseekV3Config().to_dict()["model_type"] == "deepseek_v3"
    assert CONFIG_MAPPING["deepseek_v32"] is before
