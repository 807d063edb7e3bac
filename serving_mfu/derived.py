"""The `derived` path: exact linear FLOPs for any architecture transformers can build.

A `model_type` with no registered formula is built from its config on the meta device (no
memory, no weights), and every weight matmul is read off its modules (DESIGN §3):

- an `nn.Linear` (or GPT-2's `Conv1D`) inside decoder layer i multiplies each token position by
  its `in × out` weights: `2·in·out` FLOPs per position;
- a fused expert container (transformers' `…Experts`, weights `[E, …]`) or a `ModuleList` of
  expert MLPs holds E experts of which each position runs `top_k` (from the block, its router
  or the config): `2·top_k·params(one expert)`;
- any other module holding a 2-D `weight` it multiplies by (e.g. a `TopKRouter`) counts as a
  linear of that shape; a causal `nn.Conv1d` (the short convolution of Mamba and linear-attention
  mixers) costs `2·weights` per position, `conv`; embeddings and norms cost nothing;
- the LM head is not read here (it is `2·hidden·vocab` per logit position, as for every spec);
  matmuls outside the layers (e.g. per-layer-input projections) land in layer 0 as
  `outside_layers`.

Attention follows the standard rule from the head counts: a layer holding a softmax-attention
module (not a linear-attention / state-space mixer) attends with the config's heads, KV heads,
head_dim and its key rule (sliding window, Llama 4's chunks from `layer_types`, DeepSeek-V3.2's
top-k with its indexer's heads); MLA (`kv_lora_rank`) with the module's own widths.  Other layers
have no attention scores and no KV cache; a state-space or linear-attention mixer keeps its
recurrent and convolution state per request, and a Mamba mixer's readout `y = C·h` is a matmul on
that state (2·d_inner·N per position, `recurrent_state`).  The rest of a recurrent update
(decays, the delta rule's products in its recurrent form) is elementwise and, as elsewhere,
not counted.
`load_spec` tries the formula registry first, then this path, then the generic reading
(`approximate`), and says in `ModelSpec.warnings` why a path was passed over.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from serving_mfu.model.architectures import ALIASES, PARSERS, Cfg, _unwrap, spec_from_config
from serving_mfu.model.spec import AttentionSpec, LayerSpec, LinearSpec, ModelSpec, MoESpec, load_config

if TYPE_CHECKING:  # torch is imported where a model is read, never at import
    import torch

log = logging.getLogger(__name__)

#: A decoder layer's module path: `model.layers.3`, `transformer.h.3`, `backbone.layers.3`, …
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?=\.|$)")
#: Cross-attention (the decoder of an encoder-decoder): idle in a decoder-only forward.
_CROSS = re.compile(r"(?:^|\.)(?:encoder_attn|crossattention|cross_attn|cross_attention)(?:\.|$)")
#: Mixers that are not softmax attention (their class names may still say "Attention").
_NOT_SOFTMAX = re.compile(r"Linear|Delta|Mamba|Mixer|ShortConv|Recurrent|Lightning|RWKV|Retention|SSM", re.I)
#: Layer-type names (config `layer_types`) of layers with softmax attention.
_SOFTMAX_TYPES = {"full_attention", "sliding_attention", "attention", "chunked_attention", "global", "local",
                  "sliding_window", "hybrid", "full", "sliding"}
_TOP_K_FIELDS = ("num_experts_per_tok", "top_k", "moe_top_k", "num_selected_experts", "experts_per_token",
                 "moe_k", "router_top_k", "num_experts_per_token")


class DerivationError(ValueError):
    """The model could not be built on the meta device or read (the reason is the message)."""


def load_spec(source: str | Path | Mapping[str, Any] | Any, hf_object: Any = None) -> ModelSpec:
    """The best spec for a config (path, folder, dict or transformers config): the registered
    formula, else linear FLOPs derived from the model's modules, else the generic reading.
    `hf_object`: the engine's own transformers config, built from when the derived path runs."""
    data = source.to_dict() if hasattr(source, "to_dict") else load_config(source)
    target = hf_object or (source if hasattr(source, "to_dict") else data)  # what the derived path builds
    try:
        spec = spec_from_config(data, warn=False)
    except ValueError:  # the generic reading needs standard fields the modules may not
        if has_formula(str(data.get("model_type", ""))):
            raise
        return derive_spec(target)
    if not spec.approximate:
        return spec
    try:
        return derive_spec(target, base=spec)
    except Exception as exc:  # keep the generic spec, and say why
        msg = f"derived path unavailable for {spec.model_type!r} ({exc}); the spec stays approximate"
        for line in spec.warnings + (msg,):
            log.warning(line)
        return dataclasses.replace(spec, warnings=spec.warnings + (msg,))


