"""`mfu-loadgen wrap --base-url URL -- COMMAND…`: the MFU of any benchmark a user already runs.

Reads the server's cumulative counters (data as new as that moment), runs the command with this
process's stdin/stdout/stderr, reads them again once the engines have published every step that
finished before the command ended, and reports the difference: the same `mfu` section a `run`
result has.  The command's exit status is passed through; a server without the plugin gives no
MFU and a reason, never a failed wrap.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from pydantic import BaseModel, Field

from loadgen.results import MFUSection
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


async def _run(command: list[str]) -> int:
    proc = await asyncio.create_subprocess_exec(*command)
    loop = asyncio.get_running_loop()
    # Ctrl-C reaches the command too (same process group); wait for it to stop rather than dying first
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    try:
        return await proc.wait()
    finally:
        loop.remove_signal_handler(signal.SIGINT)


async def wrap(base_url: str, command: list[str], interval_s: float = 1.0,
               fresh_timeout_s: float = 10.0) -> WrapResult:
    """Bracket `command` with counter readings of the server at `base_url`."""
    if not command:
        raise ValueError("no command to run: mfu-loadgen wrap --base-url URL [--out FILE] -- COMMAND [ARGS...]")
    probe, error = await open_probe(base_url, None, interval_s, fresh_timeout_s)
    started_at, t0 = time.time(), time.perf_counter()
    try:
        returncode = await _run(command)
    except OSError as exc:
        await close_probe(probe, error)
        raise ValueError(f"cannot run {command[0]!r}: {exc}") from exc
    duration_s = time.perf_counter() - t0
    section, error = await close_probe(probe, error)
    return WrapResult(command=command, returncode=returncode, base_url=base_url, started_at=started_at,
                      duration_s=duration_s, mfu=section, mfu_error=error)


def write(result: WrapResult, out: str | Path) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, result.model_dump_json(indent=2))
