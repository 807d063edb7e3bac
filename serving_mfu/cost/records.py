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


class Slice(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=True):
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


class DrafterRecord(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=True):
    """The speculative drafter's work in this step: method and its modelled FLOPs and bytes."""

    method: str
    flops: NonNegFloat = 0.0
    bytes: NonNegFloat = 0.0
    proposed_tokens: NonNegInt = 0


class IterationRecord(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=True):
    """Everything the accounting needs about one engine step.

    `t_sched_s` is when `schedule()` returned this step and `t_end_s` when its output reached
    `update_from_output()` (monotonic seconds, one clock per engine).  `moe_routing`, when the
    engine can measure it, is tokens routed to each expert, one list per MoE layer.
    """

    step: NonNegInt
    t_sched_s: float
    t_end_s: float
    slices: list[Slice]
    drafter: DrafterRecord | None = None
    moe_routing: list[list[int]] | None = None
    engine: str = "0"


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
