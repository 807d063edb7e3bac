"""What each request of some steps cost (DESIGN §12): its FLOPs, device-seconds and tokens, from the steps'
records and the cost the accounting gave each whole step.

- **FLOPs.** A request's useful and executed FLOPs are the sums over its positions by class (DESIGN §2),
  each costed by the one span formula `lin·n + Σ_groups coef·(pairs(b) − pairs(a)) + lm·logits`
  (serving_mfu.cost.accounting.CostModel.span_flops); executed adds its share of the drafter by kept
  (not rejected) positions, its LoRA work, and its share of the step's CUDA-graph padding by positions in
  each phase.  Over a step's requests they add up to the step's useful and executed FLOPs.
- **Device-seconds.** Each phase's time × devices (DESIGN §5's split) is divided among the step's requests
  in proportion to their own roofline cost in that phase, `max(F_i / peak, B_i / bandwidth)`: F_i its
  executed FLOPs there, B_i its KV reads and writes plus the phase's other bytes (weights, drafter) shared
  by positions.  Over all requests this is exactly the busy device-seconds.
- **Tokens.** Delivered tokens (the first token when its prompt completes, then each kept decode position),
  drafts, accepted drafts, prefix-cache hits and KV received.

`attribute_steps` does many steps in one pass: their batches are concatenated, so the fixed cost of the
array arithmetic is paid once per call, not once per step (the engine settles its steps in groups).  Pure
functions; the tracker's step costs (IterationCost) are inputs, not recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from serving_mfu.cost.accounting import CostModel, classify
from serving_mfu.cost.columns import int_array
from serving_mfu.cost.counters import IterationCost
from serving_mfu.cost.records import IterationRecord, Slice

_F = np.float64
_I = np.int64


@dataclass(slots=True, frozen=True)
class Groups:
    """Rows in runs of one step each (a step's prefill batch, its decode batch, its general slices), in row
    order: each run's step (its index in the steps given), length and first row.  Sums over a step's rows
    are one `reduceat` over the runs, and a per-step value reaches its rows by one `repeat` — a fraction of
    what a `bincount` or a gather by each row's step costs."""

    steps: np.ndarray  # intp, one per run
    sizes: np.ndarray  # intp, > 0
    offsets: np.ndarray  # intp, each run's first row

    @classmethod
    def of(cls, steps: Sequence[int], sizes: Sequence[int]) -> "Groups":
        """Runs of `sizes` rows for `steps` (empty runs are dropped: they have no rows)."""
        st, sz = np.asarray(steps, np.intp), np.asarray(sizes, np.intp)
        if len(sz) and not sz.all():
            st, sz = st[sz > 0], sz[sz > 0]
        return cls(st, sz, _offsets(sz))

    @staticmethod
    def join(parts: Sequence["Groups"]) -> "Groups":
        """The runs of consecutive row blocks."""
        return Groups.of(np.concatenate([g.steps for g in parts]), np.concatenate([g.sizes for g in parts]))

    def per_step(self, values: np.ndarray, n_steps: int) -> np.ndarray:
        """Σ `values` over each step's rows (float64, n_steps entries)."""
        if len(self.sizes) == 1:  # one step's rows (a settle of one step, or a block of one batch)
            out = np.zeros(n_steps)
            out[self.steps[0]] = values.sum()
            return out
        if not len(self.sizes):
            return np.zeros(n_steps)
        return np.bincount(self.steps, np.add.reduceat(values, self.offsets), minlength=n_steps)

    def spread(self, per_step: np.ndarray) -> np.ndarray | np.generic:
        """Each row's step's entry of `per_step` (one value for all rows where they are one step's: numpy
        broadcasts it)."""
        if len(self.sizes) == 1:
            return per_step[self.steps[0]]
        return np.repeat(per_step[self.steps], self.sizes)

    def index(self) -> np.ndarray:
        """Each row's step."""
        return np.repeat(self.steps, self.sizes)

    def rows(self, start: int, stop: int) -> "Groups":
        """The runs of rows [start, stop) (a boundary between runs), renumbered from `start`."""
        keep = (self.offsets >= start) & (self.offsets < stop)
        return Groups(self.steps[keep], self.sizes[keep], self.offsets[keep] - start)


@dataclass(slots=True)
class StepShares:
    """Each request of each step (a request in several steps has one row per step), one array entry each."""

    id_lists: list[Sequence[str]]  # the rows' request ids, as the records' lists (`ids` joins them)
    groups: Groups  # the rows' steps, run by run
    useful_flops: np.ndarray
    executed_flops: np.ndarray
    prefill_device_s: np.ndarray
    decode_device_s: np.ndarray
    delivered_tokens: np.ndarray
    draft_tokens: np.ndarray
    accepted_tokens: np.ndarray
    cached_tokens: np.ndarray
    received_tokens: np.ndarray

    @property
    def ids(self) -> list[str]:
        return [r for ids in self.id_lists for r in ids]

    @property
    def step(self) -> np.ndarray:
        """Each row's step: its index in the steps given."""
        return self.groups.index()


@dataclass(slots=True)
class _Rows:
    """Rows of requests, before the steps' shared work is divided among them."""

    ids: list[Sequence[str]]  # lists of ids, in row order
    groups: Groups
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


def span_flops_array(model: CostModel, a: np.ndarray, b: np.ndarray, logits: np.ndarray | int,
                     pairs_a: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """`CostModel.span_flops` of positions [a_i, b_i) with logits_i logit rows, for each i (float64); `pairs_a`:
    each attention group's `pairs(a)`, where spans sharing their start have them already."""
    out = (b - a).astype(_F) * model.linear_flops_per_token + np.asarray(logits, _F) * model.lm_head_flops_per_logit
    for g, (rule, coef) in enumerate(model.attention_groups):
        out += (rule.pairs(b) - (rule.pairs(a) if pairs_a is None else pairs_a[g])).astype(_F) * coef
    return out


def _kv_bytes(model: CostModel, ends: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """KV bytes each slice reads (its keys per group) and writes (its positions), plus its recurrent state."""
    out = qs.astype(_F) * model.byte_model.kv_bytes_per_token + model.state_bytes_per_slice
    for rule, _, kv_bytes in model.batch_groups:
        if kv_bytes:
            out += rule.keys_read_array(ends, qs).astype(_F) * kv_bytes
    return out


def _column(lists: Sequence[Sequence[int] | None], sizes: Sequence[int]) -> np.ndarray:
    """The steps' columns as one int64 array (a missing column: zeros); each list is converted once however
    many readers it has (serving_mfu.cost.columns)."""
    if len(lists) == 1 and lists[0] is not None:
        return int_array(lists[0])
    return np.concatenate([int_array(x) if x is not None else np.zeros(n, _I) for x, n in zip(lists, sizes)])


def _prefill_rows(steps: list[tuple[int, IterationRecord]], model: CostModel) -> _Rows:
    """Prefill batches: prompt chunks [n0, n0 + q), a logit row where a chunk completes its prompt."""
    bs = [rec.prefill for _, rec in steps]
    sizes = [len(b.new_tokens) for b in bs]
    q = _column([b.new_tokens for b in bs], sizes)
    n0 = _column([b.computed_before for b in bs], sizes)
    end = n0 + q
    logit = (end == _column([b.prompt_len for b in bs], sizes)).astype(_I)
    flops = span_flops_array(model, n0, end, logit)
    n = len(q)
    zero_f, zero_i = np.zeros(n, _F), np.zeros(n, _I)
    cached = _column([b.cached_tokens if rec.kv is None else None for (_, rec), b in zip(steps, bs)], sizes)
    return _Rows([b.req_ids for b in bs], Groups.of([s for s, _ in steps], sizes), flops, flops, zero_f,
                 q, zero_i, q, _kv_bytes(model, end, q), zero_f, logit, zero_i, zero_i, cached)


def _plain_decode_terms(model: CostModel) -> tuple[float, float]:
    """A plain decode position's FLOPs and bytes before its keys: lin + lm (its logit row), and its KV write
    plus its recurrent state; each attention group adds coef·keys and bytes·keys."""
    return (float(model.linear_flops_per_token + model.lm_head_flops_per_logit),
            float(model.byte_model.kv_bytes_per_token + model.state_bytes_per_slice))


def _decode_rows(steps: list[tuple[int, IterationRecord]], model: CostModel) -> _Rows:
    """Decode batches: request i runs [n0, n0 + 1 + k), keeps [n0, n0 + 1 + a), of which the first
    min(delivered, 1 + a) reached the user; every position has a logit row."""
    bs = [rec.decode for _, rec in steps]
    sizes = [len(b.computed_before) for b in bs]
    n0 = _column([b.computed_before for b in bs], sizes)
    plain = all(b.draft_tokens is None and b.delivered_tokens is None for b in bs)
    n = len(n0)
    ids, step = [b.req_ids for b in bs], Groups.of([s for s, _ in steps], sizes)
    if plain:  # one position each, at n0, with its logit row: lin + lm + Σ coef·keys; KV: Σ bytes·keys
        lin, own = _plain_decode_terms(model)
        flops, kv = np.full(n, lin), np.full(n, own)
        for rule, coef, kv_bytes in model.batch_groups:
            keys = rule.last_keys_array(n0).astype(_F)
            flops += keys * coef
            if kv_bytes:
                kv += keys * kv_bytes
        zero_f, zero_i, one = np.zeros(n, _F), np.zeros(n, _I), np.ones(n, _I)
        return _Rows(ids, step, flops, zero_f, flops, zero_i, one, one, zero_f, kv, one, zero_i, zero_i, zero_i)
    k, a = _column([b.draft_tokens for b in bs], sizes), _column([b.accepted_tokens for b in bs], sizes)
    q, kept = k + 1, a + 1
    end = n0 + q
    useful_q = kept  # [n0, n0 + kept) kept, of which the first `delivered` reached the user
    if any(b.delivered_tokens is not None for b in bs):
        cut = np.concatenate([int_array(b.delivered_tokens) if b.delivered_tokens is not None else
                              np.full(n_b, 1 << 40, _I) for b, n_b in zip(bs, sizes)])
        useful_q = np.minimum(kept, cut)
    pairs_n0 = [rule.pairs(n0) for rule, _ in model.attention_groups]  # the executed and useful spans' start
    executed = span_flops_array(model, n0, end, q, pairs_n0)  # every decode position has its logit row
    useful = span_flops_array(model, n0, n0 + useful_q, useful_q, pairs_n0)
    zero_f, zero_i = np.zeros(n, _F), np.zeros(n, _I)
    return _Rows(ids, step, useful, zero_f, executed, zero_i, q, kept, zero_f, _kv_bytes(model, end, q), useful_q, k,
                 a, zero_i)


def _slice_rows(steps: list[tuple[int, IterationRecord]], model: CostModel) -> _Rows:
    """General slices, position by position (`classify`); a slice's KV goes to prefill if it has any prefill
    or recompute position, else to decode (as the accounting does)."""
    slices: list[tuple[int, Slice, bool]] = [(s, x, rec.kv is None) for s, rec in steps for x in rec.slices]
    n = len(slices)
    cols = np.zeros((10, n), _F)  # useful, exec_p, exec_d, pos_p, pos_d, kept, kv, delivered, drafts, accepted
    cached = np.zeros(n, _I)
    kv_phase_p = np.zeros(n, bool)
    bm = model.byte_model
    for i, (_, s, cached_ok) in enumerate(slices):
        pos = classify(s)
        for _, cls, phase, useful, a, b, logits in pos.spans():
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
    counts: dict[int, int] = {}
    for st, _, _ in slices:
        counts[st] = counts.get(st, 0) + 1
    return _Rows([[s.req_id for _, s, _ in slices]], Groups.of(list(counts), list(counts.values())), cols[0], cols[1],
                 cols[2], as_i[0], as_i[1], as_i[2], np.where(kv_phase_p, cols[6], 0.0),
                 np.where(kv_phase_p, 0.0, cols[6]), cols[7].astype(_I), cols[8].astype(_I), cols[9].astype(_I), cached)


def _join(parts: list[_Rows]) -> _Rows:
    if len(parts) == 1:
        return parts[0]
    ids = [x for p in parts for x in p.ids]
    return _Rows(ids, Groups.join([p.groups for p in parts]),
                 *(np.concatenate([getattr(p, f) for p in parts]) for f in _Rows.__slots__[2:]))


def _add_lora(record: IterationRecord, rows: dict[str, int], useful: np.ndarray, exec_p: np.ndarray,
              exec_d: np.ndarray) -> None:
    """One step's adapter work (serving_mfu.cost.accounting.lora_cost, per request): useful on its prefill and
    kept positions, executed (the padded rank) on every position it ran; `rows` maps its ids to rows."""
    by_id = {s.req_id: s for s in record.all_slices()}
    for use in record.lora or ():
        for rid in use.req_ids:
            i, s = rows.get(rid), by_id.get(rid)
            if i is None or s is None:
                continue
            for _, _, phase, is_useful, a, b, logits in classify(s).spans():
                (exec_p if phase == "prefill" else exec_d)[i] += use.executed_per_token * (b - a) + \
                    use.executed_per_logit * logits
                if is_useful:
                    useful[i] += use.flops_per_token * (b - a) + use.flops_per_logit * logits


def _shares(totals: np.ndarray, weights: np.ndarray, fallback: np.ndarray, groups: Groups) -> np.ndarray:
    """Each step's total divided among its rows in proportion to `weights` (to `fallback` in a step whose
    weights are all 0, then equally)."""
    n = len(totals)
    w_sum = groups.per_step(weights, n)
    unweighted = (w_sum <= 0) & (totals != 0)
    if unweighted.any():  # rare: a step whose rows weigh nothing
        f_sum = groups.per_step(fallback, n)
        instead = np.where(f_sum > 0, 0.0, 1.0)  # per step: the fallback, else equal parts
        rows = groups.spread(unweighted)
        weights = np.where(rows, np.where(groups.spread(instead) > 0, 1.0, fallback), weights)
        w_sum = groups.per_step(weights, n)
    scale = np.divide(totals, w_sum, out=np.zeros(n), where=w_sum > 0)
    return weights * groups.spread(scale)


def _device_seconds(times: np.ndarray, devices: int, exec_f: np.ndarray, own_bytes: np.ndarray, pos: np.ndarray,
                    phase_bytes: np.ndarray, peak: float | None, bandwidth: float | None, fallback: np.ndarray,
                    groups: Groups) -> np.ndarray:
    """Each step's phase time × devices divided by its rows' roofline cost there, max(F_i/peak, B_i/bandwidth),
    B_i = its own bytes + the phase's other bytes shared by positions."""
    if not times.any():
        return np.zeros(len(exec_f), _F)
    if peak and bandwidth:
        n = len(times)
        pos_sum = groups.per_step(pos, n)
        rest = np.maximum(phase_bytes - groups.per_step(own_bytes, n), 0.0)
        per_pos = np.divide(rest, pos_sum, out=np.zeros(n), where=pos_sum > 0)
        weights = np.maximum(exec_f / peak, (own_bytes + pos * groups.spread(per_pos)) / bandwidth)
    else:
        weights = exec_f
    return _shares(times * devices, weights, fallback, groups)


def _step_array(costs: Sequence[IterationCost], get) -> np.ndarray:  # noqa: ANN001 - a getter of one cost
    return np.fromiter(map(get, costs), _F, len(costs))


def attribute_parts(steps: Sequence[tuple[IterationRecord, IterationCost]], model: CostModel, devices: int,
                    peak_flops_per_s: float | None, bandwidth_bytes_per_s: float | None) -> list[StepShares]:
    """Each request's share of each costed step (peak and bandwidth: the engine's totals over its devices), as
    consecutive blocks of rows: every step's general slices, then every step's prefill batch, then every
    step's decode batch.  Where nothing spans both phases (no general slice, no drafter, each phase's
    padding on that phase's batches) the prefill and decode batches are divided apart, without joining
    their arrays; else as one block.  Empty when the steps ran no request."""
    indexed = list(enumerate(rec for rec, _ in steps))
    parts = []
    with_slices = [(s, rec) for s, rec in indexed if rec.slices]
    if with_slices:
        parts.append(_slice_rows(with_slices, model))
    with_prefill = [(s, rec) for s, rec in indexed if rec.prefill is not None]
    if with_prefill:
        parts.append(_prefill_rows(with_prefill, model))
    with_decode = [(s, rec) for s, rec in indexed if rec.decode is not None]
    if with_decode:
        parts.append(_decode_rows(with_decode, model))
    if not parts:
        return []
    costs = [c for _, c in steps]
    per_step = _StepTotals(costs)
    if len(parts) == 1 or with_slices or per_step.drafter.any() or \
            not per_step.padding_on(with_prefill, with_decode):
        p = _join(parts)
        n_sp = sum(len(x) for x in p.ids[:len(p.ids) - len(with_decode)]) if with_decode else len(p.useful)
        return [_divide(p, steps, per_step, n_sp, bool(with_slices), ("prefill", "decode"), devices,
                        peak_flops_per_s, bandwidth_bytes_per_s)]
    return [_divide(parts[0], steps, per_step, len(parts[0].useful), False, ("prefill",), devices, peak_flops_per_s,
                    bandwidth_bytes_per_s),
            _divide(parts[1], steps, per_step, 0, False, ("decode",), devices, peak_flops_per_s,
                    bandwidth_bytes_per_s)]


def attribute_steps(steps: Sequence[tuple[IterationRecord, IterationCost]], model: CostModel, devices: int,
                    peak_flops_per_s: float | None, bandwidth_bytes_per_s: float | None) -> StepShares | None:
    """`attribute_parts` as one block of rows; None when the steps ran no request."""
    blocks = attribute_parts(steps, model, devices, peak_flops_per_s, bandwidth_bytes_per_s)
    return join_blocks(blocks) if blocks else None


def join_blocks(blocks: Sequence[StepShares]) -> StepShares:
    """Consecutive blocks of rows as one."""
    if len(blocks) == 1:
        return blocks[0]
    return StepShares([x for b in blocks for x in b.id_lists], Groups.join([b.groups for b in blocks]),
                      *(np.concatenate([getattr(b, f) for b in blocks]) for f in StepShares.__slots__[2:]))


class _StepTotals:
    """The steps' costs the division reads, one array each (per step)."""

    def __init__(self, costs: Sequence[IterationCost]):
        self.drafter = _step_array(costs, lambda c: c.drafter_flops)
        self.pad = {"prefill": _step_array(costs, lambda c: c.prefill.graph_padding_flops),
                    "decode": _step_array(costs, lambda c: c.decode.graph_padding_flops)}
        self.time_s = {ph: _step_array(costs, lambda c: getattr(c, ph).time_s) for ph in ("prefill", "decode")}
        self.bytes = {ph: _step_array(costs, lambda c: getattr(c, ph).bytes) for ph in ("prefill", "decode")}

    def padding_on(self, with_prefill: list, with_decode: list) -> bool:
        """Whether each step's padding of a phase falls on its batch of that phase (so they divide apart)."""
        for phase, having in (("prefill", with_prefill), ("decode", with_decode)):
            pad = self.pad[phase]
            if pad.any():
                has = np.zeros(len(pad), bool)
                has[[s for s, _ in having]] = True
                if pad[~has].any():
                    return False
        return True


def _divide(p: _Rows, steps: Sequence[tuple[IterationRecord, IterationCost]], per_step: _StepTotals, n_sp: int,
            spans: bool, pads: tuple[str, ...], devices: int, peak_flops_per_s: float | None,
            bandwidth_bytes_per_s: float | None) -> StepShares:
    """The steps' shared work and time divided among rows `p`: rows [0, n_sp) ran in the prefill phase, the
    rest in decode (all of them where `spans`: general slices, or a drafter that ran for every row); the
    graph padding of the phases in `pads` goes to them."""
    useful, exec_p, exec_d, cached = p.useful, p.exec_p, p.exec_d, p.cached
    n = len(p.useful)
    received = np.zeros(n, _I)
    if any(rec.lora or rec.kv is not None for rec, _ in steps):  # changed in place: copies (parts share arrays)
        useful, exec_p, exec_d, cached = useful.copy(), exec_p.copy(), exec_d.copy(), cached.copy()
        _per_step_extras(steps, p, useful, exec_p, exec_d, cached, received)
    drafter = per_step.drafter
    if drafter.any():
        exec_d = exec_d + _shares(drafter, p.kept.astype(_F), (p.pos_p + p.pos_d).astype(_F), p.groups)
        spans = True
    pad_p, pad_d = per_step.pad["prefill"], per_step.pad["decode"]
    if pad_p.any() and "prefill" in pads:
        exec_p = exec_p + _shares(pad_p, p.pos_p.astype(_F), p.pos_p.astype(_F), p.groups)
    if pad_d.any() and "decode" in pads:
        exec_d = exec_d + _shares(pad_d, p.pos_d.astype(_F), p.pos_d.astype(_F), p.groups)
    everyone = exec_p + exec_d
    # each phase's time goes to the rows that ran in it: prefill to the slices and prefill batches (rows
    # [0, n_s + n_p)), decode to the slices and decode batches, and to every row the drafter ran for
    pre_rows = slice(0, n_sp)
    dec_rows = slice(0, n) if spans else slice(n_sp, n)
    pre_s, dec_s = np.zeros(n, _F), np.zeros(n, _F)
    for out, rows, phase, exec_f, own, pos in ((pre_s, pre_rows, "prefill", exec_p, p.kv_p, p.pos_p),
                                               (dec_s, dec_rows, "decode", exec_d, p.kv_d, p.pos_d)):
        times = per_step.time_s[phase]
        if rows.stop > rows.start and times.any():
            whole = rows.start == 0 and rows.stop == n
            out[rows] = _device_seconds(times, devices, exec_f[rows], own[rows], pos[rows].astype(_F),
                                        per_step.bytes[phase], peak_flops_per_s, bandwidth_bytes_per_s,
                                        everyone[rows], p.groups if whole else p.groups.rows(rows.start, rows.stop))
    return StepShares(p.ids, p.groups, useful, everyone, pre_s, dec_s, p.delivered, p.drafts, p.accepted,
                      cached, received)


@dataclass(slots=True)
class RunShares:
    """Each request's sums over runs of plain decode steps of the same requests: one entry per request of
    each run taken, in run order."""

    taken: list[bool]  # per run given: charged in closed form (False: declined, to go row by row)
    steps: np.ndarray  # each entry's run length: the tokens it was delivered (one a step)
    useful_flops: np.ndarray  # = executed (plain decodes keep every position)
    decode_device_s: np.ndarray


def _plain_decode_only(rec: IterationRecord, cost: IterationCost) -> bool:
    d = rec.decode
    return d is not None and not rec.slices and rec.prefill is None and not rec.lora and rec.kv is None and \
        d.draft_tokens is None and d.delivered_tokens is None and not cost.drafter_flops and \
        not cost.decode.graph_padding_flops


def plain_decode(rec: IterationRecord, cost: IterationCost) -> tuple[Sequence[int], float, float] | None:
    """A step as `decode_runs` reads it where it is only a plain decode batch: the batch's n0 column, its decode
    time and bytes; else None.  Taken when the step is costed (its objects are at hand then)."""
    return (rec.decode.computed_before, cost.decode.time_s, cost.decode.bytes) if _plain_decode_only(rec, cost) \
        else None


def decode_run(steps: Sequence[tuple[IterationRecord, IterationCost]], model: CostModel, devices: int,
               peak_flops_per_s: float | None, bandwidth_bytes_per_s: float | None) -> RunShares | None:
    """`decode_runs` of one run of costed steps; None where it declines."""
    plain = [plain_decode(rec, cost) for rec, cost in steps]
    if any(p is None for p in plain):
        return None
    run = decode_runs([plain], model, devices, peak_flops_per_s, bandwidth_bytes_per_s)
    return run if run.taken[0] else None


def _offsets(sizes: np.ndarray) -> np.ndarray:
    """Each run's first entry, for runs of `sizes` entries."""
    out = np.zeros(len(sizes), np.intp)
    np.cumsum(sizes[:-1], out=out[1:])
    return out


def decode_runs(runs: Sequence[Sequence[tuple[Sequence[int], float, float]]], model: CostModel, devices: int,
                peak_flops_per_s: float | None, bandwidth_bytes_per_s: float | None) -> RunShares:
    """Each request's sums over each run of k ≥ 2 consecutive plain decode steps of the same requests, in
    closed form: O(requests), not O(requests × steps), and all runs at once.  vLLM keeps such a batch step
    after step, request i at position n0_i + t in step t; with x_i = n0_i + 1 keys (every attention group
    reading all keys over the run), its FLOPs and bytes in step t are affine, F = L + C·(x_i + t),
    B = K + D·(x_i + t), so where every request is on one side of the roofline in step t its device-seconds
    share (`_device_seconds`) is T_t·(a_t + s_t·x_i)/(n·a_t + s_t·Σx) and its sum over the run
    Σα_t + x_i·Σβ_t.  The same values as row by row, up to rounding.  Each run is its steps as
    `plain_decode` gives them; one that does not qualify (one step, a skipped position, a changed batch, a
    binding window, the roofline's corner inside its batch) is declined: `taken` False, and its steps go row
    by row."""
    taken = [False] * len(runs)
    cand = []  # (run, its steps, its requests)
    for r, steps in enumerate(runs):
        if len(steps) < 2:
            continue
        n = len(steps[0][0])
        if n and all(len(n0) == n for n0, _, _ in steps):
            cand.append((r, steps, n))
    empty = np.zeros(0, _F)
    if not cand:
        return RunShares(taken, empty, empty, empty)
    sizes = np.array([n for _, _, n in cand], np.intp)
    ks = np.array([len(steps) for _, steps, _ in cand], np.intp)
    first = _column([steps[0][0] for _, steps, _ in cand], sizes)
    last = _column([steps[-1][0] for _, steps, _ in cand], sizes)
    offs = _offsets(sizes)
    if len(cand) == 1:  # one position a step each
        ok = np.array([bool((last - first == ks[0] - 1).all())])
    else:
        ok = np.logical_and.reduceat(last - first == np.repeat(ks - 1, sizes), offs)
    lo, hi = np.minimum.reduceat(first, offs), np.maximum.reduceat(first, offs)
    for rule in (rule for rule, _, _ in model.batch_groups if not rule.full):  # a window or chunk that binds
        ends = np.concatenate([lo, hi + ks - 1])
        fits = rule.last_keys_array(ends) == ends + 1
        ok &= fits[:len(lo)] & fits[len(lo):]
    lin, own = _plain_decode_terms(model)
    coef = float(sum(c for _, c, _ in model.batch_groups))
    kv = float(sum(b for _, _, b in model.batch_groups))
    x = first.astype(_F)
    x += 1.0
    sx = np.add.reduceat(x, offs)
    # per step of every run: t (its index in its run), and its run's n, Σx, lowest and highest x
    step_offs = _offsets(ks)
    run_of = np.repeat(np.arange(len(cand)), ks)
    t = (np.arange(int(ks.sum())) - step_offs[run_of]).astype(_F)
    n_t, sx_t = sizes[run_of].astype(_F), sx[run_of]
    per_step = np.array([(time_s, b) for _, steps, _ in cand for _, time_s, b in steps], _F)
    time_s = per_step[:, 0] * devices
    peak, bw = peak_flops_per_s, bandwidth_bytes_per_s
    if peak and bw:
        byte_t = per_step[:, 1]
        per_pos = np.maximum(byte_t - (n_t * (own + kv * t) + kv * sx_t), 0.0) / n_t
        a_f, s_f, a_b, s_b = (lin + coef * t) / peak, coef / peak, (own + kv * t + per_pos) / bw, kv / bw
        lo_t, hi_t = (lo + 1.0)[run_of], (hi + 1.0)[run_of]
        d_lo, d_hi = a_f + s_f * lo_t - (a_b + s_b * lo_t), a_f + s_f * hi_t - (a_b + s_b * hi_t)
        flop = (d_lo >= 0) & (d_hi >= 0)
        corner = ~flop & ~((d_lo <= 0) & (d_hi <= 0))  # the roofline's corner inside the step's batch
        a, slope = np.where(flop, a_f, a_b), np.where(flop, s_f, s_b)
    else:
        a, slope, corner = lin + coef * t, np.full(len(t), coef), np.zeros(len(t), bool)
    total = n_t * a + slope * sx_t
    bad = corner | (total <= 0)
    ok &= ~np.logical_or.reduceat(bad, step_offs)
    share = np.divide(time_s, total, out=np.zeros(len(t)), where=~bad)
    alpha, beta = np.add.reduceat(share * a, step_offs), np.add.reduceat(share * slope, step_offs)
    k_f = ks.astype(_F)  # per run: useful k·lin + coef·k(k − 1)/2 + coef·k·x_i, device-seconds Σα + Σβ·x_i
    useful = _affine(k_f * lin + coef * k_f * (k_f - 1) / 2, coef * k_f, x, sizes)
    device_s = _affine(alpha, beta, x, sizes)
    steps = np.repeat(ks, sizes)
    if not ok.all():
        rows = np.repeat(ok, sizes)
        steps, useful, device_s = steps[rows], useful[rows], device_s[rows]
    for (r, _, _), good in zip(cand, ok.tolist()):
        taken[r] = good
    return RunShares(taken, steps, useful, device_s)


def _affine(a: np.ndarray, b: np.ndarray, x: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """a_r + b_r·x_i for each entry i of run r (one product, added in place: a settle's arrays are cold, and
    each fresh temporary costs more than its arithmetic)."""
    if len(sizes) == 1:
        out = x * b[0]
        out += a[0]
        return out
    out = np.repeat(b, sizes)
    out *= x
    out += np.repeat(a, sizes)
    return out


def _per_step_extras(steps: Sequence[tuple[IterationRecord, IterationCost]], p: _Rows, useful: np.ndarray,
                     exec_p: np.ndarray, exec_d: np.ndarray, cached: np.ndarray, received: np.ndarray) -> None:
    """LoRA work and KV-connector tokens, step by step (only the steps that have them)."""
    need = [s for s, (rec, _) in enumerate(steps) if rec.lora or (rec.kv is not None and rec.kv.req_ids)]
    if not need:
        return
    ids = [r for x in p.ids for r in x]
    step = p.groups.index()
    for s in need:
        rec = steps[s][0]
        rows = {ids[i]: i for i in np.flatnonzero(step == s).tolist()}
        if rec.lora:
            _add_lora(rec, rows, useful, exec_p, exec_d)
        kv = rec.kv
        if kv is not None:
            for rid, local, got in zip(kv.req_ids, kv.local_cached, kv.received):
                i = rows.get(rid)
                if i is not None:
                    cached[i] += local
                    received[i] += got


def attribute(record: IterationRecord, cost: IterationCost, model: CostModel, devices: int,
              peak_flops_per_s: float | None, bandwidth_bytes_per_s: float | None) -> StepShares | None:
    """`attribute_steps` of one step."""
    return attribute_steps([(record, cost)], model, devices, peak_flops_per_s, bandwidth_bytes_per_s)
