"""What each finished request and each tenant cost (DESIGN §12): the records engines publish and the
endpoints serve.

`FinishedRequests` (msgspec, columnar) crosses from the engine process to the API server as one JSON line
of an append-only request log (serving_mfu.runtime.request_log) and goes into the trace; the reader turns
it into one `RequestCost` per request.  `TenantTotals` are
an engine's cumulative per-tenant sums, published in its snapshot and summed over engines by the reader.
The pydantic models are the endpoints' answers (`/metrics/mfu/requests`, `/metrics/mfu/tenants`).
"""

from __future__ import annotations

import re

import msgspec
import numpy as np
from pydantic import BaseModel, Field, create_model

#: A tenant label: at most this many characters (Prometheus label values are free text; bounded for storage).
TENANT_MAX_CHARS = 128
OTHER_TENANT = "other"  # the label of tenants past SERVING_MFU_MAX_TENANTS
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:/@+=-]+")
_CHILD = re.compile(r"^\d+_(.+)$")  # vLLM's id of one of n > 1 samples: {index}_{parent's internal id}


def sanitize_tenant(value: object) -> str:
    """A tenant label from what a client declared: runs of characters outside ``A-Za-z0-9_.:/@+=-`` become
    one ``_``, then at most 128 characters; empty → ``_``.  Deterministic, so every engine agrees."""
    text = _UNSAFE.sub("_", str(value)).strip("_") or "_"
    return text[:TENANT_MAX_CHARS]


class RequestCost(msgspec.Struct, kw_only=True, frozen=True):
    """One finished request: who, how many tokens, what it cost (DESIGN §12)."""

    request_id: str  # vLLM's internal id: cmpl-{X}-{i}-{suffix} (completions), chatcmpl-{X}-{suffix} (chat)
    tenant: str  # its label (sanitised; `other` past the label budget)
    adapter: str | None = None  # its LoRA adapter's name
    engine: str = ""  # the engine that ran it (pid-rank)
    prompt_tokens: int = 0  # the whole prompt, as vLLM's usage counts it
    cached_tokens: int = 0  # local prefix-cache hits
    received_tokens: int = 0  # KV loaded through a connector
    output_tokens: int = 0  # tokens delivered to the user
    draft_tokens: int = 0
    accepted_tokens: int = 0
    useful_flops: float = 0.0
    executed_flops: float = 0.0  # + its rejected drafts, recompute, drafter share, LoRA work, graph padding share
    prefill_device_seconds: float = 0.0
    decode_device_seconds: float = 0.0
    device_seconds: float = 0.0  # prefill + decode
    first_step_at: float = 0.0  # wall-clock seconds (Unix): the end of its first step
    last_step_at: float = 0.0  # and of its last


#: FinishedRequests' packed columns, in order: integers (int64) and floats (float64), one row each.
INT_COLUMNS = ("prompt_tokens", "cached_tokens", "received_tokens", "output_tokens", "draft_tokens",
               "accepted_tokens")
FLOAT_COLUMNS = ("useful_flops", "executed_flops", "prefill_device_seconds", "decode_device_seconds",
                 "first_step_at", "last_step_at")


