"""Per-request and per-tenant accounts of one engine (DESIGN §12): the state beside the tracker's totals.

At admission a request gets its tenant label; after the tracker costs each step, `charge` notes it, and
`settle` adds each request's share of the noted steps (serving_mfu.cost.attribution, all at once: the
array work's fixed cost is paid once per settle, not per step) to the request's columns in the ledger and
to its tenant's sums; when vLLM reports requests finished, `finish` notes them and the next settle closes
them: their columns (a `FinishedRequests` batch) go to the request log and the trace.  Runs on the
accounting thread; nothing here imports vLLM.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from serving_mfu.cost.accounting import CostModel
from serving_mfu.cost.attribution import RunShares, StepShares, attribute_parts, decode_run, join_blocks
from serving_mfu.cost.columns import int_array
from serving_mfu.cost.counters import IterationCost
from serving_mfu.cost.records import IterationRecord
from serving_mfu.runtime.ledger import COST_COLUMNS, TOKEN_COLUMNS, RequestLedger
from serving_mfu.runtime.tenants import TenantTable
from serving_mfu.schema.requests import FinishedRequests

_USEFUL, _EXECUTED, _PREFILL_S, _DECODE_S = range(len(COST_COLUMNS))
_OUT, _DRAFTS, _ACCEPTED, _CACHED, _RECEIVED = range(len(TOKEN_COLUMNS))
# The accounts settle (charge the noted steps together, then close the finished requests) when any of these is
# reached, and before every publish: the array work's fixed cost is shared by enough rows (request × step), and
# finished requests, whose slots stay taken until they close, are few.
SETTLE_ROWS = 32 * 1024  # rows noted
SETTLE_STEPS = 256  # steps noted
SETTLE_FINISHED = 512  # finished requests waiting to close


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


_MIN_RUN_ROWS = 64  # rows per run at least, on average, for the runs' scatter (else one bincount per column)


def _runs(pending: list) -> list[list]:
    """The rows of the noted steps (in attribute_steps' order: every step's slices, then its prefill batch,
    then its decode batch) as runs of consecutive steps with the same slots array — an unchanged batch, which
    the ledger hands back as the same array: [slots, first row, steps, rows per step, first step, last step]."""
    runs: list[list] = []
    start = 0
    for part in range(3):
        run = None
        for s, (_, _, parts) in enumerate(pending):
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


class _Columns:
    """Shares as the ledger's columns take them: (row, values) for the cost sums and for the token counts that
    are not all zero, and the tenant sums' values."""

    __slots__ = ("floats", "ints", "tenant")

    def __init__(self, floats: tuple, ints: list, tenant: tuple):
        self.floats, self.ints, self.tenant = floats, ints, tenant

    @classmethod
    def of(cls, b: StepShares) -> "_Columns":
        return cls(((_USEFUL, b.useful_flops), (_EXECUTED, b.executed_flops), (_PREFILL_S, b.prefill_device_s),
                    (_DECODE_S, b.decode_device_s)),
                   [(row, values) for row, values in ((_OUT, b.delivered_tokens), (_DRAFTS, b.draft_tokens),
                                                      (_ACCEPTED, b.accepted_tokens), (_CACHED, b.cached_tokens),
                                                      (_RECEIVED, b.received_tokens)) if values.any()],
                   (b.useful_flops, b.executed_flops, b.prefill_device_s + b.decode_device_s, 0.0,
                    b.delivered_tokens))


