"""Parsers for the families whose attention is not plain q·c (registered beside architectures.py's).

Llama 4 (chunked attention, interleaved MoE), Qwen3-Next and Qwen3.5 (gated attention + gated
DeltaNet), DeepSeek-V3.2 (MLA + top-k sparse attention with its indexer) and Granite-4 (Mamba-2
hybrid).  Each reads the fields its transformers config class defines, with the same defaults;
each is held to FlopCounterMode and to the derived path in tests/test_families.py.
"""

from __future__ import annotations

import dataclasses

from serving_mfu.model.architectures import DEFAULTS, Cfg, _moe_layers, _qwen_sparse, deepseek, register
from serving_mfu.model.spec import AttentionSpec, LayerSpec, MixerSpec, MLPSpec, MoESpec

_LINEAR = ("linear_attention", "mamba")


def _layer_types(cfg: Cfg, default: list[str]) -> list[str]:
    types = cfg.get("layer_types") or default
    return [str(t) for t in types[: cfg.num_layers]]


@register("llama4_text")
def llama4(cfg: Cfg) -> tuple[LayerSpec, ...]:
    """Llama 4 (Scout, Maverick): MoE on `moe_layers` (default every `interleave_moe_layer_step`-th,
    counting from step − 1) with `num_experts_per_tok` of `num_local_experts` experts of
    `intermediate_size` plus one shared expert of the same size; other layers a dense MLP of
    `intermediate_size_mlp`.  Attention: GQA; the RoPE layers (`no_rope_layers[i] == 1`, default
    all but every `no_rope_layer_interval`-th) are chunked, a query seeing only its own chunk of
    `attention_chunk_size` keys; the NoPE layers attend to every key.  Sources: transformers
    `configuration_llama4.py`, `modeling_llama4.py` (Llama4TextMoe, chunked mask); vLLM `llama4.py`
    (ChunkedLocalAttention)."""
    n = cfg.num_layers
    step = int(cfg.get("interleave_moe_layer_step", 1))
    moe_layers = set(cfg.get("moe_layers") or range(step - 1, n, step))
    interval = int(cfg.get("no_rope_layer_interval", 4))
    rope = cfg.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)]
    types = _layer_types(cfg, ["chunked_attention" if r else "full_attention" for r in rope])
    chunk = cfg.get("attention_chunk_size")
    heads, kv, head_dim = cfg.heads()
    expert = int(cfg.need("intermediate_size"))
    moe = MoESpec(num_experts=int(cfg.need("num_local_experts")), top_k=int(cfg.get("num_experts_per_tok", 1)),
                  expert_intermediate_size=expert, shared_intermediate_size=expert)
    dense = MLPSpec(int(cfg.get("intermediate_size_mlp", expert)))
    layers = []
    for i in range(n):
        c = int(chunk) if chunk and types[i] == "chunked_attention" else None
        attn = AttentionSpec(heads, kv, head_dim, head_dim, chunk_size=c)
        layers.append(LayerSpec(attn, moe=moe) if i in moe_layers else LayerSpec(attn, mlp=dense))
    return tuple(layers)


def _gated_deltanet(cfg: Cfg) -> tuple[AttentionSpec, MixerSpec]:
    """Gated DeltaNet (Qwen3-Next, Qwen3.5): in-projections q, k (H_k·d_k each), v, z (H_v·d_v each),
    b, a (H_v each); a depthwise convolution over q, k, v; out-projection H_v·d_v → h.  State per
    request: H_v·d_k·d_v plus the convolution's last kernel − 1 inputs; its recurrent readout is
    elementwise (transformers `torch_recurrent_gated_delta_rule`), so no state matmuls.  Sources:
    transformers `modeling_qwen3_next.py` Qwen3NextGatedDeltaNet, `modeling_qwen3_5.py`; vLLM
    `qwen3_next.py`."""
    hk, hv = int(cfg.need("linear_num_key_heads")), int(cfg.need("linear_num_value_heads"))
    dk, dv = int(cfg.need("linear_key_head_dim")), int(cfg.need("linear_value_head_dim"))
    kernel = int(cfg.get("linear_conv_kernel_dim", 4))
    key, value = hk * dk, hv * dv
    conv = 2 * key + value
    mixer = MixerSpec("gated_deltanet", in_features=2 * key + 2 * value + 2 * hv, conv_channels=conv,
                      conv_kernel=kernel, inner=value)
    return AttentionSpec(0, 0, 0, 0, state_elements=hv * dk * dv + conv * (kernel - 1)), mixer