class FinishedRequests(msgspec.Struct, kw_only=True, frozen=True):
    """Requests that finished together, column by column: what an engine appends to its request log (one
    JSON line) and to the trace.  The numbers are packed little-endian arrays (base64 in JSON: `ints`
    int64 [INT_COLUMNS × n], `floats` float64 [FLOAT_COLUMNS × n], `tenant` and `adapter` int32 indices
    into `labels` and `adapters`, -1: none), so the engine pays one copy per column, not one Python object
    per number; the reader makes the `RequestCost` rows."""

    engine: str
    request_id: list[str]
    labels: list[str]  # the engine's tenant labels (index → label)
    adapters: list[str] = msgspec.field(default_factory=list)  # LoRA adapter names (index → name)
    tenant: bytes  # int32 per request
    adapter: bytes  # int32 per request (-1: none)
    ints: bytes
    floats: bytes

    def __len__(self) -> int:
        return len(self.request_id)

    @classmethod
    def pack(cls, engine: str, request_id: list[str], labels: list[str], tenant: np.ndarray, adapters: list[str],
             adapter: np.ndarray, ints: np.ndarray, floats: np.ndarray) -> "FinishedRequests":
        """From arrays: tenant and adapter indices [n], ints [INT_COLUMNS, n], floats [FLOAT_COLUMNS, n]."""
        return cls(engine=engine, request_id=request_id, labels=labels, adapters=adapters,
                   tenant=np.ascontiguousarray(tenant, "<i4").tobytes(),
                   adapter=np.ascontiguousarray(adapter, "<i4").tobytes(),
                   ints=np.ascontiguousarray(ints, "<i8").tobytes(),
                   floats=np.ascontiguousarray(floats, "<f8").tobytes())

    def rows(self) -> list[RequestCost]:
        """One RequestCost per request (device_seconds = prefill + decode); ValueError if the columns do not
        match the ids."""
        n = len(self.request_id)
        tenant = np.frombuffer(self.tenant, "<i4")
        adapter = np.frombuffer(self.adapter, "<i4")
        ints = np.frombuffer(self.ints, "<i8")
        floats = np.frombuffer(self.floats, "<f8")
        if len(tenant) != n or len(adapter) != n or ints.size != n * len(INT_COLUMNS) or \
                floats.size != n * len(FLOAT_COLUMNS):
            raise ValueError(f"finished requests: columns do not match {n} ids")
        if n and (tenant.min() < 0 or tenant.max() >= len(self.labels) or adapter.max() >= len(self.adapters)):
            raise ValueError("finished requests: a tenant or adapter index out of range")
        names = [self.adapters[a] if a >= 0 else None for a in adapter.tolist()]
        cols_i = ints.reshape(len(INT_COLUMNS), n).tolist()
        cols_f = floats.reshape(len(FLOAT_COLUMNS), n).tolist()
        out = []
        for i, (rid, t) in enumerate(zip(self.request_id, tenant.tolist())):
            kw = {k: cols_i[j][i] for j, k in enumerate(INT_COLUMNS)}
            kw.update((k, cols_f[j][i]) for j, k in enumerate(FLOAT_COLUMNS))
            out.append(RequestCost(request_id=rid, tenant=self.labels[t], adapter=names[i], engine=self.engine,
                                   device_seconds=kw["prefill_device_seconds"] + kw["decode_device_seconds"], **kw))
        return out


class TenantTotals(msgspec.Struct, kw_only=True):
    """One tenant label's cumulative sums on one engine (or, summed, on all of them)."""

    tenant: str
    requests: int = 0  # finished requests
    useful_flops: float = 0.0
    executed_flops: float = 0.0
    device_seconds: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0


#: The per-tenant sums exported as Prometheus counters `serving_mfu_tenant_<name>_total{tenant=…}`.
TENANT_COUNTERS = ("useful_flops", "executed_flops", "device_seconds", "prompt_tokens", "output_tokens")


def merge_tenants(groups: list[list[TenantTotals]]) -> list[TenantTotals]:
    """Sum several engines' tenant tables by label; sorted by device-seconds, largest first."""
    out: dict[str, TenantTotals] = {}
    for group in groups:
        for t in group:
            acc = out.setdefault(t.tenant, TenantTotals(tenant=t.tenant))
            acc.requests += t.requests
            for name in TENANT_COUNTERS:
                setattr(acc, name, getattr(acc, name) + getattr(t, name))
    return sorted(out.values(), key=lambda t: (-t.device_seconds, t.tenant))


