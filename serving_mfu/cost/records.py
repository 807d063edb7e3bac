"""The one record type at the engine/accounting boundary: an `IterationRecord` per engine step.

msgspec Structs, as vLLM v1 uses at its process boundaries: cheap to build on the engine thread
(no validation on construction), compact to hold, and encoded to / decoded from JSONL traces by
the library.  Records that come from outside (traces) go through `decode_record`, which checks
types and bounds (msgspec) and the cross-field rules (`check_record`); a bad one raises
RecordError naming the field.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]


class RecordError(ValueError):
    """A record that breaks a type, a bound or a cross-field rule; the message says which."""


class Slice(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=True, kw_only=True):
    """One request's share of an iteration: `new_tokens` positions after `computed_before`.

    `hwm` is how many positions of this request were computed *and kept* before this step:
    positions below it are recomputation (after preemption).  `cached_tokens` are the
    prefix-cache hits credited on this slice (its first schedule).  `draft_tokens` are the
    speculative positions verified in this slice and `accepted_tokens` how many were kept.
    `delivered_tokens`, when known, is how many tokens the slice delivered to the user: fewer
    than its kept decode positions when a stop token or max_tokens cut a verify step short
    (None: all delivered).
    """

    req_id: str
    new_tokens: NonNegInt
    computed_before: NonNegInt
    prompt_len: Annotated[int, msgspec.Meta(ge=1)]
    hwm: NonNegInt = 0
    cached_tokens: NonNegInt = 0
    draft_tokens: NonNegInt = 0
    accepted_tokens: NonNegInt = 0
    delivered_tokens: NonNegInt | None = None


class PrefillBatch(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=True, kw_only=True):
    """First-time prompt positions of many requests, one list per field (the common prefill case,
    costed in closed form): request i computes positions [computed_before[i], computed_before[i] +
    new_tokens[i]), none below its high-water mark and none past prompt_len[i]; cached_tokens[i] are
    its prefix-cache hits (its first schedule; None: no hits in the batch)."""

    req_ids: list[str]
    new_tokens: list[Annotated[int, msgspec.Meta(ge=1)]]
    computed_before: list[NonNegInt]
    prompt_len: list[Annotated[int, msgspec.Meta(ge=1)]]
    cached_tokens: list[NonNegInt] | None = None


class DecodeBatch(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=True, kw_only=True):
    """Decode slices of many requests, one list per field (the common decode case, costed in closed
    form): request i runs positions [computed_before[i], computed_before[i] + 1 + draft_tokens[i]),
    all past its prompt and its high-water mark; the first 1 + accepted_tokens[i] are kept, the
    rest are rejected drafts (None: no drafts in the batch).  `delivered_tokens[i]` is how many
    kept tokens reached the user when a stop or max_tokens cut the step short (None: all did)."""

    req_ids: list[str]
    computed_before: list[Annotated[int, msgspec.Meta(ge=1)]]
    draft_tokens: list[NonNegInt] | None = None
    accepted_tokens: list[NonNegInt] | None = None
    delivered_tokens: list[NonNegInt] | None = None


class DrafterRecord(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=True, kw_only=True):
    """The speculative drafter's work in this step: method and its modelled FLOPs and bytes."""

    method: str
    flops: NonNegFloat = 0.0
    bytes: NonNegFloat = 0.0
    proposed_tokens: NonNegInt = 0
    positions: NonNegInt = 0  # query positions the drafter's forwards ran (first pass + its k − 1 steps)


class KVTransferRecord(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=True, kw_only=True):
    """KV that crossed a KV connector in this step (engines with one; vLLM's own PrefillStats).

    Request i, whose prompt produced its first token this step, had positions [0, local_cached[i])
    from the local prefix cache and [local_cached[i], local_cached[i] + received[i]) loaded through
    the connector: neither was computed here.  `sent_tokens` are positions whose KV the connector
    stored or sent for other engines in this step."""

    req_ids: list[str] = msgspec.field(default_factory=list)
    local_cached: list[NonNegInt] = msgspec.field(default_factory=list)
    received: list[NonNegInt] = msgspec.field(default_factory=list)
    sent_tokens: NonNegInt = 0


class LoRAUse(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=True, kw_only=True):
    """The requests of this step that run one LoRA adapter, and its FLOPs per position and per logit
    position: useful (the adapter's own ranks) and executed (the serving kernels' padded rank)."""

    adapter: str
    req_ids: list[str]
    flops_per_token: NonNegInt
    flops_per_logit: NonNegInt = 0
    executed_per_token: NonNegInt = 0
    executed_per_logit: NonNegInt = 0


