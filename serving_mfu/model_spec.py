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
from typing import Any, Mapping


class ConfigError(ValueError):
    """A model config that cannot be turned into a spec; the message names what is missing."""


@dataclass(frozen=True, slots=True)
class AttentionSpec:
    """One layer's attention.  MHA/GQA/MQA when `mla` is False; DeepSeek MLA otherwise.

    `head_dim` is the query/key width per head (for MLA `qk_nope_head_dim + qk_rope_head_dim`),
    `v_head_dim` the value width per head.  `sliding_window` is the number of keys a query
    sees (itself included); None means full causal attention.
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
class LayerSpec:
    """One decoder layer: attention plus exactly one of a dense MLP or a MoE block."""

    attention: AttentionSpec
    mlp: MLPSpec | None = None
    moe: MoESpec | None = None


# Bytes per element of the dtype names that appear in configs and engine settings.
DTYPE_BYTES: dict[str, float] = {
    "float32": 4, "fp32": 4, "float": 4, "tf32": 4,
    "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2,
    "float8": 1, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "int8": 1,
    "int4": 0.5, "fp4": 0.5, "nvfp4": 0.5, "mxfp4": 0.5,
}


def dtype_bytes(name: str) -> float:
    """Bytes per element for a dtype name such as 'bfloat16' or 'torch.float16'."""
    key = str(name).removeprefix("torch.").lower()
    if key not in DTYPE_BYTES:
        raise ConfigError(f"unknown dtype {name!r}; known: {', '.join(sorted(DTYPE_BYTES))}")
    return DTYPE_BYTES[key]


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

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def moe_layer_indices(self) -> tuple[int, ...]:
        return tuple(i for i, layer in enumerate(self.layers) if layer.moe is not None)

    @property
    def is_moe(self) -> bool:
        return any(layer.moe is not None for layer in self.layers)

    @classmethod
    def from_hf_config(cls, source: str | Path | Mapping[str, Any]) -> "ModelSpec":
        """Build a spec from a config.json path, a folder holding one, or an already-loaded dict."""
        from serving_mfu.architectures import spec_from_config

        return spec_from_config(load_config(source))


def load_config(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """Read a HF config from a dict, a config.json path or a model folder."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config found at {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return data
