"""What each request of a step cost (DESIGN §12): its FLOPs, device-seconds and tokens, from the step's record
and the cost the accounting gave the whole step.

- **FLOPs.** A request's useful and executed FLOPs are the sums over its positions by class (DESIGN §2),
  each costed by the one span formula `lin·n + Σ_groups coef·(pairs(b) − pairs(a)) + lm·logits`
  (serving_mfu.cost.accounting.CostModel.span_flops); executed adds its share of the drafter by kept
  (not rejected) positions, its LoRA work, and its share of the step's CUDA-graph padding by positions in
  each phase.  Over the step's requests they add up to the step's useful and executed FLOPs.
- **Device-seconds.** Each phase's time × devices (DESIGN §5's split) is divided among the requests in
  proportion to their own roofline cost in that phase, `max(F_i / peak, B_i / bandwidth)`: F_i its executed
  FLOPs there, B_i its KV reads and writes plus the phase's other bytes (weights, drafter) shared by
  positions.  Over all requests this is exactly the busy device-seconds.
- **Tokens.** Delivered tokens (the first token when its prompt completes, then each kept decode position),
  drafts, accepted drafts, prefix-cache hits and KV received.

Pure functions over numpy arrays; the tracker's step cost (IterationCost) is an input, not recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from serving_mfu.cost.accounting import POSITION_CLASSES, CostModel, classify
from serving_mfu.cost.columns import int_array
from serving_mfu.cost.counters import IterationCost
from serving_mfu.cost.records import DecodeBatch, IterationRecord, PrefillBatch, Slice

_F = np.float64
_I = np.int64


@dataclass(slots=True)
class StepShares:
    """Each request of a step (slices, then the prefill batch, then the decode batch), one array entry each."""

    ids: list[str]
    useful_flops: np.ndarray
    executed_flops: np.ndarray
    prefill_device_s: np.ndarray
    decode_device_s: np.ndarray
    delivered_tokens: np.ndarray
    draft_tokens: np.ndarray
    accepted_tokens: np.ndarray
    cached_tokens: np.ndarray
    received_tokens: np.ndarray


@dataclass(slots=True)
class _Part:
    """One part of the step (its slices, its prefill batch or its decode batch), per request."""

    ids: list[str]
    useful: np.ndarray  # useful FLOPs (prefill + kept positions)
    exec_p: np.ndarray  # executed FLOPs in the prefill phase
    exec_d: np.ndarray  # and in decode
    pos_p: np.ndarray  # positions run in the prefill phase
    pos_d: np.ndarray  # and in decode
    kept: np.ndarray  # positions not rejected (the drafter's share)
    kv_p: np.ndarray  # KV bytes read and written, and recurrent state, in the prefill phase
    kv_d: np.ndarray  # and in decode
    delivered: np.ndarray
    drafts: np.ndarray
    accepted: np.ndarray
    cached: np.ndarray


def span_flops_array(model: CostModel, a: np.ndarray, b: np.ndarray, logits: np.ndarray | int) -> np.ndarray:
    """`CostModel.span_flops` of positions [a_i, b_i) with logits_i logit rows, for each i (float64)."""
    out = (b - a).astype(_F) * model.linear_flops_per_token + np.asarray(logits, _F) * model.lm_head_flops_per_logit
    for rule, coef in model.attention_groups:
        out += (rule.pairs(b) - rule.pairs(a)).astype(_F) * coef
    return out


def _kv_bytes(model: CostModel, ends: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """KV bytes each slice reads (its keys per group) and writes (its positions), plus its recurrent state."""
    out = qs.astype(_F) * model.byte_model.kv_bytes_per_token + model.state_bytes_per_slice
    for rule, _, kv_bytes in model.batch_groups:
        if kv_bytes:
            out += rule.keys_read_array(ends, qs).astype(_F) * kv_bytes
    return out


def _prefill_part(b: PrefillBatch, model: CostModel, cached_ok: bool) -> _Part:
    """A prefill batch: prompt chunks [n0, n0 + q), a logit row where a chunk completes its prompt."""
    n = len(b.new_tokens)
    q = int_array(b.new_tokens)
    n0 = int_array(b.computed_before)
    end = n0 + q
    logit = (end == int_array(b.prompt_len)).astype(_I)
    flops = span_flops_array(model, n0, end, logit)
    zero_f, zero_i = np.zeros(n, _F), np.zeros(n, _I)
    cached = int_array(b.cached_tokens) if (b.cached_tokens and cached_ok) else zero_i
    return _Part(b.req_ids, flops, flops, zero_f, q, zero_i, q, _kv_bytes(model, end, q), zero_f, logit,
                 zero_i, zero_i, cached)


def _decode_part(b: DecodeBatch, model: CostModel) -> _Part:
    """A decode batch: request i runs [n0, n0 + 1 + k), keeps [n0, n0 + 1 + a), of which the first
    min(delivered, 1 + a) reached the user; every position has a logit row."""
    n = len(b.computed_before)
    n0 = int_array(b.computed_before)
    k = int_array(b.draft_tokens) if b.draft_tokens is not None else np.zeros(n, _I)
    a = int_array(b.accepted_tokens) if b.accepted_tokens is not None else np.zeros(n, _I)
    kept_end, end = n0 + 1 + a, n0 + 1 + k
    useful_end = kept_end
    if b.delivered_tokens is not None:
        useful_end = np.minimum(kept_end, n0 + int_array(b.delivered_tokens))
    q = k + 1
    executed = span_flops_array(model, n0, end, q)
    useful = executed if b.draft_tokens is None and b.delivered_tokens is None else \
        span_flops_array(model, n0, useful_end, useful_end - n0)
    zero_f, zero_i = np.zeros(n, _F), np.zeros(n, _I)
    return _Part(b.req_ids, useful, zero_f, executed, zero_i, q, kept_end - n0, zero_f,
                 _kv_bytes(model, end, q), useful_end - n0, k, a, zero_i)


def _slice_part(slices: Sequence[Slice], model: CostModel, cached_ok: bool) -> _Part:
    """General slices, position by position (`classify`); a slice's KV goes to prefill if it has any prefill
    or recompute position, else to decode (as the accounting does)."""
    n = len(slices)
    cols = np.zeros((10, n), _F)  # useful, exec_p, exec_d, pos_p, pos_d, kept, kv, delivered, drafts, accepted
    cached = np.zeros(n, _I)
    kv_phase_p = np.zeros(n, bool)
    bm = model.byte_model
    for i, s in enumerate(slices):
        pos = classify(s)
        for cls, (phase, useful) in POSITION_CLASSES.items():
            a, b = pos.span(cls)
            if b <= a:
                continue
            logits = pos.logits_in(a, b)
            flops = model.span_flops(a, b, logits)
            cols[1 if phase == "prefill" else 2, i] += flops
            cols[3 if phase == "prefill" else 4, i] += b - a
            if useful:
                cols[0, i] += flops
            if cls != "rejected":
                cols[5, i] += b - a
            if cls == "prefill" and logits:
                cols[7, i] += 1  # its prompt's last position gives the first token
            elif cls == "kept":
                cols[7, i] += b - a
        cols[6, i] = bm.kv_read_bytes(pos.end, s.new_tokens) + bm.kv_bytes_per_token * s.new_tokens + \
            model.state_bytes_per_slice
        kv_phase_p[i] = pos.recompute_end > pos.start or pos.prefill_end > pos.prefill_start
        cols[8, i], cols[9, i] = s.draft_tokens, s.accepted_tokens
        cached[i] = s.cached_tokens if cached_ok else 0
    as_i = cols[3:6].astype(_I)
    return _Part([s.req_id for s in slices], cols[0], cols[1], cols[2], as_i[0], as_i[1], as_i[2],
                 np.where(kv_phase_p, cols[6], 0.0), np.where(kv_phase_p, 0.0, cols[6]),
                 cols[7].astype(_I), cols[8].astype(_I), cols[9].astype(_I), cached)


def _join(parts: list[_Part]) -> _Part:
    if len(parts) == 1:
        return parts[0]
    ids = [r for p in parts for r in p.ids]
    return _Part(ids, *(np.concatenate([getattr(p, f) for p in parts]) for f in _Part.__slots__[1:]))


def _add_lora(record: IterationRecord, model: CostModel, parts: _Part, useful: np.ndarray, exec_p: np.ndarray,
              exec_d: np.ndarray) -> None:
    """Each request's adapter work (serving_mfu.cost.accounting.lora_cost, per request): useful on its prefill
    and kept positions, executed (the padded rank) on every position it ran."""
    row = {rid: i for i, rid in enumerate(parts.ids)}
    by_id = {s.req_id: s for s in record.all_slices()}
    for use in record.lora or ():
        for rid in use.req_ids:
            i, s = row.get(rid), by_id.get(rid)
            if i is None or s is None:
                continue
            pos = classify(s)
            for cls, (phase, is_useful) in POSITION_CLASSES.items():
                a, b = pos.span(cls)
                if b <= a:
                    continue
                logits = pos.logits_in(a, b)
                (exec_p if phase == "prefill" else exec_d)[i] += use.executed_per_token * (b - a) + \
                    use.executed_per_logit * logits
                if is_useful:
                    useful[i] += use.flops_per_token * (b - a) + use.flops_per_logit * logits


def _share(total: float, weights: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """`total` divided in proportion to `weights` (to `fallback` where the weights are all 0)."""
    s = weights.sum()
    if s > 0:
        return weights * (total / s)
    s = fallback.sum()
    if s > 0:
        return fallback * (total / s)
    return np.full(len(weights), total / len(weights)) if len(weights) else weights


def _device_seconds(time_s: float, devices: int, exec_f: np.ndarray, own_bytes: np.ndarray, pos: np.ndarray,
                    phase_bytes: float, peak: float | None, bandwidth: float | None,
                    fallback: np.ndarray) -> np.ndarray:
    """A phase's time × devices divided by each request's roofline cost there, max(F_i/peak, B_i/bandwidth),
    B_i = its own bytes + the phase's other bytes shared by positions."""
    if time_s <= 0 or not len(exec_f):
        return np.zeros(len(exec_f), _F)
    if peak and bandwidth:
        rest = max(phase_bytes - float(own_bytes.sum()), 0.0)
        total_pos = pos.sum()
        b = own_bytes + (pos * (rest / total_pos) if total_pos else 0.0)
        weights = np.maximum(exec_f / peak, b / bandwidth)
    else:
        weights = exec_f
    return _share(time_s * devices, weights, fallback)


