"""HTTP endpoints `/metrics/mfu`, `/metrics/mfu/counters`, `/metrics/mfu/iterations`, `/metrics/mfu/requests`
and `/metrics/mfu/tenants`, shared by the vLLM plugin and `serving-mfu serve`.  The schema comes from the
pydantic report model; bad query parameters get a 422 saying what is accepted, never a 500 (nor vLLM's 400
for validation errors).
"""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Any, Callable

import msgspec
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from serving_mfu.runtime.aggregate import SnapshotReader
from serving_mfu.schema.report import MFUReport
from serving_mfu.schema.requests import RequestsResponse, TenantsResponse
from serving_mfu.schema.snapshot import Totals
from serving_mfu.serve.prometheus import register

MAX_WINDOW_S = 3600.0
MAX_ITERATIONS = 10_000
MAX_REQUESTS = 10_000


class IterationsResponse(BaseModel):
    """The most recent iterations' costs over all engines, oldest first."""

    count: int
    iterations: list[dict[str, Any]] = Field(description="one IterationCost per engine step")


_READER_LOCK = threading.Lock()  # handlers run on a thread pool: one reader per app, made once


def _reader(request: Request) -> SnapshotReader:
    reader = getattr(request.app.state, "serving_mfu_reader", None)
    if reader is None:
        with _READER_LOCK:
            reader = getattr(request.app.state, "serving_mfu_reader", None)
            if reader is None:
                reader = SnapshotReader(parent_pid=os.getpid())
                request.app.state.serving_mfu_reader = reader
    return reader


MAX_WAIT_S = 30.0
CLOCK_SKEW_S = 1.0  # how far past the server's clock a client's min_as_of may be (clients read their own clock)


def _fresh_params(request: Request, clock: Callable[[], float] = time.time) -> tuple[float | None, float]:
    """min_as_of and timeout; a min_as_of past the server's clock plus CLOCK_SKEW_S is a BadParameter (422):
    no data can satisfy it now, however long the client waits."""
    q = request.query_params
    min_as_of = parse_number("min_as_of", q.get("min_as_of"), 0, 1e12, False)
    timeout = parse_number("timeout", q.get("timeout"), 0, MAX_WAIT_S, False)
    now = clock()
    if min_as_of is not None and min_as_of > now + CLOCK_SKEW_S:
        raise BadParameter("min_as_of", q["min_as_of"], f"at most the server's clock plus {CLOCK_SKEW_S:g} s "
                           f"(the server's time is {now:.3f}): no data can be newer than now")
    return min_as_of, timeout or 0.0


def _fresh_enough(reader: SnapshotReader, read: Callable[[], Any], min_as_of: float | None, timeout: float) -> Any:
    """`read()` once its data is as new as `min_as_of`, polling the snapshots for up to `timeout` seconds;
    a 503 that says how old the data is otherwise (engines publish about every 0.5 s)."""
    deadline = time.monotonic() + timeout
    while True:
        answer = read()
        if answer is None:
            if time.monotonic() >= deadline:
                raise NotYet(_no_engine(reader))
        elif min_as_of is None or answer.as_of >= min_as_of:
            return answer
        elif time.monotonic() >= deadline:
            raise NotYet(f"the newest complete data is as of {answer.as_of:.3f} ({answer.age_s:.2f} s "
                                     f"old), older than min_as_of={min_as_of:.3f}: engines publish about every "
                                     f"0.5 s; retry, or wait longer with timeout (up to {MAX_WAIT_S:g} s)")
        time.sleep(0.05)


def _no_engine(reader: SnapshotReader) -> str:
    """The 503 text: what is wrong with the snapshot folder if something is, else how engines publish."""
    problem = reader.folder_problem()
    if problem is not None and "Fix:" in problem:  # a refused folder: its message names owner, mode and fix
        return f"no engine has published: {problem}"
    if problem is not None:
        return (f"no engine has published: {problem} (engines write their snapshots there; set SERVING_MFU_DIR "
                f"to a writable folder of your own, the same for the engines and this server)")
    return (f"no engine with the serving-mfu scheduler has published to {reader.dir} yet: start vLLM with "
            f"--scheduler-cls scheduler_hooks.MFUScheduler (and the same SERVING_MFU_DIR as this server)")


