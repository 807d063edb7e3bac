"""Tiny Hugging Face configs of the supported architectures, for tests and demos.

Each entry of `TINY_CONFIGS` is a dict shaped like a real `config.json` (with `model_type`,
`architectures`, `torch_dtype`, ...), scaled down so that a forward pass on a CPU takes
milliseconds.  The shapes are chosen to exercise what the FLOP model must get right:

- `tiny-llama`: dense GQA (8 query heads, 2 KV heads), head_dim = hidden / heads.
- `tiny-llama-hd`: dense GQA with an explicit head_dim (16) != hidden / heads (8).
- `tiny-gemma`: Gemma, head_dim 32 != hidden / heads (16), tied embeddings, GeGLU MLP.
- `tiny-qwen2-moe`: Qwen2-MoE with a shared expert of its own size (96) != expert size (32),
  a `shared_expert_gate`, a dense layer from `mlp_only_layers` and one from
  `decoder_sparse_step`, with intermediate_size (80) != moe_intermediate_size; the
  `sliding_window` / `use_sliding_window: false` pair as in the released checkpoints.
- `tiny-qwen3-moe`: Qwen3-MoE, 8 experts top-2, explicit head_dim, one mlp_only layer.
- `tiny-deepseek-v3`: MLA (q_lora_rank, kv_lora_rank, nope/rope/v head dims), routed and
  shared experts, `first_k_dense_replace=1`.
- `tiny-mixtral`: Mixtral, 4 experts top-2 every layer.

`build_hf_model` instantiates one with random weights, eager attention and eager experts, in
eval mode — the reference the FLOP oracle counts (DESIGN §9).  Importing this module does not
import torch or transformers; `build_hf_model` does.
"""

from __future__ import annotations

import copy
from typing import Any

_COMMON: dict[str, Any] = {
    "torch_dtype": "float32",
    "transformers_version": "5.19.0",
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 256,
    "use_cache": True,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-llama": {
        **_COMMON,
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "hidden_act": "silu",
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
    },
    "tiny-llama-hd": {
        **_COMMON,
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 512,
        "hidden_act": "silu",
        "rope_theta": 10000.0,
        "attention_bias": True,  # exercises aten.addmm (bias) next to aten.mm
        "mlp_bias": False,
        "tie_word_embeddings": False,
    },
    "tiny-gemma": {
        **_COMMON,
        "model_type": "gemma",
        "architectures": ["GemmaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "vocab_size": 512,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "rope_theta": 10000.0,
        "attention_bias": False,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
    },
    "tiny-qwen2-moe": {
        **_COMMON,
        "model_type": "qwen2_moe",
        "architectures": ["Qwen2MoeForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 80,  # dense layers
        "moe_intermediate_size": 32,  # each routed expert
        "shared_expert_intermediate_size": 96,  # the shared expert, its own size
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": False,
        # layer 0 dense via mlp_only_layers; layers 1, 3 MoE; layer 2 dense via the step.
        "decoder_sparse_step": 2,
        "mlp_only_layers": [0],
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "hidden_act": "silu",
        "rope_theta": 1000000.0,
        "qkv_bias": True,
        # As in Qwen1.5-MoE-A2.7B's config.json: a window is given but not used.
        "sliding_window": 32768,
        "use_sliding_window": False,
        "max_window_layers": 3,
        "tie_word_embeddings": False,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
    },
    "tiny-qwen3-moe": {
        **_COMMON,
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 96,  # the mlp_only layer
        "moe_intermediate_size": 24,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [1],
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "vocab_size": 512,
        "hidden_act": "silu",
        "rope_theta": 1000000.0,
        "attention_bias": False,
        "sliding_window": None,
        "use_sliding_window": False,
        "max_window_layers": 3,
        "tie_word_embeddings": False,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
    },
    "tiny-deepseek-v3": {
        **_COMMON,
        "model_type": "deepseek_v3",
        "architectures": ["DeepseekV3ForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 112,  # dense layer(s) before first_k_dense_replace
        "moe_intermediate_size": 24,
        "n_routed_experts": 8,
        "n_shared_experts": 2,  # shared expert width = 2 * 24
        "num_experts_per_tok": 2,
        "n_group": 2,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 48,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 12,  # != qk head dim (24), as in the real model (128 vs 192)
        "vocab_size": 512,
        "hidden_act": "silu",
        "rope_theta": 10000.0,
        "rope_interleave": True,
        "attention_bias": False,
        "tie_word_embeddings": False,
    },
    "tiny-gpt2": {  # fused c_attn (Conv1D), plain GELU MLP of n_inner, tied LM head
        **_COMMON,
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "n_embd": 64,
        "n_inner": 160,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 256,
        "vocab_size": 512,
        "activation_function": "gelu_new",
        "tie_word_embeddings": True,
    },
    "tiny-gpt-bigcode": {  # StarCoder 1 / SantaCoder: multi-query attention (one KV head)
        **_COMMON,
        "model_type": "gpt_bigcode",
        "architectures": ["GPTBigCodeForCausalLM"],
        "n_embd": 64,
        "n_inner": 192,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 256,
        "multi_query": True,
        "vocab_size": 512,
        "activation_function": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
    },
    "tiny-starcoder2": {  # plain GELU MLP with biases (the generic fallback would assume a gated one)
        **_COMMON,
        "model_type": "starcoder2",
        "architectures": ["Starcoder2ForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "hidden_act": "gelu_pytorch_tanh",
        "use_bias": True,
        "norm_epsilon": 1e-5,
        "rope_theta": 10000.0,
        "sliding_window": None,
        "tie_word_embeddings": True,
    },
    "tiny-glm4-moe": {  # GLM-4.5: a first dense layer, routed + shared experts, GQA with its own head_dim
        **_COMMON,
        "model_type": "glm4_moe",
        "architectures": ["Glm4MoeForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 96,  # the dense layer
        "moe_intermediate_size": 32,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 24,
        "partial_rotary_factor": 0.5,
        "vocab_size": 512,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
    },
    "tiny-phimoe": {
        **_COMMON,
        "model_type": "phimoe",
        "architectures": ["PhimoeForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 48,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "sliding_window": None,
        "tie_word_embeddings": False,
    },
    "tiny-minimax-m2": {
        **_COMMON,
        "model_type": "minimax_m2",
        "architectures": ["MiniMaxM2ForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 40,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 24,
        "vocab_size": 512,
        "tie_word_embeddings": False,
    },
    "tiny-mixtral": {
        **_COMMON,
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 48,  # each expert
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "hidden_act": "silu",
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.02,
    },
}


def tiny_config(name: str) -> dict[str, Any]:
    """A deep copy of one tiny config (callers may mutate it)."""
    return copy.deepcopy(TINY_CONFIGS[name])


def build_hf_model(config: dict[str, Any], seed: int = 0):
    """A randomly initialised HF causal LM for `config`: eager attention, eager experts, eval mode.

    `experts_implementation="eager"` makes the MoE experts loop over the experts that were hit
    and run `F.linear` on exactly the tokens routed to each (transformers 5's default,
    `grouped_mm`, is a fused kernel); it is only passed to classes that accept it.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in copy.deepcopy(config).items() if not k.startswith("_")}
    model_type = cfg.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"attn_implementation": "eager", "dtype": torch.float32}
    try:
        model = AutoModelForCausalLM.from_config(hf_config, experts_implementation="eager", **kwargs)
    except (TypeError, ValueError) as exc:  # a class without the experts interface
        if "experts" not in str(exc):
            raise
        model = AutoModelForCausalLM.from_config(hf_config, **kwargs)
    return model.eval()