class IterationRecord(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=True, kw_only=True):
    """Everything the accounting needs about one engine step.

    `t_sched_s` is when `schedule()` returned this step and `t_end_s` when its output reached
    `update_from_output()` (monotonic seconds, one clock per engine).  `moe_routing`, when the
    engine can measure it, is tokens routed to each expert, one list per MoE layer.  On an engine
    with a KV connector `kv` says where cached prompt positions came from (and the batches' and
    slices' `cached_tokens` stay 0: a first schedule cannot tell local hits from loaded KV).
    `padded_tokens` are the positions the forward ran beyond the scheduled ones (a CUDA graph's
    padding, serving_mfu.cost.graph_padding; 0 on CPU): exact from vLLM's `cudagraph_stats`, or
    modelled from its dispatch rules when `padding_modelled`.
    """

    step: NonNegInt
    t_sched_s: float
    t_end_s: float
    slices: list[Slice]
    drafter: DrafterRecord | None = None
    moe_routing: list[list[int]] | None = None
    engine: str = "0"
    prefill: PrefillBatch | None = None
    decode: DecodeBatch | None = None
    kv: KVTransferRecord | None = None
    lora: list[LoRAUse] | None = None
    padded_tokens: NonNegInt = 0
    padding_modelled: bool = False

    def all_slices(self) -> list[Slice]:
        """Every request's slice, the batches expanded (tests, tools; the accounting costs the batches
        in closed form).  A batch keeps no high-water mark or (for decode) prompt: the expansion uses
        the tightest values its rules allow, which cost the same."""
        out = list(self.slices)
        p = self.prefill
        if p is not None:
            cached = p.cached_tokens or [0] * len(p.req_ids)
            out += [Slice(req_id=r, new_tokens=q, computed_before=n0, prompt_len=prompt, hwm=n0 - c, cached_tokens=c)
                    for r, q, n0, prompt, c in zip(p.req_ids, p.new_tokens, p.computed_before, p.prompt_len, cached)]
        d = self.decode
        if d is not None:
            zeros = [0] * len(d.req_ids)
            delivered = d.delivered_tokens or [None] * len(d.req_ids)
            out += [Slice(req_id=r, new_tokens=1 + k, computed_before=n0, prompt_len=n0, hwm=n0, cached_tokens=0,
                          draft_tokens=k, accepted_tokens=a,
                          delivered_tokens=None if got is None or got >= 1 + a else got)
                    for r, n0, k, a, got in zip(d.req_ids, d.computed_before, d.draft_tokens or zeros,
                                                d.accepted_tokens or zeros, delivered)]
        return out


def check_slice(s: Slice) -> Slice:
    """The cross-field rules of a slice (the engine's are right by construction; a trace's may not be)."""
    if s.accepted_tokens > s.draft_tokens:
        raise RecordError(f"request {s.req_id}: accepted_tokens={s.accepted_tokens} > draft_tokens={s.draft_tokens}")
    if s.cached_tokens > s.computed_before:
        raise RecordError(
            f"request {s.req_id}: cached_tokens={s.cached_tokens} > computed_before={s.computed_before}")
    if s.draft_tokens:
        end = s.computed_before + s.new_tokens
        decode_positions = end - max(s.computed_before, s.hwm, s.prompt_len)
        if decode_positions < s.draft_tokens + 1:
            raise RecordError(
                f"request {s.req_id}: {s.draft_tokens} draft tokens need at least {s.draft_tokens + 1} decode "
                f"positions in the slice, it has {max(decode_positions, 0)}")
    return s


def _check_rules(rec: IterationRecord) -> IterationRecord:
    """The cross-field rules of a whole record (times in order, every slice consistent)."""
    if rec.t_end_s < rec.t_sched_s:
        raise RecordError(f"step {rec.step}: t_end_s={rec.t_end_s} is before t_sched_s={rec.t_sched_s}")
    for s in rec.slices:
        check_slice(s)
    p, d = rec.prefill, rec.decode
    if p is not None:
        n = len(p.req_ids)
        if not (len(p.new_tokens) == len(p.computed_before) == len(p.prompt_len) == n) or (
                p.cached_tokens is not None and len(p.cached_tokens) != n):
            raise RecordError(f"step {rec.step}: prefill batch columns differ in length")
        for r, q, n0, prompt, c in zip(p.req_ids, p.new_tokens, p.computed_before, p.prompt_len,
                                       p.cached_tokens or [0] * n):
            if n0 + q > prompt:
                raise RecordError(f"step {rec.step}: prefill request {r} runs to {n0 + q}, past its prompt {prompt}")
            if c > n0:
                raise RecordError(f"step {rec.step}: prefill request {r}: cached_tokens={c} > computed_before={n0}")
    if d is not None:
        n = len(d.req_ids)
        if len(d.computed_before) != n or (d.draft_tokens is None) != (d.accepted_tokens is None) or (
                d.draft_tokens is not None and not (len(d.draft_tokens) == len(d.accepted_tokens) == n)):
            raise RecordError(f"step {rec.step}: decode batch columns differ in length (or drafts without accepted)")
        if d.delivered_tokens is not None and len(d.delivered_tokens) != n:
            raise RecordError(f"step {rec.step}: decode batch delivered_tokens has {len(d.delivered_tokens)} "
                              f"entries for {n} requests")
        if d.draft_tokens is not None:
            for r, k, a in zip(d.req_ids, d.draft_tokens, d.accepted_tokens):
                if a > k:
                    raise RecordError(f"step {rec.step}: decode request {r}: accepted_tokens={a} > draft_tokens={k}")
    kv = rec.kv
    if kv is not None and not (len(kv.req_ids) == len(kv.local_cached) == len(kv.received)):
        raise RecordError(f"step {rec.step}: kv columns differ in length")
    return rec


def check_record(rec: IterationRecord) -> IterationRecord:
    """Bounds (msgspec validates them only when decoding) and cross-field rules of a whole record."""
    try:
        rec = msgspec.convert(msgspec.to_builtins(rec), IterationRecord)
    except msgspec.ValidationError as exc:
        raise RecordError(f"step {rec.step}: {exc}") from None
    return _check_rules(rec)


_decoder = msgspec.json.Decoder(IterationRecord)
_encoder = msgspec.json.Encoder()


def decode_record(line: str | bytes) -> IterationRecord:
    """One JSON line of a trace → a checked IterationRecord; RecordError says what is wrong."""
    try:
        rec = _decoder.decode(line)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise RecordError(str(exc)) from None
    return _check_rules(rec)


def encode_record(rec: IterationRecord) -> bytes:
    """The record as one JSON object (the trace line format)."""
    return _encoder.encode(rec)
