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
from collections import deque
from pathlib import Path

from pydantic import BaseModel
from rich.progress import Progress

from serving_mfu.cost.records import DecodeBatch, IterationRecord, PrefillBatch
from serving_mfu.model.spec import ModelSpec
from serving_mfu.peaks.table import lookup_peak
from serving_mfu.runtime.accounts import RequestAccounts, ledger_slots
from serving_mfu.runtime.aggregate import SnapshotReader
from serving_mfu.runtime.ledger import RequestLedger
from serving_mfu.runtime.publish import SnapshotWriter
from serving_mfu.runtime.request_log import RequestLogReader, RequestLogWriter, log_paths
from serving_mfu.runtime.tenants import TenantTable
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


class _RequestSoak:
    """The request soak's engine: a decode batch, requests finishing and admitted at every step, charged and
    published as the hook does (the ledger, the accounts, the tenant table, the request log)."""

    def __init__(self, folder: Path, batch: int, per_step: int, tenants: int, segment_records: int, model: str):
        spec = ModelSpec.from_hf_config(PUBLIC_CONFIGS[model])
        # the tracker's window (a Counters per second for max_window_s, bounded: the iteration soak's subject) is
        # full within the first 600 steps here, so what grows after the first checkpoint is the accounts'
        self.tracker = MFUTracker(spec, lookup_peak("h100-sxm", "bf16"), devices=1, clock=None, max_window_s=300.0)
        self.ledger = RequestLedger(ledger_slots(batch + per_step))  # sized as the hook sizes it
        self.accounts = RequestAccounts(self.ledger, TenantTable(20), self.tracker.cost_model, 1,
                                        *self.tracker.engine_peak, "soak-0", 0.0)
        self.log = RequestLogWriter(folder, "soak-0", segment_records=segment_records)
        self.accounts.sinks.append(self.log.add)
        self.batch, self.per_step, self.tenants = batch, per_step, tenants
        self.live: deque[str] = deque()
        self.n0: dict[str, int] = {}
        self.made = self.done = self.step = 0

    def run_step(self) -> None:
        """One engine step of 0.4 s busy (a large prefill chunk at the H100's peak stays below it)."""
        self.step += 1
        clock, k = self.step * 0.5, self.per_step
        if len(self.live) >= self.batch:  # the oldest finish
            gone = [self.live.popleft() for _ in range(k)]
            for rid in gone:
                self.n0.pop(rid)
            self.accounts.finish(gone)  # closed at the next settle
            self.done += len(gone)
        new = [f"cmpl-soak{self.made + i}-0-{self.made + i:08x}" for i in range(k)]
        slots = self.ledger.admit(new, [512] * k)
        self.accounts.open(new, [f"tenant-{(self.made + i) % self.tenants}" for i in range(k)], slots)
        self.made += k
        dec = list(self.live)
        rec = IterationRecord(step=self.step, t_sched_s=clock - 0.4, t_end_s=clock, slices=[],
                              prefill=PrefillBatch(req_ids=new, new_tokens=[512] * k, computed_before=[0] * k,
                                                   prompt_len=[512] * k),
                              decode=DecodeBatch(req_ids=dec, computed_before=[self.n0[r] for r in dec]) if dec
                              else None)
        cost = self.tracker.record(rec)
        if cost is not None:
            self.accounts.charge(rec, cost)
        for rid in dec:
            self.n0[rid] += 1
        for rid in new:
            self.live.append(rid)
            self.n0[rid] = 512
        self.log.flush()  # the engine publishes every 0.5 s: once a step here

    def point(self, folder: Path, reader: RequestLogReader, t0: float) -> RequestSoakPoint:
        self.accounts.settle()  # as before a publish
        self.log.flush()
        newest = reader.newest(1)
        last = f"cmpl-soak{self.done - 1}-0-{self.done - 1:08x}"
        live_log, old_log = log_paths(folder, "soak-0")
        return RequestSoakPoint(
            requests=self.done, wall_s=time.perf_counter() - t0, peak_rss_mib=_peak_rss_mib(),
            ledger_slots=len(self.ledger.prompt_len), tenant_labels=len(self.accounts.tenants.labels),
            log_bytes=sum(p.stat().st_size for p in (live_log, old_log) if p.exists()), reader_ring=len(reader.ring),
            reader_matches=bool(newest) and newest[0].request_id == last and newest[0].output_tokens > 0
            and newest[0].prompt_tokens == 512)


def soak_requests(requests: int = 1_000_000, batch: int = 128, per_step: int = 16, tenants: int = 100_000,
                  checkpoints: tuple[int, ...] = (10_000, 100_000, 1_000_000), ring: int = 10_000,
                  segment_records: int = 50_000, model: str = "llama-3-8b", progress: bool = True
                  ) -> list[RequestSoakPoint]:
    """`requests` requests through the ledger, the per-request accounts, the tenant table, the request log and
    its reader: a decode batch of `batch`, `per_step` finishing and as many admitted (a prompt chunk each) per
    step, each declaring one of `tenants` distinct tenants (far more than the label budget)."""
    if requests < 1 or batch < per_step or per_step < 1:
        raise ValueError("need requests >= 1 and 1 <= per_step <= batch")
    marks = sorted({c for c in checkpoints if c < requests} | {requests})
    points: list[RequestSoakPoint] = []
    with tempfile.TemporaryDirectory(prefix="serving-mfu-soak-") as name, \
            Progress(disable=not progress, transient=True) as bar:
        folder = Path(name)
        sim = _RequestSoak(folder, batch, per_step, tenants, segment_records, model)
        reader = RequestLogReader(folder, ring=ring)
        task = bar.add_task("bench-soak (requests)", total=requests)
        t0 = time.perf_counter()
        while sim.done < requests:
            sim.run_step()
            if sim.step % 500 == 0:
                reader.refresh()
                bar.update(task, completed=sim.done)
            while marks and sim.done >= marks[0]:
                marks.pop(0)
                points.append(sim.point(folder, reader, t0))
        sim.log.close()
    return points
