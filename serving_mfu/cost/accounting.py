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

from itertools import repeat
from operator import add, eq, mul
from typing import Any, Sequence

import numpy as np

from serving_mfu.cost.bytes import ByteModel
from serving_mfu.cost.counters import IterationCost, PhaseCost  # noqa: F401 - PhaseCost re-exported
from serving_mfu.cost.flops import FlopModel, KeyRule
from serving_mfu.cost.records import DecodeBatch, IterationRecord, KVTransferRecord, PrefillBatch, Slice
from serving_mfu.cost.time_split import split_time
from serving_mfu.model.spec import ModelSpec


class CostModel:
    """FLOP and byte coefficients of one model, built once and reused for every iteration."""

    def __init__(self, spec: ModelSpec, kv_cache_dtype: str | None = None):
        self.spec = spec
        self.flop_model = FlopModel(spec)
        self.byte_model = ByteModel(spec, kv_cache_dtype)
        self._lin = self.flop_model.linear_flops_per_token_total
        self._groups = tuple((g.rule, g.flops_per_pair) for g in self.flop_model.attention_groups)
        self._lm = self.flop_model.lm_head_flops_per_logit
        kv = dict(self.byte_model.kv_groups)
        #: (key rule, score FLOPs per (query, key) pair, KV bytes per key) per key-rule group
        self._batch_groups = tuple((r, f, kv.get(r, 0.0)) for r, f in self._groups)
        #: Recurrent/convolution state bytes every slice reads and writes (linear-attention, SSM layers).
        self._state_bytes = self.byte_model.state_bytes_per_slice

    def _pairs(self, start: int, end: int) -> int:
        """Attention-score FLOPs of positions [start, end) (inlined hot-path version)."""
        total = 0
        for rule, coef in self._groups:
            if rule.full:
                total += coef * ((end * (end + 1) - start * (start + 1)) // 2)
            else:
                total += coef * (rule.pairs(end) - rule.pairs(start))
        return total


def _range_pairs(rule: KeyRule, starts: Sequence[int] | None, ends: Sequence[int]) -> int:
    """Σ_i pairs(e_i) − pairs(s_i): causal (query, key) pairs of positions [s_i, e_i) under a key rule
    (starts None: all 0).

    For full attention pairs(n) = n(n + 1)/2, so the sum is (Σe² + Σe − Σs² − Σs)/2 (exact integers).
    """
    if rule.full:
        total = sum(map(mul, ends, ends)) + sum(ends)
        if starts is not None:
            total -= sum(map(mul, starts, starts)) + sum(starts)
        return total // 2
    total = sum(map(rule.pairs, ends))
    return total - sum(map(rule.pairs, starts)) if starts is not None else total


def prefill_batch_cost(b: PrefillBatch, model: CostModel) -> tuple[int, int, int, float, int, int]:
    """(tokens, FLOPs without logits, logit rows, KV bytes read, hit tokens, saved FLOPs) of a prefill batch.

    FLOPs = lin·Σq + Σ_groups coef·Σ_i [keys(n0_i + q_i) − keys(n0_i)] (flops.py); a request whose
    chunk reaches the end of its prompt samples, one logit row; KV read = Σ_groups bytes·Σ keys read
    (+ each slice's recurrent state).
    """
    if len(b.new_tokens) >= NUMPY_MIN_BATCH:
        return _prefill_batch_cost_np(b, model)
    q, n0 = b.new_tokens, b.computed_before
    ends = list(map(add, n0, q))
    return _prefill_classes(model, _range_pairs, sum(q), n0, ends, sum(map(eq, ends, b.prompt_len)), b.cached_tokens,
                            q)


def _prefill_classes(model: CostModel, pairs: Any, tokens: int, n0: Any, ends: Any, logits: int, cached: Any,
                     q: Any) -> tuple[int, int, int, float, int, int]:
    """The per-group arithmetic of `prefill_batch_cost`, over lists (`_range_pairs`) or arrays
    (`_range_pairs_np`); slice i reads `rule.keys_read(ends_i, q_i)` keys per group."""
    flops = model._lin * tokens
    kv = model._state_bytes * len(ends)
    for rule, coef, kv_bytes in model._batch_groups:
        flops += coef * pairs(rule, n0, ends)
        kv += kv_bytes * rule.keys_read_sum(ends, q)
    hit = saved = 0
    if cached is not None:
        hit = int(sum(cached))
        if hit:
            saved = model._lin * hit + sum(coef * pairs(w, None, cached) for w, coef in model._groups)
    return tokens, flops, logits, kv, hit, saved


def decode_batch_cost(b: DecodeBatch, model: CostModel) -> tuple[int, int, int, int, int, int, float, int, int]:
    """(kept tokens, kept FLOPs, rejected tokens, rejected FLOPs, discarded tokens, discarded FLOPs, KV
    bytes read, drafts, accepted) of a decode batch, FLOPs without logits (every position of a decode
    slice has a logit row: one per token).

    Request i runs [n0_i, n0_i + 1 + k_i) and keeps [n0_i, n0_i + 1 + a_i), of which the first
    u_i = min(delivered_i, 1 + a_i) reached the user (useful) and the rest were discarded.
    FLOPs of a class = lin·Σ(its positions) + Σ_groups coef·Σ_i [keys(e_i) − keys(s_i)] over its
    ranges; without drafts or cuts the pairs are Σ_i keys of one query at n0_i (`last_keys_sum`).
    KV read = Σ_groups bytes·Σ_i keys_read(n0_i + 1 + k_i, 1 + k_i) (+ each request's recurrent state).
    """
    n0 = b.computed_before
    n = len(n0)
    if b.draft_tokens is None and b.delivered_tokens is None:
        kept_f, kv = 0, model._state_bytes * n
        total = sum(n0) + n
        for rule, coef, kv_bytes in model._batch_groups:
            keys = total if rule.full else rule.last_keys_sum(n0)
            kept_f += coef * keys
            kv += kv_bytes * keys
        return n, kept_f + model._lin * n, 0, 0, 0, 0, kv, 0, 0
    if n >= NUMPY_MIN_BATCH:
        return _decode_batch_cost_np(b, model)
    k = b.draft_tokens or [0] * n
    a = b.accepted_tokens or [0] * n
    kept_end = list(map(add, n0, map(add, a, repeat(1))))
    end = list(map(add, n0, map(add, k, repeat(1))))
    useful_end = kept_end
    if b.delivered_tokens is not None:
        useful_end = list(map(min, kept_end, map(add, n0, b.delivered_tokens)))
    return _decode_classes(model, _range_pairs, n, sum(k), sum(a), sum(useful_end) - sum(n0), n0, useful_end,
                           kept_end, end, list(map(add, k, repeat(1))))


def _decode_classes(model: CostModel, pairs: Any, n: int, drafts: int, accepted: int, kept_t: int, n0: Any,
                    useful_end: Any, kept_end: Any, end: Any, q: Any
                    ) -> tuple[int, int, int, int, int, int, float, int, int]:
    """The per-class arithmetic of `decode_batch_cost` with drafts or cuts, over lists (`_range_pairs`)
    or arrays (`_range_pairs_np`): useful [n0, u), discarded [u, kept), rejected [kept, end); request i
    reads `rule.keys_read(end_i, q_i)` keys per group (q = 1 + drafts)."""
    disc_t = n + accepted - kept_t
    rej_t = drafts - accepted
    kept_f = rej_f = disc_f = 0
    kv = model._state_bytes * n
    for rule, coef, kv_bytes in model._batch_groups:
        useful_pairs = pairs(rule, n0, useful_end)
        kept_pairs = pairs(rule, n0, kept_end) if disc_t else useful_pairs
        kept_f += coef * useful_pairs
        disc_f += coef * (kept_pairs - useful_pairs)
        rej_f += coef * (pairs(rule, n0, end) - kept_pairs)
        kv += kv_bytes * rule.keys_read_sum(end, q)
    lin = model._lin
    return (kept_t, kept_f + lin * kept_t, rej_t, rej_f + lin * rej_t, disc_t, disc_f + lin * disc_t, kv,
            drafts, accepted)


#: From this many slices on, a prefill batch, or a decode batch with drafts or cuts, is costed with
#: numpy (one array per column, exact int64 sums: contexts up to ~3·10⁹ positions) instead of sums
#: over Python ints.
NUMPY_MIN_BATCH = 64


def _range_pairs_np(rule: KeyRule, starts: np.ndarray | None, ends: np.ndarray) -> int:
    """`_range_pairs` over int64 arrays (starts None: all 0)."""
    total = rule.pairs(ends)
    return int((total - rule.pairs(starts)).sum() if starts is not None else total.sum())


def _prefill_batch_cost_np(b: PrefillBatch, model: CostModel) -> tuple[int, int, int, float, int, int]:
    """`prefill_batch_cost` of a large batch, the same formulas over numpy arrays."""
    n = len(b.new_tokens)
    q = np.fromiter(b.new_tokens, np.int64, n)
    n0 = np.fromiter(b.computed_before, np.int64, n)
    ends = n0 + q
    logits = int((ends == np.fromiter(b.prompt_len, np.int64, n)).sum())
    cached = np.fromiter(b.cached_tokens, np.int64, n) if b.cached_tokens else None
    return _prefill_classes(model, _range_pairs_np, int(q.sum()), n0, ends, logits, cached, q)


def _decode_batch_cost_np(b: DecodeBatch, model: CostModel) -> tuple[int, int, int, int, int, int, float, int, int]:
    """`decode_batch_cost` of a large batch with drafts or cuts, the same formulas over numpy arrays."""
    n = len(b.computed_before)
    n0 = np.fromiter(b.computed_before, np.int64, n)
    k = np.fromiter(b.draft_tokens, np.int64, n) if b.draft_tokens is not None else np.zeros(n, np.int64)
    a = np.fromiter(b.accepted_tokens, np.int64, n) if b.accepted_tokens is not None else np.zeros(n, np.int64)
    kept_end, end = n0 + 1 + a, n0 + 1 + k
    useful_end = kept_end
    if b.delivered_tokens is not None:
        useful_end = np.minimum(kept_end, n0 + np.fromiter(b.delivered_tokens, np.int64, n))
    return _decode_classes(model, _range_pairs_np, n, int(k.sum()), int(a.sum()), int((useful_end - n0).sum()), n0,
                           useful_end, kept_end, end, k + 1)


def _moe_measured(routing: Sequence[Sequence[int]]) -> tuple[list[float], float]:
    """Distinct experts hit per layer and the mean over layers of max/mean routed tokens."""
    active, imbalance = [], 0.0
    for counts in routing:
        active.append(float(sum(1 for n in counts if n > 0)))
        total = sum(counts)
        imbalance += (max(counts) * len(counts) / total) if total else 1.0
    return active, imbalance / max(len(routing), 1)


def kv_transfer_cost(kv: KVTransferRecord, model: CostModel, out: IterationCost) -> None:
    """Add a step's KV-connector traffic to `out`: local hits (positions [0, l)) save
    lin·l + pairs(0, l); KV received for [l, l + r) saves lin·r + pairs(l, l + r), and its bytes are
    r × the KV bytes per position (all layers, as the connector moves them); bytes sent likewise."""
    lin, pairs = model._lin, model._pairs
    kvw = model.byte_model.kv_bytes_per_token
    for local, got in zip(kv.local_cached, kv.received):
        if local:
            out.hit_tokens += local
            out.saved_flops += lin * local + pairs(0, local)
        if got:
            out.kv_received_tokens += got
            out.kv_received_flops += lin * got + pairs(local, local + got)
    out.kv_received_bytes = kvw * out.kv_received_tokens
    out.kv_sent_tokens = kv.sent_tokens
    out.kv_sent_bytes = kvw * kv.sent_tokens


def slice_positions(s: Slice) -> tuple[int, int, int, int, int, tuple[int, int, int, int, int]]:
    """A slice's positions per class — prefill, recompute, kept, rejected, discarded (DESIGN §2) — and
    its logit positions per class in the same order (the last 1 + drafts positions of a slice that
    reaches the end of its prompt past its high-water mark)."""
    q, n0, prompt, hwm, k = s.new_tokens, s.computed_before, s.prompt_len, s.hwm, s.draft_tokens
    c = n0 + q
    rej = k - s.accepted_tokens
    rec = max(min(c, hwm) - n0, 0)
    p_start = max(n0, hwm)
    pre = max(min(c, prompt) - p_start, 0)
    d_start = max(p_start, prompt)
    kept = rejected = disc = 0
    useful_end = kept_end = c - rej
    if c > d_start:
        if s.delivered_tokens is not None and d_start + s.delivered_tokens < kept_end:
            useful_end = d_start + s.delivered_tokens
        kept, rejected, disc = useful_end - d_start, rej, kept_end - useful_end
    logits = [0, 0, 0, 0, 0]
    if q and c >= prompt and c > hwm:
        for pos in range(max(n0, c - 1 - k), c):
            logits[0 if hwm <= pos < prompt else 1 if pos < hwm else 3 if pos >= kept_end
                   else 4 if pos >= useful_end else 2] += 1
    return pre, rec, kept, rejected, disc, tuple(logits)


def lora_cost(record: IterationRecord, out: IterationCost) -> None:
    """Add the step's LoRA adapter FLOPs to `out`, per phase: useful = the adapter's FLOPs per position
    over prefill and kept positions (+ per logit at their logit positions); executed = the padded-rank
    FLOPs over every position the step ran (recompute, rejected and discarded included)."""
    by_id = {s.req_id: s for s in record.all_slices()}
    p, d = out.prefill, out.decode
    for use in record.lora or ():
        ft, fl, et, el = use.flops_per_token, use.flops_per_logit, use.executed_per_token, use.executed_per_logit
        for rid in use.req_ids:
            s = by_id.get(rid)
            if s is None:
                continue
            pre, rec, kept, rej, disc, (l_pre, l_rec, l_kept, l_rej, l_disc) = slice_positions(s)
            pu, du = ft * pre + fl * l_pre, ft * kept + fl * l_kept
            pe = et * (pre + rec) + el * (l_pre + l_rec)
            de = et * (kept + rej + disc) + el * (l_kept + l_rej + l_disc)
            p.useful_flops += pu
            p.executed_flops += pe
            d.useful_flops += du
            d.executed_flops += de
            out.lora_tokens += pre + kept
            out.lora_useful_flops += pu + du
            out.lora_executed_flops += pe + de


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
    for s in record.slices:
        q, n0, prompt, hwm, cached = s.new_tokens, s.computed_before, s.prompt_len, s.hwm, s.cached_tokens
        k, accepted, delivered = s.draft_tokens, s.accepted_tokens, s.delivered_tokens
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
    if record.prefill is not None:
        t, f, logits, kv, hit, saved = prefill_batch_cost(record.prefill, model)
        pre_t += t
        pre_f += f
        pre_logits += logits
        kv_read_p += kv
        out.hit_tokens += hit
        out.saved_flops += saved
    if record.decode is not None:
        t, f, rt, rf, dt, df, kv, drafts, accepted = decode_batch_cost(record.decode, model)
        kept_t += t
        kept_logits += t
        kept_f += f
        rej_t += rt
        rej_f += rf + lm * rt
        disc_t += dt
        disc_f += df + lm * dt
        kv_read_d += kv
        out.draft_tokens += drafts
        out.accepted_tokens += accepted
    if record.kv is not None:
        kv_transfer_cost(record.kv, model, out)
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
    if record.lora:
        lora_cost(record, out)

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
