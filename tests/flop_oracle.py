"""An independent FLOP counter for HF models: `torch.utils.flop_counter.FlopCounterMode`.

It runs a real forward pass of a (tiny) HF causal LM and attributes every counted FLOP to
the module that executed it, then maps module names to the FLOP model's component keys
(`q_proj`, ..., `routed_experts`, `shared_experts`), `attention_scores` and `lm_head`.
Nothing here reads `serving_mfu` code: the numbers come from the aten ops torch dispatched.

How a FLOP is attributed.  `FlopCounterMode.get_flop_counts()` returns, per module name
(`LlamaForCausalLM.model.layers.1.self_attn.q_proj`), the FLOPs of every op executed while
that module was on the stack, children included.  Subtracting the children gives each
module's *exclusive* count: the ops its own `forward` ran.  Then:

- `…layers.{i}.self_attn.<proj>`     -> that projection (`kv_a_proj_with_mqa` -> `kv_a_proj`);
- `…layers.{i}.self_attn` itself     -> attention scores: HF eager attention is
  `torch.matmul(q, kᵀ)` and `torch.matmul(p, v)` on 4-D tensors, i.e. `aten.bmm`;
- `…layers.{i}.mlp.gate`             -> router (a `TopKRouter` calling `F.linear`);
- `…layers.{i}.mlp.experts`          -> routed experts (eager experts: one `F.linear` pair per
  expert hit, on the rows routed to it, i.e. `aten.mm`);
- `…layers.{i}.mlp.shared_expert[s]`, `…mlp.shared_expert_gate` -> shared experts;
- `…layers.{i}.mlp.{gate,up,down}_proj`, `…mlp.{c_fc,c_proj}` (StarCoder2) -> dense MLP;
- `lm_head`                          -> LM head.

Anything else that counts FLOPs lands in `other` (keyed by module path) so a new
transformers version that moves work around is noticed, not silently absorbed.  Independently
of module names, `by_op` splits the same FLOPs by aten op, so a test can check that the
name-based attention count equals all batched matmuls and the name-based weight count
equals all `mm`/`addmm`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

ATTENTION_SCORES = "attention_scores"
LM_HEAD = "lm_head"

from serving_mfu.tools.compare import ATTENTION_OPS, LINEAR_OPS  # noqa: E402  (one list of aten ops)

_ATTN_PROJ = {
    "q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "o_proj",
    "q_a_proj": "q_a_proj", "q_b_proj": "q_b_proj",
    "kv_a_proj_with_mqa": "kv_a_proj", "kv_a_proj": "kv_a_proj", "kv_b_proj": "kv_b_proj",
}
_LAYER = re.compile(r"^(?:model\.layers|transformer\.h)\.(\d+)\.(.+)$")  # transformer.h: GPT-2, GPT-BigCode
QKV_FUSED = "qkv_fused"  # GPT-2's c_attn: q, k and v in one matmul, split by its output columns


class UnattributedFlops(AssertionError):
    """An op ran where the oracle does not expect FLOPs (e.g. a matmul directly in an MLP's forward)."""


@dataclass
class PhaseCount:
    """FLOPs of one forward pass, attributed to the FLOP model's keys.

    `components`: weight-matmul FLOPs per component key, summed over layers.
    `per_layer[i]`: the same per decoder layer, plus `attention_scores`.
    `by_op[category][op]`: the FLOPs of each category (`linear`, `attention_scores`,
    `lm_head`) split by aten op.  `other`: module path -> FLOPs outside any known place.
    """

    components: dict[str, int] = field(default_factory=dict)
    per_layer: dict[int, dict[str, int]] = field(default_factory=dict)
    attention_scores: int = 0
    lm_head: int = 0
    other: dict[str, int] = field(default_factory=dict)
    by_op: dict[str, dict[str, int]] = field(default_factory=dict)
    total: int = 0
    #: (token, expert) pairs each MoE layer's router selected, when tracked.
    routed_pairs: dict[int, int] = field(default_factory=dict)
    #: distinct experts each MoE layer's router selected (to show routing was not degenerate).
    experts_hit: dict[int, int] = field(default_factory=dict)
    #: FLOPs of the whole forward by aten op, straight from FlopCounterMode ("Global").
    ops_total: dict[str, int] = field(default_factory=dict)

    @property
    def linear(self) -> int:
        """All weight-matmul FLOPs except the LM head."""
        return sum(self.components.values())

    def breakdown(self) -> dict[str, int]:
        """Same keys as `FlopModel.slice_breakdown` (components with 0 FLOPs omitted)."""
        out = {k: v for k, v in self.components.items() if v}
        out[ATTENTION_SCORES] = self.attention_scores
        out[LM_HEAD] = self.lm_head
        return out


@dataclass
class OracleResult:
    """A prefill of `prompt_len` tokens (logits_to_keep=1) and one decode step on its KV cache."""

    prompt_len: int
    prefill: PhaseCount
    decode: PhaseCount


def _exclusive_counts(counts: dict[str, dict[Any, int]]) -> dict[str, dict[str, int]]:
    """Per-module FLOPs of the ops each module ran itself (children subtracted), by op name."""
    names = [n for n in counts if n != "Global"]
    tracked = set(names)

    def parent(name: str) -> str | None:
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            cand = ".".join(parts[:cut])
            if cand in tracked:
                return cand
        return None

    excl: dict[str, dict[str, int]] = {
        n: defaultdict(int, {str(op): int(c) for op, c in counts[n].items()}) for n in names
    }
    roots = []
    for n in names:
        p = parent(n)
        if p is None:
            roots.append(n)
            continue
        for op, c in counts[n].items():
            excl[p][str(op)] -= int(c)
    # Ops run outside every module (none expected) are Global minus the roots.
    outside: dict[str, int] = defaultdict(int, {str(op): int(c) for op, c in counts.get("Global", {}).items()})
    for r in roots:
        for op, c in counts[r].items():
            outside[str(op)] -= int(c)
    out = {n: {op: c for op, c in d.items() if c} for n, d in excl.items()}
    out["<outside any module>"] = {op: c for op, c in outside.items() if c}
    for n, d in out.items():
        for op, c in d.items():
            if c < 0:
                raise UnattributedFlops(f"negative exclusive count {c} for {op} in {n}: module tracking is confused")
    return {n: d for n, d in out.items() if d}


def _classify(path: str) -> tuple[int | None, str | None]:
    """(layer index, key) for a module path relative to the top model, or (None, None) if unknown."""
    if path == "lm_head":
        return None, LM_HEAD
    m = _LAYER.match(path)
    if not m:
        return None, None
    layer, rest = int(m.group(1)), m.group(2)
    parts = rest.split(".")
    if rest in ("self_attn", "attn"):
        return layer, ATTENTION_SCORES
    if parts[0] == "self_attn" and len(parts) == 2 and parts[1] in _ATTN_PROJ:
        return layer, _ATTN_PROJ[parts[1]]
    if parts[0] == "attn" and len(parts) == 2 and parts[1] in ("c_attn", "c_proj"):
        return layer, QKV_FUSED if parts[1] == "c_attn" else "o_proj"
    if parts[0] in ("mlp", "block_sparse_moe") and len(parts) >= 2:
        sub = parts[1]
        if sub in ("gate", "router") and len(parts) == 2:  # router: Phi-MoE
            return layer, "router"
        if sub == "experts":
            return layer, "routed_experts"
        if sub in ("shared_expert", "shared_experts", "shared_expert_gate"):
            return layer, "shared_experts"
        if sub in ("gate_proj", "up_proj", "down_proj", "c_fc", "c_proj") and len(parts) == 2:
            return layer, "mlp"
    return layer, None


def _split_fused(module: torch.nn.Module, flops: int) -> dict[str, int]:
    """A fused q|k|v matmul's FLOPs by output column: q has the input's width E, k and v share the rest
    equally (GPT-2: E each; GPT-BigCode multi-query: one head each).  Conv1D's weight is (in, out)."""
    w = module.weight
    e, out = (w.shape[0], w.shape[1]) if type(module).__name__ == "Conv1D" else (w.shape[1], w.shape[0])
    kv = (out - e) // 2
    assert e + 2 * kv == out and flops % out == 0, (type(module).__name__, tuple(w.shape), flops)
    per_column = flops // out
    return {"q_proj": per_column * e, "k_proj": per_column * kv, "v_proj": per_column * kv}


def count_forward(model: torch.nn.Module, **inputs: Any) -> tuple[PhaseCount, Any]:
    """Run `model(**inputs)` under FlopCounterMode (no grad); return the attributed counts and the output."""
    root = type(model).__name__
    routed: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(getattr(getattr(model, "model", None), "layers", [])):
        mlp = getattr(layer, "mlp", None)
        gate = getattr(mlp, "gate", None) or getattr(mlp, "router", None)  # router: Phi-MoE
        if gate is not None and hasattr(mlp, "experts"):
            def hook(_mod, _inp, out, i=i):
                routed[i] = out[-1].detach().clone()  # (tokens, top_k) expert indices
            hooks.append(gate.register_forward_hook(hook))
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            output = model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    counts = counter.get_flop_counts()
    excl = _exclusive_counts(counts)

    pc = PhaseCount(ops_total={str(op): int(c) for op, c in counts.get("Global", {}).items() if c})
    by_op: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for name, ops in excl.items():
        pc.total += sum(ops.values())
        path = name[len(root) + 1:] if name.startswith(root + ".") else ("" if name == root else name)
        layer, key = _classify(path)
        if key is None:
            pc.other[name] = pc.other.get(name, 0) + sum(ops.values())
            continue
        allowed = ATTENTION_OPS if key == ATTENTION_SCORES else LINEAR_OPS
        bad = {op: c for op, c in ops.items() if op not in allowed}
        if bad:
            raise UnattributedFlops(f"{name} ({key}) ran unexpected ops {bad}")
        flops = sum(ops.values())
        category = key if key in (ATTENTION_SCORES, LM_HEAD) else "linear"
        for op, c in ops.items():
            by_op[category][op] += c
        if key == LM_HEAD:
            pc.lm_head += flops
            continue
        parts = _split_fused(model.get_submodule(path), flops) if key == QKV_FUSED else {key: flops}
        for key, flops in parts.items():
            pc.per_layer.setdefault(layer, {})
            pc.per_layer[layer][key] = pc.per_layer[layer].get(key, 0) + flops
            if key == ATTENTION_SCORES:
                pc.attention_scores += flops
            else:
                pc.components[key] = pc.components.get(key, 0) + flops
    pc.by_op = {k: dict(v) for k, v in by_op.items()}
    for i, idx in routed.items():
        pc.routed_pairs[i] = int(idx.numel())
        pc.experts_hit[i] = int(torch.unique(idx).numel())
    return pc, output


def oracle_prefill_decode(model: torch.nn.Module, prompt_len: int, seed: int = 0) -> OracleResult:
    """Count a prefill of `prompt_len` random tokens (`logits_to_keep=1`, as a server does) and
    one decode step of the argmax token on the KV cache the prefill left."""
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (1, prompt_len), generator=gen)
    prefill, out = count_forward(model, input_ids=ids, logits_to_keep=1, use_cache=True)
    cache = out.past_key_values
    if cache.get_seq_length() != prompt_len:
        raise AssertionError(f"KV cache holds {cache.get_seq_length()} positions after a {prompt_len}-token prefill")
    next_id = out.logits[:, -1:].argmax(-1)
    decode, out2 = count_forward(model, input_ids=next_id, past_key_values=cache, use_cache=True, logits_to_keep=1)
    if out2.past_key_values.get_seq_length() != prompt_len + 1:
        raise AssertionError("decode step did not extend the KV cache by one position")
    return OracleResult(prompt_len, prefill, decode)
