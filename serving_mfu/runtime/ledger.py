"""Every request's state between steps, in one place: the hook's `RequestLedger`.

Storage is columnar, as vLLM's InputBatch keeps its requests: numpy arrays indexed by a slot, one dict
from request id to slot, and a free list of slots that finished requests gave back.  The few requests in
a sparse state (still in their prompt, recomputing) are also kept as small sets of ids, because a step
asks "which of them are scheduled?" and iterating a handful of ids beats scanning a column.

A request's *high-water mark* is how many of its positions were computed and kept so far (DESIGN §4):
recomputing below it is waste, computing past it is new work.  Three things give it, and the mark is
their maximum, so a decode batch needs one column write per step (no per-request Python):

- `mark`: set explicitly by a chunk of a prompt, a verified draft step (n0 + 1 + accepted) or a general
  slice;
- `last_n0`: the n0 of the request's last plain decode (that step kept n0 + 1 positions);
- `prompt_len`, once the request is no longer in its prompt.

The cost columns for per-request attribution (DESIGN §12) live here too, beside the state they follow.
Nothing here imports vLLM; the hook reads vLLM's objects and calls the named operations.
"""

from __future__ import annotations

from itertools import compress, repeat
from typing import Collection, Iterable, Sequence

import numpy as np

_NO_ADAPTER = -1
DEFAULT_CAPACITY = 1024  # slots when the engine's max_num_seqs is unknown (the ledger grows past it if needed)

#: The cost columns (DESIGN §12): float sums, then token counts; each request's totals since it was admitted.
COST_COLUMNS = ("useful_flops", "executed_flops", "prefill_device_s", "decode_device_s")
TOKEN_COLUMNS = ("output_tokens", "draft_tokens", "accepted_tokens", "cached_tokens", "received_tokens")


