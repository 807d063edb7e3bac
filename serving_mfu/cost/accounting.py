"""One iteration → useful and executed FLOPs, bytes, tokens and time per phase (DESIGN §2–§5).

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
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from serving_mfu.cost.bytes import ByteModel
from serving_mfu.cost.columns import int_array
from serving_mfu.cost.counters import IterationCost, PhaseCost  # noqa: F401 - PhaseCost re-exported
from serving_mfu.cost.flops import FlopModel, KeyRule
from serving_mfu.cost.records import DecodeBatch, IterationRecord, KVTransferRecord, PrefillBatch, Slice
from serving_mfu.cost.roofline import NONE as NO_ROOFLINE
from serving_mfu.cost.roofline import roofline_parts
from serving_mfu.cost.time_split import split_time
from serving_mfu.model.spec import ModelSpec


class CostModel:
    """FLOP and byte coefficients of one model, built once and reused for every iteration (flops.py, bytes.py)."""

    def __init__(self, spec: ModelSpec, kv_cache_dtype: str | None = None):
        self.spec = spec
        self.flop_model = FlopModel(spec)
        self.byte_model = ByteModel(spec, kv_cache_dtype)
        #: Weight-matmul FLOPs of one position through every layer (lm head excluded).
        self.linear_flops_per_token = self.flop_model.linear_flops_per_token_total
        #: (key rule, score FLOPs per (query, key) pair) per key-rule group of attention layers.
        self.attention_groups = tuple((g.rule, g.flops_per_pair) for g in self.flop_model.attention_groups)
        #: FLOPs of one logit row (the lm head).
        self.lm_head_flops_per_logit = self.flop_model.lm_head_flops_per_logit
        kv = dict(self.byte_model.kv_groups)
        #: (key rule, score FLOPs per (query, key) pair, KV bytes per key) per key-rule group.
        self.batch_groups = tuple((r, f, kv.get(r, 0.0)) for r, f in self.attention_groups)
        #: Recurrent/convolution state bytes every slice reads and writes (linear-attention, SSM layers).
        self.state_bytes_per_slice = self.byte_model.state_bytes_per_slice

    def pairs(self, start: int, end: int) -> int:
        """Attention-score FLOPs of positions [start, end): Σ_groups coef·(keys(end) − keys(start))."""
        total = 0
        for rule, coef in self.attention_groups:
            if rule.full:
                total += coef * ((end * (end + 1) - start * (start + 1)) // 2)
            else:
                total += coef * (rule.pairs(end) - rule.pairs(start))
        return total

    def span_flops(self, start: int, end: int, logits: int = 0) -> int:
        """FLOPs of positions [start, end) with `logits` logit rows among them (DESIGN §3):
        linear·n + attention pairs + lm head·logits — the one formula every position class is costed by."""
        return self.linear_flops_per_token * (end - start) + self.pairs(start, end) + \
            self.lm_head_flops_per_logit * logits


# ------------------------------------------------------------------------------ one slice, position by position
#: Every position class (DESIGN §2) → (the phase it runs in, whether its work is useful).
POSITION_CLASSES: dict[str, tuple[str, bool]] = {
    "prefill": ("prefill", True),  # first-time prompt positions
    "recompute": ("prefill", False),  # below the request's high-water mark (after preemption)
    "kept": ("decode", True),  # the last sampled token and the accepted drafts, delivered
    "rejected": ("decode", False),  # the rejected drafts
    "discarded": ("decode", False),  # kept but never delivered (a stop or max_tokens inside a verify step)
}


class SlicePositions(NamedTuple):
    """A slice's positions [start, end) by class: recompute [start, recompute_end), prefill
    [prefill_start, prefill_end), kept [decode_start, useful_end), discarded [useful_end, kept_end),
    rejected [kept_end, end); its logit rows are [logits_start, end) (logits_start = end: none)."""

    start: int
    recompute_end: int
    prefill_start: int
    prefill_end: int
    decode_start: int
    useful_end: int
    kept_end: int
    end: int
    logits_start: int

    def span(self, cls: str) -> tuple[int, int]:
        """The [a, b) range of a position class (a == b: none)."""
        if cls == "prefill":
            return self.prefill_start, self.prefill_end
        if cls == "recompute":
            return self.start, self.recompute_end
        if cls == "kept":
            return self.decode_start, self.useful_end
        if cls == "discarded":
            return self.useful_end, self.kept_end
        return self.kept_end, self.end

    def logits_in(self, a: int, b: int) -> int:
        """Logit rows among positions [a, b)."""
        lo = a if a > self.logits_start else self.logits_start
        return b - lo if b > lo else 0

    def spans(self) -> Iterator[tuple[int, str, str, bool, int, int, int]]:
        """Each class that has positions, in POSITION_CLASSES order: (its index there, class, phase, useful,
        start, end, logit rows) — the one walk the costing, LoRA and the per-request attribution share."""
        for i, (cls, (phase, useful)) in enumerate(POSITION_CLASSES.items()):
            a, b = self.span(cls)
            if b > a:
                yield i, cls, phase, useful, a, b, self.logits_in(a, b)


def classify(s: Slice) -> SlicePositions:
    """Where each class of a slice's positions lies (DESIGN §2): positions below the high-water mark are
    recomputed, then come first-time prompt positions, then decode positions, of which the last
    `draft_tokens − accepted_tokens` are rejected and those past `delivered_tokens` discarded; a slice
    that reaches the end of its prompt past its high-water mark has a logit row at each of its last
    1 + drafts positions."""
    n0, c, prompt, hwm = s.computed_before, s.computed_before + s.new_tokens, s.prompt_len, s.hwm
    r_end = c if c < hwm else hwm
    p_start = n0 if n0 > hwm else hwm
    p_end = c if c < prompt else prompt
    d_start = p_start if p_start > prompt else prompt
    if c > d_start:
        kept_end = c - (s.draft_tokens - s.accepted_tokens)
        useful_end = kept_end
        if s.delivered_tokens is not None and d_start + s.delivered_tokens < kept_end:
            useful_end = d_start + s.delivered_tokens
    else:
        d_start = useful_end = kept_end = c
    logits = c - 1 - s.draft_tokens if s.new_tokens and c >= prompt and c > hwm else c
    return SlicePositions(n0, r_end if r_end > n0 else n0, p_start, p_end if p_end > p_start else p_start,
                          d_start, useful_end, kept_end, c, logits if logits > n0 else n0)


def slice_positions(s: Slice) -> tuple[int, int, int, int, int, tuple[int, int, int, int, int]]:
    """A slice's positions per class — prefill, recompute, kept, rejected, discarded — and its logit
    rows per class in the same order (from `classify`)."""
    pos = classify(s)
    spans = [pos.span(cls) for cls in CLASS_ORDER]
    counts = [b - a for a, b in spans]
    return (*counts, tuple(pos.logits_in(a, b) for a, b in spans))  # type: ignore[return-value]


CLASS_ORDER = tuple(POSITION_CLASSES)


class PrefillCost(NamedTuple):
    """A prefill batch's cost (prefill_batch_cost); FLOPs without the logit rows'."""

    tokens: int
    flops: int
    logits: int
    kv_read_bytes: float
    hit_tokens: int
    saved_flops: int


class DecodeCost(NamedTuple):
    """A decode batch's cost by class (decode_batch_cost); FLOPs without the logit rows'."""

    kept_tokens: int
    kept_flops: int
    rejected_tokens: int
    rejected_flops: int
    discarded_tokens: int
    discarded_flops: int
    kv_read_bytes: float
    draft_tokens: int
    accepted_tokens: int


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


def prefill_batch_cost(b: PrefillBatch, model: CostModel) -> PrefillCost:
    """The tokens, FLOPs (without logits), logit rows, KV bytes read, hits and saved FLOPs of a prefill batch.

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
                     q: Any) -> PrefillCost:
    """The per-group arithmetic of `prefill_batch_cost`, over lists (`_range_pairs`) or arrays
    (`_range_pairs_np`); slice i reads `rule.keys_read(ends_i, q_i)` keys per group."""
    flops = model.linear_flops_per_token * tokens
    kv = model.state_bytes_per_slice * len(ends)
    for rule, coef, kv_bytes in model.batch_groups:
        flops += coef * pairs(rule, n0, ends)
        kv += kv_bytes * rule.keys_read_sum(ends, q)
    hit = saved = 0
    if cached is not None:
        hit = int(sum(cached))
        if hit:
            saved = model.linear_flops_per_token * hit + sum(coef * pairs(w, None, cached)
                                                             for w, coef in model.attention_groups)
    return PrefillCost(tokens, flops, logits, kv, hit, saved)


