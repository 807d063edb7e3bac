"""Fabricated finished-request records for the stub's `/metrics/mfu/requests` and `/metrics/mfu/tenants`.

Each stream the stub completes becomes one record whose figures follow from the request alone, so a test
can compute them on its own (`fake_cost`).  Ids are vLLM's: the client's X-Request-Id X (or a generated
one) gives the response id `cmpl-X` / `chatcmpl-X` and the internal id `cmpl-X-0-<8 hex>` /
`chatcmpl-X-<8 hex>`; a lookup accepts any of the three (`id_keys`).  The tenant is `vllm_xargs.tenant`
(sanitised), else the model name.  A record is published `delay_s` after its stream ends, as engines
publish about every 0.5 s; a prompt holding `STUB_UNRECORDED` never gets one.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from serving_mfu.schema.requests import RequestCostModel, TenantModel, id_keys, sanitize_tenant

PREFILL_S_PER_TOKEN = 1e-4  # fake prefill device-seconds per prompt token
DECODE_S_PER_TOKEN = 1e-3  # fake decode device-seconds per output token
UNRECORDED = "STUB_UNRECORDED"
TENANT_SUMS = ("useful_flops", "executed_flops", "device_seconds", "prompt_tokens", "output_tokens")


def vllm_ids(x: str, chat: bool, suffix: str) -> tuple[str, str]:
    """(response id, internal id) as vLLM builds them from X (completions: prompt index 0)."""
    response = f"chatcmpl-{x}" if chat else f"cmpl-{x}"
    return response, f"{response}-{suffix}" if chat else f"{response}-0-{suffix}"


def declared_tenant(body: dict[str, Any]) -> str:
    """vllm_xargs.tenant, else the served model's name: sanitised as the plugin does."""
    tenant = (body.get("vllm_xargs") or {}).get("tenant")
    return sanitize_tenant(tenant if tenant is not None else body.get("model", "stub"))


def fake_cost(request_id: str, tenant: str, prompt_tokens: int, output_tokens: int, params: float,
              started_at: float, ended_at: float) -> RequestCostModel:
    """One request's made-up cost, P = params:
    useful = 2·P·(prompt + output) FLOPs; executed = useful + 2·P·output (one rejected draft per output token);
    prefill device-s = prompt × PREFILL_S_PER_TOKEN; decode device-s = output × DECODE_S_PER_TOKEN."""
    useful = 2.0 * params * (prompt_tokens + output_tokens)
    prefill, decode = prompt_tokens * PREFILL_S_PER_TOKEN, output_tokens * DECODE_S_PER_TOKEN
    return RequestCostModel(request_id=request_id, tenant=tenant, adapter=None, engine="stub-0",
                            prompt_tokens=prompt_tokens, cached_tokens=0, received_tokens=0,
                            output_tokens=output_tokens, draft_tokens=0, accepted_tokens=0, useful_flops=useful,
                            executed_flops=useful + 2.0 * params * output_tokens, prefill_device_seconds=prefill,
                            decode_device_seconds=decode, device_seconds=prefill + decode,
                            first_step_at=started_at, last_step_at=ended_at)


class FakeLedger:
    """The stub's finished requests: a bounded ring indexed by every id a client may use, and tenant totals."""

    def __init__(self, delay_s: float = 0.0, capacity: int = 100_000, clock: Callable[[], float] = time.monotonic):
        self.delay_s = delay_s
        self.clock = clock
        self._pending: deque[tuple[float, RequestCostModel]] = deque()
        self._ring: deque[RequestCostModel] = deque()  # oldest first
        self._capacity = capacity
        self._index: dict[str, list[RequestCostModel]] = {}
        self._tenants: dict[str, TenantModel] = {}

    def finish(self, record: RequestCostModel) -> None:
        """A request finished: published `delay_s` from now."""
        self._pending.append((self.clock() + self.delay_s, record))

    def _publish(self) -> None:
        now = self.clock()
        while self._pending and self._pending[0][0] <= now:
            record = self._pending.popleft()[1]
            self._ring.append(record)
            for key in id_keys(record.request_id):
                self._index.setdefault(key, []).append(record)
            t = self._tenants.setdefault(record.tenant, TenantModel(tenant=record.tenant, requests=0, useful_flops=0,
                                                                    executed_flops=0, device_seconds=0,
                                                                    prompt_tokens=0, output_tokens=0))
            t.requests += 1
            for name in TENANT_SUMS:
                setattr(t, name, getattr(t, name) + getattr(record, name))
            if len(self._ring) > self._capacity:
                old = self._ring.popleft()
                for key in id_keys(old.request_id):
                    self._index[key].remove(old)
                    if not self._index[key]:
                        del self._index[key]

    def lookup(self, key: str) -> list[RequestCostModel]:
        """The published records `key` names, newest first."""
        self._publish()
        return list(reversed(self._index.get(key, ())))

    def recent(self, limit: int, tenant: str | None) -> list[RequestCostModel]:
        self._publish()
        out = []
        for record in reversed(self._ring):
            if len(out) >= limit:
                break
            if tenant is None or record.tenant == tenant:
                out.append(record)
        return out

    def tenants(self) -> list[TenantModel]:
        self._publish()
        return sorted((t.model_copy() for t in self._tenants.values()), key=lambda t: (-t.device_seconds, t.tenant))
