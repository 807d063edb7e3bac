"""Closed-form FLOPs of a forward pass over token positions (DESIGN §3).

Per-model coefficients are precomputed once (`FlopModel`); the cost of positions
`[a, b)` of one request is then

    linear  = Σ_components 2·active_params · (b − a)
    scores  = Σ_key-rule groups 2·heads·(d_qk + d_v) · (pairs(b) − pairs(a))
    lm_head = 2 · hidden · vocab · logits

where `pairs(n)` is the number of (query, key) pairs of the first n positions under the layer's
key rule (`KeyRule`): n(n + 1)/2 for full causal attention, Σ_{j=1..n} min(j, W) under a sliding
window W or a top-k sparse selection of k keys, and per chunk of C positions C(C + 1)/2 for
chunked attention.  For a slice of q new positions and context c without a rule,
`pairs(c) − pairs(c − q) = q·(c − q) + q(q + 1)/2`: each position i (0-based) of the slice attends
to `c − q + i + 1` keys.  A sparse-attention indexer scores every causal key (a full-attention
group of its own).  Linear-attention and state-space layers cost the same per position at any
context (their state matmuls are a per-position component, `recurrent_state`).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat
from operator import add, mod
from typing import Any, Sequence

import numpy as np

from serving_mfu.model.components import layer_matmuls
from serving_mfu.model.spec import AttentionSpec, ModelSpec

ATTENTION_SCORES = "attention_scores"
LM_HEAD = "lm_head"
RECURRENT_STATE = "recurrent_state"


FULL, WINDOW, CHUNK, TOP_K = "full", "window", "chunk", "top_k"


@dataclass(frozen=True, slots=True)
class KeyRule:
    """Which keys a query at position p (0-based) attends to, with the closed forms the costing needs.

    full: all p + 1; window W: the last min(p + 1, W); chunk C: its own chunk, p − ⌊p/C⌋·C + 1;
    top_k k: min(p + 1, k) picked per query (DeepSeek Sparse Attention, DeepSeek-V3.2-Exp report §2.1:
    each query attends to the top-k keys its lightning indexer selects; `index_topk` = 2048)."""

    kind: str = FULL
    size: int = 0

    @property
    def full(self) -> bool:
        return self.kind == FULL

    def pairs(self, n: Any) -> Any:
        """(query, key) pairs of the first n positions, Σ_{p<n} keys(p), for an int or an int64 array."""
        if self.kind == FULL:
            return n * (n + 1) // 2
        w = self.size
        if self.kind == CHUNK:
            r = n % w
            return (n - r) // w * (w * (w + 1) // 2) + r * (r + 1) // 2
        m = np.minimum(n, w) if isinstance(n, np.ndarray) else min(n, w)  # window or top-k: min(p + 1, w) each
        return m * (m + 1) // 2 + (n - m) * w

    def keys_read(self, context_len: int, new_tokens: int) -> int:
        """Distinct keys a slice of q positions ending at context c reads: full c; window
        min(c, W + q − 1); chunk c − ⌊(c − q)/C⌋·C (from its first position's chunk on); top-k at
        most min(c, q·k) (each query's own selection)."""
        c, q = context_len, new_tokens
        if self.kind == FULL:
            return c
        if self.kind == WINDOW:
            return min(c, self.size + q - 1)
        if self.kind == CHUNK:
            return c - (c - q) // self.size * self.size
        return min(c, q * self.size)

    def keys_read_array(self, ends: np.ndarray, qs: np.ndarray) -> np.ndarray:
        """keys_read(ends_i, qs_i) of each slice, over int64 arrays."""
        if self.kind == FULL:
            return ends
        w = self.size
        if self.kind == WINDOW:
            return np.minimum(ends, qs + (w - 1))
        if self.kind == CHUNK:
            return ends - (ends - qs) // w * w
        return np.minimum(ends, qs * w)

    def last_keys_array(self, n0: np.ndarray) -> np.ndarray:
        """Keys of one query at position n0_i, for each i (a plain decode step): pairs(n0 + 1) − pairs(n0),
        which is also the keys it reads, keys_read(n0 + 1, 1)."""
        if self.kind == FULL:
            return n0 + 1
        if self.kind == CHUNK:
            return n0 % self.size + 1
        return np.minimum(n0 + 1, self.size)

    def keys_read_sum(self, ends: Any, qs: Any) -> int:
        """Σ_i keys_read(ends_i, qs_i) over int sequences or int64 arrays."""
        if isinstance(ends, np.ndarray):
            return int(self.keys_read_array(ends, qs).sum())
        if self.kind == FULL:
            return sum(ends)
        if self.kind == WINDOW:
            return sum(map(min, ends, map(add, qs, repeat(self.size - 1))))
        return sum(map(self.keys_read, ends, qs))

    def last_keys_sum(self, n0: Sequence[int]) -> int:
        """Σ_i keys of one query at position n0_i (a plain decode step): pairs(n0 + 1) − pairs(n0)."""
        if self.kind == FULL:
            return sum(n0) + len(n0)
        if self.kind == CHUNK:
            return sum(map(mod, n0, repeat(self.size))) + len(n0)
        return sum(map(min, map(add, n0, repeat(1)), repeat(self.size)))


def causal_pairs(n: int, window: int | None) -> int:
    """Σ_{j=1..n} min(j, W): (query, key) pairs of the first n positions, causal, window W (None: full)."""
    return (KeyRule(WINDOW, window) if window else KeyRule()).pairs(n)


def key_rule(a: AttentionSpec) -> KeyRule:
    """The key rule of a layer's softmax attention (a sparse layer's window is its top-k)."""
    if a.top_k_keys:
        return KeyRule(TOP_K, a.top_k_keys)
    if a.chunk_size:
        return KeyRule(CHUNK, a.chunk_size)
    if a.sliding_window:
        return KeyRule(WINDOW, a.sliding_window)
    return KeyRule()


def indexer_flops_per_pair(a: AttentionSpec) -> int:
    """A sparse-attention indexer's FLOPs per (query, key) it scores: 2·H_I·d_I for the q·k products
    and 2·H_I for weighting and summing the heads (I = Σ_h w_h·ReLU(q_h·k), DeepSeek-V3.2-Exp report
    eq. 1; transformers' DeepseekV32Indexer computes the same two products)."""
    return 2 * a.indexer_heads * (a.indexer_head_dim + 1) if a.indexer_heads else 0


def score_groups(spec: ModelSpec) -> dict[KeyRule, list[int]]:
    """Per key rule: [score FLOPs per (query, key) pair, layers], over every softmax-attention layer
    and every sparse-attention indexer (scoring all causal keys)."""
    groups: dict[KeyRule, list[int]] = {}
    for layer in spec.layers:
        a = layer.attention
        if not a.num_heads:  # no softmax attention in this layer
            continue
        entry = groups.setdefault(key_rule(a), [0, 0])
        entry[0] += 2 * a.num_heads * (a.head_dim + a.v_head_dim)
        entry[1] += 1
        if a.indexer_heads:
            entry = groups.setdefault(KeyRule(), [0, 0])
            entry[0] += indexer_flops_per_pair(a)
    return groups


@dataclass(frozen=True, slots=True)
class AttentionGroup:
    """Layers sharing a key rule: their summed score FLOPs per (query, key) pair."""

    rule: KeyRule
    flops_per_pair: int
    num_layers: int


class FlopModel:
    """Per-model FLOP coefficients, computed once from a `ModelSpec` (hot path reads them)."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        per_component: dict[str, int] = {}
        for layer in spec.layers:
            for name, active, _, _ in layer_matmuls(layer, spec):
                if active:
                    per_component[name] = per_component.get(name, 0) + 2 * active
            state = layer.attention.state_flops_per_token  # linear-attention / SSM: matmuls on the state
            if state:
                per_component[RECURRENT_STATE] = per_component.get(RECURRENT_STATE, 0) + state
        #: FLOPs per token position of every weight component (and of the recurrent state), summed over layers.
        self.linear_flops_per_token: dict[str, int] = per_component
        self.linear_flops_per_token_total: int = sum(per_component.values())
        #: One entry per key rule (full attention first).
        self.attention_groups: tuple[AttentionGroup, ...] = tuple(
            AttentionGroup(r, f, n) for r, (f, n) in sorted(score_groups(spec).items(), key=lambda kv: (
                not kv[0].full, kv[0].kind, kv[0].size))
        )
        #: FLOPs of the LM head per position that produces logits: 2·hidden·vocab.
        self.lm_head_flops_per_logit: int = 2 * spec.hidden_size * spec.vocab_size

    def score_flops(self, start: int, end: int) -> int:
        """Attention-score FLOPs (QKᵀ and scores·V) of positions [start, end), all layers."""
        return sum(
            g.flops_per_pair * (g.rule.pairs(end) - g.rule.pairs(start))
            for g in self.attention_groups
        )

    def run_flops(self, start: int, end: int, logits: int = 0) -> int:
        """Total FLOPs of positions [start, end) of one request with `logits` logit positions."""
        return (
            self.linear_flops_per_token_total * (end - start)
            + self.score_flops(start, end)
            + self.lm_head_flops_per_logit * logits
        )

    def slice_breakdown(self, new_tokens: int, context_len: int, logits_tokens: int = 1) -> dict[str, int]:
        """FLOPs by component of one forward over one slice (q new positions, context c after)."""
        if new_tokens < 0 or context_len < new_tokens:
            raise ValueError(f"need 0 <= new_tokens <= context_len, got q={new_tokens}, c={context_len}")
        if logits_tokens < 0 or logits_tokens > new_tokens:
            raise ValueError(f"logits_tokens must be in [0, new_tokens={new_tokens}], got {logits_tokens}")
        start = context_len - new_tokens
        out = {name: f * new_tokens for name, f in self.linear_flops_per_token.items()}
        out[ATTENTION_SCORES] = self.score_flops(start, context_len)
        out[LM_HEAD] = self.lm_head_flops_per_logit * logits_tokens
        return out