def decode_batch_cost(b: DecodeBatch, model: CostModel) -> DecodeCost:
    """Each class's tokens and FLOPs, the KV bytes read, drafts and accepted of a decode batch, FLOPs
    without logits (every position of a decode slice has a logit row: one per token).

    Request i runs [n0_i, n0_i + 1 + k_i) and keeps [n0_i, n0_i + 1 + a_i), of which the first
    u_i = min(delivered_i, 1 + a_i) reached the user (useful) and the rest were discarded.
    FLOPs of a class = lin·Σ(its positions) + Σ_groups coef·Σ_i [keys(e_i) − keys(s_i)] over its
    ranges; without drafts or cuts the pairs are Σ_i keys of one query at n0_i (`last_keys_sum`).
    KV read = Σ_groups bytes·Σ_i keys_read(n0_i + 1 + k_i, 1 + k_i) (+ each request's recurrent state).
    """
    n0 = b.computed_before
    n = len(n0)
    if b.draft_tokens is None and b.delivered_tokens is None:
        kept_f, kv = 0, model.state_bytes_per_slice * n
        total = sum(n0) + n
        for rule, coef, kv_bytes in model.batch_groups:
            keys = total if rule.full else rule.last_keys_sum(n0)
            kept_f += coef * keys
            kv += kv_bytes * keys
        return DecodeCost(n, kept_f + model.linear_flops_per_token * n, 0, 0, 0, 0, kv, 0, 0)
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
                    ) -> DecodeCost:
    """The per-class arithmetic of `decode_batch_cost` with drafts or cuts, over lists (`_range_pairs`)
    or arrays (`_range_pairs_np`): useful [n0, u), discarded [u, kept), rejected [kept, end); request i
    reads `rule.keys_read(end_i, q_i)` keys per group (q = 1 + drafts)."""
    disc_t = n + accepted - kept_t
    rej_t = drafts - accepted
    kept_f = rej_f = disc_f = 0
    kv = model.state_bytes_per_slice * n
    for rule, coef, kv_bytes in model.batch_groups:
        useful_pairs = pairs(rule, n0, useful_end)
        kept_pairs = pairs(rule, n0, kept_end) if disc_t else useful_pairs
        kept_f += coef * useful_pairs
        disc_f += coef * (kept_pairs - useful_pairs)
        rej_f += coef * (pairs(rule, n0, end) - kept_pairs)
        kv += kv_bytes * rule.keys_read_sum(end, q)
    lin = model.linear_flops_per_token
    return DecodeCost(kept_t, kept_f + lin * kept_t, rej_t, rej_f + lin * rej_t, disc_t, disc_f + lin * disc_t, kv,
                      drafts, accepted)


