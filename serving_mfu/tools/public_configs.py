"""Shapes of public models, written from their published config.json files (no download).

Used by the docs' worked example, the benchmarks and the estimator comparison.
Only the fields the FLOP and byte models read are kept.
"""

from __future__ import annotations

PUBLIC_CONFIGS: dict[str, dict] = {
    # meta-llama/Meta-Llama-3-8B config.json
    "llama-3-8b": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 128256, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
    # meta-llama/Meta-Llama-3-70B config.json
    "llama-3-70b": {
        "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
        "vocab_size": 128256, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
    # Qwen/Qwen3-30B-A3B config.json
    "qwen3-30b-a3b": {
        "model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
        "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
    # mistralai/Mixtral-8x7B-v0.1 config.json
    "mixtral-8x7b": {
        "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
    # zai-org/GLM-4.5-Air: 46 layers (the first dense), 96 query heads / 8 KV groups of 128, 128 experts
    # top-8 of 1408 plus one shared of 1408 (Megatron-Bridge docs/models/llm/glm45.md, slime
    # scripts/models/glm4.5-106B-A12B.sh); the MTP layer is not part of the main forward
    "glm-4.5-air": {
        "model_type": "glm4_moe", "hidden_size": 4096, "intermediate_size": 10944,
        "moe_intermediate_size": 1408, "num_hidden_layers": 46, "num_attention_heads": 96,
        "num_key_value_heads": 8, "head_dim": 128, "n_routed_experts": 128, "n_shared_experts": 1,
        "num_experts_per_tok": 8, "first_k_dense_replace": 1, "partial_rotary_factor": 0.5,
        "vocab_size": 151552, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
    # deepseek-ai/DeepSeek-V3 config.json (MTP layer not part of the main forward)
    "deepseek-v3": {
        "model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
        "num_key_value_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
        "num_experts_per_tok": 8, "first_k_dense_replace": 3, "moe_layer_freq": 1,
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "vocab_size": 129280, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    # deepseek-ai/DeepSeek-V3.2-Exp: DeepSeek-V3's shape plus DeepSeek Sparse Attention's indexer
    # (config.json index_n_heads 64, index_head_dim 128, index_topk 2048; transformers DeepseekV32Config defaults)
    "deepseek-v3.2": {
        "model_type": "deepseek_v32", "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
        "num_key_value_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
        "num_experts_per_tok": 8, "first_k_dense_replace": 3, "moe_layer_freq": 1,
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048,
        "vocab_size": 129280, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
    # meta-llama/Llama-4-Scout-17B-16E text_config (transformers Llama4TextConfig defaults are this model):
    # MoE on every layer, 16 experts top-1 + one shared, chunked attention (8192) on 3 of every 4 layers
    "llama-4-scout": {
        "model_type": "llama4_text", "hidden_size": 5120, "intermediate_size": 8192,
        "intermediate_size_mlp": 16384, "num_hidden_layers": 48, "num_attention_heads": 40,
        "num_key_value_heads": 8, "head_dim": 128, "num_local_experts": 16, "num_experts_per_tok": 1,
        "interleave_moe_layer_step": 1, "attention_chunk_size": 8192, "vocab_size": 202048,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
    # Qwen/Qwen3-Next-80B-A3B-Instruct config.json: 3 of every 4 layers gated DeltaNet, the 4th gated
    # full attention; 512 experts top-10 plus a shared one
    "qwen3-next-80b-a3b": {
        "model_type": "qwen3_next", "hidden_size": 2048, "intermediate_size": 5120,
        "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "num_hidden_layers": 48,
        "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256, "num_experts": 512,
        "num_experts_per_tok": 10, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "full_attention_interval": 4, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
        "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
        "vocab_size": 151936, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
}
