"""Rich progress for long tool work (calibration), drawn from the events the core emits."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


@contextlib.contextmanager
def calibration_progress(console: Console | None = None, enabled: bool = True) -> Iterator[Callable[[str, Any], None]]:
    """An `on_event` for serving_mfu.peaks.calibrate.calibrate: one bar per kernel, its best figure so far."""
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[best]}"), TimeElapsedColumn())
    with Progress(*columns, console=console or Console(stderr=True), transient=True, disable=not enabled) as bar:
        state: dict[str, Any] = {"task": None}

        def on_event(kind: str, payload: Any) -> None:
            if kind in ("finding", "copy"):
                text = ("finding the engine's kernels (imports vLLM once)…" if kind == "finding"
                        else "memory bandwidth (streaming read, copy, GEMV)")
                state["task"] = bar.add_task(text, total=None, best="")
            elif kind == "kernel":
                kernel, sizes = payload
                state["task"] = bar.add_task(f"{kernel.name} {kernel.dtype}", total=len(sizes), best="")
            elif kind == "result" and state["task"] is not None:
                bar.update(state["task"], advance=1, best=f"n={payload.n}: {payload.flops_per_s / 1e9:,.1f} GFLOP/s")
            elif kind == "bandwidth" and state["task"] is not None:
                bar.update(state["task"], best=f"{payload.kernel}: {payload.bytes_per_s / 1e9:,.1f} GB/s")
            elif kind == "skipped" and state["task"] is not None:
                bar.update(state["task"], best=f"skipped: {payload[1]!r}"[:60])

        yield on_event
