"""`run_benchmark`: warm up, bracket the measured requests with MFU counter readings, summarise."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import time
import uuid
from pathlib import Path

import aiohttp
import numpy as np

from loadgen import arrivals, dispatch, vocab
from loadgen.client import Sender
from loadgen.config import RunConfig
from loadgen.costs import request_costs
from loadgen.mfu import MFUProbe
from loadgen.progress import RunProgress
from loadgen.records import RequestRecord
from loadgen.results import MFUSection, RunResult
from loadgen.stats import figures, length_mismatches
from loadgen.workload import RequestSpec, specs
from serving_mfu.files import open_own_for_writing, write_atomic


@contextlib.contextmanager
def frozen_heap():
    """Exempt the objects that exist before the run from garbage collection during it: a full
    collection of this heap (numpy, pydantic, FastAPI…) pauses the event loop ≈ 40 ms."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# below uvicorn's (vLLM's) 5 s keep-alive: aiohttp never retries a POST on a connection the
# server closed meanwhile, so it must not pick one the server is about to close
KEEPALIVE_S = 4.0


def make_session(config: RunConfig) -> aiohttp.ClientSession:
    """One shared session, its pool sized to the concurrency cap plus one for the MFU probe
    (unlimited without a cap); no proxy variables, deadlines set per request (`Sender`)."""
    size = config.max_connections or (config.max_concurrency + 1 if config.max_concurrency else 0)
    connector = aiohttp.TCPConnector(limit=size, limit_per_host=0, keepalive_timeout=KEEPALIVE_S)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None),
                                 trust_env=False)


def run_id() -> str:
    """A fresh prefix for one run's X-Request-Ids (`<run>-<index>`, `<run>-w<index>` for the warm-up):
    unique across runs, so a lookup by id finds only this run's request."""
    return uuid.uuid4().hex[:12]


async def _warmup(config: RunConfig, sender: Sender, pool: vocab.TokenPool | None, run: str) -> None:
    """Requests whose results are dropped, before the measured window (and its MFU baseline)."""
    n = config.warmup_requests
    if n == 0:
        return
    source = specs(config, np.random.default_rng([config.seed, 2]), pool=pool)
    t0 = time.perf_counter()

    async def issue(index: int, spec: RequestSpec, scheduled: float) -> None:
        rec = RequestRecord(index=index, request_id=f"{run}-w{index}", tenant=sender.tenant_of(spec),
                            scheduled_at_s=scheduled, issued_at_s=scheduled, sent_at_s=scheduled,
                            input_len=spec.input_len, output_len=spec.output_len)
        await sender.send(spec, rec, t0)

    await dispatch.closed_loop(source, issue, t0, min(n, config.max_concurrency or n), n)


async def _measure(config: RunConfig, sender: Sender, t0: float, progress: RunProgress,
                   trace: list[arrivals.TraceEntry] | None, pool: vocab.TokenPool | None,
                   run: str) -> list[RequestRecord]:
    total = config.total_requests(len(trace) if trace else None)
    trace = trace[:total] if trace else None
    workload = specs(config, np.random.default_rng([config.seed, 1]), trace, pool)
    closed = config.arrival == "closed"
    slots = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency and not closed else None
    records: list[RequestRecord] = []

    async def issue(index: int, spec: RequestSpec, scheduled: float) -> None:
        issued = scheduled if closed else time.perf_counter() - t0  # closed: issued when scheduled
        rec = RequestRecord(index=index, request_id=f"{run}-{index}", tenant=sender.tenant_of(spec),
                            scheduled_at_s=scheduled, issued_at_s=issued, sent_at_s=issued,
                            input_len=spec.input_len, output_len=spec.output_len)
        if slots is None:
            await sender.send(spec, rec, t0)
        else:
            async with slots:
                await sender.send(spec, rec, t0)
        records.append(rec)
        progress.done(rec.ok)

    if closed:
        await dispatch.closed_loop(workload, issue, t0, config.max_concurrency, total, config.duration_s)
    else:
        if trace:
            times = arrivals.trace_offsets(trace, config.trace_time_scale)
        else:
            times = arrivals.offsets(config.arrival, config.request_rate, config.burstiness,
                                     np.random.default_rng([config.seed, 0]), total)
        await dispatch.open_loop(zip(times, workload), issue, t0, config.duration_s)
    return sorted(records, key=lambda r: r.index)


