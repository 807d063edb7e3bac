"""One small class per model component, each stating its matmul shapes (DESIGN §3).

A weight component multiplies every token position by some of its parameters: its FLOPs
per position are `2 × active_params` (a `[1×k]·[k×n]` matmul costs `2kn`), and the bytes
it reads per iteration are `stored_params × bytes per weight`.  Attention scores and the
LM head are not per-position weight matmuls and live in `flops.py`.  Elementwise work
(norms, rotary, activations, softmax, biases) is not counted, as is standard for MFU.
"""

from __future__ import annotations

from typing import ClassVar, Iterator

from serving_mfu.model.spec import LayerSpec, MixerSpec, MLPSpec, ModelSpec, MoESpec

COMPONENTS: dict[str, type["Component"]] = {}


class Component:
    """A weight matmul of one decoder layer; subclasses register themselves by `name`, which must be
    their own (a name already registered, e.g. one inherited, raises ValueError naming both classes)."""

    name: ClassVar[str]
    # Read at activation width even when the linear weights are quantized (router, gates).
    full_precision: ClassVar[bool] = False

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        prior = COMPONENTS.get(cls.name)
        if prior is not None:
            raise ValueError(f"duplicate component name {cls.name!r}: already registered by "
                             f"{prior.__module__}.{prior.__qualname__}, refusing {cls.__module__}.{cls.__qualname__}")
        COMPONENTS[cls.name] = cls

    @staticmethod
    def active_params(layer: LayerSpec, spec: ModelSpec) -> int:
        """Parameters one token position is multiplied by in this layer (0 if absent)."""
        raise NotImplementedError

    @classmethod
    def stored_params(cls, layer: LayerSpec, spec: ModelSpec) -> int:
        """Parameters held in memory for this layer (differs from active for routed experts)."""
        return cls.active_params(layer, spec)


def _mlp_params(hidden: int, intermediate: int, gated: bool) -> int:
    """SwiGLU/GeGLU: gate, up, down = 3·h·i; plain GELU MLP: up, down = 2·h·i."""
    return (3 if gated else 2) * hidden * intermediate


class QProj(Component):
    """Query projection: h × heads·d_qk (MHA/GQA, or MLA without a query LoRA); with an output gate
    (Qwen3-Next, Qwen3.5: `q_proj` emits query and gate, transformers `modeling_qwen3_next.py`) twice that."""

    name = "q_proj"

    @staticmethod
    def active_params(layer: LayerSpec, spec: ModelSpec) -> int:
        a = layer.attention
        if a.mla and a.q_lora_rank:
            return 0
        return spec.hidden_size * a.num_heads * a.head_dim * (2 if a.output_gate else 1)


class QAProj(Component):
    """MLA query down-projection: h × q_lora_rank."""

    name = "q_a_proj"

    @staticmethod
    def active_params(layer: LayerSpec, spec: ModelSpec) -> int:
        a = layer.attention
        return spec.hidden_size * a.q_lora_rank if a.mla and a.q_lora_rank else 0


class QBProj(Component):
    """MLA query up-projection: q_lora_rank × heads·(d_nope + d_rope)."""

    name = "q_b_proj"

    @staticmethod
    def active_params(layer: LayerSpec, spec: ModelSpec) -> int:
        a = layer.attention
        return a.q_lora_rank * a.num_heads * a.head_dim if a.mla and a.q_lora_rank else 0


class KProj(Component):
    """Key projection: h × kv_heads·head_dim (GQA/MQA use the real KV head count)."""

    name = "k_proj"

    @staticmethod
    def active_params(layer: LayerSpec, spec: ModelSpec) -> int:
        a = layer.attention
        return 0 if a.mla else spec.hidden_size * a.num_kv_heads * a.head_dim


class VProj(Component):
    """Value projection: h × kv_heads·v_head_dim."""

    name = "v_proj"

    @staticmethod
    def active_params(layer: LayerSpec, spec: ModelSpec) -> int:
        a = layer.attention
        return 0 if a.mla else spec.hidden_size * a.num_kv_heads * a.v_head_dim


class KVAProj(Component):
    """MLA joint KV down-projection with the shared rope key: h × (kv_lora_rank + d_rope)."""

    name = "kv_a_proj"

    @staticmethod
    def active_params(layer: LayerSpec, spec: ModelSpec) -> int:
        a = layer.attention
        return spec.hidden_size * (a.kv_lora_rank + a.qk_rope_head_dim) if a.mla else 0


class KVBProj(Component):
    """MLA KV up-projection (decompressed K/V, as the HF reference computes it):
    kv_lora_rank × heads·(d_nope + d_v)."""

    name = "kv_b_proj"

    @staticmethod
    def active_params(layer: LayerSpec, spec: ModelSpec) -> int:
        a = layer.attention
        return a.kv_lora_rank * a.num_heads * (a.qk_nope_head_dim + a.v_head_dim) if a.mla else 0


