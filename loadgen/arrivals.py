"""Open-loop arrival processes: scheduled issue times (seconds from the run's start), seeded.

The first request goes at 0 s; later ones follow gaps drawn from the process.  Poisson:
exponential gaps of mean 1/rate.  Gamma: shape `burstiness`, scale 1/(rate·burstiness), so the
mean is still 1/rate and the squared coefficient of variation is 1/burstiness (1 = Poisson).
Constant: exactly 1/rate.  A trace replays its own timestamps.  The closed loop has no
schedule: its workers are in `dispatch.py`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

CHUNK = 4096


def gaps(kind: str, rate: float, burstiness: float, rng: np.random.Generator, size: int) -> np.ndarray:
    """`size` inter-arrival gaps in seconds."""
    if math.isinf(rate):
        return np.zeros(size)
    if kind == "poisson":
        return rng.exponential(1.0 / rate, size)
    if kind == "gamma":
        return rng.gamma(burstiness, 1.0 / (rate * burstiness), size)
    if kind == "constant":
        return np.full(size, 1.0 / rate)
    raise ValueError(f"no open-loop arrival process called {kind!r}")


def offsets(kind: str, rate: float, burstiness: float, rng: np.random.Generator,
            n: int | None) -> Iterator[float]:
    """Scheduled issue times: the first at 0, then cumulative gaps; endless when n is None."""
    t = 0.0
    left = n
    while left is None or left > 0:
        size = CHUNK if left is None else min(CHUNK, left)
        g = gaps(kind, rate, burstiness, rng, size)
        times = t + np.concatenate(([0.0], np.cumsum(g[:-1])))
        t = float(times[-1] + g[-1])
        yield from times.tolist()
        if left is not None:
            left -= size


class TraceEntry(BaseModel):
    """One line of a replay trace: when to issue, and optionally what."""

    timestamp: float = Field(description="seconds; only differences matter")
    prompt: str | None = None
    input_len: int | None = Field(None, ge=1)
    output_len: int | None = Field(None, ge=1)
    tenant: str | None = Field(None, description="its vllm_xargs.tenant (default: the run's --tenant)")


def load_trace(path: str | Path) -> list[TraceEntry]:
    """Read a JSONL trace, sorted by timestamp."""
    entries = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                entries.append(TraceEntry.model_validate(json.loads(line)))
            except ValueError as exc:
                raise ValueError(f"{path}:{i}: not a trace entry: {exc}") from None
    if not entries:
        raise ValueError(f"{path}: empty trace")
    return sorted(entries, key=lambda e: e.timestamp)


def trace_offsets(entries: list[TraceEntry], time_scale: float = 1.0) -> list[float]:
    """The trace's issue times, shifted so that the first is 0 and multiplied by time_scale."""
    t0 = entries[0].timestamp
    return [(e.timestamp - t0) * time_scale for e in entries]
