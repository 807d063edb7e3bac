"""The seams where the engine hook takes its collaborators: what each one must provide.

The hook is given a clock, a snapshot publisher, a GPU sampler and (benchmarks only) an observer; the
engine's defaults are `time.monotonic`, `publish.SnapshotWriter`, `gpu_util.GpuUtilSampler` and none.  Tests
and benchmarks pass their own, which only have to match these Protocols, never monkeypatch internals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from serving_mfu.cost.counters import Counters
from serving_mfu.schema.report import GpuUtilStatus


class Clock(Protocol):
    """Seconds from a fixed origin: monotonic for step times, wall time for snapshots."""

    def __call__(self) -> float: ...


@runtime_checkable
class Publisher(Protocol):
    """Publishes the tracker's state (publish.SnapshotWriter; a NullWriter for benchmarks)."""

    path: Path | None

    def mark_dirty(self) -> None:
        """New steps were accounted: publish at the next tick (never blocks the caller)."""

    def close(self) -> None:
        """Publish once more, with everything accounted, and stop."""


@runtime_checkable
class Sampler(Protocol):
    """Samples GPU-Util and SM activity beside the engine (gpu_util.GpuUtilSampler)."""

    available: bool
    reason: str | None
    devices: list[Any]

    def add_to(self, counters: Counters) -> Counters:
        """Add its cumulative sums (the table's gpu_* rows) into `counters`; never raises."""

    def status(self) -> GpuUtilStatus:
        """What it measures, or why not."""

    def stop(self) -> None:
        """Take the last sample and stop."""


@runtime_checkable
class Observer(Protocol):
    """Sees each engine callback's arguments before it runs and its result after (bench-overhead)."""

    def enter(self, kind: str, *args: Any) -> None: ...

    def exit(self, kind: str, result: Any) -> None: ...