def has_formula(model_type: str) -> bool:
    """Whether `model_type` has a registered formula (a parser in the registry)."""
    return ALIASES.get(model_type, model_type) in PARSERS


def hf_config(source: Mapping[str, Any] | Any) -> Any:
    """A transformers config object for a config dict (its `model_type`'s config class)."""
    if not isinstance(source, Mapping):
        return source
    from transformers import AutoConfig

    data = dict(source)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise DerivationError("the config has no model_type")
    try:
        return AutoConfig.for_model(model_type, **data)
    except Exception as exc:
        raise DerivationError(f"transformers has no config class for {model_type!r}: {exc}") from exc


def meta_model(config: Any) -> torch.nn.Module:
    """The causal LM for `config`, built on the meta device (shapes only, no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return AutoModelForCausalLM.from_config(config)
        except Exception as exc:
            raise DerivationError(f"transformers cannot build it: {type(exc).__name__}: {exc}") from exc


def derive_spec(source: Mapping[str, Any] | Any, base: ModelSpec | None = None) -> ModelSpec:
    """A `derived` spec: linear FLOPs read from the meta-device model, attention by the standard rule.

    `base` (the generic spec, when there is one) supplies dtype, quantization and vocabulary."""
    config = hf_config(source)
    model = meta_model(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    data = _unwrap(text.to_dict())
    cfg = Cfg(data)
    stack = decoder_stack(model)
    out_emb = model.get_output_embeddings()
    per_layer, n_layers = read_linear(model, data, stack, out_emb)
    attention = read_attention(model, cfg, n_layers, stack)
    layers = []
    for i in range(n_layers):
        lin = tuple(per_layer.get(i, ()))
        layers.append(LayerSpec(attention[i], moe=_moe_of(lin), linear=lin))
    hidden = int(out_emb.weight.shape[1]) if out_emb is not None else int(cfg.first("hidden_size", "d_model",
                                                                                    "n_embd"))
    vocab = int(out_emb.weight.shape[0]) if out_emb is not None else int(cfg.need("vocab_size"))
    note = (f"{cfg.model_type!r} has no registered formula: linear FLOPs read from its modules built on the "
            "meta device (exact), attention by the standard rule from the head counts (derived)")
    fields: dict[str, Any] = dict(model_type=cfg.model_type, hidden_size=hidden, vocab_size=vocab,
                                  layers=tuple(layers), tie_word_embeddings=bool(getattr(config, "tie_word_embeddings",
                                                                                         False)),
                                  warnings=(note,), derived=True, approximate=False)
    if base is not None:
        fields.update(act_dtype=base.act_dtype, weight_bits=base.weight_bits, compute_dtype=base.compute_dtype,
                      name=base.name)
    return ModelSpec(**fields)


def read_linear(model: torch.nn.Module, data: Mapping[str, Any], stack: str,
                out_emb: torch.nn.Module | None) -> tuple[dict[int, list[LinearSpec]], int]:
    """Each decoder layer's weight matmuls by component, and the number of decoder layers, reading
    only the layers of `stack` (`decoder_stack`) and leaving out the LM head `out_emb`."""
    import torch
    skip = {id(out_emb)} if out_emb is not None else set()
    found: dict[int, dict[str, list[int]]] = {}  # layer -> component -> [active, stored, per expert]
    full_precision: set[str] = set()
    n_layers = 0
    handled: list[str] = []  # expert containers already counted (their children are not read again)
    for name, mod in model.named_modules():
        if id(mod) in skip or any(name.startswith(h + ".") for h in handled):
            continue
        m = _LAYER.search(name)
        if m and name[:m.start()] != stack:  # another stack (a vision or audio encoder): not run on text
            continue
        if _CROSS.search(name):  # cross-attention: runs only with an encoder's output
            continue
        layer = int(m.group(1)) if m else None
        if layer is not None:
            n_layers = max(n_layers, layer + 1)
        rel = name[m.end() + 1:] if m else name
        entry = None
        experts = _expert_container(mod)
        if experts is not None:
            _, per_expert, stored = experts
            k = _top_k(model, name, data)
            entry = ("routed_experts", k * per_expert, stored, per_expert)
            handled.append(name)
        else:
            w = _matmul_weight(mod)
            if w is None:
                continue
            params = int(w)
            comp = "outside_layers" if layer is None else "conv" if isinstance(mod, torch.nn.Conv1d) \
                else _component(rel, name)
            entry = (comp, params, params, 0)
            if comp == "router":
                full_precision.add(comp)
        comp, active, stored, per_expert = entry
        slot = found.setdefault(layer if layer is not None else -1, {}).setdefault(comp, [0, 0, 0])
        slot[0] += active
        slot[1] += stored
        slot[2] += per_expert
    if n_layers == 0:
        raise DerivationError("no decoder layers found (module paths like `model.layers.<i>`)")
    outside = found.pop(-1, None)
    if outside:
        found.setdefault(0, {}).update(outside)
    per_layer = {i: [LinearSpec(c, a, s, c in full_precision, pe) for c, (a, s, pe) in comps.items()]
                 for i, comps in found.items()}
    return per_layer, n_layers


def decoder_stack(model: torch.nn.Module) -> str:
    """The path of the module holding the decoder layers (`model`, `transformer`, …): of the layer
    stacks, the one with the most layers, the shortest path breaking ties (a vision tower's stack
    sits deeper)."""
    stacks: dict[str, int] = {}
    for name, _ in model.named_modules():
        m = _LAYER.search(name)
        if m and m.end() == len(name):
            prefix = name[:m.start()]
            stacks[prefix] = max(stacks.get(prefix, 0), int(m.group(1)) + 1)
    if not stacks:
        raise DerivationError("no decoder layers found (module paths like `model.layers.<i>`)")
    return min(stacks, key=lambda p: (-stacks[p], p.count("."), len(p)))


def _matmul_weight(mod: torch.nn.Module) -> int | None:
    """Weights per position of a module that multiplies its input by a 2-D weight, else None."""
    import torch
    cls = type(mod).__name__
    if isinstance(mod, (torch.nn.Embedding, torch.nn.EmbeddingBag)) or "Embedding" in cls or "Norm" in cls:
        return None
    w = mod._parameters.get("weight")
    if isinstance(mod, torch.nn.Conv1d) and w is not None:  # out × in/groups × kernel per position
        return int(w.numel())
    if w is None or w.dim() != 2:
        return None
    return int(w.shape[0]) * int(w.shape[1])


def _expert_container(mod: torch.nn.Module) -> tuple[int, int, int] | None:
    """(experts, params of one, params of all) of a module holding routed experts, else None:
    transformers' fused `…Experts` ([E, …] weights), or a ModuleList of expert MLPs named experts."""
    import torch
    cls = type(mod).__name__
    if isinstance(mod, torch.nn.ModuleList):
        return None
    direct = [p for p in mod._parameters.values() if p is not None and p.dim() == 3]
    if direct and cls.endswith("Experts"):
        e = int(direct[0].shape[0])
        stored = sum(int(p.numel()) for p in direct)
        return e, stored // e, stored
    experts = getattr(mod, "experts", None) if not direct else None
    if isinstance(experts, torch.nn.ModuleList) and len(experts) > 1 and _is_moe_block(mod):
        sizes = [sum(int(w) for w in map(_matmul_weight, ex.modules()) if w) for ex in experts]
        if len(set(sizes)) == 1 and sizes[0]:
            return len(sizes), sizes[0], sum(sizes)
    return None


