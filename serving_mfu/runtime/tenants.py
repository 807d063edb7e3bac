"""One engine's per-tenant sums, under bounded, counter-safe labels (DESIGN §12).

A tenant that has its own label keeps it for the engine's life, so no Prometheus series ever goes down:
the first `max_tenants` distinct tenants get one each, later ones share `other`.  A pinned list
(SERVING_MFU_TENANTS) gives exactly those labels, in every engine of a fleet alike; every other tenant is
`other`.  Labels are sanitised (serving_mfu.schema.requests.sanitize_tenant).  The sums are accrued at
every step, so a rate over any window is exact, not only at a request's end.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from serving_mfu.schema.requests import OTHER_TENANT, TENANT_COUNTERS, TenantTotals, sanitize_tenant


class TenantTable:
    """Labels by index, and each label's cumulative sums (TENANT_COUNTERS and finished requests)."""

    def __init__(self, max_tenants: int = 20, pinned: Sequence[str] = ()):
        if max_tenants < 0:
            raise ValueError(f"max_tenants must be >= 0, got {max_tenants}")
        self.pinned = tuple(dict.fromkeys(sanitize_tenant(p) for p in pinned))
        self.max_tenants = len(self.pinned) if self.pinned else max_tenants
        self.labels: list[str] = list(self.pinned)
        self._index: dict[str, int] = {name: i for i, name in enumerate(self.labels)}
        self._seen: dict[str, int] = {}  # what clients declared → its label's index (bounded, see label_of)
        self.sums = np.zeros((len(TENANT_COUNTERS), max(len(self.labels), 1) + 1), np.float64)
        self.requests = np.zeros(self.sums.shape[1], np.int64)

    def label_of(self, declared: str) -> int:
        """The label index of a tenant as declared (its own label while the budget lasts, else `other`)."""
        hit = self._seen.get(declared)
        if hit is not None:
            return hit
        name = sanitize_tenant(declared)
        idx = self._index.get(name)
        if idx is None:
            if self.pinned or len(self.labels) >= self.max_tenants + (OTHER_TENANT in self._index):
                idx = self._add(OTHER_TENANT)
            else:
                idx = self._add(name)
        if len(self._seen) < 4 * self.max_tenants + 1024:  # a cache, bounded however many tenants clients invent
            self._seen[declared] = idx
        return idx

    def _add(self, name: str) -> int:
        idx = self._index.get(name)
        if idx is not None:
            return idx
        idx = len(self.labels)
        self.labels.append(name)
        self._index[name] = idx
        if idx >= self.sums.shape[1]:
            self.sums = np.concatenate([self.sums, np.zeros((len(TENANT_COUNTERS), self.sums.shape[1]))], axis=1)
            self.requests = np.concatenate([self.requests, np.zeros(len(self.requests), np.int64)])
        return idx

    def add(self, label: int, values: Sequence[np.ndarray | float]) -> None:
        """Add requests' values (one array per TENANT_COUNTERS entry, or a scalar 0: nothing), all of one label."""
        for row, v in enumerate(values):
            if isinstance(v, np.ndarray):  # the scalars are zeros
                self.sums[row, label] += float(v.sum())

    def accrue(self, labels: np.ndarray, values: Sequence[np.ndarray | float]) -> None:
        """Add each request's values (one array per TENANT_COUNTERS entry, or a scalar 0: nothing) to its label."""
        if not len(labels):
            return
        first = int(labels[0])
        if len(self.labels) == 1 or (labels == first).all():  # one tenant in the step (the usual case): plain sums
            self.add(first, values)
            return
        n = self.sums.shape[1]
        for row, v in enumerate(values):
            if np.ndim(v):
                self.sums[row] += np.bincount(labels, weights=v, minlength=n)[:n]

    def accrue_at(self, column: np.ndarray, slots: np.ndarray, values: Sequence[np.ndarray | float]) -> None:
        """`accrue` for the requests at `slots` of a label column (the ledger's), read only where there is more
        than one label."""
        if len(self.labels) == 1:
            if len(slots):
                self.add(0, values)
            return
        self.accrue(column[slots], values)

    def finished(self, labels: np.ndarray) -> None:
        """Requests that finished, by label."""
        if len(labels):
            self.requests += np.bincount(labels, minlength=len(self.requests))[:len(self.requests)]

    def totals(self) -> list[TenantTotals]:
        """Each label's cumulative sums (labels never leave: counters stay monotonic)."""
        out = []
        for i, name in enumerate(self.labels):
            sums = dict(zip(TENANT_COUNTERS, self.sums[:, i].tolist()))
            for k in ("prompt_tokens", "output_tokens"):
                sums[k] = int(sums[k])
            out.append(TenantTotals(tenant=name, requests=int(self.requests[i]), **sums))
        return out
