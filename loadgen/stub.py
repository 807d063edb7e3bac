"""A stub OpenAI-compatible server: streams `max_tokens` tokens at a set pace, with fault injection.

For testing the load generator without an engine.  A prompt's token count is its number of
whitespace-separated words.  Faults, chosen per request by a marker in the prompt or a
`"stub": {"fault": ...}` body field, or for a fraction of requests by `fail_fraction`:
`STUB_HTTP_<code>` answers that status; `STUB_CUT` ends the stream cleanly after
`cut_after_chunks` chunks without a finish or `[DONE]`; `STUB_ABORT` drops the connection
there; `STUB_SLOW` waits `slow_s` before the first token; `STUB_ERROR` sends an error event.
Ids follow vLLM's from the `X-Request-Id` header; with `fake_costs` every completed stream gets a
fabricated finished-request record (`loadgen/stub_costs.py`) served as the plugin serves its own.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import uuid
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from loadgen.stub_costs import UNRECORDED, FakeLedger, declared_tenant, fake_cost, vllm_ids
from loadgen.stub_mfu import FakeEngine
from serving_mfu.schema.requests import RequestsResponse, TenantsResponse

HTTP_MARKER = re.compile(r"STUB_HTTP_(\d{3})")
MARKERS = {"STUB_CUT": "cut", "STUB_ABORT": "abort", "STUB_SLOW": "slow", "STUB_ERROR": "error"}


class StubConfig(BaseModel):
    """Pace and faults of the stub server."""

    model_config = ConfigDict(ser_json_inf_nan="strings")  # inf rates survive a JSON round trip

    ttft_s: float = Field(0.0, ge=0, description="delay before the first token")
    tokens_per_s: float = Field(math.inf, gt=0, description="decode pace after the first token (inf: at once)")
    tokens_per_chunk: int = Field(1, ge=1, description=">1 imitates speculative decoding's multi-token chunks")
    default_max_tokens: int = Field(16, ge=1)
    fail_fraction: float = Field(0.0, ge=0, le=1, description="share of requests answered with fail_status")
    fail_status: int = Field(500, ge=400, le=599)
    cut_after_chunks: int = Field(2, ge=0)
    slow_s: float = Field(30.0, ge=0)
    seed: int = 0
    fake_mfu: bool = Field(False, description="serve /metrics/mfu/counters from a fake engine")
    fake_params: float = Field(1e9, gt=0, description="fake model size: 2 × params FLOPs per token")
    fake_peak_flops_per_s: float = Field(1e14, gt=0)
    fake_costs: bool = Field(False, description="serve /metrics/mfu/requests[/{id}] and /metrics/mfu/tenants "
                             "with a fabricated record per completed stream")
    fake_costs_delay_s: float = Field(0.0, ge=0, description="publish each record this long after its stream ends")


class StubStats:
    """What the stub saw: requests, the most streams open at once, and each request's X-Request-Id header,
    declared tenant (vllm_xargs.tenant) and vLLM-style internal id (the latest 100 000)."""

    def __init__(self) -> None:
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.seen: deque[dict[str, Any]] = deque(maxlen=100_000)

    def opened(self) -> None:
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)


class StubAbort(Exception):
    """Raised inside a stream to make the server drop the connection mid-response."""


def prompt_text(body: dict[str, Any]) -> str:
    if "messages" in body:
        return " ".join(str(m.get("content") or "") for m in body["messages"])
    prompt = body.get("prompt", "")
    return " ".join(map(str, prompt)) if isinstance(prompt, list) else str(prompt)


def choose_fault(body: dict[str, Any], text: str, rng: np.random.Generator, config: StubConfig) -> str | None:
    """The fault for this request: body field, then prompt marker, then the random fraction."""
    fault = (body.get("stub") or {}).get("fault")
    if fault:
        return fault
    m = HTTP_MARKER.search(text)
    if m:
        return f"http_{m.group(1)}"
    for marker, kind in MARKERS.items():
        if marker in text:
            return kind
    if config.fail_fraction and rng.random() < config.fail_fraction:
        return f"http_{config.fail_status}"
    return None


def _chunk(rid: str, model: str, chat: bool, text: str | None, finish: str | None) -> bytes:
    if chat:
        delta = {"role": "assistant", "content": ""} if text is None else {"content": text}
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish}
    obj = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
           "model": model, "choices": [choice]}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


async def _sleep_until(t: float) -> None:
    delay = t - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


Done = Callable[[int, int], None]  # called with (prompt tokens, output tokens) when a stream completes


async def stream(body: dict[str, Any], config: StubConfig, fault: str | None, rid: str, chat: bool,
                 engine: FakeEngine | None, stats: StubStats, on_done: Done | None = None) -> AsyncIterator[bytes]:
    """The SSE body, counted as in flight while it runs."""
    stats.opened()
    try:
        async for part in _events(body, config, fault, rid, chat, engine, on_done):
            yield part
    finally:
        stats.in_flight -= 1


async def _events(body: dict[str, Any], config: StubConfig, fault: str | None, rid: str, chat: bool,
                  engine: FakeEngine | None, on_done: Done | None) -> AsyncIterator[bytes]:
    """Chunks of `tokens_per_chunk` tokens on schedule, then usage and [DONE]."""
    t0 = time.perf_counter()
    over = body.get("stub") or {}
    ttft = float(over.get("ttft_s", config.ttft_s)) + (config.slow_s if fault == "slow" else 0.0)
    per_chunk_s = config.tokens_per_chunk / float(over.get("tokens_per_s", config.tokens_per_s))
    model = body.get("model", "stub")
    n_out = int(body.get("max_tokens") or body.get("max_completion_tokens") or config.default_max_tokens)
    n_in = len(prompt_text(body).split())
    if chat:
        yield _chunk(rid, model, chat, None, None)
    sent = 0
    k = 0
    while sent < n_out:
        await _sleep_until(t0 + ttft + k * per_chunk_s)
        if fault in ("cut", "abort", "error") and k >= config.cut_after_chunks:
            if fault == "abort":
                raise StubAbort(f"stub: dropping the connection after {k} chunks")
            if fault == "error":
                yield b'data: {"error": {"message": "stub: injected error", "code": 500}}\n\n'
            return
        n = min(config.tokens_per_chunk, n_out - sent)
        sent += n
        if engine:
            engine.chunk(n_in if k == 0 else 0, n, ttft if k == 0 else per_chunk_s, config.tokens_per_chunk)
        yield _chunk(rid, model, chat, " tok" * n, "length" if sent >= n_out else None)
        k += 1
    if on_done is not None:
        on_done(n_in, n_out)
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}
        yield b"data: " + json.dumps({"id": rid, "model": model, "choices": [], "usage": usage}).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"


def _recorder(ledger: FakeLedger | None, body: dict[str, Any], internal_id: str, params: float) -> Done | None:
    """What a completed stream calls: files its fabricated record (none without a ledger, or unrecorded)."""
    if ledger is None or UNRECORDED in prompt_text(body):
        return None
    tenant, started = declared_tenant(body), time.time()

    def done(prompt_tokens: int, output_tokens: int) -> None:
        ledger.finish(fake_cost(internal_id, tenant, prompt_tokens, output_tokens, params, started, time.time()))
    return done


def add_cost_routes(app: FastAPI, ledger: FakeLedger) -> None:
    """The plugin's request and tenant endpoints, answered from the stub's ledger."""
    @app.get("/metrics/mfu/requests")
    async def recent(limit: int = 100, tenant: str | None = None) -> Any:
        return RequestsResponse(requests=ledger.recent(limit, tenant)).model_dump()

    @app.get("/metrics/mfu/requests/{request_id}")
    async def one(request_id: str) -> Any:
        if not (found := ledger.lookup(request_id)):
            return JSONResponse({"detail": f"no finished request matches {request_id!r} yet"}, 404)
        return RequestsResponse(requests=found).model_dump()

    @app.get("/metrics/mfu/tenants")
    async def tenants() -> Any:
        return TenantsResponse(tenants=ledger.tenants()).model_dump()


def build_app(config: StubConfig | None = None) -> FastAPI:
    """The stub's FastAPI app: both OpenAI endpoints, /v1/models, /health, optional fake counters and costs."""
    config = config or StubConfig()
    app = FastAPI(title="mfu-loadgen stub")
    rng = np.random.default_rng(config.seed)
    engine = FakeEngine(config.fake_params, config.fake_peak_flops_per_s) if config.fake_mfu else None
    ledger = FakeLedger(config.fake_costs_delay_s) if config.fake_costs else None
    stats = StubStats()

    async def complete(request: Request, chat: bool) -> Any:
        body = await request.json()
        header = request.headers.get("x-request-id")
        rid, internal = vllm_ids(header or uuid.uuid4().hex, chat, uuid.uuid4().hex[:8])
        stats.seen.append({"x_request_id": header, "tenant": (body.get("vllm_xargs") or {}).get("tenant"),
                           "request_id": internal})
        fault = choose_fault(body, prompt_text(body), rng, config)
        if fault and fault.startswith("http_"):
            status = int(fault[5:])
            return JSONResponse({"error": {"message": f"stub: injected {status}", "code": status}}, status)
        if not body.get("stream"):
            return JSONResponse({"error": {"message": "the stub only streams", "code": 400}}, 400)
        on_done = _recorder(ledger, body, internal, config.fake_params)
        return StreamingResponse(stream(body, config, fault, rid, chat, engine, stats, on_done),
                                 media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await complete(request, chat=True)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Any:
        """vLLM's /tokenize shape: one ID per whitespace-separated word (the stub's token count)."""
        body = await request.json()
        tokens = [zlib.crc32(w.encode()) % 4000 + 10 for w in str(body.get("prompt", "")).split()]
        return {"count": len(tokens), "max_model_len": 4096, "tokens": tokens}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "stub", "object": "model"}]}

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True}

    if engine:
        @app.get("/metrics/mfu/counters")
        async def counters() -> Any:
            return engine.totals().model_dump()
    if ledger:
        add_cost_routes(app, ledger)

    app.state.stub_config = config
    app.state.fake_engine = engine
    app.state.fake_ledger = ledger
    app.state.stats = stats
    return app
