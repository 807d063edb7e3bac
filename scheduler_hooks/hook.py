"""The engine-side recorder: turns vLLM's SchedulerOutput / ModelRunnerOutput into IterationRecords.

It only reads scheduler state, never changes it.  On the engine thread it only captures, in O(1)
per step (plus one `len` per sampled list on steps that verify drafts): `on_schedule` reads the
clock, `before_output` stops it (DESIGN §5) and copies the sampled lengths, `after_output` hands
the SchedulerOutput, the runner output and what update_from_output() returned to the accounting
thread.  There `build_record` classifies every slice (high-water marks, prefix-cache credit,
accepted and delivered tokens), costs the drafter and counts MoE routing, and the tracker costs
the record; a background thread publishes the snapshots.

Settings: serving_mfu.runtime.settings.Settings (SERVING_MFU_*, read once in `from_vllm_config`).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any, Callable

import numpy as np

from scheduler_hooks.engine_info import EngineInfo, engine_info
from serving_mfu.cost.accounting import CostModel
from serving_mfu.cost.drafter import drafter_cost
from serving_mfu.cost.records import DrafterRecord, IterationRecord, Slice
from serving_mfu.runtime.gpu_util import sampler_for_engine
from serving_mfu.runtime.report import ModelReport
from serving_mfu.runtime.settings import Settings, load_settings
from serving_mfu.runtime.trace import TraceHeader, TraceWriter
from serving_mfu.runtime.tracker import MFUTracker
from serving_mfu.runtime.transport import SnapshotWriter

log = logging.getLogger("serving_mfu.hook")


class NullWriter:
    """A snapshot writer that publishes nothing (benchmarks, tests of the hook alone)."""

    path = None

    def mark_dirty(self) -> None:
        pass

    def close(self) -> None:
        pass


class InjectedFault(RuntimeError):
    """Raised on purpose (SERVING_MFU_FAIL_AT_STEP) to prove a failing hook leaves the engine serving."""


class MFUHook:
    """Per-engine recorder state: pending steps, per-request high-water marks, the tracker.

    Its collaborators are passed in (settings, tracker, snapshot writer, GPU sampler, trace, clock),
    so tests and benchmarks give their own; `from_vllm_config` wires the engine's defaults.
    """

    def __init__(self, info: EngineInfo, settings: Settings, tracker: MFUTracker, sampler: Any,
                 writer_factory: Callable[["MFUHook"], Any], trace: TraceWriter | None = None,
                 clock: Callable[[], float] = time.monotonic, engine_id: str | None = None):
        self.info = info
        self.settings = settings
        self.clock = clock
        self.engine_id = engine_id or f"{os.getpid()}-{info.dp_rank}"
        self.tracker = tracker
        self.draft_model = CostModel(info.draft_spec) if info.draft_spec is not None else None
        self.spec_method = info.spec_method
        self.num_spec_tokens = info.num_spec_tokens
        self.pending: dict[int, float] = {}  # id(SchedulerOutput) → t_sched, until its output comes
        # accounting-side state, in step order: high-water marks, first sightings, prompt lengths
        self.hwm: dict[str, int] = {}
        self.seen: set[str] = set()
        self.prompt_lens: dict[str, int] = {}
        self.step = 0
        self.fail_at = settings.fail_at_step
        # The accounting runs on its own thread, mostly while the engine thread waits for the model;
        # the engine thread only captures what the step left behind.  sync_accounting does it inline
        # (benchmarks that time the whole path, debugging).
        self.sync = settings.sync_accounting
        self._queue: queue.Queue | None = None if self.sync else queue.Queue(maxsize=10_000)
        self.gpu = sampler
        self.trace = trace
        self.observer: Any = None  # see "engine callbacks"
        self._accountant: threading.Thread | None = None  # before the writer, whose thread calls flush()
        try:
            self.writer = writer_factory(self)
        except BaseException:
            self.gpu.stop()
            raise
        if self._queue is not None:
            self._accountant = threading.Thread(target=self._account_loop, name="serving-mfu-accounting",
                                                daemon=True)
            self._accountant.start()

    @classmethod
    def from_vllm_config(cls, vllm_config: Any, settings: Settings | None = None,
                         clock: Callable[[], float] = time.monotonic, publish: bool = True,
                         tracker_cls: type[MFUTracker] = MFUTracker) -> "MFUHook":
        """The hook as the engine builds it: settings from SERVING_MFU_* (a bad value is counted and
        ignored), the tracker, a snapshot writer publishing to `settings.dir` (`publish=False`: a writer
        that keeps nothing, for benchmarks), the GPU sampler and the optional trace."""
        errors: list[str] = []
        if settings is None:
            settings, errors = load_settings()
        info = engine_info(vllm_config, settings)
        tracker = tracker_cls(info.spec, info.peak, info.devices, kv_cache_dtype=info.kv_cache_dtype,
                              time_split=settings.time_split)
        for message in errors:
            tracker.note_anomaly("bad_setting", message)
        if info.peak is None:
            tracker.note_anomaly("missing_peak", info.peak_error or "no peak for this device; set "
                                 "SERVING_MFU_DEVICE, SERVING_MFU_PEAK_FLOPS or SERVING_MFU_CALIBRATION")
        model = ModelReport(name=info.spec.name, model_type=info.spec.model_type, approximate=info.spec.approximate)
        sampler = sampler_for_engine(getattr(vllm_config, "parallel_config", None), settings=settings)
        trace = None
        if settings.trace:
            header = TraceHeader(hf_config=vllm_config.model_config.hf_config.to_dict(), peak=info.peak,
                                 devices=info.devices, kv_cache_dtype=info.kv_cache_dtype)
            trace = TraceWriter(settings.trace, header)

        def writer(hook: "MFUHook") -> Any:
            if not publish:
                return NullWriter()
            return SnapshotWriter(hook._snapshot, hook.engine_id, model, tracker.peak_report(), tracker.time_split,
                                  directory=settings.snapshot_dir(), gpu_status=sampler.status,
                                  before_write=hook.flush)

        hook = cls(info, settings, tracker, sampler, writer, trace=trace, clock=clock)
        log.info("serving-mfu: tracking %s on %d device(s), peak %s, publishing to %s; GPU-Util: %s",
                 info.spec.name, info.devices, info.peak.source if info.peak else "missing",
                 getattr(hook.writer, "path", "nowhere"),
                 f"{len(sampler.devices)} device(s)" if sampler.available else sampler.reason)
        return hook

    def _snapshot(self) -> tuple[Any, list[dict]]:
        """The tracker's cumulative counters with the GPU sampler's cumulative sums added (publisher thread)."""
        counters, recent = self.tracker.snapshot(recent=100, raw=True)
        return self.gpu.add_to(counters), recent

    # ------------------------------------------------------------------ engine callbacks
    # `observer` (None in the engine) sees each callback's arguments before it runs and its result after,
    # and every record made: benchmarks time the hook and keep what it read without replacing its methods.
    def on_schedule(self, sched: Any, out: Any) -> None:
        obs = self.observer
        if obs is None:
            return self._on_schedule(sched, out)
        obs.enter("schedule", sched, out)
        result = self._on_schedule(sched, out)
        obs.exit("schedule", result)
        return result

    def before_output(self, sched: Any, out: Any, runner_out: Any) -> tuple | None:
        obs = self.observer
        if obs is None:
            return self._before_output(sched, out, runner_out)
        obs.enter("output", sched, out, runner_out)
        result = self._before_output(sched, out, runner_out)
        obs.exit("output", result)
        return result

    def after_output(self, token: tuple, result: Any = None) -> None:
        obs = self.observer
        if obs is None:
            return self._after_output(token, result)
        obs.enter("after", token, result)
        try:
            self._after_output(token, result)
        finally:
            obs.exit("after", None)

    # The engine thread only captures: two clock readings, references to what vLLM hands over, and
    # the one thing vLLM changes in place before the accounting thread runs.  Safe to read later:
    #  - SchedulerOutput (`out`): built fresh by each schedule() and never changed after; it carries
    #    every scheduled request's tokens (`num_scheduled_tokens`), the positions computed before the
    #    step (NewRequestData / CachedRequestData `num_computed_tokens`), prompts of new requests,
    #    drafts (`scheduled_spec_decode_tokens`) and `finished_req_ids`;
    #  - the EngineCoreOutputs update_from_output() returns: what reached each user (`new_token_ids`,
    #    already cut at stop tokens / max_tokens);
    #  - ModelRunnerOutput's routed-experts capture (numpy rows).
    # Not safe: `sampled_token_ids`, whose lists update_from_output() trims in place at a stop, so
    # their lengths (accepted drafts) are copied in before_output — only on steps with drafts — and
    # Request objects, whose counters move on; `sched.requests` is kept only to look up the prompt of
    # a request first seen before this hook started.
    def _on_schedule(self, sched: Any, out: Any) -> None:
        """After `schedule()`: the clock (O(1))."""
        if out.total_num_scheduled_tokens:
            pending = self.pending
            pending[id(out)] = self.clock()
            if len(pending) > 64:  # outputs that never came (aborted steps): forget the oldest
                pending.pop(next(iter(pending)))

    def _before_output(self, sched: Any, out: Any, runner_out: Any) -> tuple | None:
        """Before `update_from_output()`: stop the clock; copy the sampled lengths if drafts were verified."""
        t_end = self.clock()
        t_sched = self.pending.pop(id(out), None)
        if t_sched is None:
            return None
        lengths = None
        if out.scheduled_spec_decode_tokens:
            sampled = runner_out.sampled_token_ids
            lengths = list(map(len, sampled)) if sampled else []
        return t_sched, t_end, out, runner_out, lengths, sched.requests

    def _after_output(self, token: tuple, result: Any = None) -> None:
        """After `update_from_output()`: hand the capture to the accounting thread (O(1))."""
        self.step += 1
        item = (self.step, token, result)
        if self._queue is None:
            self._account(item)
        else:
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                self.tracker.note_anomaly("dropped_records", "the accounting thread fell 10000 steps behind")
        if self.fail_at is not None and self.step == self.fail_at:
            raise InjectedFault(f"SERVING_MFU_FAIL_AT_STEP={self.fail_at} (after recording the step)")

    # ------------------------------------------------------------------ building the record (accounting side)
    def build_record(self, step: int, token: tuple, result: Any) -> IterationRecord:
        """One IterationRecord from a step's capture: slices with their high-water marks, prefix-cache
        credit, accepted and delivered tokens; the drafter's cost; MoE routing counts."""
        t_sched, t_end, out, runner_out, lengths, requests = token
        hwm, seen, prompts = self.hwm, self.seen, self.prompt_lens
        for rid in out.finished_req_ids:
            hwm.pop(rid, None)
            seen.discard(rid)
            prompts.pop(rid, None)
        before: dict[str, int] = {}
        for nr in out.scheduled_new_reqs:
            before[nr.req_id] = nr.num_computed_tokens
            ids = nr.prompt_token_ids
            prompts[nr.req_id] = len(ids) if ids is not None else int(nr.prompt_embeds.shape[0])
        cached_reqs = out.scheduled_cached_reqs
        before.update(zip(cached_reqs.req_ids, cached_reqs.num_computed_tokens))
        spec_tokens = out.scheduled_spec_decode_tokens
        index = runner_out.req_id_to_index if lengths is not None else None
        delivered_by_id: dict[str, int] | None = None
        slices = []
        append = slices.append
        runs = [] if self.draft_model is not None else None
        n_drafting = 0
        entries = []
        for rid, q in out.num_scheduled_tokens.items():
            n0 = before[rid]
            prompt = prompts.get(rid)
            if prompt is None:  # first seen before this hook started
                prompt = prompts[rid] = requests[rid].num_prompt_tokens
            cached = 0
            if rid not in seen:  # first schedule: what it starts from was served by the prefix cache
                seen.add(rid)
                cached = n0
            mark = hwm.get(rid, 0)
            drafts = spec_tokens.get(rid) if spec_tokens else None
            k = len(drafts) if drafts else 0
            accepted = 0
            if k:
                i = index.get(rid)
                n = (lengths[i] if lengths and i is not None else 0) - 1
                accepted = k if n > k else (n if n > 0 else 0)
            end = n0 + q
            kept_end = end - (k - accepted)
            if kept_end > mark:
                hwm[rid] = kept_end
            if end >= prompt:
                n_drafting += 1
            delivered = None
            if end > prompt and end > mark:  # a decode step: what reached the user
                first = n0 if n0 > mark else mark
                if first < prompt:
                    first = prompt
                if delivered_by_id is None:
                    delivered_by_id = _delivered(result)
                got = delivered_by_id.get(rid, 0)
                if got < kept_end - first:  # a stop or max_tokens cut the kept positions short
                    delivered = got
                if runs is not None:
                    runs.append((n0 if n0 > mark else mark, kept_end))
            elif runs is not None and end == prompt and end > mark:  # a finished prefill drafts too
                runs.append((n0 if n0 > mark else mark, kept_end))
            append(Slice(rid, q, n0, prompt, mark, cached, k, accepted, delivered))
            entries.append((rid, q, n0))
        drafter = None
        if self.spec_method:
            n_drafting = len(runs) if runs is not None else n_drafting
            flops, bytes_ = (0.0, 0.0) if runs is None else drafter_cost(self.draft_model, self.num_spec_tokens, runs)
            drafter = DrafterRecord(self.spec_method, flops, bytes_, self.num_spec_tokens * n_drafting)
        routing = moe_routing(runner_out, entries, self.tracker.spec) if self.tracker.spec.is_moe else None
        return IterationRecord(step, t_sched, t_end, slices, drafter, routing, self.engine_id)

    # ------------------------------------------------------------------ accounting thread
    def _account(self, item: tuple) -> None:
        try:
            rec = self.build_record(*item)
            if self.observer is not None:
                self.observer.recorded(rec)
            self.tracker.record(rec)
            self.writer.mark_dirty()
            if self.trace is not None:
                self.trace.write(rec)
        except Exception as exc:
            self.error("accounting", exc)

    def _account_loop(self) -> None:
        q = self._queue
        assert q is not None
        while True:
            rec = q.get()
            try:
                if rec is None:
                    return
                self._account(rec)
            finally:
                q.task_done()

    def flush(self) -> None:
        """Wait until every submitted step is accounted (publisher thread, tests, shutdown)."""
        if self._queue is not None and self._accountant is not None and self._accountant.is_alive():
            self._queue.join()

    def error(self, where: str, exc: BaseException) -> None:
        """Count a hook failure (logged once per kind); the engine goes on."""
        self.tracker.note_anomaly("hook_errors", f"{where}: {exc!r}")
        self.writer.mark_dirty()

    def close(self) -> None:
        if self._queue is not None and self._accountant is not None:
            self._queue.put(None)
            self._accountant.join(timeout=5)
        self.gpu.stop()  # before the last write, so that it carries the final GPU sums
        self.writer.close()
        if self.trace is not None:
            self.trace.close()


