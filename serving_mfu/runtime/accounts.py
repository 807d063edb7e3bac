"""Per-request and per-tenant accounts of one engine (DESIGN §12): the state beside the tracker's totals.

At admission a request gets its tenant label; after the tracker costs each step, `charge` notes it, and
`settle` adds each request's share of the noted steps (serving_mfu.cost.attribution, all at once: the
array work's fixed cost is paid once per settle, not per step) to the request's columns in the ledger and
to its tenant's sums; when vLLM reports requests finished, `finish` notes them and the next settle closes
them: their columns (a `FinishedRequests` batch) go to the request log and the trace.  Runs on the
accounting thread; nothing here imports vLLM.
"""

from __future__ import annotations

from itertools import chain
from typing import Any, Callable, Sequence

import numpy as np

from serving_mfu.cost.accounting import CostModel
from serving_mfu.cost.attribution import StepShares, attribute_parts, decode_runs, plain_decode
from serving_mfu.cost.columns import int_array
from serving_mfu.cost.counters import IterationCost
from serving_mfu.cost.records import IterationRecord
from serving_mfu.runtime.ledger import COST_COLUMNS, TOKEN_COLUMNS, RequestLedger
from serving_mfu.runtime.tenants import TenantTable
from serving_mfu.schema.requests import FinishedRequests

_USEFUL, _EXECUTED, _PREFILL_S, _DECODE_S = range(len(COST_COLUMNS))
_OUT, _DRAFTS, _ACCEPTED, _CACHED, _RECEIVED = range(len(TOKEN_COLUMNS))
# The accounts settle (charge the noted steps together, then close the finished requests) when any of these is
# reached, and before every publish (about every 0.5 s): a settle's cost is mostly fixed — its code and data are
# cold by then — so fewer, larger settles cost less; the finished requests waiting keep their ledger slots, which
# `ledger_slots` provides for.
SETTLE_ROWS = 32 * 1024  # rows noted
SETTLE_STEPS = 256  # steps noted
SETTLE_FINISHED = 4096  # finished requests waiting to close


def ledger_slots(in_flight: int) -> int:
    """The ledger slots an engine of `in_flight` requests at most needs with attribution on: those in flight and
    those finished but not yet closed (their slots are freed when they close), so that it never grows."""
    return in_flight + SETTLE_FINISHED


def _columns(record: IterationRecord) -> list:
    """The record's integer columns the attribution reads."""
    out = []
    if record.prefill is not None:
        b = record.prefill
        out += [b.new_tokens, b.computed_before, b.prompt_len, b.cached_tokens]
    if record.decode is not None:
        d = record.decode
        out += [d.computed_before, d.draft_tokens, d.accepted_tokens, d.delivered_tokens]
    return [c for c in out if c is not None]


def _runs(pending: list) -> list[list]:
    """The rows of the noted steps (in attribute_steps' order: every step's slices, then its prefill batch,
    then its decode batch) as runs of consecutive steps with the same slots array — an unchanged batch, which
    the ledger hands back as the same array: [slots, first row, steps, rows per step, first step, last step]."""
    runs: list[list] = []
    start = 0
    for part in range(3):
        run = None
        for s, (_, _, parts, _, _) in enumerate(pending):
            slots = parts[part]
            if slots is None or not len(slots):
                continue
            if run is not None and slots is run[0]:
                run[2] += 1
                run[5] = s
            else:
                run = [slots, start, 1, len(slots), s, s]
                runs.append(run)
            start += len(slots)
    return runs


class _Piece:
    """Rows a settle adds to the ledger: their slots, their values by column (COST_COLUMNS floats, then
    TOKEN_COLUMNS counts; None: zeros), and each row's first and last step end (arrays, or one for all)."""

    __slots__ = ("slots", "columns", "first_s", "last_s")

    def __init__(self, slots: np.ndarray, columns: list, first_s: Any, last_s: Any):
        self.slots, self.columns, self.first_s, self.last_s = slots, columns, first_s, last_s

    @classmethod
    def pieces(cls, b: StepShares, runs: list[list], start: int, t_end: np.ndarray) -> list["_Piece"]:
        """Shares `b` (rows from `start` on, in `runs`: _runs) as the ledger's columns; columns all zero in the
        block are left out.  Rows as they are where no batch stayed unchanged, else each unchanged batch's
        rows summed over its steps first."""
        if not runs:  # no request rows (every batch empty)
            return []
        columns = [v if v.any() else None for v in (
            b.useful_flops, b.executed_flops, b.prefill_device_s, b.decode_device_s, b.delivered_tokens,
            b.draft_tokens, b.accepted_tokens, b.cached_tokens, b.received_tokens)]
        if all(k == 1 for _, _, k, _, _, _ in runs):
            at = b.groups.spread(t_end)
            return [cls(runs[0][0] if len(runs) == 1 else np.concatenate([r[0] for r in runs]), columns, at, at)]
        out = []
        for slots, first_row, k, n, first, last in runs:
            rows = slice(first_row - start, first_row - start + k * n)
            out.append(cls(slots, [None if v is None else v[rows] if k == 1 else v[rows].reshape(k, n).sum(axis=0)
                                   for v in columns], float(t_end[first]), float(t_end[last])))
        return out