@register("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text")
def qwen3_next(cfg: Cfg) -> tuple[LayerSpec, ...]:
    """Qwen3-Next, Qwen3.5 dense and MoE: `layer_types` (default every `full_attention_interval`-th
    layer full attention, the rest linear) alternate gated full attention — GQA with its own
    `head_dim`, q_proj emitting query and output gate — and gated DeltaNet (`_gated_deltanet`).
    MLP: Qwen3-Next / Qwen3.5-MoE routed experts plus a gated shared expert of its own size
    (`decoder_sparse_step`, `mlp_only_layers` as Qwen2-MoE), Qwen3.5 dense a SwiGLU MLP.  Sources:
    transformers `modeling_qwen3_next.py`, `modeling_qwen3_5.py`, `modeling_qwen3_5_moe.py`; vLLM
    `qwen3_next.py`."""
    interval = int(cfg.get("full_attention_interval", 4))
    types = _layer_types(cfg, ["linear_attention" if (i + 1) % interval else "full_attention"
                               for i in range(cfg.num_layers)])
    heads, kv, head_dim = cfg.heads()
    full = AttentionSpec(heads, kv, head_dim, head_dim, output_gate=True)
    state, mixer = _gated_deltanet(cfg)
    if cfg.first("num_experts", "num_local_experts", default=0):
        shared = int(cfg.get("shared_expert_intermediate_size", 0))
        moe = MoESpec(num_experts=int(cfg.first("num_experts", "num_local_experts")),
                      top_k=int(cfg.need("num_experts_per_tok")),
                      expert_intermediate_size=int(cfg.need("moe_intermediate_size")),
                      shared_intermediate_size=shared, shared_expert_gate=shared > 0)
        base = _moe_layers(cfg, lambda i: _qwen_sparse(cfg, i), moe)
    else:
        mlp = MLPSpec(int(cfg.need("intermediate_size")))
        base = tuple(LayerSpec(full, mlp=mlp) for _ in range(cfg.num_layers))
    return tuple(LayerSpec(full, mlp=b.mlp, moe=b.moe) if t not in _LINEAR else
                 LayerSpec(state, mlp=b.mlp, moe=b.moe, mixer=mixer) for b, t in zip(base, types))


@register("deepseek_v32")
def deepseek_v32(cfg: Cfg) -> tuple[LayerSpec, ...]:
    """DeepSeek-V3.2: DeepSeek-V3's MLA and MoE layout (`deepseek`), every layer with DeepSeek Sparse
    Attention — a lightning indexer (`index_n_heads` heads of `index_head_dim`, its own linears) scores
    every causal key and each query attends to the `index_topk` best.  Sources: DeepSeek-V3.2-Exp report
    §2.1; transformers `modeling_deepseek_v32.py`; vLLM `deepseek_v2.py` (sparse MLA + Indexer)."""
    sparse = dict(top_k_keys=int(cfg.get("index_topk", 2048)), indexer_heads=int(cfg.get("index_n_heads", 64)),
                  indexer_head_dim=int(cfg.get("index_head_dim", 128)))
    return tuple(dataclasses.replace(layer, attention=dataclasses.replace(layer.attention, **sparse))
                 for layer in deepseek(cfg))


@register("granitemoehybrid")
def granite4(cfg: Cfg) -> tuple[LayerSpec, ...]:
    """Granite-4 (`granitemoehybrid`): per `layer_types`, Mamba-2 (`linear_attention`/`mamba`) or GQA
    attention, each followed by `num_local_experts` routed experts (`num_experts_per_tok`, gated, of
    `intermediate_size`) and a gated shared MLP of `shared_intermediate_size` (dense when there are no
    experts).  Mamba-2: in-projection h → 2·d_inner + 2·G·N + H (z, x, B, C, dt) with
    d_inner = `mamba_expand`·h, a depthwise convolution over x, B, C, out-projection d_inner → h;
    state H·P·N = d_inner·N plus the convolution's last kernel − 1 inputs, and its readout y = C·h
    is a matmul on that state, 2·d_inner·N per position.  Sources: transformers
    `modeling_granitemoehybrid.py` (GraniteMoeHybridMambaLayer, torch_forward); vLLM
    `granitemoehybrid.py`, `mamba_mixer2.py`."""
    h = cfg.hidden
    heads_m = int(cfg.need("mamba_n_heads"))
    groups, n = int(cfg.get("mamba_n_groups", 1)), int(cfg.get("mamba_d_state", 256))
    kernel = int(cfg.get("mamba_d_conv", 4))
    d_inner = int(float(cfg.get("mamba_expand", 2)) * h)
    conv = d_inner + 2 * groups * n
    mixer = MixerSpec("mamba2", in_features=2 * d_inner + 2 * groups * n + heads_m, conv_channels=conv,
                      conv_kernel=kernel, inner=d_inner)
    state = AttentionSpec(0, 0, 0, 0, state_elements=d_inner * n + conv * (kernel - 1),
                          state_flops_per_token=2 * d_inner * n)
    heads, kv, head_dim = cfg.heads()
    attn = AttentionSpec(heads, kv, head_dim, head_dim)
    shared = int(cfg.get("shared_intermediate_size", 0))
    experts = int(cfg.get("num_local_experts", 0))
    if experts:
        moe = MoESpec(num_experts=experts, top_k=int(cfg.need("num_experts_per_tok")),
                      expert_intermediate_size=int(cfg.need("intermediate_size")), shared_intermediate_size=shared)
        ffn: dict = dict(moe=moe)
    else:
        ffn = dict(mlp=MLPSpec(shared))
    types = _layer_types(cfg, ["linear_attention"] * cfg.num_layers)
    return tuple(LayerSpec(state, mixer=mixer, **ffn) if t in _LINEAR else LayerSpec(attn, **ffn) for t in types)


DEFAULTS.update({
    "deepseek_v32": {**DEFAULTS["deepseek_v3"]},
})
