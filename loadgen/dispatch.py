"""Issue requests on schedule (open loop) or as workers free up (closed loop).

`issue(index, spec, scheduled_at_s)` is awaited for each request; it notes its own start, so
issued − scheduled measures the generator's lateness (timer granularity, a busy event loop).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Iterable

from loadgen.workload import RequestSpec

Issue = Callable[[int, RequestSpec, float], Awaitable[None]]


async def open_loop(schedule: Iterable[tuple[float, RequestSpec]], issue: Issue, t0: float,
                    stop_at_s: float | None = None) -> None:
    """Start each request at t0 + its offset (all overdue ones at once); wait for all to finish."""
    pending: set[asyncio.Task] = set()
    for index, (offset, spec) in enumerate(schedule):
        if stop_at_s is not None and offset >= stop_at_s:
            break
        delay = t0 + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(issue(index, spec, offset))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(pending)


async def closed_loop(specs: Iterable[RequestSpec], issue: Issue, t0: float, workers: int,
                      total: int | None, stop_at_s: float | None = None) -> None:
    """`workers` loops, each issuing its next request as soon as its previous one finished.
    A closed loop has no schedule to be late for: `scheduled_at_s` is the issue instant."""
    source = iter(specs)
    counter = itertools.count()

    async def worker() -> None:
        while True:
            if stop_at_s is not None and time.perf_counter() - t0 >= stop_at_s:
                return
            index = next(counter)
            if total is not None and index >= total:
                return
            spec = next(source, None)
            if spec is None:
                return
            now = time.perf_counter() - t0  # the issue instant: the stop rule and the record share it
            if stop_at_s is not None and now >= stop_at_s:
                return
            await issue(index, spec, now)

    await asyncio.gather(*(worker() for _ in range(workers)))