_N_FLOATS = len(COST_COLUMNS)


class RequestAccounts:
    """What each request in flight has cost so far, and each tenant label in total."""

    def __init__(self, ledger: RequestLedger, tenants: TenantTable, model: CostModel, devices: int,
                 peak_flops_per_s: float | None, bandwidth_bytes_per_s: float | None, engine_id: str,
                 wall_offset_s: float, sinks: Sequence[Callable[[FinishedRequests], Any]] = (),
                 adapter_names: dict[int, str] | None = None, settle_steps: int = SETTLE_STEPS,
                 settle_rows: int = SETTLE_ROWS, settle_finished: int = SETTLE_FINISHED):
        self.ledger = ledger
        self.tenants = tenants
        self.model = model
        self.devices = devices
        self.peak, self.bandwidth = peak_flops_per_s, bandwidth_bytes_per_s  # the engine's totals
        self.engine_id = engine_id
        self.wall_offset_s = wall_offset_s  # wall-clock seconds = the hook's clock + this
        self.sinks = list(sinks)  # where finished requests go (the request log, the trace)
        self.adapter_names = adapter_names if adapter_names is not None else {}
        self.settle_steps, self.settle_rows, self.settle_finished = settle_steps, settle_rows, settle_finished
        self._pending: list[tuple[IterationRecord, IterationCost, tuple, Any, float]] = []
        self._rows = 0  # rows noted since the last settle
        self._finishing: list[tuple[list[str], np.ndarray]] = []  # finished: their ids and kept slots
        self._n_finishing = 0

    def open(self, ids: list[str], declared: Sequence[str] | str, slots: np.ndarray | None = None) -> None:
        """Requests just admitted (at `slots`, if known), with the tenant each declared (one for all, or one
        each): their label, and their prompts added to their tenants' prompt tokens."""
        led = self.ledger
        if slots is None:
            slots = led.slots(ids)
        if isinstance(declared, str):  # one label for all: one write, one sum
            label = self.tenants.label_of(declared)
            led.tenant[slots] = label
            self.tenants.add(label, (0.0, 0.0, 0.0, led.prompt_len[slots], 0.0))
            return
        labels = np.fromiter(map(self.tenants.label_of, declared), np.int32, len(ids))
        led.tenant[slots] = labels
        prompts = led.prompt_len[slots].astype(np.float64)
        self.tenants.accrue(labels, (0.0, 0.0, 0.0, prompts, 0.0))

    def charge(self, record: IterationRecord, cost: IterationCost) -> None:
        """Note a costed step; its shares are added when the accounts settle (SETTLE_ROWS rows or SETTLE_STEPS
        steps noted, and before every publish).  The step's slots are taken now (cheap: the ledger keeps the
        last batch's)."""
        led = self.ledger
        parts = (led.slots([s.req_id for s in record.slices]) if record.slices else None,
                 led.slots(record.prefill.req_ids) if record.prefill is not None else None,
                 led.slots(record.decode.req_ids) if record.decode is not None else None)
        for column in _columns(record):  # converted now, while the costing's conversion is still at hand
            int_array(column)
        # what a settle reads of the step, taken while its objects are at hand: as a step of a decode run (or
        # None), and its end on the wall clock
        plain = plain_decode(record, cost) if parts[0] is None and parts[1] is None else None
        self._pending.append((record, cost, parts, plain, record.t_end_s + self.wall_offset_s))
        for p in parts:
            if p is not None:
                self._rows += len(p)
        if self._rows >= self.settle_rows or len(self._pending) >= self.settle_steps:
            self.settle()

    def finish(self, ids: Any) -> None:
        """Requests vLLM finished: they leave the ledger's ids now, and are closed (their slots freed) when the
        accounts settle, after their last steps are charged."""
        ids, slots = self.ledger.finish(ids, keep=True)
        if ids:
            self._finishing.append((ids, slots))
            self._n_finishing += len(ids)
        if len(self._pending) == 0 or self._n_finishing >= self.settle_finished:
            self.settle()

    def settle(self) -> None:
        """Charge every noted step (serving_mfu.cost.attribution, all at once), then close the finished
        requests.  On the accounting thread only."""
        if self._pending:
            pending, self._pending, self._rows = self._pending, [], 0
            self._charge_all(pending)
        if self._finishing:
            finishing, self._finishing, self._n_finishing = self._finishing, [], 0
            ids = finishing[0][0] if len(finishing) == 1 else list(chain.from_iterable(x for x, _ in finishing))
            slots = finishing[0][1] if len(finishing) == 1 else np.concatenate([x for _, x in finishing])
            self.close(ids, slots)
            self.ledger.release(slots)

    def _charge_all(self, pending: list) -> None:
        """The noted steps' shares, as pieces added to the ledger together (`_add`)."""
        pieces: list[_Piece] = []
        pending = self._decode_runs(pending, pieces)
        blocks = attribute_parts([(r, c) for r, c, _, _, _ in pending], self.model, self.devices, self.peak,
                                 self.bandwidth) if pending else []
        if blocks:
            t_end = np.fromiter((t for _, _, _, _, t in pending), np.float64, len(pending))
            runs = _runs(pending)
            start = 0
            for b in blocks:  # runs never cross blocks: a block holds whole parts
                end = start + len(b.useful_flops)
                pieces += _Piece.pieces(b, [r for r in runs if start <= r[1] < end], start, t_end)
                start = end
        if pieces:
            self._add(pieces)

    def _decode_runs(self, pending: list, pieces: list[_Piece]) -> list:
        """Runs of ≥ 2 steps of only the same decode batch, charged in closed form (attribution.decode_runs, all
        at once) as one piece; returns the steps left to attribute row by row, in order."""
        segments: list[tuple[int, int]] = []  # [i, j): plain decode steps of one batch, or one other step
        i = 0
        while i < len(pending):
            slots = pending[i][2][2]
            j = i + 1
            if pending[i][3] is not None:
                while j < len(pending) and pending[j][2][2] is slots and pending[j][3] is not None:
                    j += 1
            segments.append((i, j))
            i = j
        runs = [(i, j) for i, j in segments if j - i >= 2]
        if not runs:
            return pending
        shares = decode_runs([[p[3] for p in pending[i:j]] for i, j in runs], self.model, self.devices,
                             self.peak, self.bandwidth)
        taken = {i: j for (i, j), good in zip(runs, shares.taken) if good}
        if not taken:
            return pending
        slots = [pending[i][2][2] for i in taken]
        sizes = [len(x) for x in slots]
        first = np.repeat([pending[i][4] for i in taken], sizes)
        last = np.repeat([pending[j - 1][4] for j in taken.values()], sizes)
        pieces.append(_Piece(slots[0] if len(slots) == 1 else np.concatenate(slots),
                             [shares.useful_flops, shares.useful_flops, None, shares.decode_device_s,
                              shares.steps.astype(np.int64), None, None, None, None], first, last))
        return [step for i, j in segments if i not in taken for step in pending[i:j]]

    def _add(self, pieces: list[_Piece]) -> None:
        """The pieces' rows into the ledger's columns, each row's first and last step end, and the tenants'
        sums.  Piece by piece with unbuffered `ufunc.at` (a request may have several rows), which allocates
        nothing: joining the pieces first costs more in fresh memory than the calls it saves."""
        led, tenants = self.ledger, self.tenants
        for p in pieces:
            slots, columns = p.slots, p.columns
            for row in range(_N_FLOATS):
                if columns[row] is not None:
                    np.add.at(led.costs[row], slots, columns[row])
            for row in range(len(led.tokens)):
                if columns[_N_FLOATS + row] is not None:
                    np.add.at(led.tokens[row], slots, columns[_N_FLOATS + row])
            np.minimum.at(led.first_at, slots, p.first_s)
            np.maximum.at(led.last_at, slots, p.last_s)
            useful, executed, pre_s, dec_s, delivered = (v if v is not None else 0.0 for v in columns[:_N_FLOATS + 1])
            tenants.accrue_at(led.tenant, slots, (useful, executed, pre_s + dec_s, 0.0, delivered))

    def close(self, ids: list[str], slots: np.ndarray) -> FinishedRequests | None:
        """The columns of requests the ledger just finished (RequestLedger.finish: their ids and slots), handed
        to the sinks."""
        if not ids:
            return None
        led = self.ledger
        labels = led.tenant[slots]
        self.tenants.finished(labels)
        keys = led.adapter[slots]
        adapters: list[str] = []
        if (keys >= 0).any():  # adapter keys → indices into a list of names
            known = sorted(set(keys.tolist()) - {-1})
            adapters = [self.adapter_names.get(k, str(k)) for k in known]
            keys = np.searchsorted(np.array(known), keys).astype(np.int32)
            keys[led.adapter[slots] < 0] = -1
        c, t, n = led.costs, led.tokens, len(slots)
        ints, floats = np.empty((6, n), np.int64), np.empty((6, n), np.float64)  # INT_ and FLOAT_COLUMNS
        for out, column in zip(ints, (led.prompt_len, t[_CACHED], t[_RECEIVED], t[_OUT], t[_DRAFTS],
                                      t[_ACCEPTED])):
            np.take(column, slots, out=out)
        for out, column in zip(floats, (c[_USEFUL], c[_EXECUTED], c[_PREFILL_S], c[_DECODE_S], led.first_at,
                                        led.last_at)):
            np.take(column, slots, out=out)
        np.copyto(floats[4], 0.0, where=np.isinf(floats[4]))  # never run: no first step
        batch = FinishedRequests.pack(self.engine_id, ids, list(self.tenants.labels), labels, adapters, keys, ints,
                                      floats)
        for sink in self.sinks:
            sink(batch)
        return batch
