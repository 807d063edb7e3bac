"""HTTP endpoints `/metrics/mfu` and `/metrics/mfu/iterations`, shared by the vLLM plugin and
`serving-mfu serve`.  The schema comes from the pydantic report model; bad query parameters
get a 422 saying what is accepted, never a 500.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from pydantic import BaseModel, Field

from serving_mfu.report import MFUReport
from serving_mfu.transport import SnapshotReader, Totals

MAX_WINDOW_S = 3600.0
MAX_ITERATIONS = 10_000


class IterationsResponse(BaseModel):
    """The most recent iterations' costs over all engines, oldest first."""

    count: int
    iterations: list[dict[str, Any]] = Field(description="one IterationCost per engine step")


def _reader(request: Request) -> SnapshotReader:
    reader = getattr(request.app.state, "serving_mfu_reader", None)
    if reader is None:
        reader = SnapshotReader(parent_pid=os.getpid())
        request.app.state.serving_mfu_reader = reader
    return reader


def build_router() -> APIRouter:
    router = APIRouter(tags=["serving-mfu"])

    @router.get("/metrics/mfu", response_model=MFUReport,
                summary="Prefill / decode MFU, HFU and MBU since start or over a window")
    def mfu(
        request: Request,
        window: float | None = Query(
            None, gt=0, le=MAX_WINDOW_S, allow_inf_nan=False,
            description=f"report only the last WINDOW seconds: a number in (0, {MAX_WINDOW_S:g}]; "
                        "omit for totals since start"),
    ) -> MFUReport:
        report = _reader(request).report(window)
        if report is None:
            raise HTTPException(503, "no engine with the serving-mfu scheduler has published yet: start vLLM "
                                     "with --scheduler-cls scheduler_hooks.MFUScheduler")
        return report

    @router.get("/metrics/mfu/counters", response_model=Totals,
                summary="Raw cumulative counters over all engines (subtract two readings for any interval)")
    def counters(request: Request) -> Totals:
        totals = _reader(request).totals()
        if totals is None:
            raise HTTPException(503, "no engine with the serving-mfu scheduler has published yet")
        return totals

    @router.get("/metrics/mfu/iterations", response_model=IterationsResponse,
                summary="The most recent iterations, with their per-phase FLOPs, bytes and time")
    def iterations(
        request: Request,
        limit: int = Query(100, ge=1, le=MAX_ITERATIONS,
                           description=f"how many of the latest iterations: an integer in [1, {MAX_ITERATIONS}]"),
    ) -> IterationsResponse:
        items = _reader(request).recent(limit)
        return IterationsResponse(count=len(items), iterations=items)

    return router


def mount_first(app: FastAPI, router: APIRouter) -> None:
    """Add the routes ahead of everything else: vLLM mounts its Prometheus app at /metrics,
    and a mount answers every path below it, /metrics/mfu included, unless our route comes first."""
    before = list(app.router.routes)
    app.include_router(router)
    added = [r for r in app.router.routes if r not in before]
    app.router.routes[:] = added + before


def build_app(reader_factory: Callable[[], SnapshotReader] | None = None) -> FastAPI:
    """Standalone app (`serving-mfu serve`): the endpoints plus Prometheus text at /metrics."""
    from prometheus_client import CollectorRegistry, make_asgi_app

    from serving_mfu.prometheus import register

    app = FastAPI(title="serving-mfu", description="MFU of LLM serving, read from the engines' snapshots")
    reader = reader_factory() if reader_factory else SnapshotReader()
    app.state.serving_mfu_reader = reader
    registry = CollectorRegistry()
    register(reader, registry=registry)
    app.mount("/metrics", make_asgi_app(registry=registry))
    mount_first(app, build_router())
    return app
