"""Bytes moved by one forward pass, for MBU (DESIGN §4).

Weights are read once per iteration (for MoE layers only the experts routed to in this
iteration); the KV cache is read once per slice for every key it attends to and written
for every new position (a sparse-attention indexer's keys too, `indexer_head_dim` each).
Linear-attention and state-space layers instead read and write their per-request state once
per slice.  Activations and embedding-row gathers are not counted.  MLA caches its
compressed latent (`kv_lora_rank + d_rope` per position), as serving engines do.
"""

from __future__ import annotations

from typing import Sequence

from serving_mfu.cost.flops import KeyRule, key_rule
from serving_mfu.model.components import RoutedExperts, expert_params, layer_matmuls
from serving_mfu.model.dtypes import dtype_bytes
from serving_mfu.model.spec import ModelSpec


def expected_active_experts(num_experts: int, top_k: int, tokens: int) -> float:
    """E·(1 − (1 − k/E)^T): distinct experts hit by T tokens each routed to k of E, uniformly."""
    if tokens <= 0 or num_experts <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


class ByteModel:
    """Per-model byte coefficients, computed once from a `ModelSpec`."""

    def __init__(self, spec: ModelSpec, kv_cache_dtype: str | None = None):
        self.spec = spec
        act = dtype_bytes(spec.act_dtype)
        weight = spec.weight_bits / 8
        self.kv_bytes_per_elem = dtype_bytes(kv_cache_dtype) if kv_cache_dtype else act
        dense = 0.0
        for layer in spec.layers:
            for name, _, stored, full_precision in layer_matmuls(layer, spec):
                if name != RoutedExperts.name:
                    dense += (act if full_precision else weight) * stored
        #: Weights every iteration reads in full (attention, dense MLPs, routers, shared experts).
        self.dense_weight_bytes: float = dense
        #: LM head weight, read when any position produces logits (kept at activation width).
        self.lm_head_bytes: float = act * spec.hidden_size * spec.vocab_size
        moe_layers = [spec.layers[i] for i in spec.moe_layer_indices]
        #: Bytes of one routed expert, per MoE layer.
        self.expert_bytes: tuple[float, ...] = tuple(weight * expert_params(layer, spec) for layer in moe_layers)
        self.moe_shape: tuple[tuple[int, int], ...] = tuple(
            (layer.moe.num_experts, layer.moe.top_k) for layer in moe_layers
        )
        self._uniform_moe = len(set(self.moe_shape)) == 1
        groups: dict[KeyRule, float] = {}
        state = 0
        for layer in spec.layers:
            a = layer.attention
            state += a.state_elements
            if not a.num_heads:  # no softmax attention: no KV cache in this layer
                continue
            if a.mla:
                per_key = (a.kv_lora_rank + a.qk_rope_head_dim) * self.kv_bytes_per_elem
            else:
                per_key = a.num_kv_heads * (a.head_dim + a.v_head_dim) * self.kv_bytes_per_elem
            rule = key_rule(a)
            groups[rule] = groups.get(rule, 0.0) + per_key
            if a.indexer_heads:  # the indexer's own key cache, read in full by every query
                groups[KeyRule()] = groups.get(KeyRule(), 0.0) + a.indexer_head_dim * self.kv_bytes_per_elem
        #: (key rule, KV bytes per cached position summed over the group's layers).
        self.kv_groups: tuple[tuple[KeyRule, float], ...] = tuple(groups.items())
        #: KV bytes written per new position, all layers.
        self.kv_bytes_per_token: float = sum(b for _, b in self.kv_groups)
        #: Recurrent and convolution state of one request, read and written once per slice (all layers).
        self.state_bytes_per_slice: float = 2 * state * act

    def expected_experts(self, tokens: int) -> list[float]:
        """Expected distinct experts per MoE layer for `tokens` positions under uniform routing."""
        if self._uniform_moe:  # one shape for every MoE layer: one evaluation
            return [expected_active_experts(*self.moe_shape[0], tokens)] * len(self.moe_shape)
        return [expected_active_experts(e, k, tokens) for e, k in self.moe_shape]

    def weight_bytes(self, any_tokens: bool, any_logits: bool, active_experts: Sequence[float]) -> float:
        """Weights read by one iteration: dense weights, LM head if used, the routed-to experts."""
        if not any_tokens:
            return 0.0
        total = self.dense_weight_bytes + (self.lm_head_bytes if any_logits else 0.0)
        for n, b in zip(active_experts, self.expert_bytes):
            total += n * b
        return total

    def kv_read_bytes(self, context_len: int, new_tokens: int) -> float:
        """KV bytes one slice reads: each distinct key it attends to, once per layer (and its state)."""
        return sum(b * r.keys_read(context_len, new_tokens) for r, b in self.kv_groups) + self.state_bytes_per_slice
