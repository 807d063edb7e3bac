"""`serving-mfu bench-soak`: a long run through tracker → snapshot writer → reader, in-process.

Feeds `iterations` engine-shaped records (a decode batch of `batch` requests at growing contexts,
a prompt chunk every 8th step, requests finishing and new ones arriving) into an `MFUTracker`
whose `SnapshotWriter` publishes from its own thread as in an engine, while a `SnapshotReader`
reads the totals every `read_every` steps.  At each checkpoint (10⁴, 10⁵, 10⁶ … iterations) it
prints the process's peak RSS, the snapshot file's size and the writer's publish latency, and checks
that the reader's totals equal the tracker's.  Memory is bounded by construction: the tracker keeps
one `Counters` per second of window (≤ 3,600) and 1,024 recent iterations, the writer 60 history
points and the recent costs; the bound shows as a flat RSS from 10⁵ to 10⁶ iterations.

`soak_requests` does the same for per-request attribution (DESIGN §12): 10⁶ requests of 10⁵ distinct
tenants through the ledger (slots reused), the accounts, the tenant table (20 labels and `other`), the
request log (two segments at most) and its reader (a ring): a flat RSS from 10⁵ to 10⁶ requests.
"""

from __future__ import annotations

import resource
import statistics
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel

from serving_mfu.cost.records import DecodeBatch, IterationRecord, PrefillBatch
from serving_mfu.model.spec import ModelSpec
from serving_mfu.peaks.table import lookup_peak
from serving_mfu.runtime.aggregate import SnapshotReader
from serving_mfu.runtime.publish import SnapshotWriter
from serving_mfu.runtime.tracker import MFUTracker
from serving_mfu.tools.public_configs import PUBLIC_CONFIGS


class SoakPoint(BaseModel):
    iterations: int
    wall_s: float
    peak_rss_mib: float
    snapshot_bytes: int
    publishes: int  # by the writer's own thread so far
    snapshot_read_ms_p50: float  # the writer's read of the tracker (under its lock), median over publishes
    publish_ms: float  # one whole publish at the checkpoint: read, encode, write, rename
    reader_matches: bool  # the reader's totals equal the tracker's


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def soak(iterations: int = 1_000_000, batch: int = 64, checkpoints: tuple[int, ...] = (10_000, 100_000, 1_000_000),
         read_every: int = 1000, model: str = "llama-3-8b", progress: bool = True) -> list[SoakPoint]:
    """Run the soak; one point per checkpoint reached (the last at `iterations`)."""
    if iterations < 1 or batch < 1 or read_every < 1:
        raise ValueError("--iterations, --batch and --read-every must be >= 1")
    from rich.progress import Progress

    spec = ModelSpec.from_hf_config(PUBLIC_CONFIGS[model])
    tracker = MFUTracker(spec, lookup_peak("h100-sxm", "bf16"), devices=1, clock=None)
    marks = sorted({c for c in checkpoints if c < iterations} | {iterations})
    points: list[SoakPoint] = []
    publish_s: list[float] = []
    with tempfile.TemporaryDirectory(prefix="serving-mfu-soak-") as folder:
        def timed_source():  # the writer's read of the tracker: what each publish costs, timed
            t0 = time.perf_counter()
            out = tracker.snapshot(recent=100, raw=True)
            publish_s.append(time.perf_counter() - t0)
            return out

        writer = SnapshotWriter(timed_source, "soak", tracker.model_report(), tracker.peak_report(),
                                tracker.time_split, directory=folder, interval_s=0.5)
        reader = SnapshotReader(folder)
        ids = [f"r{i}" for i in range(batch)]
        ctx = list(range(100, 100 + batch))
        t0 = time.perf_counter()
        clock = 0.0
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("bench-soak", total=iterations)
            for step in range(iterations):
                clock += 0.02
                prefill = None
                if step % 8 == 0:  # a prompt chunk of a new request
                    prefill = PrefillBatch(req_ids=[f"p{step}"], new_tokens=[256], computed_before=[0],
                                           prompt_len=[1024])
                ctx = [c + 1 if c < 8192 else 100 for c in ctx]  # long requests finish, new ones start short
                tracker.record(IterationRecord(step=step, t_sched_s=clock - 0.015, t_end_s=clock, slices=[],
                                               prefill=prefill, decode=DecodeBatch(req_ids=ids, computed_before=ctx)))
                writer.mark_dirty()
                if step % read_every == 0:
                    reader.totals()
                n = step + 1
                if n in marks:
                    w0 = time.perf_counter()
                    writer.write_now()
                    publish_ms = (time.perf_counter() - w0) * 1e3
                    totals = reader.totals()
                    counters = tracker.counters
                    ms = [x * 1e3 for x in publish_s] or [0.0]
                    points.append(SoakPoint(
                        iterations=n, wall_s=time.perf_counter() - t0, peak_rss_mib=_peak_rss_mib(),
                        snapshot_bytes=Path(writer.path).stat().st_size, publishes=len(publish_s),
                        snapshot_read_ms_p50=statistics.median(ms), publish_ms=publish_ms,
                        reader_matches=totals is not None and totals.counters.decode_tokens == counters.decode_tokens
                        and totals.counters.iterations == counters.iterations == n))
                if step % 1000 == 0:
                    bar.update(task, completed=n)
        writer.close()
    return points