#: From this many slices on, a prefill batch, or a decode batch with drafts or cuts, is costed with
#: numpy (one array per column, exact int64 sums: contexts up to ~3·10⁹ positions) instead of sums
#: over Python ints.
NUMPY_MIN_BATCH = 64


def _range_pairs_np(rule: KeyRule, starts: np.ndarray | None, ends: np.ndarray) -> int:
    """`_range_pairs` over int64 arrays (starts None: all 0)."""
    total = rule.pairs(ends)
    return int((total - rule.pairs(starts)).sum() if starts is not None else total.sum())


def _prefill_batch_cost_np(b: PrefillBatch, model: CostModel) -> PrefillCost:
    """`prefill_batch_cost` of a large batch, the same formulas over numpy arrays."""
    q = int_array(b.new_tokens)
    n0 = int_array(b.computed_before)
    ends = n0 + q
    logits = int((ends == int_array(b.prompt_len)).sum())
    cached = int_array(b.cached_tokens) if b.cached_tokens else None
    return _prefill_classes(model, _range_pairs_np, int(q.sum()), n0, ends, logits, cached, q)


def _decode_batch_cost_np(b: DecodeBatch, model: CostModel) -> DecodeCost:
    """`decode_batch_cost` of a large batch with drafts or cuts, the same formulas over numpy arrays."""
    n = len(b.computed_before)
    n0 = int_array(b.computed_before)
    k = int_array(b.draft_tokens) if b.draft_tokens is not None else np.zeros(n, np.int64)
    a = int_array(b.accepted_tokens) if b.accepted_tokens is not None else np.zeros(n, np.int64)
    kept_end, end = n0 + 1 + a, n0 + 1 + k
    useful_end = kept_end
    if b.delivered_tokens is not None:
        useful_end = np.minimum(kept_end, n0 + int_array(b.delivered_tokens))
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
    kvw = model.byte_model.kv_bytes_per_token
    for local, got in zip(kv.local_cached, kv.received):
        if local:
            out.hit_tokens += local
            out.saved_flops += model.span_flops(0, local)
        if got:
            out.kv_received_tokens += got
            out.kv_received_flops += model.span_flops(local, local + got)
    out.kv_received_bytes = kvw * out.kv_received_tokens
    out.kv_sent_tokens = kv.sent_tokens
    out.kv_sent_bytes = kvw * kv.sent_tokens