def _summed(values: np.ndarray, rows: slice, k: int, n: int) -> np.ndarray:
    """A run's rows (k steps of the same n requests) summed over its steps: n values."""
    return values[rows] if k == 1 else values[rows].reshape(k, n).sum(axis=0)


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
        self._pending: list[tuple[IterationRecord, IterationCost, tuple]] = []
        self._rows = 0  # rows noted since the last settle
        self._finishing: list[str] = []

    def open(self, ids: list[str], declared: Sequence[str] | str, slots: np.ndarray | None = None) -> None:
        """Requests just admitted (at `slots`, if known), with the tenant each declared (one for all, or one
        each): their label, and their prompts added to their tenants' prompt tokens."""
        led = self.ledger
        if slots is None:
            slots = led.slots(ids)
        if isinstance(declared, str):
            labels = np.full(len(ids), self.tenants.label_of(declared), np.int32)
        else:
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
        self._pending.append((record, cost, parts))
        self._rows += sum(len(p) for p in parts if p is not None)
        if self._rows >= self.settle_rows or len(self._pending) >= self.settle_steps:
            self.settle()

    def finish(self, ids: Any) -> None:
        """Requests vLLM finished: closed (and their slots freed) when the accounts settle, after their last
        steps are charged."""
        self._finishing.extend(ids)
        if len(self._pending) == 0 or len(self._finishing) >= self.settle_finished:
            self.settle()

    def settle(self) -> None:
        """Charge every noted step (serving_mfu.cost.attribution, all at once), then close the finished
        requests.  On the accounting thread only."""
        if self._pending:
            pending, self._pending, self._rows = self._pending, [], 0
            self._charge_all(pending)
        if self._finishing:
            finishing, self._finishing = self._finishing, []
            self.close(*self.ledger.finish(finishing))

    def _charge_all(self, pending: list) -> None:
        pending = self._decode_runs(pending)
        if not pending:
            return
        blocks = attribute_parts([(r, c) for r, c, _ in pending], self.model, self.devices, self.peak,
                                 self.bandwidth)
        if not blocks:
            return
        t_end = [r.t_end_s + self.wall_offset_s for r, _, _ in pending]
        runs = _runs(pending)
        if len(runs) * _MIN_RUN_ROWS > sum(len(b.useful_flops) for b in blocks):  # batches that keep changing
            shares = join_blocks(blocks)
            slots = np.concatenate([parts[k] for k in range(3) for _, _, parts in pending if parts[k] is not None])
            at = np.asarray(t_end)[shares.step]
            self._add_rows(slots, _Columns.of(shares), at, at)
            return
        start = 0
        for b in blocks:  # runs never cross blocks: a block holds whole parts
            end = start + len(b.useful_flops)
            cols = _Columns.of(b)
            for slots, first_row, k, n, first, last in runs:
                if start <= first_row < end:
                    self._add_run(slots, slice(first_row - start, first_row - start + k * n), k, n, cols,
                                  t_end[first], t_end[last])
            start = end

    def _decode_runs(self, pending: list) -> list:
        """Runs of ≥ 2 steps of only the same decode batch, charged in closed form (attribution.decode_run),
        all of them with one scatter per column; returns the steps left to attribute row by row."""
        rest: list = []
        done: list[tuple[np.ndarray, RunShares, float, float]] = []
        i = 0
        while i < len(pending):
            slots = pending[i][2][2]
            j = i + 1
            if slots is not None and pending[i][2][0] is None and pending[i][2][1] is None:
                while j < len(pending) and pending[j][2][2] is slots and pending[j][2][0] is None and \
                        pending[j][2][1] is None:
                    j += 1
            run = decode_run([(r, c) for r, c, _ in pending[i:j]], self.model, self.devices, self.peak,
                             self.bandwidth) if j - i >= 2 else None
            if run is None:
                rest.extend(pending[i:j])
            else:
                done.append((slots, run, pending[i][0].t_end_s + self.wall_offset_s,
                             pending[j - 1][0].t_end_s + self.wall_offset_s))
            i = j
        if done:
            self._add_decode_runs(done)
        return rest

    def _add_decode_runs(self, done: list[tuple[np.ndarray, RunShares, float, float]]) -> None:
        """The runs' per-request sums into the ledger's columns and the tenants' (a request may be in several
        runs: `_add_rows`)."""
        sizes = [len(s) for s, _, _, _ in done]
        useful = np.concatenate([r.useful_flops for _, r, _, _ in done])
        device_s = np.concatenate([r.decode_device_s for _, r, _, _ in done])
        delivered = np.repeat(np.array([r.steps for _, r, _, _ in done], np.float64), sizes)
        cols = _Columns(((_USEFUL, useful), (_EXECUTED, useful), (_DECODE_S, device_s)), [(_OUT, delivered)],
                        (useful, useful, device_s, 0.0, delivered))
        self._add_rows(np.concatenate([s for s, _, _, _ in done]), cols,
                       np.repeat([first for _, _, first, _ in done], sizes),
                       np.repeat([last for _, _, _, last in done], sizes))

    def _add_run(self, slots: np.ndarray, rows: slice, k: int, n: int, cols: "_Columns", first_s: float,
                 last_s: float) -> None:
        """A run of k steps of the same n requests: its rows summed over the steps, added once to its slots."""
        led = self.ledger
        c, t = led.costs, led.tokens
        for row, values in cols.floats:
            c[row][slots] += _summed(values, rows, k, n)
        for row, values in cols.ints:
            t[row][slots] += _summed(values, rows, k, n)
        led.first_at[slots] = np.minimum(led.first_at[slots], first_s)
        led.last_at[slots] = np.maximum(led.last_at[slots], last_s)
        self.tenants.accrue(led.tenant[slots], [_summed(v, rows, k, n) if isinstance(v, np.ndarray) else v
                                                for v in cols.tenant])

    def _add_rows(self, slots: np.ndarray, cols: "_Columns", first_s: np.ndarray, last_s: np.ndarray) -> None:
        """Row by row (a request may have several rows): one `bincount` per column; each row's first and last
        step end."""
        led = self.ledger
        n = len(led.prompt_len)
        c, t = led.costs, led.tokens
        for row, values in cols.floats:
            c[row] += np.bincount(slots, values, minlength=n)
        for row, values in cols.ints:
            t[row] += np.bincount(slots, values, minlength=n).astype(np.int64)
        np.minimum.at(led.first_at, slots, first_s)
        np.maximum.at(led.last_at, slots, last_s)
        self.tenants.accrue(led.tenant[slots], cols.tenant)

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
        c, t = led.costs, led.tokens
        ints = np.stack([led.prompt_len[slots], t[_CACHED][slots], t[_RECEIVED][slots], t[_OUT][slots],
                         t[_DRAFTS][slots], t[_ACCEPTED][slots]])
        first = led.first_at[slots]
        floats = np.stack([c[_USEFUL][slots], c[_EXECUTED][slots], c[_PREFILL_S][slots], c[_DECODE_S][slots],
                           np.where(np.isfinite(first), first, 0.0), led.last_at[slots]])
        batch = FinishedRequests.pack(self.engine_id, ids, list(self.tenants.labels), labels, adapters, keys, ints,
                                      floats)
        for sink in self.sinks:
            sink(batch)
        return batch