def id_keys(request_id: str) -> tuple[str, ...]:
    """The ids a client may look a request up by: vLLM's internal id, the response's `id` (`cmpl-{X}`,
    `chatcmpl-{X}`) and X itself (the client's X-Request-Id, or the one vLLM generated).

    vLLM builds the internal id as `{external}-{8 hex}`, the external one as `cmpl-{X}-{i}` (completions,
    i the prompt's index) or `chatcmpl-{X}` (chat); with n > 1 each sample is a child `{j}_{internal}`, also
    found by its parent's ids."""
    child = _CHILD.match(request_id)
    parent = child.group(1) if child else request_id
    head, sep, _ = parent.rpartition("-")
    own = (request_id, parent) if child else (request_id,)
    if not sep:
        return own
    if head.startswith("chatcmpl-"):
        return own + (head, head[len("chatcmpl-"):])
    if head.startswith("cmpl-"):
        response, sep, index = head.rpartition("-")
        if sep and index.isdigit():
            return own + (response, response[len("cmpl-"):])
    return own + (head,)


# ------------------------------------------------------------------ endpoint answers (pydantic)
#: What each field of a finished request means (the endpoint's schema; RequestCost holds the fields).
REQUEST_FIELD_DOCS = {
    "request_id": "vLLM's internal request id",
    "tenant": "vllm_xargs.tenant, else the LoRA adapter's name, else the served model (sanitised; `other` past "
              "SERVING_MFU_MAX_TENANTS)",
    "adapter": "its LoRA adapter's name, if any",
    "engine": "the engine that ran it (pid-rank)",
    "prompt_tokens": "the whole prompt, as vLLM's usage counts it",
    "cached_tokens": "prompt tokens served by the local prefix cache",
    "received_tokens": "prompt tokens whose KV came through a KV connector",
    "output_tokens": "tokens delivered to the user",
    "draft_tokens": "speculative draft tokens verified for it",
    "accepted_tokens": "drafts accepted",
    "useful_flops": "FLOPs of its useful positions (DESIGN §2)",
    "executed_flops": "all FLOPs run for it: useful, recompute, rejected drafts, its drafter share by kept "
                      "positions, LoRA, its graph-padding share",
    "prefill_device_seconds": "its share of prefill time × devices (DESIGN §12)",
    "decode_device_seconds": "its share of decode time × devices",
    "device_seconds": "prefill + decode device-seconds",
    "first_step_at": "Unix seconds: the end of its first step",
    "last_step_at": "Unix seconds: the end of its last step",
}

#: What each per-tenant sum means: the endpoint's schema and the Prometheus counters' help.
TENANT_FIELD_DOCS = {
    "tenant": "the tenant label (sanitised; `other` past SERVING_MFU_MAX_TENANTS)",
    "requests": "finished requests",
    "useful_flops": "Useful FLOPs of the tenant's requests (DESIGN §12)",
    "executed_flops": "Executed FLOPs of the tenant's requests: useful, recompute, rejected drafts, drafter share, "
                      "LoRA, graph-padding share",
    "device_seconds": "The tenant's share of busy time × devices: each step's phase time divided by its requests' "
                      "roofline cost",
    "prompt_tokens": "Prompt tokens of the tenant's requests (each whole prompt, at its first step)",
    "output_tokens": "Tokens delivered to the tenant's requests",
}


def endpoint_model(struct: type[msgspec.Struct], name: str, doc: str, docs: dict[str, str]) -> type[BaseModel]:
    """The pydantic model an endpoint serves for a msgspec struct: its fields (all required), each described."""
    fields = {f.name: (f.type, Field(description=docs[f.name])) for f in msgspec.structs.fields(struct)}
    return create_model(name, __doc__=doc, **fields)


RequestCostModel = endpoint_model(RequestCost, "RequestCostModel",
                                  "One finished request (the endpoint's view of `RequestCost`).", REQUEST_FIELD_DOCS)
TenantModel = endpoint_model(TenantTotals, "TenantModel", "One tenant label's totals over every engine since it "
                             "started.", TENANT_FIELD_DOCS)


class RequestsResponse(BaseModel):
    """Finished requests, newest first."""

    requests: list[RequestCostModel]  # type: ignore[valid-type]


class TenantsResponse(BaseModel):
    """Every tenant label, largest device-seconds first."""

    tenants: list[TenantModel]  # type: ignore[valid-type]
