"""One iteration → useful and executed FLOPs, bytes, tokens and time per phase (DESIGN §2, §5).

Every position of a slice falls in exactly one class: recompute (below the request's
high-water mark), prefill (first-time prompt position), decode kept (the last sampled token
plus the accepted drafts) or decode rejected (the rejected drafts); a kept position whose token
was never delivered (a stop token or max_tokens ended the request inside a verify step) is
decode discarded.  Prefill and recompute
run in the prefill phase, decode and the drafter in the decode phase; only prefill and
decode-kept work is useful.  Prefix-cache hits are neither: they are reported as saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from serving_mfu.cost.bytes import ByteModel
from serving_mfu.cost.flops import FlopModel, causal_pairs
from serving_mfu.cost.records import IterationRecord
from serving_mfu.cost.time_split import split_time
from serving_mfu.model.spec import ModelSpec


@dataclass(slots=True)
class PhaseCost:
    """One phase's share of an iteration."""

    useful_flops: float = 0.0
    executed_flops: float = 0.0
    bytes: float = 0.0
    tokens: int = 0
    time_s: float = 0.0


@dataclass(slots=True)
class IterationCost:
    """Everything the tracker accumulates from one iteration."""

    step: int
    engine: str
    t_end_s: float
    busy_s: float
    wall_s: float
    prefill: PhaseCost = field(default_factory=PhaseCost)
    decode: PhaseCost = field(default_factory=PhaseCost)
    mixed: bool = False
    recompute_tokens: int = 0
    recompute_flops: float = 0.0
    rejected_tokens: int = 0
    rejected_flops: float = 0.0
    discarded_tokens: int = 0
    discarded_flops: float = 0.0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    drafter_flops: float = 0.0
    hit_tokens: int = 0
    saved_flops: float = 0.0
    moe_active_experts: list[float] | None = None
    moe_measured: bool = False
    moe_imbalance: float | None = None
    hfu: float | None = None
    hfu_over_1: bool = False
    time_repaired_s: float = 0.0
    anomalies: list[str] = field(default_factory=list)