def _delivered(result: Any) -> dict[str, int]:
    """Tokens each request received in this step, from update_from_output()'s EngineCoreOutputs."""
    out: dict[str, int] = {}
    for outputs in (result or {}).values():
        for o in outputs.outputs:
            out[o.request_id] = len(o.new_token_ids)
    return out


def moe_routing(runner_out: Any, entries: list[tuple], spec: Any) -> list[list[int]] | None:
    """Tokens routed to each expert per MoE layer in this step, from vLLM's routed-experts capture.

    Needs `enable_return_routed_experts`; the rows cover a request's tokens from `token_start`,
    shaped [tokens, layers, top_k].  All requests' rows of the step are counted with one
    `bincount` over (layer, expert) pairs.  Returns None when the engine did not capture routing.
    """
    aux = getattr(runner_out, "aux_output_connector_output", None)
    if not aux:
        return None
    moe_layers = spec.moe_layer_indices
    experts = spec.layers[moe_layers[0]].moe.num_experts
    chunks = []
    for rid, q, n0, *_ in entries:
        item = aux.get(rid)
        if item is None:
            continue
        rows = np.asarray(item.rows)
        lo, hi = max(n0 - item.token_start, 0), max(n0 + q - item.token_start, 0)
        chosen = rows[lo:hi]
        if chosen.size:
            chunks.append(chosen)
    if not chunks:
        return None
    layers = min(c.shape[1] for c in chunks)
    chosen = np.concatenate([c[:, :layers, :] for c in chunks], axis=0)  # [tokens, layers, top_k]
    ids = chosen.astype(np.int64, copy=False)
    valid = (ids >= 0) & (ids < experts)
    flat = (np.arange(layers, dtype=np.int64)[None, :, None] * experts + ids)[valid]
    return np.bincount(flat, minlength=layers * experts).reshape(layers, experts).tolist()