class NotYet(RuntimeError):
    """No data to answer with yet (503).  Answered as our own JSON, `{"detail": ...}`, on every server:
    vLLM's error handler would rewrite an HTTPException and blank the folder's path out of the message."""

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": str(self)})


class BadParameter(ValueError):
    """A query parameter outside what an endpoint accepts."""

    def __init__(self, name: str, raw: str, accepted: str):
        super().__init__(f"{name}={raw!r} is not accepted: {name} must be {accepted}")
        self.name, self.raw, self.accepted = name, raw, accepted

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": [
            {"loc": ["query", self.name], "msg": str(self), "input": self.raw, "accepted": self.accepted}]})


def parse_number(name: str, raw: str | None, low: float, high: float, integer: bool,
                 low_inclusive: bool = True) -> float | int | None:
    """Validate a numeric query parameter here rather than through FastAPI, so that the answer is a
    422 on every server: vLLM's API server turns FastAPI's validation errors into 400s."""
    if raw is None:
        return None
    kind = "an integer" if integer else "a number"
    bracket = "[" if low_inclusive else "("
    accepted = f"{kind} in {bracket}{low:g}, {high:g}]"
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise BadParameter(name, raw, accepted) from None
    if not math.isfinite(value) or value > high or value < low or (value == low and not low_inclusive):
        raise BadParameter(name, raw, accepted)
    return value


def _param(name: str, kind: str, description: str, **bounds: float) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": {"type": kind, **bounds}}


UNPROCESSABLE = ("a parameter outside what is accepted (the detail names it and what is accepted), including a "
                 "min_as_of later than the server's clock plus the skew allowance")
UNAVAILABLE = ("not yet: no engine has published (the detail says why, e.g. a snapshot folder refused because "
               "another user owns it or may write to it, and the fix), or no data as new as min_as_of within timeout")


def build_router() -> APIRouter:
    router = APIRouter(tags=["serving-mfu"])
    window_doc = (f"report only the last WINDOW seconds: a number in (0, {MAX_WINDOW_S:g}]; omit for totals "
                  "since start")
    limit_doc = f"how many of the latest iterations: an integer in [1, {MAX_ITERATIONS}] (default 100)"

    fresh_doc = ("answer only with data at least this new: wall-clock seconds (e.g. when a client's run ended); "
                 "every step the engines finished before then is counted.  At most the server's clock plus "
                 f"{CLOCK_SKEW_S:g} s: a later time is a 422 naming the server's time")
    timeout_doc = f"how long to wait for data as new as min_as_of: seconds in [0, {MAX_WAIT_S:g}] (default 0)"
    fresh_params = [_param("min_as_of", "number", fresh_doc, minimum=0, maximum=1e12),
                    _param("timeout", "number", timeout_doc, minimum=0, maximum=MAX_WAIT_S)]

    @router.get("/metrics/mfu", response_model=MFUReport,
                summary="Prefill / decode MFU, HFU and MBU since start or over a window",
                responses={422: {"description": UNPROCESSABLE}, 503: {"description": UNAVAILABLE}},
                openapi_extra={"parameters": [_param("window", "number", window_doc, exclusiveMinimum=0,
                                                     maximum=MAX_WINDOW_S)] + fresh_params})
    def mfu(request: Request) -> Any:
        try:
            window = parse_number("window", request.query_params.get("window"), 0, MAX_WINDOW_S, False,
                                  low_inclusive=False)
            fresh = _fresh_params(request)
            reader = _reader(request)
            return _fresh_enough(reader, lambda: reader.report(window), *fresh)
        except (BadParameter, NotYet) as exc:
            return exc.response()

    @router.get("/metrics/mfu/counters", response_model=Totals,
                summary="Raw cumulative counters over all engines (subtract two readings for any interval)",
                responses={422: {"description": UNPROCESSABLE}, 503: {"description": UNAVAILABLE}},
                openapi_extra={"parameters": fresh_params})
    def counters(request: Request) -> Any:
        try:
            fresh = _fresh_params(request)
            reader = _reader(request)
            return _fresh_enough(reader, reader.totals, *fresh)
        except (BadParameter, NotYet) as exc:
            return exc.response()

    @router.get("/metrics/mfu/iterations", response_model=IterationsResponse,
                summary="The most recent iterations, with their per-phase FLOPs, bytes and time",
                responses={422: {"description": "a parameter outside what is accepted"}},
                openapi_extra={"parameters": [_param("limit", "integer", limit_doc, minimum=1,
                                                     maximum=MAX_ITERATIONS)]})
    def iterations(request: Request) -> Any:
        try:
            limit = parse_number("limit", request.query_params.get("limit"), 1, MAX_ITERATIONS, True)
        except BadParameter as exc:
            return exc.response()
        items = _reader(request).recent(100 if limit is None else int(limit))
        return IterationsResponse(count=len(items), iterations=items)

    _request_routes(router)
    return router


