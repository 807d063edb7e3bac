"""The wire and trace format: one `IterationRecord` per engine step (pydantic, JSONL in traces)."""

from __future__ import annotations

from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Slice(BaseModel):
    """One request's share of an iteration: `new_tokens` positions after `computed_before`.

    `hwm` is how many positions of this request were computed *and kept* before this step:
    positions below it are recomputation (after preemption).  `cached_tokens` are the
    prefix-cache hits credited on this slice (its first schedule).  `draft_tokens` are the
    speculative positions verified in this slice and `accepted_tokens` how many were kept.
    `delivered_tokens`, when known, is how many tokens the slice actually delivered.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    req_id: str
    new_tokens: int = Field(ge=0)
    computed_before: int = Field(ge=0)
    prompt_len: int = Field(ge=1)
    hwm: int = Field(default=0, ge=0)
    cached_tokens: int = Field(default=0, ge=0)
    draft_tokens: int = Field(default=0, ge=0)
    accepted_tokens: int = Field(default=0, ge=0)
    delivered_tokens: int | None = Field(
        default=None, ge=0,
        description="tokens this slice delivered to the user; fewer than its kept decode positions when a "
                    "stop token or max_tokens cut a verify step short (None: all delivered)")

    @model_validator(mode="after")
    def _consistent(self) -> "Slice":
        if self.accepted_tokens > self.draft_tokens:
            raise ValueError(
                f"request {self.req_id}: accepted_tokens={self.accepted_tokens} > draft_tokens={self.draft_tokens}"
            )
        if self.cached_tokens > self.computed_before:
            raise ValueError(
                f"request {self.req_id}: cached_tokens={self.cached_tokens} > computed_before={self.computed_before}"
            )
        if self.draft_tokens:
            end = self.computed_before + self.new_tokens
            decode_positions = end - max(self.computed_before, self.hwm, self.prompt_len)
            if decode_positions < self.draft_tokens + 1:
                raise ValueError(
                    f"request {self.req_id}: {self.draft_tokens} draft tokens need at least "
                    f"{self.draft_tokens + 1} decode positions in the slice, it has {max(decode_positions, 0)}"
                )
        return self


class DrafterRecord(BaseModel):
    """The speculative drafter's work in this step: method and its modelled FLOPs and bytes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str
    flops: float = Field(default=0.0, ge=0)
    bytes: float = Field(default=0.0, ge=0)
    proposed_tokens: int = Field(default=0, ge=0)


class IterationRecord(BaseModel):
    """Everything the accounting needs about one engine step.

    `t_sched_s` is when `schedule()` returned this step and `t_end_s` when its output reached
    `update_from_output()` (monotonic seconds, one clock per engine).  `moe_routing`, when the
    engine can measure it, is tokens routed to each expert, one list per MoE layer.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    step: int = Field(ge=0)
    t_sched_s: float
    t_end_s: float
    slices: list[Slice]
    drafter: DrafterRecord | None = None
    moe_routing: list[list[int]] | None = None
    engine: str = "0"

    @model_validator(mode="after")
    def _times(self) -> "IterationRecord":
        if self.t_end_s < self.t_sched_s:
            raise ValueError(f"step {self.step}: t_end_s={self.t_end_s} is before t_sched_s={self.t_sched_s}")
        return self


class FastSlice(NamedTuple):
    """`Slice` without validation, for the engine's hot path (same fields, same order, same meaning).

    The engine hook builds plain tuples in this field order (cheaper still); the accounting
    unpacks either."""

    req_id: str
    new_tokens: int
    computed_before: int
    prompt_len: int
    hwm: int = 0
    cached_tokens: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    delivered_tokens: int | None = None


class FastRecord(NamedTuple):
    """`IterationRecord` without validation, built by the engine hook; `validated()` for traces."""

    step: int
    t_sched_s: float
    t_end_s: float
    slices: list[FastSlice]
    drafter: DrafterRecord | None = None
    moe_routing: list[list[int]] | None = None
    engine: str = "0"

    def validated(self) -> IterationRecord:
        return IterationRecord(step=self.step, t_sched_s=self.t_sched_s, t_end_s=self.t_end_s,
                               slices=[Slice(**FastSlice(*s)._asdict()) for s in self.slices],
                               drafter=self.drafter, moe_routing=self.moe_routing, engine=self.engine)


def slice_tuples(slices: list) -> list:
    """The slices as tuples in `FastSlice` order (the engine's records already are)."""
    if slices and not isinstance(slices[0], tuple):
        return [(s.req_id, s.new_tokens, s.computed_before, s.prompt_len, s.hwm, s.cached_tokens, s.draft_tokens,
                 s.accepted_tokens, s.delivered_tokens) for s in slices]
    return slices