class CostModel:
    """FLOP and byte coefficients of one model, built once and reused for every iteration."""

    def __init__(self, spec: ModelSpec, kv_cache_dtype: str | None = None):
        self.spec = spec
        self.flop_model = FlopModel(spec)
        self.byte_model = ByteModel(spec, kv_cache_dtype)
        self._lin = self.flop_model.linear_flops_per_token_total
        self._groups = tuple((g.window, g.flops_per_pair) for g in self.flop_model.attention_groups)
        self._lm = self.flop_model.lm_head_flops_per_logit
        kv = dict(self.byte_model.kv_groups)
        #: (window, score FLOPs per key, KV bytes per key) per window group, for one-token decode slices
        self._decode_groups = tuple((w, f, kv.get(w, 0.0)) for w, f in self._groups)

    def _pairs(self, start: int, end: int) -> int:
        """Attention-score FLOPs of positions [start, end) (inlined hot-path version)."""
        total = 0
        for window, coef in self._groups:
            if window is None:
                total += coef * ((end * (end + 1) - start * (start + 1)) // 2)
            else:
                total += coef * (causal_pairs(end, window) - causal_pairs(start, window))
        return total


def _moe_measured(routing: Sequence[Sequence[int]]) -> tuple[list[float], float]:
    """Distinct experts hit per layer and the mean over layers of max/mean routed tokens."""
    active, imbalance = [], 0.0
    for counts in routing:
        active.append(float(sum(1 for n in counts if n > 0)))
        total = sum(counts)
        imbalance += (max(counts) * len(counts) / total) if total else 1.0
    return active, imbalance / max(len(routing), 1)


def cost_iteration(
    record: IterationRecord,
    model: CostModel,
    busy_s: float,
    wall_s: float,
    engine_peak_flops_per_s: float | None,
    engine_bandwidth_bytes_per_s: float | None,
    split: str = "shapley",
) -> IterationCost:
    """Classify every position of `record`, cost each phase, and split `busy_s` between phases.

    `engine_peak_flops_per_s` and `engine_bandwidth_bytes_per_s` are totals over the engine's devices;
    without them the split falls back to FLOP-proportional.
    """
    lin, lm = model._lin, model._lm
    pairs = model._pairs
    bm = model.byte_model
    out = IterationCost(step=record.step, engine=record.engine, t_end_s=record.t_end_s, busy_s=busy_s, wall_s=wall_s)
    pre_f = rec_f = kept_f = rej_f = disc_f = 0
    pre_t = rec_t = kept_t = rej_t = disc_t = 0
    pre_logits = kept_logits = 0
    kv_read_p = kv_read_d = 0.0
    dec_groups = model._decode_groups
    full_only = len(dec_groups) == 1 and dec_groups[0][0] is None
    dec1_n = 0  # plain one-token decode slices: the common case, summed in closed form below
    dec1_keys = [0] * len(dec_groups)
    for s in record.slices:
        q, n0, prompt, hwm, cached = s.new_tokens, s.computed_before, s.prompt_len, s.hwm, s.cached_tokens
        k, accepted, delivered = s.draft_tokens, s.accepted_tokens, s.delivered_tokens
        if q == 1 and not k and n0 >= hwm and n0 >= prompt and not cached and delivered is None:
            # one kept position at context c = n0 + 1: min(c, W) keys per group, one logit row
            dec1_n += 1
            if full_only:
                dec1_keys[0] += n0 + 1
            else:
                for i, (w, _, _) in enumerate(dec_groups):
                    dec1_keys[i] += n0 + 1 if w is None or n0 + 1 <= w else w
            continue
        if cached:
            out.hit_tokens += cached
            out.saved_flops += lin * cached + pairs(0, cached)
        if q == 0:
            continue
        c = n0 + q
        rej = k - accepted
        out.draft_tokens += k
        out.accepted_tokens += accepted
        # recompute [n0, min(c, hwm))
        r_end = c if c < hwm else hwm
        if r_end > n0:
            rec_t += r_end - n0
            rec_f += lin * (r_end - n0) + pairs(n0, r_end)
        # prefill [max(n0, hwm), min(c, prompt))
        p_start = n0 if n0 > hwm else hwm
        p_end = c if c < prompt else prompt
        has_prefill = r_end > n0
        if p_end > p_start:
            pre_t += p_end - p_start
            pre_f += lin * (p_end - p_start) + pairs(p_start, p_end)
            has_prefill = True
        # decode [max(n0, hwm, prompt), c): kept, then the `rej` rejected drafts at the end
        d_start = p_start if p_start > prompt else prompt
        if c > d_start:
            kept_end = c - rej
            # kept positions whose tokens were not delivered (a stop token or max_tokens ended the
            # request inside this verify step) are executed waste
            useful_end = kept_end
            if delivered is not None and d_start + delivered < kept_end:
                useful_end = d_start + delivered
                disc = kept_end - useful_end
                disc_logits = kept_end - max(useful_end, c - 1 - k)
                disc_t += disc
                disc_f += lin * disc + pairs(useful_end, kept_end) + lm * max(disc_logits, 0)
            kept_t += useful_end - d_start
            kept_f += lin * (useful_end - d_start) + pairs(d_start, useful_end)
            if rej:
                rej_t += rej
                rej_f += lin * rej + pairs(kept_end, c) + lm * rej
        # logits: the last 1 + k positions of a slice that reaches the end of its prompt
        if c >= prompt and c > hwm:
            if c > d_start:
                kept_logits += (useful_end - max(d_start, c - 1 - k)) if useful_end > c - 1 - k else 0
            else:
                pre_logits += 1
        kv = bm.kv_read_bytes(c, q)
        if has_prefill:
            kv_read_p += kv
        else:
            kv_read_d += kv
    if dec1_n:
        kept_t += dec1_n
        kept_logits += dec1_n
        kept_f += lin * dec1_n
        for (_, coef, kvb), keys in zip(dec_groups, dec1_keys):
            kept_f += coef * keys
            kv_read_d += kvb * keys
    pre_f += lm * pre_logits
    kept_f += lm * kept_logits
    drafter = record.drafter
    drafter_f = drafter.flops if drafter else 0.0
    drafter_b = drafter.bytes if drafter else 0.0

    p, d = out.prefill, out.decode
    p.useful_flops, p.executed_flops, p.tokens = pre_f, pre_f + rec_f, pre_t
    d.useful_flops, d.executed_flops, d.tokens = kept_f, kept_f + rej_f + disc_f + drafter_f, kept_t
    out.recompute_tokens, out.recompute_flops = rec_t, rec_f
    out.rejected_tokens, out.rejected_flops = rej_t, rej_f
    out.discarded_tokens, out.discarded_flops = disc_t, disc_f
    out.drafter_flops = drafter_f

    # Bytes: weights (with the experts each subset of positions routes to), KV reads, KV writes.
    tokens_p, tokens_d = pre_t + rec_t, kept_t + rej_t + disc_t
    logits_p, logits_d = pre_logits > 0, (kept_logits + rej_t + disc_t) > 0
    if bm.moe_shape:
        expected_all = bm.expected_experts(tokens_p + tokens_d)
        if record.moe_routing is not None and len(record.moe_routing) == len(bm.moe_shape):
            active_all, out.moe_imbalance = _moe_measured(record.moe_routing)
            out.moe_measured = True
        else:
            if record.moe_routing is not None:
                out.anomalies.append("moe_routing_shape_mismatch")
            active_all = expected_all
        active_p = [min(a, b) for a, b in zip(bm.expected_experts(tokens_p), active_all)]
        active_d = [min(a, b) for a, b in zip(bm.expected_experts(tokens_d), active_all)]
        if tokens_p + tokens_d:
            out.moe_active_experts = active_all
    else:
        active_all = active_p = active_d = ()
    kvw = bm.kv_bytes_per_token
    b_p = bm.weight_bytes(tokens_p > 0, logits_p, active_p) + kv_read_p + kvw * tokens_p
    b_d = bm.weight_bytes(tokens_d > 0, logits_d, active_d) + kv_read_d + kvw * tokens_d + drafter_b
    b_pd = (bm.weight_bytes(tokens_p + tokens_d > 0, logits_p or logits_d, active_all)
            + kv_read_p + kv_read_d + kvw * (tokens_p + tokens_d) + drafter_b)
    out.mixed = tokens_p > 0 and tokens_d > 0
    if out.mixed:
        p.bytes = (b_p + b_pd - b_d) / 2
        d.bytes = (b_d + b_pd - b_p) / 2
    elif tokens_p:
        p.bytes = b_pd
    else:
        d.bytes = b_pd

    executed = p.executed_flops + d.executed_flops
    p.time_s, d.time_s, out.time_repaired_s = split_time(
        busy_s, p.executed_flops, d.executed_flops, b_p, b_d, b_pd,
        engine_peak_flops_per_s, engine_bandwidth_bytes_per_s, split,
    ) if (tokens_p or tokens_d or drafter_f) else (0.0, 0.0, 0.0)
    if engine_peak_flops_per_s and busy_s > 0:
        out.hfu = executed / (busy_s * engine_peak_flops_per_s)
        out.hfu_over_1 = out.hfu > 1.0 + 1e-9
    return out