def attribute(record: IterationRecord, cost: IterationCost, model: CostModel, devices: int,
              peak_flops_per_s: float | None, bandwidth_bytes_per_s: float | None) -> StepShares | None:
    """Each request's share of a step whose cost the tracker computed (`cost`; peak and bandwidth are the
    engine's totals over its devices).  None for a step that ran no request."""
    kv = record.kv
    cached_ok = kv is None  # with a connector, local hits come from vLLM's PrefillStats (record.kv)
    parts = []
    if record.slices:
        parts.append(_slice_part(record.slices, model, cached_ok))
    if record.prefill is not None:
        parts.append(_prefill_part(record.prefill, model, cached_ok))
    if record.decode is not None:
        parts.append(_decode_part(record.decode, model))
    if not parts:
        return None
    p = _join(parts)
    useful, exec_p, exec_d = p.useful.copy(), p.exec_p.copy(), p.exec_d.copy()
    if record.lora:
        _add_lora(record, model, p, useful, exec_p, exec_d)
    if cost.drafter_flops:
        exec_d += _share(cost.drafter_flops, p.kept.astype(_F), (p.pos_p + p.pos_d).astype(_F))
    if cost.prefill.graph_padding_flops:
        exec_p += _share(cost.prefill.graph_padding_flops, p.pos_p.astype(_F), p.pos_p.astype(_F))
    if cost.decode.graph_padding_flops:
        exec_d += _share(cost.decode.graph_padding_flops, p.pos_d.astype(_F), p.pos_d.astype(_F))
    everyone = (exec_p + exec_d)
    pre_s = _device_seconds(cost.prefill.time_s, devices, exec_p, p.kv_p, p.pos_p.astype(_F), cost.prefill.bytes,
                            peak_flops_per_s, bandwidth_bytes_per_s, everyone)
    dec_s = _device_seconds(cost.decode.time_s, devices, exec_d, p.kv_d, p.pos_d.astype(_F), cost.decode.bytes,
                            peak_flops_per_s, bandwidth_bytes_per_s, everyone)
    cached, received = p.cached, np.zeros(len(p.ids), _I)
    if kv is not None and kv.req_ids:
        row = {rid: i for i, rid in enumerate(p.ids)}
        cached = cached.copy()
        for rid, local, got in zip(kv.req_ids, kv.local_cached, kv.received):
            i = row.get(rid)
            if i is not None:
                cached[i] += local
                received[i] += got
    return StepShares(p.ids, useful, exec_p + exec_d, pre_s, dec_s, p.delivered, p.drafts, p.accepted, cached,
                      received)
