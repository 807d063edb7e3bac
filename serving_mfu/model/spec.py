"""The shape of a model, read from its Hugging Face config: what the FLOP and byte models need.

`ModelSpec.from_hf_config` turns a `config.json` (a path, a folder holding one, or a dict)
into per-layer attention / MLP / MoE shapes.  Each supported `model_type` has one small
parser in `architectures.py`; an unknown type whose standard fields are present gets a
generic dense or MoE spec flagged `approximate`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from serving_mfu.model.dtypes import dtype_bytes  # noqa: F401 - re-exported
from serving_mfu.model.errors import ConfigError

# The parser registry's entry point, set by serving_mfu.model.architectures when it loads (the
# package imports it): a seam, so this module needs nothing from the parsers that build on it.
_builder: list[Callable[[dict[str, Any]], "ModelSpec"]] = []


def set_spec_builder(build: Callable[[dict[str, Any]], "ModelSpec"]) -> None:
    """Install the function that turns a config dict into a spec (architectures.spec_from_config)."""
    _builder[:] = [build]


@dataclass(frozen=True, slots=True)
class AttentionSpec:
    """One layer's attention.  MHA/GQA/MQA when `mla` is False; DeepSeek MLA otherwise.

    `head_dim` is the query/key width per head (for MLA `qk_nope_head_dim + qk_rope_head_dim`),
    `v_head_dim` the value width per head.  Which keys a query at position p attends to:
    `sliding_window` W: the last W (itself included); `chunk_size` C (Llama 4's chunked local
    attention): those of its own chunk, [⌊p/C⌋·C, p]; `top_k_keys` k (DeepSeek-V3.2's sparse
    attention): at most k, picked by an indexer that scores every causal key with
    `indexer_heads` heads of `indexer_head_dim`; none of these: all p + 1.

    `output_gate` (Qwen3-Next / Qwen3.5 gated attention): q_proj also produces a sigmoid gate of the
    attention output, heads·head_dim more columns.

    `num_heads == 0` marks a layer without softmax attention (a linear-attention or state-space
    mixer): no scores, no KV cache; instead it keeps `state_elements` per request (recurrent and
    convolution state, read and written once per step) and runs `state_flops_per_token` of
    matmuls on that state per position, the same at any context.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    sliding_window: int | None = None
    mla: bool = False
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    chunk_size: int | None = None
    top_k_keys: int | None = None
    indexer_heads: int = 0
    indexer_head_dim: int = 0
    state_elements: int = 0
    state_flops_per_token: int = 0
    output_gate: bool = False


@dataclass(frozen=True, slots=True)
class MLPSpec:
    """A dense feed-forward block: gated (SwiGLU/GeGLU, 3 matrices) or plain (2 matrices)."""

    intermediate_size: int
    gated: bool = True


@dataclass(frozen=True, slots=True)
class MoESpec:
    """A mixture-of-experts block: router, `top_k` of `num_experts` routed experts, shared experts.

    `shared_intermediate_size` is the total width of the always-on shared expert(s), with
    their own size (0 when there are none); `shared_expert_gate` is Qwen2-MoE's `hidden -> 1`
    sigmoid gate on the shared expert.
    """

    num_experts: int
    top_k: int
    expert_intermediate_size: int
    gated: bool = True
    shared_intermediate_size: int = 0
    shared_expert_gate: bool = False


@dataclass(frozen=True, slots=True)
class MixerSpec:
    """A linear-attention or state-space mixer's weight shapes (the layer's `attention` then has
    heads 0 and carries the mixer's state): an input projection `hidden → in_features`, a causal
    depthwise convolution over `conv_channels` with `conv_kernel` taps, an output projection
    `inner → hidden`.  `kind` names the family (`gated_deltanet`, `mamba2`)."""

    kind: str
    in_features: int
    conv_channels: int
    conv_kernel: int
    inner: int


@dataclass(frozen=True, slots=True)
class LinearSpec:
    """Weight matmuls of one layer read from the model's own modules (the `derived` path), grouped
    under a component name: parameters each token position is multiplied by (`active_params`),
    parameters held (`stored_params`), and for routed experts the parameters of one expert."""

    component: str
    active_params: int
    stored_params: int
    full_precision: bool = False
    per_expert_params: int = 0


@dataclass(frozen=True, slots=True)
class LayerSpec:
    """One decoder layer: attention (or a linear-attention / state-space `mixer`) plus exactly one of
    a dense MLP or a MoE block.

    `linear`, when set (derived specs), lists the layer's weight matmuls as read from its modules;
    they replace the registry components' shapes (the attention spec then only sets the scores
    and the KV cache).  `attention.num_heads == 0` marks a layer without softmax attention.
    """

    attention: AttentionSpec
    mlp: MLPSpec | None = None
    moe: MoESpec | None = None
    linear: tuple[LinearSpec, ...] | None = None
    mixer: MixerSpec | None = None


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model's shape for FLOP and byte counting.

    `weight_bits` is the storage width of the linear weights (16 for bf16, 8 for fp8, about
    4.125 for 4-bit group-quantized weights with their scales); `act_dtype` the dtype of
    activations, which sets the compute dtype unless activations are quantized too.
    """

    model_type: str
    hidden_size: int
    vocab_size: int
    layers: tuple[LayerSpec, ...]
    tie_word_embeddings: bool = False
    act_dtype: str = "bfloat16"
    weight_bits: float = 16.0
    compute_dtype: str = "bfloat16"
    approximate: bool = False
    warnings: tuple[str, ...] = field(default=())
    name: str = ""
    derived: bool = False

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def moe_layer_indices(self) -> tuple[int, ...]:
        return tuple(i for i, layer in enumerate(self.layers) if layer.moe is not None)

    @property
    def is_moe(self) -> bool:
        return any(layer.moe is not None for layer in self.layers)

    @property
    def flop_model(self) -> str:
        """Which path built this spec: `formula` (the model_type's registered parser), `derived`
        (linear FLOPs exact from the model's modules built on the meta device, attention by the
        standard rule) or `approximate` (the generic dense/MoE reading of the standard fields)."""
        if self.derived:
            return "derived"
        return "approximate" if self.approximate else "formula"

    @classmethod
    def from_hf_config(cls, source: str | Path | Mapping[str, Any]) -> "ModelSpec":
        """Build a spec from a config.json path, a folder holding one, or an already-loaded dict."""
        if not _builder:  # only when this module is loaded without its package
            raise RuntimeError("import serving_mfu.model (it registers the architecture parsers) first")
        return _builder[0](load_config(source))


def load_config(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """Read a HF config from a dict, a config.json path or a model folder."""
    if isinstance(source, Mapping):
        return dict(source)
    return read_json_object(Path(source), "config.json", "config")


def read_json_object(path: Path, name: str, what: str) -> dict[str, Any]:
    """The JSON object in `path` (or in `path/name` for a folder); ConfigError says what is wrong."""
    if path.is_dir():
        path = path / name
    if not path.is_file():
        raise ConfigError(f"no {what} found at {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return data
