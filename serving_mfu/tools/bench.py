"""`serving-mfu bench-accounting`: what the tracker costs per iteration, at several batch sizes."""

from __future__ import annotations

import random
import time

import msgspec
from pydantic import BaseModel

from serving_mfu.cost.records import DecodeBatch, IterationRecord, PrefillBatch
from serving_mfu.model.spec import ModelSpec
from serving_mfu.peaks.table import lookup_peak
from serving_mfu.runtime.tracker import MFUTracker
from serving_mfu.tools.public_configs import PUBLIC_CONFIGS


class BenchRow(BaseModel):
    model: str
    slices: int
    us_per_iteration: float
    us_per_slice: float


def synthetic_iteration(step: int, batch: int, rng: random.Random) -> IterationRecord:
    """A mixed iteration as the engine hook records it: one 512-token prefill chunk (continuing a 4k
    prompt), then decodes at random contexts, a third of them verifying 3 drafts."""
    prefill = None
    n = batch
    if batch > 1:
        prefill = PrefillBatch(req_ids=[f"p{step}"], new_tokens=[512], computed_before=[1024], prompt_len=[4096])
        n = batch - 1
    ctx = [rng.randint(128, 8192) for _ in range(n)]
    drafts = [3 if i % 3 == 0 else 0 for i in range(n)]
    accepted = [rng.randint(0, k) for k in drafts]
    decode = DecodeBatch(req_ids=[f"r{i}" for i in range(n)], computed_before=ctx, draft_tokens=drafts,
                         accepted_tokens=accepted)
    return IterationRecord(step=step, t_sched_s=step * 0.02, t_end_s=step * 0.02 + 0.015, slices=[],
                           prefill=prefill, decode=decode)


def bench_accounting(batches: list[int], repeats: int = 200, progress: bool = True) -> list[BenchRow]:
    """Time `MFUTracker.record` (closed-form costing of the batches, bytes, split, counters) per iteration."""
    from rich.progress import track

    rng = random.Random(0)
    peak = lookup_peak("h100-sxm", "bf16")
    rows = []
    work = [(name, b) for name in ("llama-3-70b", "qwen3-30b-a3b") for b in batches]
    for name, batch in track(work, description="bench-accounting", disable=not progress, transient=True):
        tracker = MFUTracker(ModelSpec.from_hf_config(PUBLIC_CONFIGS[name]), peak, devices=8, clock=None)
        shapes = [synthetic_iteration(i, batch, rng) for i in range(min(repeats, 50))]
        n = max(repeats, 1)
        # every timed record a step later than the one before, as an engine's are (a record whose
        # t_end runs backwards would skip the time split), built before the clock starts
        records = [msgspec.structs.replace(shapes[i % len(shapes)], step=5 + i, t_sched_s=(5 + i) * 0.02,
                                           t_end_s=(5 + i) * 0.02 + 0.015) for i in range(n)]
        for rec in shapes[:5]:  # warm-up (steps 0-4)
            tracker.record(rec)
        t0 = time.perf_counter()
        for rec in records:
            tracker.record(rec)
        us = (time.perf_counter() - t0) / n * 1e6
        rows.append(BenchRow(model=name, slices=batch, us_per_iteration=us, us_per_slice=us / batch))
    return rows