class RequestSoakPoint(BaseModel):
    """One checkpoint of the request soak (DESIGN §12: memory stays bounded however many requests pass)."""

    requests: int  # finished so far
    wall_s: float
    peak_rss_mib: float
    ledger_slots: int  # the ledger's capacity (slots are reused)
    tenant_labels: int  # labels ever given (bounded by max_tenants + `other`)
    log_bytes: int  # the engine's request log on disk (two segments at most)
    reader_ring: int  # finished requests the reader holds (bounded by its ring)
    reader_matches: bool  # the newest request the reader holds is the newest the engine finished, intact


def soak_requests(requests: int = 1_000_000, batch: int = 128, per_step: int = 16, tenants: int = 100_000,
                  checkpoints: tuple[int, ...] = (10_000, 100_000, 1_000_000), ring: int = 10_000,
                  segment_records: int = 50_000, model: str = "llama-3-8b", progress: bool = True
                  ) -> list[RequestSoakPoint]:
    """`requests` requests through the ledger, the per-request accounts, the tenant table, the request log and
    its reader: a decode batch of `batch`, `per_step` finishing and as many admitted (a prompt chunk each) per
    step, each declaring one of `tenants` distinct tenants (far more than the label budget)."""
    if requests < 1 or batch < per_step or per_step < 1:
        raise ValueError("need requests >= 1 and 1 <= per_step <= batch")
    from collections import deque

    from rich.progress import Progress

    from serving_mfu.runtime.accounts import RequestAccounts
    from serving_mfu.runtime.ledger import RequestLedger
    from serving_mfu.runtime.request_log import RequestLogReader, RequestLogWriter, log_paths
    from serving_mfu.runtime.tenants import TenantTable

    spec = ModelSpec.from_hf_config(PUBLIC_CONFIGS[model])
    tracker = MFUTracker(spec, lookup_peak("h100-sxm", "bf16"), devices=1, clock=None)
    marks = sorted({c for c in checkpoints if c < requests} | {requests})
    points: list[RequestSoakPoint] = []
    with tempfile.TemporaryDirectory(prefix="serving-mfu-soak-") as folder:
        ledger = RequestLedger()
        accounts = RequestAccounts(ledger, TenantTable(20), tracker.cost_model, 1, *tracker.engine_peak, "soak-0",
                                   0.0)
        log = RequestLogWriter(Path(folder), "soak-0", segment_records=segment_records)
        accounts.sinks.append(log.add)
        reader = RequestLogReader(Path(folder), ring=ring)
        live: deque[str] = deque()
        n0: dict[str, int] = {}
        made = done = step = 0
        clock = 0.0
        t0 = time.perf_counter()
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("bench-soak (requests)", total=requests)
            while done < requests:
                step += 1
                clock += 0.5  # steps of 0.4 s busy: a large prefill chunk at the H100's peak stays below it
                if len(live) >= batch:  # the oldest finish
                    gone = [live.popleft() for _ in range(per_step)]
                    for rid in gone:
                        n0.pop(rid)
                    ids, slots = ledger.finish(gone)
                    accounts.close(ids, slots)
                    done += len(ids)
                new = [f"cmpl-soak{made + i}-0-{made + i:08x}" for i in range(per_step)]
                made += per_step
                slots = ledger.admit(new, [512] * per_step)
                accounts.open(new, [f"tenant-{(made + i) % tenants}" for i in range(per_step)], slots)
                dec = list(live)
                rec = IterationRecord(step=step, t_sched_s=clock - 0.4, t_end_s=clock, slices=[],
                                      prefill=PrefillBatch(req_ids=new, new_tokens=[512] * per_step,
                                                           computed_before=[0] * per_step, prompt_len=[512] * per_step),
                                      decode=DecodeBatch(req_ids=dec, computed_before=[n0[r] for r in dec]) if dec
                                      else None)
                cost = tracker.record(rec)
                if cost is not None:
                    accounts.charge(rec, cost)
                for rid in dec:
                    n0[rid] += 1
                for rid in new:
                    live.append(rid)
                    n0[rid] = 512
                log.flush()  # the engine publishes every 0.5 s: once a step here
                if step % 500 == 0:
                    reader.refresh()
                while marks and done >= marks[0]:
                    marks.pop(0)
                    log.flush()
                    newest = reader.newest(1)
                    last = f"cmpl-soak{done - 1}-0-{done - 1:08x}"
                    live_log, old_log = log_paths(Path(folder), "soak-0")
                    points.append(RequestSoakPoint(
                        requests=done, wall_s=time.perf_counter() - t0, peak_rss_mib=_peak_rss_mib(),
                        ledger_slots=len(ledger.prompt_len), tenant_labels=len(accounts.tenants.labels),
                        log_bytes=sum(p.stat().st_size for p in (live_log, old_log) if p.exists()),
                        reader_ring=len(reader.ring),
                        reader_matches=bool(newest) and newest[0].request_id == last
                        and newest[0].output_tokens > 0 and newest[0].prompt_tokens == 512))
                if step % 1000 == 0:
                    bar.update(task, completed=done)
        log.close()
    return points
