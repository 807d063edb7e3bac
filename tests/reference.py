"""A deliberately naive, position-by-position reading of DESIGN §2–§3, to check the closed forms.

Each position is classified on its own by the table of DESIGN §2 and costed on its own:
its weight matmuls (2 × active params, summed layer by layer from the spec), its attention
scores (the keys it sees in each layer, listed one by one), and its logits.
"""

from __future__ import annotations

from collections import Counter

from serving_mfu.cost.records import Slice
from serving_mfu.model.spec import ModelSpec


def per_position_linear_flops(spec: ModelSpec) -> int:
    """Σ over layers of 2·(every weight matrix a token multiplies), from the spec's raw shapes."""
    h = spec.hidden_size
    total = 0
    for layer in spec.layers:
        a = layer.attention
        if a.mla:
            q = (h * a.q_lora_rank + a.q_lora_rank * a.num_heads * a.head_dim) if a.q_lora_rank \
                else h * a.num_heads * a.head_dim
            kv = h * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank * a.num_heads * (
                a.qk_nope_head_dim + a.v_head_dim)
            total += 2 * (q + kv)
        else:
            q = h * a.num_heads * a.head_dim * (2 if a.output_gate else 1)  # a gated q_proj also emits the gate
            total += 2 * (q + h * a.num_kv_heads * (a.head_dim + a.v_head_dim))
        total += 2 * a.num_heads * a.v_head_dim * h
        if a.indexer_heads:  # wq_b from the query latent, wk and the head weights from the hidden state
            total += 2 * ((a.q_lora_rank or h) * a.indexer_heads * a.indexer_head_dim
                          + h * a.indexer_head_dim + h * a.indexer_heads)
        if layer.mixer:
            m = layer.mixer
            total += 2 * (h * m.in_features + m.conv_channels * m.conv_kernel + m.inner * h)
        if layer.mlp:
            total += 2 * (3 if layer.mlp.gated else 2) * h * layer.mlp.intermediate_size
        if layer.moe:
            m = layer.moe
            mats = 3 if m.gated else 2
            total += 2 * h * m.num_experts  # router
            total += 2 * m.top_k * mats * h * m.expert_intermediate_size
            total += 2 * mats * h * m.shared_intermediate_size
            if m.shared_expert_gate:
                total += 2 * h
    return total


def keys_seen(a, p: int) -> int:
    """Keys position p (0-based) attends to in a layer, listed one by one from the rule's definition."""
    if a.top_k_keys:
        seen = list(range(p + 1))[-a.top_k_keys:]  # any k of the causal keys: count only
    elif a.chunk_size:
        seen = [j for j in range(p + 1) if j // a.chunk_size == p // a.chunk_size]
    elif a.sliding_window:
        seen = [j for j in range(p + 1) if p - j < a.sliding_window]
    else:
        seen = list(range(p + 1))
    return len(seen)


def position_attention_flops(spec: ModelSpec, p: int) -> int:
    """Score FLOPs of position p (0-based): in each layer 2·heads·(d_qk + d_v)·keys_seen(p), an
    indexer's 2·H_I·(d_I + 1) for every causal key, and a recurrent layer's state matmuls."""
    total = 0
    for layer in spec.layers:
        a = layer.attention
        total += 2 * a.num_heads * (a.head_dim + a.v_head_dim) * keys_seen(a, p)
        total += 2 * a.indexer_heads * (a.indexer_head_dim + 1) * (p + 1)
        total += a.state_flops_per_token
    return total


def classify(s: Slice) -> list[tuple[int, str, bool]]:
    """(position, class, produces_logits) for every position of the slice, one at a time."""
    c = s.computed_before + s.new_tokens
    rejected = s.draft_tokens - s.accepted_tokens
    samples = c >= s.prompt_len and c > s.hwm
    out = []
    kept_seen = 0
    for p in range(s.computed_before, c):
        if p < s.hwm:
            cls = "recompute"
        elif p < s.prompt_len:
            cls = "prefill"
        elif p >= c - rejected:
            cls = "rejected"
        elif s.delivered_tokens is not None and kept_seen >= s.delivered_tokens:
            cls = "discarded"
        else:
            cls = "kept"
            kept_seen += 1
        logits = samples and p >= c - 1 - s.draft_tokens
        out.append((p, cls, logits))
    return out


def reference_costs(spec: ModelSpec, slices: list[Slice]) -> tuple[Counter, Counter]:
    """FLOPs and positions per class over the slices (plus 'saved' for prefix-cache hits)."""
    lin = per_position_linear_flops(spec)
    lm = 2 * spec.hidden_size * spec.vocab_size
    flops: Counter = Counter()
    tokens: Counter = Counter()
    for s in slices:
        for p in range(s.cached_tokens):
            flops["saved"] += lin + position_attention_flops(spec, p)
            tokens["saved"] += 1
        for p, cls, logits in classify(s):
            flops[cls] += lin + position_attention_flops(spec, p) + (lm if logits else 0)
            tokens[cls] += 1
    return flops, tokens