def lora_cost(record: IterationRecord, out: IterationCost) -> None:
    """Add the step's LoRA adapter FLOPs to `out`, per phase: useful = the adapter's FLOPs per position
    over prefill and kept positions (+ per logit at their logit positions); executed = the padded-rank
    FLOPs over every position the step ran (recompute, rejected and discarded included)."""
    by_id = {s.req_id: s for s in record.all_slices()}
    for use in record.lora or ():
        ft, fl, et, el = use.flops_per_token, use.flops_per_logit, use.executed_per_token, use.executed_per_logit
        for rid in use.req_ids:
            s = by_id.get(rid)
            if s is None:
                continue
            for _, cls, phase, useful, a, b, logits in classify(s).spans():
                side = out.prefill if phase == "prefill" else out.decode
                executed = et * (b - a) + el * logits
                side.executed_flops += executed
                out.lora_executed_flops += executed
                if useful:
                    work = ft * (b - a) + fl * logits
                    side.useful_flops += work
                    side.lora_padding_flops += executed - work  # ranks padded to --max-lora-rank
                    out.lora_useful_flops += work
                    out.lora_tokens += b - a
                else:  # the adapter's work on a wasted position has that position's cause
                    setattr(out, LORA_WASTE[cls], getattr(out, LORA_WASTE[cls]) + executed)


#: Index of each position class in ClassTotals' lists (the order of POSITION_CLASSES).
PREFILL, RECOMPUTE, KEPT, REJECTED, DISCARDED = range(5)


#: The counter holding LoRA work on each wasted class of position (its waste cause, DESIGN §11).
LORA_WASTE = {"recompute": "lora_recompute_flops", "rejected": "lora_rejected_flops",
              "discarded": "lora_discarded_flops"}


class ClassTotals:
    """Tokens, FLOPs (logit rows included) and logit rows of one step, one list entry per position class
    (PREFILL … DISCARDED), and its KV bytes read by phase."""

    __slots__ = ("tokens", "flops", "logits", "kv_read_p", "kv_read_d")

    def __init__(self) -> None:
        self.tokens = [0, 0, 0, 0, 0]
        self.flops = [0, 0, 0, 0, 0]
        self.logits = [0, 0, 0, 0, 0]
        self.kv_read_p = self.kv_read_d = 0.0


def _add_slices(record: IterationRecord, model: CostModel, out: IterationCost, t: ClassTotals) -> None:
    """Each slice's positions by class (`classify`), costed by `span_flops`; its KV read goes to the
    prefill phase if it has any prefill or recompute position, else to decode."""
    bm = model.byte_model
    for s in record.slices:
        if s.cached_tokens:
            out.hit_tokens += s.cached_tokens
            out.saved_flops += model.span_flops(0, s.cached_tokens)
        if s.new_tokens == 0:
            continue
        out.draft_tokens += s.draft_tokens
        out.accepted_tokens += s.accepted_tokens
        pos = classify(s)
        for i, _, _, _, a, b, logits in pos.spans():
            t.tokens[i] += b - a
            t.logits[i] += logits
            t.flops[i] += model.span_flops(a, b, logits)
        kv = bm.kv_read_bytes(pos.end, s.new_tokens)
        if pos.recompute_end > pos.start or pos.prefill_end > pos.prefill_start:
            t.kv_read_p += kv
        else:
            t.kv_read_d += kv