async def open_probe(base_url: str, session: aiohttp.ClientSession | None, interval_s: float,
                     fresh_timeout_s: float) -> tuple[MFUProbe | None, str | None]:
    """The baseline counter reading, data as new as now; (None, why) when it cannot be taken."""
    probe = MFUProbe(base_url, session, interval_s, fresh_timeout_s)
    try:
        await probe.start()
    except Exception as exc:  # an odd /metrics/mfu/counters must not stop the load
        return None, f"{type(exc).__name__}: {exc}"
    return probe, None


async def close_probe(probe: MFUProbe | None, error: str | None) -> tuple[MFUSection | None, str | None]:
    """The `mfu` section since `open_probe`, data as new as now; (None, why) when there is none."""
    if probe is None:
        return None, error
    try:
        run_mfu = await probe.stop()
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"
    if run_mfu is None:
        return None, probe.error or "the server has no serving-mfu counters"
    return MFUSection.from_run(run_mfu), None


async def run_benchmark(config: RunConfig, session: aiohttp.ClientSession | None = None) -> RunResult:
    """Run the load described by `config` against its server; write `out`/`requests_out` if set.
    `session`: one to reuse (its connections kept warm across runs); else the run makes its own."""
    trace = arrivals.load_trace(config.trace_path) if config.arrival == "trace" else None
    own = session is None
    session = session or make_session(config)
    try:
        sender, run = Sender(session, config), run_id()
        pool, prompt_source = await vocab.prompt_pool(config, session)
        await _warmup(config, sender, pool, run)
        # after the warm-up has been published: the warm-up included, nothing of the run yet
        probe, mfu_error = (await open_probe(config.base_url, session, config.mfu_interval_s,
                                             config.mfu_fresh_timeout_s) if config.mfu else (None, "disabled"))
        total = config.total_requests(len(trace) if trace else None)
        with frozen_heap(), RunProgress(total, "requests", enabled=False if config.quiet else None) as progress:
            started_at, t0 = time.time(), time.perf_counter()
            records = await _measure(config, sender, t0, progress, trace, pool, run)
        duration_s = time.perf_counter() - t0
        mfu, mfu_error = await close_probe(probe, mfu_error)
        costs, costs_error = await request_costs(config, session, records)  # after the engines published
    finally:
        if own:
            await session.close()
    rate = None if config.arrival in ("closed", "trace") or math.isinf(config.request_rate) else config.request_rate
    result = RunResult(config=config, started_at=started_at, duration_s=duration_s,
                       warmup_requests=config.warmup_requests, prompt_source=prompt_source,
                       prompt_len_mismatches=length_mismatches(records, config.dataset != "sharegpt"),
                       requested_rate=rate, mfu=mfu, mfu_error=mfu_error, request_costs=costs,
                       request_costs_error=costs_error,
                       records=records, **figures(records, config.slos, duration_s))
    write_outputs(result, records, config)
    return result


def write_outputs(result: RunResult, records: list[RequestRecord], config: RunConfig) -> None:
    if config.out:
        Path(config.out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(config.out), result.model_dump_json(indent=2))
    if config.requests_out:
        Path(config.requests_out).parent.mkdir(parents=True, exist_ok=True)
        with open_own_for_writing(Path(config.requests_out)) as f:
            for rec in records:
                f.write(rec.model_dump_json() + "\n")


def run_sync(coro):
    """Run a coroutine on a fresh asyncio loop.  Not uvloop: its millisecond timers fire up to
    1 ms early, issuing requests before their time."""
    return asyncio.run(coro)


def run_benchmark_sync(config: RunConfig) -> RunResult:
    """Blocking `run_benchmark` for scripts and notebooks without an event loop."""
    return run_sync(run_benchmark(config))
