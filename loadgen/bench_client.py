"""`mfu-loadgen bench-client`: the generator's own accuracy against a near-zero-latency stub.

For each rate, a constant-rate run of `duration_s` against the stub (in a subprocess by
default, so it has its own core and event loop): achieved vs requested issue rate, issue
lateness p50/p99, and the client's CPU seconds per request (all of this process's CPU in
thread mode, the stub's included).
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field
from rich.table import Table

from loadgen.config import LengthSpec, RunConfig
from loadgen.runner import make_session, run_benchmark
from loadgen.stub import StubConfig
from loadgen.stub_server import StubProcess, StubThread

StubMode = Literal["subprocess", "thread"]


class BenchPoint(BaseModel):
    requested_rate: float
    achieved_rate: float | None = Field(description="issue rate: (n − 1) / issue span")
    completed_rate: float = Field(description="completed requests / run duration")
    lateness_p50_s: float | None
    lateness_p99_s: float | None
    lateness_max_s: float | None
    completed: int
    failed: int
    cpu_s_per_request: float = Field(description="this process's CPU seconds / requests issued")
    cpu_share: float = Field(description="this process's CPU seconds / wall seconds (1.0 = one core)")


class BenchClientResult(BaseModel):
    stub: StubMode
    duration_s: float
    output_len: int
    points: list[BenchPoint]


def _config(url: str, rate: float, n: int, output_len: int) -> RunConfig:
    return RunConfig(base_url=url, model="stub", arrival="constant", request_rate=rate, num_prompts=n,
                     input=LengthSpec(mean=16), output=LengthSpec(mean=output_len), mfu=False, request_costs=False,
                     quiet=True, request_timeout_s=30)


async def _measure(url: str, rate: float, duration_s: float, output_len: int) -> BenchPoint:
    n = max(2, int(rate * duration_s))
    config = _config(url, rate, n, output_len)
    async with make_session(config) as session:
        await run_benchmark(_config(url, rate, max(20, n // 10), output_len), session)  # warm connections
        cpu0, wall0 = time.process_time(), time.perf_counter()
        r = await run_benchmark(config, session)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return BenchPoint(requested_rate=rate, achieved_rate=r.achieved_rate, completed_rate=r.request_throughput,
                      lateness_p50_s=r.lateness_s.p50, lateness_p99_s=r.lateness_s.p99,
                      lateness_max_s=r.lateness_s.max, completed=r.completed, failed=r.failed,
                      cpu_s_per_request=cpu / n, cpu_share=cpu / wall)


async def bench_client(rates: list[float], duration_s: float = 5.0, output_len: int = 4,
                       stub: StubMode = "subprocess") -> BenchClientResult:
    """Run every rate against one stub server (zero TTFT, all tokens at once)."""
    server = (StubProcess if stub == "subprocess" else StubThread)(StubConfig())
    points = []
    with server:
        for rate in rates:
            points.append(await _measure(server.url, rate, duration_s, output_len))
    return BenchClientResult(stub=stub, duration_s=duration_s, output_len=output_len, points=points)


def bench_table(res: BenchClientResult) -> Table:
    t = Table(title=f"mfu-loadgen bench-client: stub in a {res.stub}, {res.duration_s:g} s per rate, "
                    f"{res.output_len} output tokens",
              caption="rate: requested req/s; sent/s: achieved issue rate; lateness in ms; CPU: this process")
    for col in ("rate", "sent/s", "done/s", "late p50", "late p99", "late max", "failed", "CPU ms/req",
                "CPU share"):
        t.add_column(col, justify="right")
    for p in res.points:
        ms = lambda x: "—" if x is None else f"{1000 * x:.2f}"  # noqa: E731
        t.add_row(f"{p.requested_rate:g}", f"{p.achieved_rate or 0:.1f}", f"{p.completed_rate:.1f}",
                  ms(p.lateness_p50_s), ms(p.lateness_p99_s), ms(p.lateness_max_s), str(p.failed),
                  f"{1000 * p.cpu_s_per_request:.3f}", f"{p.cpu_share:.0%}")
    return t
