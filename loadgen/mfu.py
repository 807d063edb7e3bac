"""The MFU of one load-generator run, from the server's cumulative counters.

`MFUProbe` reads `GET /metrics/mfu/counters` when the run starts and when it ends, each time
asking for data at least as new as that moment (`min_as_of`): the difference is exactly the
run's work, whatever else the server did before, with no fixed wait for the engines to publish.  While the run
goes, it reads the counters about once a second for a per-second time series.  A server
without the serving-mfu plugin gives no MFU (None), never an error.  It reads through the run's
aiohttp session, or its own (closed in `stop()`) when given none.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

import aiohttp
from pydantic import BaseModel, Field

from serving_mfu.schema.report import MFUReport
from serving_mfu.schema.snapshot import Totals


class MFUPoint(BaseModel):
    """One second of the run: per-phase utilization over that interval."""

    t_s: float = Field(description="seconds since the run started")
    prefill_mfu: float | None
    decode_mfu: float | None
    prefill_hfu: float | None
    decode_hfu: float | None
    prefill_mbu: float | None
    decode_mbu: float | None
    overall_mfu: float | None
    prefill_tokens: int
    decode_tokens: int
    gpu_util: float | None = Field(default=None, description="mean GPU-Util over the interval (null: not sampled)")
    sm_active: float | None = Field(default=None, description="mean SM activity over the interval (NVML GPM)")


class RunMFU(BaseModel):
    """The run's report (DESIGN §6 sections) and its per-second series."""

    report: MFUReport
    series: list[MFUPoint]


def point(t_s: float, report: MFUReport) -> MFUPoint:
    return MFUPoint(t_s=t_s, prefill_mfu=report.prefill.mfu, decode_mfu=report.decode.mfu,
                    prefill_hfu=report.prefill.hfu, decode_hfu=report.decode.hfu,
                    prefill_mbu=report.prefill.mbu, decode_mbu=report.decode.mbu,
                    overall_mfu=report.overall.mfu, prefill_tokens=report.prefill.tokens,
                    decode_tokens=report.decode.tokens,
                    gpu_util=report.gpu_util.gpu_util if report.gpu_util else None,
                    sm_active=report.gpu_util.sm_active if report.gpu_util else None)


class MFUProbe:
    """Brackets a run with counter readings; polls in between for the time series."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession | None = None, interval_s: float = 1.0,
                 fresh_timeout_s: float = 10.0, clock: Callable[[], float] = time.time):
        self.url = base_url.rstrip("/") + "/metrics/mfu/counters"
        self.session = session
        self._own_session = session is None
        self.interval_s = interval_s
        # the bracketing readings ask for data at least as new as the moment they are taken (min_as_of):
        # the server answers once the engines have published every step finished before then
        self.fresh_timeout_s = fresh_timeout_s
        self.clock = clock
        self.available: bool | None = None
        self.error: str | None = None
        self._start: Totals | None = None
        self._t0 = 0.0
        self._points: list[MFUPoint] = []
        self._task: asyncio.Task | None = None

    async def _read(self, session: aiohttp.ClientSession, fresh: bool = False) -> Totals | None:
        """The server's counters, or None (with `self.error` set) on any failure: never raises."""
        params = {"min_as_of": f"{self.clock():.6f}", "timeout": f"{self.fresh_timeout_s:g}"} if fresh else None
        timeout = aiohttp.ClientTimeout(total=self.fresh_timeout_s + 10)
        try:
            async with session.get(self.url, params=params, timeout=timeout) as r:
                body = await r.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.error = f"cannot read {self.url}: {type(exc).__name__}: {exc}"
            return None
        if r.status != 200:
            self.error = f"{self.url} answered {r.status}: {body[:200].decode(errors='replace')}"
            return None
        try:
            return Totals.model_validate_json(body)
        except ValueError as exc:  # pydantic's ValidationError included
            self.error = f"{self.url} sent no counters: {exc!s:.200}"
            return None

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None:
            self.session = aiohttp.ClientSession(trust_env=False)
        return self.session

    async def start(self) -> None:
        session = self._session()
        self._start = await self._read(session, fresh=True)
        self.available = self._start is not None
        self._t0 = time.monotonic()
        if self.available:
            self._task = asyncio.create_task(self._poll(session))

    async def _poll(self, session: aiohttp.ClientSession) -> None:
        prev = self._start
        while True:
            await asyncio.sleep(self.interval_s)
            now = await self._read(session)
            if now is None or prev is None:
                continue
            if now.updated_at > prev.updated_at:
                self._points.append(point(time.monotonic() - self._t0, now.report_since(prev)))
                prev = now

    async def stop(self) -> RunMFU | None:
        """The run's report, or None when the server has no serving-mfu endpoint."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if me is not None and me.cancelling():  # this run itself is being cancelled (Ctrl-C): go on
                    raise
        try:
            if not self.available or self._start is None:
                return None
            end = await self._read(self._session(), fresh=True)
        finally:
            if self._own_session and self.session is not None:
                await self.session.close()
                self.session = None
        if end is None:
            return None
        return RunMFU(report=end.report_since(self._start), series=self._points)