def _is_moe_block(mod: torch.nn.Module) -> bool:
    """A block that routes to a ModuleList `experts` (it has a router/gate or a top-k)."""
    return any(hasattr(mod, a) for a in ("gate", "router", "top_k", "num_experts_per_tok", "topk"))


def _top_k(model: torch.nn.Module, name: str, data: Mapping[str, Any]) -> int:
    """Experts each position runs in the expert container `name`: from the container, its block or
    the block's router (transformers keeps `top_k` there), else the config."""
    import torch
    parts = name.split(".")
    candidates = [model.get_submodule(".".join(parts[:i])) for i in range(len(parts), len(parts) - 2, -1)]
    block = candidates[-1]
    for child in ("gate", "router", "topk"):
        sub = getattr(block, child, None)
        if isinstance(sub, torch.nn.Module):
            candidates.append(sub)
    for mod in candidates:
        for attr in ("top_k", "num_experts_per_tok", "topk", "k"):
            v = getattr(mod, attr, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    for f in _TOP_K_FIELDS:
        v = data.get(f)
        if isinstance(v, int) and v > 0:
            return v
    raise DerivationError(f"cannot tell how many experts {name} runs per token (no top_k on the block or config)")


def _component(rel: str, name: str) -> str:
    """A component name for a matmul at `rel` inside a decoder layer."""
    parts = rel.split(".")
    head = parts[0]
    if "shared" in rel:
        return "shared_experts"
    if parts[-1] in ("gate", "router", "router_gate", "w_gate") and len(parts) == 2 and _in_moe(head):
        return "router"
    if head in ("self_attn", "attn", "attention", "self_attention", "cross_attn") or "attn" in head:
        return "attention"
    if head in ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe", "mlp_block", "ff"):
        return "mlp"
    if head in ("mamba", "mixer", "linear_attn", "conv", "ssm", "short_conv", "temporal_block", "recurrent"):
        return "mixer"
    return "other"


def _in_moe(head: str) -> bool:
    return head in ("mlp", "block_sparse_moe", "moe", "feed_forward", "ffn")


def read_attention(model: torch.nn.Module, cfg: Cfg, n_layers: int, stack: str) -> list[AttentionSpec]:
    """Per layer: softmax attention with the config's heads and the layer's key rule, or none (heads 0)
    with the state of its mixer."""
    types = cfg.get("layer_types")
    prefix = type(model).__name__.removesuffix("ForCausalLM")  # "KimiLinear…Attention" is still softmax
    softmax: list[torch.nn.Module | None] = [None] * n_layers
    state: list[tuple[int, int]] = [(0, 0)] * n_layers
    for name, mod in model.named_modules():
        m = _LAYER.search(name)
        if not m or name[:m.start()] != stack or "." in name[m.end() + 1:] or not name[m.end() + 1:]:
            continue
        i = int(m.group(1))
        if i >= n_layers:
            continue
        cls = type(mod).__name__.removeprefix(prefix)
        if cls.endswith(("Attention", "Attn")) and not _NOT_SOFTMAX.search(cls):
            softmax[i] = mod
        elif _NOT_SOFTMAX.search(cls):
            elements, flops = _mixer_state(mod)
            state[i] = (state[i][0] + elements, state[i][1] + flops)
    if isinstance(types, list) and len(types) >= n_layers:
        softmax = [a if a is not None and _softmax_type(str(t)) else None for a, t in zip(softmax, types)]
    heads = int(cfg.first("num_attention_heads", "n_head", "num_heads", default=0) or 0)
    kv = int(cfg.first("num_key_value_heads", "num_kv_heads", "n_head_kv", default=heads) or heads)
    hidden = int(cfg.first("hidden_size", "d_model", "n_embd"))
    head_dim = int(cfg.get("head_dim") or (hidden // heads if heads else 0))
    chunk = cfg.get("attention_chunk_size")
    out = []
    for i, mod in enumerate(softmax):
        own = dict(state_elements=state[i][0], state_flops_per_token=state[i][1])  # a hybrid layer has both
        if mod is None or not heads:
            out.append(AttentionSpec(0, 0, 0, 0, **own))
            continue
        w = getattr(mod, "sliding_window", None)
        rule: dict[str, Any] = dict(sliding_window=int(w) if isinstance(w, int) and w > 0 else None, **own)
        if isinstance(types, list) and i < len(types) and types[i] == "chunked_attention" and isinstance(chunk, int):
            rule.update(sliding_window=None, chunk_size=chunk)
        indexer = getattr(mod, "indexer", None)
        if indexer is not None and isinstance(getattr(indexer, "index_topk", None), int):
            rule.update(top_k_keys=indexer.index_topk, indexer_heads=int(indexer.n_heads),
                        indexer_head_dim=int(indexer.head_dim))
        if isinstance(getattr(mod, "kv_lora_rank", None), int) and mod.kv_lora_rank:
            n = int(getattr(mod, "num_heads", heads))
            rope, nope = int(mod.qk_rope_head_dim), int(mod.qk_nope_head_dim)
            out.append(AttentionSpec(n, n, rope + nope, int(mod.v_head_dim), mla=True,
                                     q_lora_rank=getattr(mod, "q_lora_rank", None) or None,
                                     kv_lora_rank=int(mod.kv_lora_rank), qk_rope_head_dim=rope,
                                     qk_nope_head_dim=nope, **rule))
        else:
            d = int(getattr(mod, "head_dim", head_dim) or head_dim)
            out.append(AttentionSpec(heads, kv, d, d, **rule))
    return out


def _mixer_state(mod: torch.nn.Module) -> tuple[int, int]:
    """(state elements per request, state matmul FLOPs per position) of a linear-attention or
    state-space mixer: its convolution's last kernel − 1 inputs per channel, plus the recurrent state —
    Mamba d_inner × N (readout y = C·h: 2·d_inner·N per position), gated DeltaNet H_v × d_k × d_v,
    Kimi delta attention H × d × d (their recurrent readouts are elementwise products and sums)."""
    import torch
    elements = 0
    for sub in mod.modules():
        if isinstance(sub, torch.nn.Conv1d):
            elements += int(sub.weight.shape[0]) * (int(sub.kernel_size[0]) - 1)
    n = getattr(mod, "ssm_state_size", None)
    d_inner = getattr(mod, "intermediate_size", None)
    if isinstance(n, int) and isinstance(d_inner, int):
        return elements + d_inner * n, 2 * d_inner * n
    hv, dk, dv = (getattr(mod, a, None) for a in ("num_v_heads", "head_k_dim", "head_v_dim"))
    if all(isinstance(x, int) for x in (hv, dk, dv)):
        return elements + hv * dk * dv, 0
    h, d = getattr(mod, "num_heads", None), getattr(mod, "head_dim", None)
    if isinstance(h, int) and isinstance(d, int):
        return elements + h * d * d, 0
    return elements, 0


def _softmax_type(layer_type: str) -> bool:
    """Whether a `layer_types` entry names a softmax-attention layer."""
    return layer_type in _SOFTMAX_TYPES or ("attention" in layer_type and "linear" not in layer_type)


def _moe_of(linear: tuple[LinearSpec, ...]) -> MoESpec | None:
    """The MoE shape of a derived layer with routed experts (experts and top-k from its matmuls)."""
    for lin in linear:
        if lin.component == "routed_experts" and lin.per_expert_params:
            e = lin.stored_params // lin.per_expert_params
            k = lin.active_params // lin.per_expert_params
            return MoESpec(num_experts=e, top_k=k, expert_intermediate_size=0)
    return None
