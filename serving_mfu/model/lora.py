"""LoRA adapters: which modules an adapter adapts, at which rank, and the FLOPs that adds per position.

A LoRA module adds x·Aᵀ·Bᵀ beside the base weight (A: r × d_in, B: d_out × r): per position
2·r·d_in + 2·r·d_out = 2·r·(d_in + d_out) FLOPs (Hu et al. 2021, "LoRA", §4; peft's `lora.Linear`
runs the two matmuls).  An adapted embedding looks A up (no FLOPs) and multiplies by B: 2·r·d_out.
An adapted `lm_head` runs only at the positions that produce logits.  The scaling α/r and dropout
are elementwise (not counted, as FlopCounterMode does not).

Executed form (vLLM's serving kernels): adapters live in buffers of rank `--max-lora-rank`, and the
shrink/expand kernels multiply at that rank whatever the adapter's own (zero padding), so executed
LoRA FLOPs use the padded rank.  Not counted as executed: modules the adapter leaves alone (vLLM
wraps every LoRA-capable module and runs zero weights for them) and, on the CPU engine, the tokens
of base-model requests in a step that has an adapted one (PunicaWrapperCPU's torch ops run the
whole batch) — HFU is understated there, never overstated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from serving_mfu.model.errors import ConfigError
from serving_mfu.model.spec import LayerSpec, ModelSpec, read_json_object

# module name → (d_in, d_out) of one layer; fused names are the sums of their parts
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "dense", "out_proj", "c_attn",
         "c_proj", "Wqkv")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _layer_dims(layer: LayerSpec, hidden: int) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each adaptable linear module of a layer (Llama/Qwen/Mistral names and fused forms)."""
    a = layer.attention
    q, kv, v = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.num_kv_heads * a.v_head_dim
    out = a.num_heads * a.v_head_dim
    dims = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, v), "o_proj": (out, hidden),
            "qkv_proj": (hidden, q + kv + v)}
    if layer.mlp is not None:
        i = layer.mlp.intermediate_size
        dims |= {"up_proj": (hidden, i), "down_proj": (i, hidden)}
        if layer.mlp.gated:
            dims |= {"gate_proj": (hidden, i), "gate_up_proj": (hidden, 2 * i)}
    return dims


@dataclass(frozen=True)
class LoRASpec:
    """One adapter: its rank, its per-module ranks where they differ, the modules it adapts, the layers."""

    name: str
    rank: int
    target_modules: tuple[str, ...] | str  # names, or one regex over full module names (peft)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    layers_to_transform: tuple[int, ...] | None = None

    @classmethod
    def from_adapter_config(cls, cfg: dict, name: str = "") -> "LoRASpec":
        """From a peft `adapter_config.json` (peft_type LORA); ConfigError says what is unusable."""
        if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
            raise ConfigError(f"adapter {name!r}: peft_type {cfg.get('peft_type')!r} is not LORA")
        rank = cfg.get("r")
        if not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"adapter {name!r}: rank r={rank!r} must be a positive integer")
        targets = cfg.get("target_modules")
        if targets == "all-linear":
            targets = ALL_LINEAR
        elif isinstance(targets, list):
            targets = tuple(targets)
        elif not isinstance(targets, str):
            raise ConfigError(f"adapter {name!r}: target_modules {targets!r} is neither a list nor a pattern")
        layers = cfg.get("layers_to_transform")
        if isinstance(layers, int):
            layers = (layers,)
        return cls(name=name, rank=rank, target_modules=targets, rank_pattern=dict(cfg.get("rank_pattern") or {}),
                   layers_to_transform=tuple(layers) if layers else None)

    def _targets(self, full: str, short: str) -> bool:
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, full) is not None
        return short in self.target_modules

    def _rank(self, full: str, short: str) -> int:
        for pattern, r in self.rank_pattern.items():  # peft: a key matches the end of a module's name (a regex)
            if re.fullmatch(f"(.*\\.)?{pattern}", full):
                return int(r)
        return self.rank


@dataclass(frozen=True)
class LoRAFlops:
    """Adapter FLOPs per position (every position of a request using it) and per logit position."""

    per_token: int
    per_logit: int
    modules: int  # adapted modules found (0: the adapter adapts nothing this model has)


def lora_flops(adapter: LoRASpec, spec: ModelSpec, rank: int | None = None) -> LoRAFlops:
    """Σ over adapted modules of 2·r·(d_in + d_out) per position (embeddings 2·r·d, `lm_head` per logit);
    `rank` replaces the adapter's ranks (vLLM's padded max_lora_rank: the executed form)."""
    d, per_token, per_logit, modules = spec.hidden_size, 0, 0, 0
    for i, layer in enumerate(spec.layers):
        if adapter.layers_to_transform is not None and i not in adapter.layers_to_transform:
            continue
        for short, (d_in, d_out) in _layer_dims(layer, d).items():
            part = "self_attn" if short in _ATTN else "mlp"
            full = f"model.layers.{i}.{part}.{short}"
            if adapter._targets(full, short):
                r = rank or adapter._rank(full, short)
                per_token += 2 * r * (d_in + d_out)
                modules += 1
    for short, full in (("embed_tokens", "model.embed_tokens"), ("lm_head", "lm_head")):
        if adapter._targets(full, short):
            r = rank or adapter._rank(full, short)
            modules += 1
            if short == "lm_head":
                per_logit += 2 * r * (d + spec.vocab_size)
            else:
                per_token += 2 * r * d
    return LoRAFlops(per_token, per_logit, modules)


def load_adapter(source: str | Path, name: str | None = None) -> LoRASpec:
    """An adapter from its folder (adapter_config.json) or that file; ConfigError says what is wrong."""
    path = Path(source)
    cfg = read_json_object(path, "adapter_config.json", "LoRA adapter config (adapter_config.json)")
    return LoRASpec.from_adapter_config(cfg, name or (path.name if path.is_dir() else path.parent.name))