class RequestLedger:
    """All per-request state of one engine, by slot: admit, advance, accept, hold, mark, finish, high-water mark."""

    __slots__ = ("slot_of", "_free", "_n_free", "prompt_len", "mark", "last_n0", "adapter", "prefilling", "recomputing",
                 "adapters_in_flight", "_cache_ids", "_cache_slots", "tenant", "costs", "tokens", "first_at", "last_at")

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        self.slot_of: dict[str, int] = {}
        # the free slots, a stack: _free[:_n_free], taken from the top (low slots first in a fresh ledger)
        self._free = np.arange(capacity - 1, -1, -1, dtype=np.intp)
        self._n_free = capacity
        self.prompt_len = np.zeros(capacity, np.int64)
        self.mark = np.zeros(capacity, np.int64)  # explicit high-water mark
        self.last_n0 = np.full(capacity, -1, np.int64)  # n0 of the last plain decode (-1: none)
        self.adapter = np.full(capacity, _NO_ADAPTER, np.int32)  # LoRA adapter key (vLLM's lora_int_id)
        self.prefilling: set[str] = set()  # still in their prompt, with an explicit mark
        self.recomputing: set[str] = set()  # below their mark again (preempted, recomputed)
        self.adapters_in_flight = 0  # requests with an adapter, so that a step without any skips LoRA
        self._cache_ids: list[str] | None = None  # the last list `slots` resolved, and its slots
        self._cache_slots = np.zeros(0, np.intp)
        # attribution (DESIGN §12): tenant label, cost sums (COST_COLUMNS), token counts (TOKEN_COLUMNS), and
        # the first and last step's end (0: not run yet)
        self.tenant = np.zeros(capacity, np.int32)
        self.costs = np.zeros((len(COST_COLUMNS), capacity), np.float64)
        self.tokens = np.zeros((len(TOKEN_COLUMNS), capacity), np.int64)
        self.first_at = np.zeros(capacity, np.float64)
        self.last_at = np.zeros(capacity, np.float64)

    # ------------------------------------------------------------------ slots
    def __len__(self) -> int:
        return len(self.slot_of)

    def __contains__(self, rid: str) -> bool:
        return rid in self.slot_of

    def any_known(self, ids: Iterable[str]) -> bool:
        """Whether any of `ids` was admitted and has not finished."""
        return not self.slot_of.keys().isdisjoint(ids)

    def slots(self, ids: list[str]) -> np.ndarray:
        """The slots of `ids` (those not admitted are admitted, prompt unknown).  The last answer is kept: a
        decode batch that did not change since the previous step (the usual case) costs one list comparison,
        as vLLM's persistent batch."""
        if ids == self._cache_ids:
            return self._cache_slots
        try:
            slots = np.fromiter(map(self.slot_of.__getitem__, ids), np.intp, len(ids))
        except KeyError:  # requests scheduled before the hook saw them: admitted now, prompt unknown (0)
            unknown = [r for r in dict.fromkeys(ids) if r not in self.slot_of]
            self.admit(unknown, [0] * len(unknown))
            slots = np.fromiter(map(self.slot_of.__getitem__, ids), np.intp, len(ids))
        self._cache_ids, self._cache_slots = list(ids), slots  # a copy: the caller may reuse its list
        return slots

    def _grow(self, need: int) -> None:
        old = len(self.prompt_len)
        new = max(2 * old, old + need)
        free = np.empty(new, np.intp)
        free[:new - old] = np.arange(new - 1, old - 1, -1)  # below the free slots left, so they go first
        free[new - old:new - old + self._n_free] = self._free[:self._n_free]
        self._free, self._n_free = free, self._n_free + new - old
        self.prompt_len = np.concatenate([self.prompt_len, np.zeros(new - old, np.int64)])
        self.mark = np.concatenate([self.mark, np.zeros(new - old, np.int64)])
        self.last_n0 = np.concatenate([self.last_n0, np.full(new - old, -1, np.int64)])
        self.adapter = np.concatenate([self.adapter, np.full(new - old, _NO_ADAPTER, np.int32)])
        self.tenant = np.concatenate([self.tenant, np.zeros(new - old, np.int32)])
        self.costs = np.concatenate([self.costs, np.zeros((len(COST_COLUMNS), new - old))], axis=1)
        self.tokens = np.concatenate([self.tokens, np.zeros((len(TOKEN_COLUMNS), new - old), np.int64)], axis=1)
        self.first_at = np.concatenate([self.first_at, np.zeros(new - old)])
        self.last_at = np.concatenate([self.last_at, np.zeros(new - old)])

    # ------------------------------------------------------------------ named operations
    def admit(self, ids: Sequence[str], prompt_lens: Sequence[int] | np.ndarray) -> np.ndarray:
        """New requests (none known), with their prompts' lengths: each takes a free slot (returned)."""
        n = len(ids)
        if n > self._n_free:
            self._grow(n - self._n_free)
        top = self._n_free
        idx = self._free[top - n:top][::-1].copy()
        self._n_free = top - n
        self.slot_of.update(zip(ids, idx.tolist()))
        self.prompt_len[idx] = prompt_lens
        self.mark[idx] = 0
        self.last_n0[idx] = -1
        self.tenant[idx] = 0
        self.adapter[idx] = _NO_ADAPTER
        for row in (*self.costs, *self.tokens, self.last_at):  # 1-D writes: the cheapest
            row[idx] = 0
        self.first_at[idx] = np.inf  # not run yet (a minimum)
        self._cache_ids, self._cache_slots = list(ids), idx  # the step's prefill batch asks for them next
        return idx

    def admit_one(self, rid: str, prompt_len: int) -> None:
        """One request, new or seen before (a resumed request under Model Runner V2 comes again as new):
        a known one keeps its marks and takes the new prompt length."""
        slot = self.slot_of.get(rid)
        if slot is None:
            self.admit([rid], [prompt_len])
        else:
            self.prompt_len[slot] = prompt_len

    def finish(self, ids: Collection[str], keep: bool = False) -> tuple[list[str], np.ndarray]:
        """Requests vLLM finished: their slots go back to the free list (with `keep`, only at `release`: their
        columns stay theirs meanwhile, while the ids are already gone).  Returns those it held and their slots,
        whose columns stay readable until the next `admit` (it resets them)."""
        ids = list(ids)
        slots = np.fromiter(map(self.slot_of.pop, ids, repeat(-1)), np.intp, len(ids))
        if not len(slots):
            return [], slots
        if slots.min() < 0:  # some were not held
            held = slots >= 0
            ids, slots = list(compress(ids, held.tolist())), slots[held]
            if not len(slots):
                return [], slots
        if self.adapters_in_flight:  # the column itself stays readable until the slot is admitted again
            self.adapters_in_flight -= int((self.adapter[slots] != _NO_ADAPTER).sum())
        if not keep:
            self.release(slots)
        if self.prefilling:
            self.prefilling.difference_update(ids)
        if self.recomputing:
            self.recomputing.difference_update(ids)
        self._cache_ids = None
        return ids, slots

    def release(self, slots: np.ndarray) -> None:
        """Slots that `finish` kept, back to the free list."""
        self._free[self._n_free:self._n_free + len(slots)] = slots
        self._n_free += len(slots)

    def advance(self, ids: list[str], n0s: Sequence[int]) -> None:
        """A plain decode of each of `ids` from its n0 (one position computed and kept)."""
        if ids:
            self.last_n0[self.slots(ids)] = n0s

    def accept(self, ids: list[str], kept_ends: Sequence[int]) -> None:
        """A verified draft step of each of `ids`: positions up to its kept end (n0 + 1 + accepted) are kept."""
        if ids:
            self.mark[self.slots(ids)] = kept_ends

    def hold(self, ids: Sequence[str], ends: Sequence[int]) -> None:
        """Prompts still incomplete after this step's chunk: their mark is the chunk's end."""
        self.mark[self.slots(list(ids))] = ends
        self.prefilling.update(ids)

    def prompts_done(self, ids: Iterable[str]) -> None:
        """Prompts this step completed: from now on their mark is at least their prompt's length."""
        self.prefilling.difference_update(ids)

    def set_mark(self, rid: str, mark: int, kept_end: int, prompt_len: int) -> None:
        """A general slice kept positions up to `kept_end` and left the request's mark at `mark`: it is still
        in its prompt while `kept_end` < prompt, recomputing while `kept_end` < `mark`.  A request not known
        (the hook started after it) is admitted with `prompt_len`."""
        slot = self.slot_of.get(rid)
        if slot is None:
            self.admit([rid], [prompt_len])
            slot = self.slot_of[rid]
        self.mark[slot] = mark
        (self.recomputing.add if kept_end < mark else self.recomputing.discard)(rid)
        (self.prefilling.add if kept_end < self.prompt_len[slot] else self.prefilling.discard)(rid)

    def high_water_mark(self, rid: str) -> int:
        """Positions of `rid` computed and kept so far (0 for a request not known): the max of its explicit
        mark, its last plain decode's n0 + 1, and, once no longer in its prompt, its prompt's length."""
        slot = self.slot_of.get(rid)
        if slot is None:
            return 0
        mark = max(int(self.mark[slot]), int(self.last_n0[slot]) + 1)
        if rid not in self.prefilling:
            mark = max(mark, int(self.prompt_len[slot]))
        return mark

    def prompt_of(self, rid: str, default: int = 0) -> int:
        """The prompt length of `rid` (`default` for a request not known)."""
        slot = self.slot_of.get(rid)
        return default if slot is None else int(self.prompt_len[slot])

    # ------------------------------------------------------------------ LoRA
    def set_adapter(self, rid: str, key: int) -> None:
        """`rid` (admitted) runs with the LoRA adapter `key`."""
        slot = self.slot_of[rid]
        if self.adapter[slot] == _NO_ADAPTER:
            self.adapters_in_flight += 1
        self.adapter[slot] = key

    def adapters(self, ids: list[str]) -> np.ndarray:
        """The adapter key of each of `ids` (-1: the base model); unknown ids have none."""
        slot_of = self.slot_of
        known = [slot_of.get(r, -1) for r in ids]
        idx = np.asarray(known, np.intp)
        keys = self.adapter[idx] if len(idx) else np.zeros(0, np.int32)
        return np.where(idx >= 0, keys, _NO_ADAPTER)