def _add_batches(record: IterationRecord, model: CostModel, out: IterationCost, t: ClassTotals) -> None:
    """The prefill and decode batches in closed form; every decode position has a logit row."""
    lm = model.lm_head_flops_per_logit
    tokens, flops, logits = t.tokens, t.flops, t.logits
    if record.prefill is not None:
        pc = prefill_batch_cost(record.prefill, model)
        tokens[PREFILL] += pc.tokens
        flops[PREFILL] += pc.flops + lm * pc.logits
        logits[PREFILL] += pc.logits
        t.kv_read_p += pc.kv_read_bytes
        out.hit_tokens += pc.hit_tokens
        out.saved_flops += pc.saved_flops
    if record.decode is not None:
        dc = decode_batch_cost(record.decode, model)
        kept, rej, disc = dc.kept_tokens, dc.rejected_tokens, dc.discarded_tokens
        tokens[KEPT] += kept
        logits[KEPT] += kept
        flops[KEPT] += dc.kept_flops + lm * kept
        if rej or disc:
            tokens[REJECTED] += rej
            logits[REJECTED] += rej
            flops[REJECTED] += dc.rejected_flops + lm * rej
            tokens[DISCARDED] += disc
            logits[DISCARDED] += disc
            flops[DISCARDED] += dc.discarded_flops + lm * disc
        t.kv_read_d += dc.kv_read_bytes
        out.draft_tokens += dc.draft_tokens
        out.accepted_tokens += dc.accepted_tokens


def _set_flops(record: IterationRecord, out: IterationCost, t: ClassTotals) -> None:
    """Phase FLOPs from the classes (POSITION_CLASSES: phase, useful), the drafter's and LoRA's."""
    drafter_f = record.drafter.flops if record.drafter else 0.0
    tokens, flops = t.tokens, t.flops
    p, d = out.prefill, out.decode
    p.useful_flops, p.tokens = flops[PREFILL], tokens[PREFILL]
    p.executed_flops = flops[PREFILL] + flops[RECOMPUTE]
    d.useful_flops, d.tokens = flops[KEPT], tokens[KEPT]
    d.executed_flops = flops[KEPT] + flops[REJECTED] + flops[DISCARDED] + drafter_f
    out.recompute_tokens, out.recompute_flops = tokens[RECOMPUTE], flops[RECOMPUTE]
    out.rejected_tokens, out.rejected_flops = tokens[REJECTED], flops[REJECTED]
    out.discarded_tokens, out.discarded_flops = tokens[DISCARDED], flops[DISCARDED]
    out.drafter_flops = drafter_f
    if record.lora:
        lora_cost(record, out)


def _add_graph_padding(record: IterationRecord, model: CostModel, out: IterationCost, t: ClassTotals) -> None:
    """The positions a CUDA graph padded the step to (`record.padded_tokens`, serving_mfu.cost.graph_padding):
    executed waste (`graph_padding`), split between the phases by their executed positions (prefill:
    prefill + recompute, decode: kept + rejected + discarded; integers, so the shares sum exactly).

    A padded position runs every linear layer (the graph's matmuls run its fixed token count), and only
    those: it belongs to no request, so its attention scores no (query, key) pairs of any context, and
    it samples nothing, so it has no logit row (the lm head runs on the sampled rows only).  Its FLOPs
    are `linear_flops_per_token` each; its bytes are not counted (the weights are read once per step
    anyway, and it reads no KV)."""
    padded = record.padded_tokens
    tokens = t.tokens
    tokens_p = tokens[PREFILL] + tokens[RECOMPUTE]
    total = tokens_p + tokens[KEPT] + tokens[REJECTED] + tokens[DISCARDED]
    if not padded or not total:  # a step that ran no position has nothing to pad
        return
    flops = model.linear_flops_per_token * padded
    flops_p = flops * tokens_p // total
    p, d = out.prefill, out.decode
    p.executed_flops += flops_p
    p.graph_padding_flops += flops_p
    d.executed_flops += flops - flops_p
    d.graph_padding_flops += flops - flops_p
    if record.padding_modelled:
        out.graph_padding_modelled_iterations = 1


def _active_experts(record: IterationRecord, bm: ByteModel, out: IterationCost, tokens_p: int, tokens_d: int
                    ) -> tuple[Sequence[float], Sequence[float], Sequence[float]]:
    """Experts hit per MoE layer by all positions, the prefill ones and the decode ones: measured from
    the step's routing where it has the model's shape, else expected under uniform routing (bytes.py)."""
    if record.moe_routing is not None and len(record.moe_routing) == len(bm.moe_shape):
        active_all, out.moe_imbalance = _moe_measured(record.moe_routing)
        out.moe_measured = True
    else:
        if record.moe_routing is not None:
            out.anomalies.append("moe_routing_shape_mismatch")
        active_all = bm.expected_experts(tokens_p + tokens_d)
    if tokens_p + tokens_d:
        out.moe_active_experts = list(active_all)
    return (active_all, [min(a, b) for a, b in zip(bm.expected_experts(tokens_p), active_all)],
            [min(a, b) for a, b in zip(bm.expected_experts(tokens_d), active_all)])