def _request_routes(router: APIRouter) -> None:
    """/metrics/mfu/requests, /metrics/mfu/requests/{id} and /metrics/mfu/tenants (DESIGN §12)."""
    limit_doc = f"how many of the newest finished requests: an integer in [1, {MAX_REQUESTS}] (default 100)"
    tenant_doc = "only this tenant label (as /metrics/mfu/tenants lists them)"

    @router.get("/metrics/mfu/requests", response_model=RequestsResponse,
                summary="The newest finished requests with their FLOPs, device-seconds and tokens",
                responses={422: {"description": "a parameter outside what is accepted"}},
                openapi_extra={"parameters": [_param("limit", "integer", limit_doc, minimum=1, maximum=MAX_REQUESTS),
                                              _param("tenant", "string", tenant_doc)]})
    def requests(request: Request) -> Any:
        try:
            limit = parse_number("limit", request.query_params.get("limit"), 1, MAX_REQUESTS, True)
        except BadParameter as exc:
            return exc.response()
        found = _reader(request).requests.newest(100 if limit is None else int(limit),
                                                 request.query_params.get("tenant"))
        return {"requests": [msgspec.to_builtins(r) for r in found]}

    @router.get("/metrics/mfu/requests/{request_id}", response_model=RequestsResponse,
                summary="A finished request by vLLM's id, the response's id, or the client's X-Request-Id",
                responses={404: {"description": "no finished request with that id (yet: engines publish about "
                                 "every 0.5 s)"}})
    def request_by_id(request_id: str, request: Request) -> Any:
        found = _reader(request).requests.find(request_id)
        if not found:
            return JSONResponse({"detail": f"no finished request {request_id!r} (yet: engines publish finished "
                                 "requests about every 0.5 s; the API server keeps the newest "
                                 "SERVING_MFU_REQUESTS_RING)"}, status_code=404)
        return {"requests": [msgspec.to_builtins(r) for r in found]}

    @router.get("/metrics/mfu/tenants", response_model=TenantsResponse,
                summary="Each tenant label's FLOPs, device-seconds and tokens over every engine since start",
                responses={503: {"description": UNAVAILABLE}})
    def tenants(request: Request) -> Any:
        reader = _reader(request)
        found = reader.tenants()
        if found is None:
            return NotYet(_no_engine(reader)).response()
        return {"tenants": [msgspec.to_builtins(t) for t in found]}


def mount_first(app: FastAPI, router: APIRouter) -> None:
    """Add the routes ahead of everything else: vLLM mounts its Prometheus app at /metrics,
    and a mount answers every path below it, /metrics/mfu included, unless our route comes first."""
    before = list(app.router.routes)
    app.include_router(router)
    added = [r for r in app.router.routes if r not in before]
    app.router.routes[:] = added + before


def build_app(reader_factory: Callable[[], SnapshotReader] | None = None) -> FastAPI:
    """Standalone app (`serving-mfu serve`): the endpoints plus Prometheus text at /metrics."""
    from fastapi.responses import Response
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    app = FastAPI(title="serving-mfu", description="MFU of LLM serving, read from the engines' snapshots")
    reader = reader_factory() if reader_factory else SnapshotReader()
    app.state.serving_mfu_reader = reader
    registry = CollectorRegistry()
    register(reader, registry=registry)
    app.include_router(build_router())

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
