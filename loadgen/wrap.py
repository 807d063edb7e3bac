"""`mfu-loadgen wrap --base-url URL -- COMMAND…`: the MFU of any benchmark a user already runs.

Reads the server's cumulative counters (data as new as that moment), runs the command with this
process's stdin/stdout/stderr, reads them again once the engines have published every step that
finished before the command ended, and reports the difference: the same `mfu` section a `run`
result has.  It reads the server's per-tenant totals (`/metrics/mfu/tenants`) at the same two moments
and reports each tenant's difference: requests, FLOPs, device-seconds, tokens and, at a device-hour
price, their cost.  The command's exit status is passed through; a server without the plugin (or
without the tenant endpoint) gives no MFU (no tenants) and a reason, never a failed wrap.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
from pydantic import BaseModel, Field

from loadgen.costs import read_tenants, tenant_differences
from loadgen.results import MFUSection, TenantCost
from loadgen.runner import close_probe, open_probe
from serving_mfu.files import write_atomic


class WrapResult(BaseModel):
    """What `wrap` writes to `--out`: the command, its status and timing, and the server's MFU over it."""

    command: list[str]
    returncode: int = Field(description="the command's exit status (negative: killed by that signal)")
    base_url: str
    started_at: float = Field(description="unix seconds when the command started")
    duration_s: float = Field(description="the command's wall-clock seconds")
    mfu: MFUSection | None = Field(description="the server's report over the command's window (null: see mfu_error)")
    mfu_error: str | None = None
    device_hour_price: float | None = Field(None, description="USD per device-hour (--device-hour-price)")
    tenants: list[TenantCost] | None = Field(None, description="each tenant's /metrics/mfu/tenants totals after − "
                                             "before the command, tenants that did nothing left out (null: see "
                                             "tenants_error)")
    tenants_error: str | None = None


async def _run(command: list[str]) -> int:
    proc = await asyncio.create_subprocess_exec(*command)
    loop = asyncio.get_running_loop()
    # Ctrl-C reaches the command too (same process group); wait for it to stop rather than dying first
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    try:
        return await proc.wait()
    finally:
        loop.remove_signal_handler(signal.SIGINT)


async def wrap(base_url: str, command: list[str], interval_s: float = 1.0, fresh_timeout_s: float = 10.0,
               device_hour_price: float | None = None) -> WrapResult:
    """Bracket `command` with counter and tenant readings of the server at `base_url`."""
    if not command:
        raise ValueError("no command to run: mfu-loadgen wrap --base-url URL [--out FILE] -- COMMAND [ARGS...]")
    async with aiohttp.ClientSession(trust_env=False) as session:
        probe, error = await open_probe(base_url, session, interval_s, fresh_timeout_s)
        before, tenants_error = await read_tenants(session, base_url)
        started_at, t0 = time.time(), time.perf_counter()
        try:
            returncode = await _run(command)
        except OSError as exc:
            await close_probe(probe, error)
            raise ValueError(f"cannot run {command[0]!r}: {exc}") from exc
        duration_s = time.perf_counter() - t0
        section, error = await close_probe(probe, error)  # waits until the engines published past the end
        tenants = None
        if before is not None:
            after, tenants_error = await read_tenants(session, base_url)
            tenants = None if after is None else tenant_differences(before, after, device_hour_price)
    return WrapResult(command=command, returncode=returncode, base_url=base_url, started_at=started_at,
                      duration_s=duration_s, mfu=section, mfu_error=error, device_hour_price=device_hour_price,
                      tenants=tenants, tenants_error=tenants_error)


def write(result: WrapResult, out: str | Path) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, result.model_dump_json(indent=2))
