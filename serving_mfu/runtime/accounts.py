"""Per-request and per-tenant accounts of one engine (DESIGN §12): the state beside the tracker's totals.

At admission a request gets its tenant label; after the tracker costs each step, `charge` adds each
request's share of it (serving_mfu.cost.attribution) to the request's columns in the ledger and to its
tenant's sums; when vLLM reports requests finished, `close` hands their columns (a `FinishedRequests` batch) to the
request log and the trace.  Runs on the accounting thread; nothing here imports vLLM.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from serving_mfu.cost.accounting import CostModel
from serving_mfu.cost.attribution import attribute
from serving_mfu.cost.counters import IterationCost
from serving_mfu.cost.records import IterationRecord
from serving_mfu.runtime.ledger import COST_COLUMNS, TOKEN_COLUMNS, RequestLedger
from serving_mfu.runtime.tenants import TenantTable
from serving_mfu.schema.requests import FinishedRequests

_USEFUL, _EXECUTED, _PREFILL_S, _DECODE_S = range(len(COST_COLUMNS))
_OUT, _DRAFTS, _ACCEPTED, _CACHED, _RECEIVED = range(len(TOKEN_COLUMNS))


class RequestAccounts:
    """What each request in flight has cost so far, and each tenant label in total."""

    def __init__(self, ledger: RequestLedger, tenants: TenantTable, model: CostModel, devices: int,
                 peak_flops_per_s: float | None, bandwidth_bytes_per_s: float | None, engine_id: str,
                 wall_offset_s: float, sinks: Sequence[Callable[[FinishedRequests], Any]] = (),
                 adapter_names: dict[int, str] | None = None):
        self.ledger = ledger
        self.tenants = tenants
        self.model = model
        self.devices = devices
        self.peak, self.bandwidth = peak_flops_per_s, bandwidth_bytes_per_s  # the engine's totals
        self.engine_id = engine_id
        self.wall_offset_s = wall_offset_s  # wall-clock seconds = the hook's clock + this
        self.sinks = list(sinks)  # where finished requests go (the request log, the trace)
        self.adapter_names = adapter_names if adapter_names is not None else {}

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
        """Add each request's share of a costed step to its columns and to its tenant's sums."""
        shares = attribute(record, cost, self.model, self.devices, self.peak, self.bandwidth)
        if shares is None:
            return
        led = self.ledger
        slots = led.slots(shares.ids)
        c, t = led.costs, led.tokens  # one row (a view) at a time: a 1-D scatter is the cheapest
        c[_USEFUL][slots] += shares.useful_flops
        c[_EXECUTED][slots] += shares.executed_flops
        if cost.prefill.time_s:
            c[_PREFILL_S][slots] += shares.prefill_device_s
        if cost.decode.time_s:
            c[_DECODE_S][slots] += shares.decode_device_s
        device_s = shares.prefill_device_s + shares.decode_device_s
        t[_OUT][slots] += shares.delivered_tokens
        if cost.draft_tokens:
            t[_DRAFTS][slots] += shares.draft_tokens
            t[_ACCEPTED][slots] += shares.accepted_tokens
        if cost.hit_tokens or record.kv is not None:
            t[_CACHED][slots] += shares.cached_tokens
            t[_RECEIVED][slots] += shares.received_tokens
        at = record.t_end_s + self.wall_offset_s
        first = led.first_at[slots]
        if not first.all():
            led.first_at[slots] = np.where(first == 0.0, at, first)
        led.last_at[slots] = at
        self.tenants.accrue(led.tenant[slots], (shares.useful_flops, shares.executed_flops, device_s, 0.0,
                                                shares.delivered_tokens.astype(np.float64)))

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
        floats = np.stack([c[_USEFUL][slots], c[_EXECUTED][slots], c[_PREFILL_S][slots], c[_DECODE_S][slots],
                           led.first_at[slots], led.last_at[slots]])
        batch = FinishedRequests.pack(self.engine_id, ids, list(self.tenants.labels), labels, adapters, keys, ints,
                                      floats)
        for sink in self.sinks:
            sink(batch)
        return batch
