"""Closed-form FLOPs of a forward pass over token positions (DESIGN §3).

Per-model coefficients are precomputed once (`FlopModel`); the cost of positions
`[a, b)` of one request is then

    linear  = Σ_components 2·active_params · (b − a)
    scores  = Σ_window-groups 2·heads·(d_qk + d_v) · (keys(b) − keys(a))
    lm_head = 2 · hidden · vocab · logits

where `keys(n) = Σ_{j=1..n} min(j, W)` is the number of causal (query, key) pairs of the
first n positions under a window W (W = ∞ for full attention).  For a slice of q new
positions and context c, `keys(c) − keys(c − q) = q·(c − q) + q(q + 1)/2` without a
window: each position i (0-based) of the slice attends to `c − q + i + 1` keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from serving_mfu.model.components import layer_matmuls
from serving_mfu.model.spec import ModelSpec

ATTENTION_SCORES = "attention_scores"
LM_HEAD = "lm_head"


def causal_pairs(n: int, window: int | None) -> int:
    """Σ_{j=1..n} min(j, W): (query, key) pairs of the first n positions, causal, window W."""
    if window is None or n <= window:
        return n * (n + 1) // 2
    return window * (window + 1) // 2 + (n - window) * window


def keys_read(context_len: int, new_tokens: int, window: int | None) -> int:
    """Distinct keys a slice of q positions ending at context c attends to: c, or min(c, W + q − 1)."""
    if window is None:
        return context_len
    return min(context_len, window + new_tokens - 1)


@dataclass(frozen=True, slots=True)
class AttentionGroup:
    """Layers sharing a window: their summed score FLOPs per (query, key) pair."""

    window: int | None
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
        #: FLOPs per token position of every weight component, summed over layers.
        self.linear_flops_per_token: dict[str, int] = per_component
        self.linear_flops_per_token_total: int = sum(per_component.values())
        groups: dict[int | None, list[int]] = {}
        for layer in spec.layers:
            a = layer.attention
            if not a.num_heads:  # no softmax attention in this layer
                continue
            entry = groups.setdefault(a.sliding_window, [0, 0])
            entry[0] += 2 * a.num_heads * (a.head_dim + a.v_head_dim)
            entry[1] += 1
        #: One entry per distinct window (None = full attention).
        self.attention_groups: tuple[AttentionGroup, ...] = tuple(
            AttentionGroup(w, f, n) for w, (f, n) in sorted(groups.items(), key=lambda kv: kv[0] or 0)
        )
        #: FLOPs of the LM head per position that produces logits: 2·hidden·vocab.
        self.lm_head_flops_per_logit: int = 2 * spec.hidden_size * spec.vocab_size

    def score_flops(self, start: int, end: int) -> int:
        """Attention-score FLOPs (QKᵀ and scores·V) of positions [start, end), all layers."""
        return sum(
            g.flops_per_pair * (causal_pairs(end, g.window) - causal_pairs(start, g.window))
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