NO_MOE: tuple[tuple[()], tuple[()], tuple[()]] = ((), (), ())


def _phase_bytes(record: IterationRecord, model: CostModel, out: IterationCost, t: ClassTotals
                 ) -> tuple[float, float, float]:
    """Bytes of the prefill positions alone, the decode positions alone, and both together (DESIGN §4):
    weights (with the experts each subset routes to), KV reads and KV writes; sets each phase's share
    (a mixed step's shared reads split evenly: b_p' = (b_p + b_pd − b_d) / 2)."""
    bm = model.byte_model
    tokens, logits = t.tokens, t.logits
    tokens_p, tokens_d = tokens[PREFILL] + tokens[RECOMPUTE], tokens[KEPT] + tokens[REJECTED] + tokens[DISCARDED]
    logits_p = logits[PREFILL] + logits[RECOMPUTE] > 0
    logits_d = logits[KEPT] + logits[REJECTED] + logits[DISCARDED] > 0
    active_all, active_p, active_d = _active_experts(record, bm, out, tokens_p, tokens_d) if bm.moe_shape else NO_MOE
    kvw, drafter_b = bm.kv_bytes_per_token, record.drafter.bytes if record.drafter else 0.0
    kv_p, kv_d = t.kv_read_p, t.kv_read_d
    b_p = bm.weight_bytes(tokens_p > 0, logits_p, active_p) + kv_p + kvw * tokens_p
    b_d = bm.weight_bytes(tokens_d > 0, logits_d, active_d) + kv_d + kvw * tokens_d + drafter_b
    b_pd = (bm.weight_bytes(tokens_p + tokens_d > 0, logits_p or logits_d, active_all)
            + kv_p + kv_d + kvw * (tokens_p + tokens_d) + drafter_b)
    out.mixed = tokens_p > 0 and tokens_d > 0
    if out.mixed:
        out.prefill.bytes = (b_p + b_pd - b_d) / 2
        out.decode.bytes = (b_d + b_pd - b_p) / 2
    elif tokens_p:
        out.prefill.bytes = b_pd
    else:
        out.decode.bytes = b_pd
    return b_p, b_d, b_pd


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
    out = IterationCost(step=record.step, engine=record.engine, t_end_s=record.t_end_s, busy_s=busy_s, wall_s=wall_s)
    t = ClassTotals()
    if record.slices:
        _add_slices(record, model, out, t)
    _add_batches(record, model, out, t)
    if record.kv is not None:
        kv_transfer_cost(record.kv, model, out)
    _set_flops(record, out, t)
    if record.padded_tokens:
        _add_graph_padding(record, model, out, t)
    b_p, b_d, b_pd = _phase_bytes(record, model, out, t)
    p, d = out.prefill, out.decode
    ran = any(t.tokens) or out.drafter_flops
    p.time_s, d.time_s, out.time_repaired_s = split_time(
        busy_s, p.executed_flops, d.executed_flops, b_p, b_d, b_pd,
        engine_peak_flops_per_s, engine_bandwidth_bytes_per_s, split,
    ) if ran else (0.0, 0.0, 0.0)
    parts = roofline_parts(busy_s, p.time_s, d.time_s, p.executed_flops, d.executed_flops, p.bytes + d.bytes,
                           engine_peak_flops_per_s, engine_bandwidth_bytes_per_s)
    if parts is not NO_ROOFLINE:
        (p.sol_s, p.memory_bound_s, p.beyond_roofline_s, d.sol_s, d.memory_bound_s, d.beyond_roofline_s,
         out.busy_sol_s, out.busy_memory_bound_s, out.busy_beyond_roofline_s) = parts
    if engine_peak_flops_per_s and busy_s > 0:
        out.hfu = (p.executed_flops + d.executed_flops) / (busy_s * engine_peak_flops_per_s)
        out.hfu_over_1 = out.hfu > 1.0 + 1e-9
    return out