class OProj(Component):
    """Output projection: heads·v_head_dim × h."""

    name = "o_proj"

    @staticmethod
    def active_params(layer: LayerSpec, spec: ModelSpec) -> int:
        a = layer.attention
        return a.num_heads * a.v_head_dim * spec.hidden_size


class Indexer(Component):
    """DeepSeek-V3.2's lightning indexer: `wq_b` q_lora_rank × H_I·d_I (from the query latent), `wk`
    h × d_I, `weights_proj` h × H_I (transformers `modeling_deepseek_v32.py` DeepseekV32Indexer;
    vLLM `deepseek_v2.py` Indexer).  Its scoring of every key is in flops.py."""

    name = "indexer"

    @staticmethod
    def active_params(layer: LayerSpec, spec: ModelSpec) -> int:
        a = layer.attention
        if not a.indexer_heads:
            return 0
        q_in = a.q_lora_rank or spec.hidden_size
        return q_in * a.indexer_heads * a.indexer_head_dim + spec.hidden_size * (a.indexer_head_dim + a.indexer_heads)


class MixerIn(Component):
    """A linear-attention / state-space mixer's input projections, h × in_features (gated DeltaNet:
    q, k, v, z, b, a; Mamba-2: z, x, B, C, dt)."""

    name = "mixer_in"

    @staticmethod
    def active_params(layer: LayerSpec, spec: ModelSpec) -> int:
        m: MixerSpec | None = layer.mixer
        return spec.hidden_size * m.in_features if m else 0


class MixerConv(Component):
    """The mixer's causal depthwise convolution: conv_channels × kernel weights, one output per position."""

    name = "mixer_conv"

    @staticmethod
    def active_params(layer: LayerSpec, spec: ModelSpec) -> int:
        m = layer.mixer
        return m.conv_channels * m.conv_kernel if m else 0


class MixerOut(Component):
    """The mixer's output projection: inner × h."""

    name = "mixer_out"

    @staticmethod
    def active_params(layer: LayerSpec, spec: ModelSpec) -> int:
        m = layer.mixer
        return m.inner * spec.hidden_size if m else 0


class DenseMLP(Component):
    """Dense feed-forward of a non-MoE layer, with its own intermediate size."""

    name = "mlp"

    @staticmethod
    def active_params(layer: LayerSpec, spec: ModelSpec) -> int:
        m: MLPSpec | None = layer.mlp
        return _mlp_params(spec.hidden_size, m.intermediate_size, m.gated) if m else 0


class Router(Component):
    """MoE router gate: h × num_experts, every token."""

    name = "router"
    full_precision = True

    @staticmethod
    def active_params(layer: LayerSpec, spec: ModelSpec) -> int:
        moe: MoESpec | None = layer.moe
        return spec.hidden_size * moe.num_experts if moe else 0


class RoutedExperts(Component):
    """`top_k` routed experts of `expert_intermediate_size` per token; all E stored."""

    name = "routed_experts"

    @staticmethod
    def active_params(layer: LayerSpec, spec: ModelSpec) -> int:
        moe = layer.moe
        if not moe:
            return 0
        return moe.top_k * _mlp_params(spec.hidden_size, moe.expert_intermediate_size, moe.gated)

    @classmethod
    def stored_params(cls, layer: LayerSpec, spec: ModelSpec) -> int:
        moe = layer.moe
        if not moe:
            return 0
        return moe.num_experts * _mlp_params(spec.hidden_size, moe.expert_intermediate_size, moe.gated)


class SharedExperts(Component):
    """Always-on shared expert(s) with their own intermediate size, plus Qwen2-MoE's h × 1 gate."""

    name = "shared_experts"

    @staticmethod
    def active_params(layer: LayerSpec, spec: ModelSpec) -> int:
        moe = layer.moe
        if not moe or not moe.shared_intermediate_size:
            return 0
        gate = spec.hidden_size if moe.shared_expert_gate else 0
        return _mlp_params(spec.hidden_size, moe.shared_intermediate_size, moe.gated) + gate


def expert_params(layer: LayerSpec, spec: ModelSpec) -> int:
    """Parameters of one routed expert of a MoE layer (what routing to it makes the GPU read)."""
    if layer.linear is not None:
        return sum(lin.per_expert_params for lin in layer.linear if lin.component == RoutedExperts.name)
    moe = layer.moe
    return _mlp_params(spec.hidden_size, moe.expert_intermediate_size, moe.gated) if moe else 0


def layer_matmuls(layer: LayerSpec, spec: ModelSpec) -> Iterator[tuple[str, int, int, bool]]:
    """(component, active params, stored params, full precision) of each weight matmul of a layer:
    the shapes read from its modules where the spec has them (derived), else each registered
    component's formula.  The one place FLOP and byte models learn a layer's weights from."""
    if layer.linear is not None:
        for lin in layer.linear:
            yield lin.component, lin.active_params, lin.stored_params, lin.full_precision
        return
    for name, comp in COMPONENTS.items():
        active = comp.active_params(layer, spec)
        stored = comp.stored_params(layer, spec)
        if active or stored:
            yield name, active, stored, comp.full_precision
