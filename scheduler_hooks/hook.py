"""The engine-side recorder: turns vLLM's SchedulerOutput / ModelRunnerOutput into IterationRecords.

It only reads scheduler state, never changes it.  On the engine thread it only captures, in O(1)
per step (plus, with vLLM's stats off, one `len` per sampled list on steps that verify drafts):
`on_schedule` reads the clock, `before_output` stops it (DESIGN §5), `after_output` hands
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
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import add, attrgetter, lt
from typing import Any, Callable

import msgspec
import numpy as np

from scheduler_hooks.capture import StepCapture
from scheduler_hooks.engine_info import EngineInfo, engine_info
from scheduler_hooks.vllm_outputs import (
    FROM_STATS,
    delivered_by_request,
    delivered_tokens,
    kv_transfer,
    moe_routing,
    sampled_lengths,
    uniform_decode,
)
from serving_mfu.cost.accounting import CostModel
from serving_mfu.cost.columns import int_array, remember
from serving_mfu.cost.drafter import DraftRequest, drafter_work
from serving_mfu.cost.graph_padding import padded_tokens, padding_from_stats
from serving_mfu.cost.records import (
    DecodeBatch,
    DrafterRecord,
    IterationRecord,
    LoRAUse,
    PrefillBatch,
    Slice,
)
from serving_mfu.model.lora import load_adapter, lora_flops
from serving_mfu.peaks.cpu import last_level_cache_bytes, weights_fit_in_cache
from serving_mfu.runtime.accounts import RequestAccounts, ledger_slots
from serving_mfu.runtime.gpu_util import sampler_for_engine
from serving_mfu.runtime.ledger import DEFAULT_CAPACITY, RequestLedger
from serving_mfu.runtime.publish import SnapshotWriter
from serving_mfu.runtime.request_log import RequestLogWriter
from serving_mfu.runtime.seams import Clock, Observer, Publisher, Sampler
from serving_mfu.runtime.settings import Settings, load_settings
from serving_mfu.runtime.tenants import TenantTable
from serving_mfu.runtime.trace import TraceHeader, TraceWriter
from serving_mfu.runtime.tracker import MFUTracker
from serving_mfu.schema.report import ModelReport

log = logging.getLogger("serving_mfu.hook")
_REQ_ID = attrgetter("req_id")
_COMPUTED = attrgetter("num_computed_tokens")
_PROMPT_IDS = attrgetter("prompt_token_ids")
_EXTRA_ARGS = attrgetter("sampling_params.extra_args")


class NullWriter:
    """A snapshot writer that publishes nothing (benchmarks, tests of the hook alone)."""

    path = None

    def mark_dirty(self) -> None:
        pass

    def close(self) -> None:
        pass


def _flag_weights_in_cache(tracker: MFUTracker, info: EngineInfo,
                           cache_bytes: Callable[[], int | None] = last_level_cache_bytes) -> None:
    """On a CPU engine (its peak has an ISA figure), flag a model whose weights fit in the last-level cache:
    its bytes are not DRAM traffic, so MBU against the DRAM bandwidth overstates the memory's load (DESIGN §11)."""
    if info.peak is None or not info.peak.isa_flops_per_s:
        return
    bm = tracker.cost_model.byte_model
    weights = bm.weight_bytes(True, True, [float(e) for e, _ in bm.moe_shape])
    cache = cache_bytes()
    if weights_fit_in_cache(weights, cache):
        tracker.note_anomaly("weights_fit_in_cache", f"the model's weights ({weights / 2**20:.1f} MiB) fit in the "
                             f"last-level cache ({cache / 2**20:.0f} MiB): its bytes are not DRAM traffic, and MBU "
                             "against the DRAM bandwidth overstates the memory's load")


_FLUSH = "flush"  # an accounting-queue item (_FLUSH, event): settle the per-request accounts, then set the event
_QUEUE_LIMIT = 10_000  # steps waiting for the accounting thread at most (more are dropped and counted)


class InjectedFault(RuntimeError):
    """Raised on purpose (SERVING_MFU_FAIL_AT_STEP) to prove a failing hook leaves the engine serving."""


@dataclass(slots=True)
class _Sorted:
    """One step's requests as `build_record` sorts them: the prefill batch's columns, the decode batch's
    (vLLM's own lists until a request is sorted out of them), and the general rows."""

    dec_ids: list[str]
    dec_n0: list[int]
    general: list[tuple[str, int, int, int, int, int]] = field(default_factory=list)  # rid, q, n0, prompt, mark, cached
    p_ids: list[str] = field(default_factory=list)
    p_q: list[int] = field(default_factory=list)
    p_n0: list[int] = field(default_factory=list)
    p_prompt: list[int] = field(default_factory=list)
    p_cached: list[int] = field(default_factory=list)
    p_end: Any = None  # the prefill batch's chunk ends (an array), where _sort_new computed them
    n_chunks: int = 0  # prompt chunks of cached requests in the prefill batch
    p_done: int = 0  # prompts the prefill batch completes
    drafts: list[int] | None = None
    accepted: list[int] | None = None
    dec_delivered: list[int] | None = None
    shared: bool = False  # the prefill lists are converted (int_array): append to copies

    def add_prompt(self, rid: str, q: int, n0: int, prompt: int, cached: int) -> None:
        if self.shared:  # a converted list must not change: its array is memoized by identity
            self.p_ids, self.p_q, self.p_n0, self.p_prompt = list(self.p_ids), list(self.p_q), list(self.p_n0), \
                list(self.p_prompt)
            self.p_cached, self.p_end, self.shared = list(self.p_cached), None, False
        self.p_ids.append(rid)
        self.p_q.append(q)
        self.p_n0.append(n0)
        self.p_prompt.append(prompt)
        self.p_cached.append(cached)


class MFUHook:
    """Per-engine recorder state: pending steps, per-request high-water marks, the tracker.

    Its collaborators are passed in (settings, tracker, snapshot writer, GPU sampler, trace, clock),
    so tests and benchmarks give their own; `from_vllm_config` wires the engine's defaults.
    """

    def __init__(self, info: EngineInfo, settings: Settings, tracker: MFUTracker, sampler: Sampler,
                 writer_factory: Callable[["MFUHook"], Publisher], trace: TraceWriter | None = None,
                 clock: Clock = time.monotonic, engine_id: str | None = None):
        self.info = info
        self.settings = settings
        self.clock = clock
        self.engine_id = engine_id or f"{os.getpid()}-{info.dp_rank}"
        self.tracker = tracker
        self.draft_model = CostModel(info.draft_spec) if info.draft_spec is not None else None
        self.spec_method = info.spec_method
        self._is_moe = info.spec.is_moe
        self._experts = info.spec.layers[info.spec.moe_layer_indices[0]].moe.num_experts if self._is_moe else 0
        self.num_spec_tokens = info.num_spec_tokens
        # with a KV connector a first schedule's computed positions may be local hits or loaded KV: both
        # are told apart at the request's first output (vLLM's PrefillStats), not at its first schedule
        self._kv = info.kv_role != "none"
        # LoRA (--enable-lora): each request's adapter, from its NewRequestData.lora_request, and each
        # adapter's FLOPs per position (its own ranks) and executed (vLLM's padded max_lora_rank)
        self._lora_rank = info.max_lora_rank
        self._adapters: dict[int, LoRAUse | None] = {}
        self.pending: dict[int, float] = {}  # id(SchedulerOutput) → t_sched, until its output comes
        # accounting-side state, in step order: every request's prompt length, high-water mark, adapter
        # sized as vLLM's InputBatch, for the requests in flight (and, with attribution, those finished but not
        # yet closed: SETTLE_FINISHED), so that it does not grow while the engine serves
        in_flight = info.max_num_seqs or DEFAULT_CAPACITY
        self.ledger = RequestLedger(ledger_slots(in_flight) if settings.attribution else in_flight)
        # per-request and per-tenant cost (DESIGN §12): a request's tenant is vllm_xargs.tenant, else its
        # adapter's name, else `default_tenant` (the served model's name, set by from_vllm_config)
        self.default_tenant = info.spec.name
        self.accounts: RequestAccounts | None = None
        self.request_log: RequestLogWriter | None = None
        self._adapter_names: dict[int, str] = {}
        if settings.attribution:
            self.accounts = RequestAccounts(
                self.ledger, TenantTable(settings.max_tenants, settings.pinned_tenants()), tracker.cost_model,
                info.devices, *tracker.engine_peak, self.engine_id, time.time() - time.monotonic(),
                sinks=[trace.write_requests] if trace is not None else [], adapter_names=self._adapter_names)
        self.step = 0
        self.fail_at = settings.fail_at_step
        # The accounting runs on its own thread, mostly while the engine thread waits for the model;
        # the engine thread only captures what the step left behind.  sync_accounting does it inline
        # (benchmarks that time the whole path, debugging).
        self.sync = settings.sync_accounting
        # a SimpleQueue (C): the engine thread's hand-over is one put, no Python-level locks or notify
        self._queue: queue.SimpleQueue | None = None if self.sync else queue.SimpleQueue()
        self.gpu = sampler
        self.trace = trace
        self.observer: Observer | None = None  # see "engine callbacks"
        # where each numbered step goes (a seam: a benchmark wraps it to see which step a capture became)
        self.sink: Callable[[int, StepCapture, Any], None] = self.hand_over
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
                         clock: Clock = time.monotonic, publish: bool = True,
                         tracker_cls: type[MFUTracker] = MFUTracker) -> "MFUHook":
        """The hook as the engine builds it: settings from SERVING_MFU_* (a bad value is counted and
        ignored), the tracker, a snapshot writer publishing to `settings.dir` (`publish=False`: a writer
        that keeps nothing, for benchmarks), the GPU sampler and the optional trace."""
        errors: list[str] = []
        if settings is None:
            settings, errors = load_settings()
        info = engine_info(vllm_config, settings)
        tracker = tracker_cls(info.spec, info.peak, info.devices, kv_cache_dtype=info.kv_cache_dtype,
                              time_split=settings.time_split, kv_role=info.kv_role)
        for message in errors:
            tracker.note_anomaly("bad_setting", message)
        if info.kv_cache_dtype_note:  # bytes use the guessed width; the engine is tracked all the same
            tracker.note_anomaly("unknown_kv_cache_dtype", info.kv_cache_dtype_note)
        _flag_weights_in_cache(tracker, info)
        if info.peak is None:
            tracker.note_anomaly("missing_peak", info.peak_error or "no peak for this device; set "
                                 "SERVING_MFU_DEVICE, SERVING_MFU_PEAK_FLOPS or SERVING_MFU_CALIBRATION")
        model = ModelReport(name=info.spec.name, model_type=info.spec.model_type, approximate=info.spec.approximate,
                            flop_model=info.spec.flop_model)
        sampler = sampler_for_engine(getattr(vllm_config, "parallel_config", None), settings=settings)
        trace = None
        if settings.trace:
            header = TraceHeader(hf_config=vllm_config.model_config.hf_config.to_dict(), peak=info.peak,
                                 devices=info.devices, kv_cache_dtype=info.kv_cache_dtype)
            try:
                trace = TraceWriter(settings.trace, header)
            except OSError as exc:  # a link or another user's file at the path, or no such folder: no trace
                tracker.note_anomaly("trace_refused", f"SERVING_MFU_TRACE={settings.trace}: {exc}")

        def writer(hook: "MFUHook") -> Publisher:
            if not publish:
                return NullWriter()
            if hook.accounts is not None:  # finished requests: appended to their log at each publish
                hook.request_log = RequestLogWriter(settings.snapshot_dir(), hook.engine_id)
                hook.accounts.sinks.append(hook.request_log.add)
            return SnapshotWriter(hook._snapshot, hook.engine_id, model, tracker.peak_report(), tracker.time_split,
                                  directory=settings.snapshot_dir(), gpu_status=sampler.status,
                                  before_write=hook.flush, kv_role=info.kv_role, kv_connector=info.kv_connector,
                                  tenants=hook._tenants if hook.accounts is not None else None)

        hook = cls(info, settings, tracker, sampler, writer, trace=trace, clock=clock)
        served = getattr(vllm_config.model_config, "served_model_name", None)
        hook.default_tenant = str((served[0] if isinstance(served, (list, tuple)) and served else served)
                                  or info.spec.name)
        log.info("serving-mfu: tracking %s on %d device(s), peak %s, publishing to %s; GPU-Util: %s",
                 info.spec.name, info.devices, info.peak.source if info.peak else "missing",
                 getattr(hook.writer, "path", "nowhere"),
                 f"{len(sampler.devices)} device(s)" if sampler.available else sampler.reason)
        return hook

    def _snapshot(self) -> tuple[Any, list[dict]]:
        """The tracker's cumulative counters with the GPU sampler's cumulative sums added (publisher thread);
        the requests that finished since the last publish are appended to their log first."""
        if self.request_log is not None:
            self.request_log.flush()
        counters, recent = self.tracker.snapshot(recent=100, raw=True)
        return self.gpu.add_to(counters), recent

    def _tenants(self) -> list:
        """Each tenant label's cumulative sums (publisher thread)."""
        return self.accounts.tenants.totals() if self.accounts is not None else []

    # ------------------------------------------------------------------ engine callbacks
    # `observer` (None in the engine) sees each callback's arguments before it runs and its result after,
    # and each accounting of a step ("account": the step's capture, then its record or None): benchmarks
    # time the hook on both threads and keep what it read without replacing its methods.
    def on_schedule(self, sched: Any, out: Any) -> None:
        obs = self.observer
        if obs is None:
            return self._on_schedule(sched, out)
        obs.enter("schedule", sched, out)
        result = self._on_schedule(sched, out)
        obs.exit("schedule", result)
        return result

    def before_output(self, sched: Any, out: Any, runner_out: Any) -> StepCapture | None:
        obs = self.observer
        if obs is None:
            return self._before_output(sched, out, runner_out)
        obs.enter("output", sched, out, runner_out)
        result = self._before_output(sched, out, runner_out)
        obs.exit("output", result)
        return result

    def after_output(self, token: StepCapture, result: Any = None) -> None:
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
    #  - ModelRunnerOutput's routed-experts capture (numpy rows) and its `cudagraph_stats` (a frozen
    #    CUDAGraphStat built per step, None without --cudagraph-metrics), captured by reference.
    # Not safe: `sampled_token_ids`, whose lists update_from_output() trims in place at a stop (only
    # those of requests that stopped), and Request objects, whose counters move on (never read).  On
    # draft steps an engine with stats on (`Scheduler.log_stats`, the API server's default) costs
    # nothing here: the accounting thread reads the lengths (exact for every request that did not
    # stop) and gives the accepted drafts the trim hid back from the step's SpecDecodingStats
    # (`sampled_lengths`); with stats off, before_output copies one `len` per request.  Every
    # request is first seen as a NewRequestData: the hook starts with the scheduler.
    def _on_schedule(self, sched: Any, out: Any) -> None:
        """After `schedule()`: the clock (O(1)).  A step that runs nothing but reports finished requests (the
        engine's last schedule() before it idles) hands them over, so their records close now."""
        if out.total_num_scheduled_tokens:
            pending = self.pending
            pending[id(out)] = self.clock()
            if len(pending) > 64:  # outputs that never came (aborted steps): forget the oldest
                pending.pop(next(iter(pending)))
        elif out.finished_req_ids and self.accounts is not None:
            self.sink(0, None, out.finished_req_ids)  # type: ignore[arg-type]

    def _before_output(self, sched: Any, out: Any, runner_out: Any) -> StepCapture | None:
        """Before `update_from_output()`: stop the clock; on draft steps of an engine with its stats off,
        copy the sampled lengths (update_from_output() trims those of requests that stop).  The step's
        CUDA-graph padding counts (`cudagraph_stats`) are kept by reference."""
        t_end = self.clock()
        t_sched = self.pending.pop(id(out), None)
        if t_sched is None:
            return None
        lengths = None
        if out.scheduled_spec_decode_tokens:
            if getattr(sched, "log_stats", False):
                lengths = FROM_STATS  # read on the accounting thread, completed by vLLM's SpecDecodingStats
            else:
                sampled = runner_out.sampled_token_ids
                lengths = list(map(len, sampled)) if sampled else []
        return StepCapture(t_sched_s=t_sched, t_end_s=t_end, out=out, runner_out=runner_out, lengths=lengths,
                           cudagraph_stats=getattr(runner_out, "cudagraph_stats", None))

    def _after_output(self, token: StepCapture, result: Any = None) -> None:
        """After `update_from_output()`: number the step and hand it to the sink (O(1))."""
        self.step += 1
        self.sink(self.step, token, result)
        if self.fail_at is not None and self.step == self.fail_at:
            raise InjectedFault(f"SERVING_MFU_FAIL_AT_STEP={self.fail_at} (after recording the step)")

    def hand_over(self, step: int, capture: StepCapture, result: Any) -> None:
        """The default sink: the step to the accounting thread (inline with sync_accounting)."""
        item = (step, capture, result)
        q = self._queue
        if q is None:
            self._account(item)
        elif q.qsize() < _QUEUE_LIMIT:
            q.put(item)
        else:
            self.tracker.note_anomaly("dropped_records", f"the accounting thread fell {_QUEUE_LIMIT} steps behind")

    # ------------------------------------------------------------------ building the record (accounting side)
    def high_water_mark(self, rid: str) -> int:
        """Positions of `rid` computed and kept so far (RequestLedger.high_water_mark)."""
        return self.ledger.high_water_mark(rid)

    def _drafter(self, slices: list[Slice], p_n0: list[int], p_q: list[int], p_prompt: list[int],
                 dec_n0: list[int], drafts: list[int] | None, accepted: list[int] | None) -> DrafterRecord:
        """The drafter's work this step as vLLM runs it (serving_mfu.cost.drafter.drafter_work): every
        scheduled request, rejected drafts and unfinished prompt chunks included in the padded batch;
        vLLM proposes k drafts for every request of the batch."""
        k = self.num_spec_tokens
        n = len(slices) + len(p_n0) + len(dec_n0)
        if self.draft_model is None:  # n-gram, suffix: no matmuls
            return DrafterRecord(method=self.spec_method, proposed_tokens=k * n)
        reqs = [DraftRequest(s.computed_before, s.new_tokens, s.prompt_len, s.draft_tokens, s.accepted_tokens)
                for s in slices]
        reqs += map(DraftRequest, p_n0, p_q, p_prompt)
        zeros = repeat(0)
        reqs += (DraftRequest(n0, 1 + d, n0, d, a) for n0, d, a in zip(dec_n0, drafts or zeros, accepted or zeros))
        work = drafter_work(self.draft_model, k, reqs, padded=self.info.drafter_padded, method=self.spec_method,
                            max_model_len=self.info.max_model_len)
        return DrafterRecord(method=self.spec_method, flops=work.flops, bytes=work.bytes, proposed_tokens=k * n,
                             positions=work.first_pass_positions + work.step_positions)

    def build_record(self, step: int, token: StepCapture, result: Any) -> IterationRecord:
        """One IterationRecord from a step's capture, in named steps: forget finished requests, sort the
        new requests and the cached ones into the prefill batch, the decode batch and general slices,
        close prompts, read acceptance, cost the general rows, then what reached the users, the marks,
        the drafter, the routing and the padding.

        Most requests of a step fit a batch costed in closed form: first-time prompt chunks
        (`PrefillBatch`) and decodes past the prompt and the high-water mark (`DecodeBatch`, vLLM's
        own `req_ids` / `num_computed_tokens` lists when every cached request is one).  What does not
        fit — a resumed (preempted) request, recomputation, a chunk past its prompt — becomes a
        general `Slice`.  The sets of requests still in their prompt or recomputing are small, so
        sorting a step costs O(those + new requests), plus one dict update over the decodes (their
        high-water marks) and, on draft steps, the accepted counts.
        """
        out, runner_out, lengths = token.out, token.runner_out, token.lengths
        if lengths is FROM_STATS:
            lengths = sampled_lengths(out, runner_out, result)
        self._forget(out.finished_req_ids)
        st = _Sorted(dec_ids=out.scheduled_cached_reqs.req_ids, dec_n0=out.scheduled_cached_reqs.num_computed_tokens)
        if out.scheduled_new_reqs:
            self._sort_new(out, st)
        self._sort_cached(out, st)
        if st.p_ids:
            self._close_prompts(st)
        index = runner_out.req_id_to_index if lengths is not None else None
        if st.dec_ids:
            self._acceptance(out, runner_out, lengths, index, st)
        g_rows, expected, decoding = self._general_rows(out.scheduled_spec_decode_tokens, lengths, index, st)
        # what reached the users is read only for decodes (a prompt's first token is never cut short)
        delivered_by_id = self._delivered(result, expected, st) if decoding or st.dec_ids else None
        slices = self._marks_and_slices(g_rows, delivered_by_id, st)
        kv = self._kv
        prefill = PrefillBatch(req_ids=st.p_ids, new_tokens=st.p_q, computed_before=st.p_n0, prompt_len=st.p_prompt,
                               cached_tokens=st.p_cached if any(st.p_cached) and not kv else None) if st.p_ids else None
        decode = DecodeBatch(req_ids=st.dec_ids, computed_before=st.dec_n0, draft_tokens=st.drafts,
                             accepted_tokens=st.accepted, delivered_tokens=st.dec_delivered) if st.dec_ids else None
        drafter = None
        if self.spec_method and getattr(out, "skip_drafts", False):
            # vLLM ≥ 0.33 (Model Runner V2): this step proposes no drafts
            drafter = DrafterRecord(method=self.spec_method)
        elif self.spec_method:
            drafter = self._drafter(slices, st.p_n0, st.p_q, st.p_prompt, st.dec_n0, st.drafts, st.accepted)
        routing = self._routing(runner_out, slices, st) if self._is_moe else None
        padded, modelled = self._graph_padding(token, out, prefill, slices)
        return IterationRecord(step=step, t_sched_s=token.t_sched_s, t_end_s=token.t_end_s, slices=slices,
                               drafter=drafter, moe_routing=routing, engine=self.engine_id, prefill=prefill,
                               decode=decode, kv=kv_transfer(out, result) if kv else None,
                               lora=self._lora_uses(out.num_scheduled_tokens) if self.ledger.adapters_in_flight
                               else None,
                               padded_tokens=padded, padding_modelled=modelled)

    def _forget(self, finished: Any) -> None:
        """The requests that finished leave the ledger (their records closed first, with attribution on)."""
        if not finished:
            return
        if self.accounts is None:
            self.ledger.finish(finished)
            return
        try:  # closed once their last steps are charged (RequestAccounts.settle)
            self.accounts.finish(finished)
        except Exception as exc:
            self.error("attribution", exc)

    def _sort_new(self, out: Any, st: "_Sorted") -> None:
        """New requests (NewRequestData): first schedules go to the prefill batch, credited with what the
        prefix cache served; a resumed or odd one becomes a general row."""
        new, nst, spec, ledger = out.scheduled_new_reqs, out.num_scheduled_tokens, out.scheduled_spec_decode_tokens, \
            self.ledger
        ids = list(map(_REQ_ID, new))
        n0s = list(map(_COMPUTED, new))
        # vLLM fills num_scheduled_tokens in schedule order: a step of new requests only lists them as they come
        qs = list(nst.values()) if len(nst) == len(ids) and list(nst) == ids else list(map(nst.__getitem__, ids))
        try:
            lens = list(map(len, map(_PROMPT_IDS, new)))
        except TypeError:  # prompt embeddings instead of token ids
            lens = [len(ids_) if ids_ is not None else int(nr.prompt_embeds.shape[0])
                    for nr, ids_ in zip(new, map(_PROMPT_IDS, new))]
        # converted once: the costing, the ledger and the attribution read these same arrays
        prompt, new_end = int_array(lens), int_array(n0s) + int_array(qs)
        if not ledger.any_known(ids) and not (new_end > prompt).any() and \
                not (spec and not spec.keys().isdisjoint(ids)):
            # first schedules: what each starts from was served by the prefix cache
            st.p_ids, st.p_q, st.p_n0, st.p_prompt = ids, qs, n0s, lens
            st.p_cached = remember(list(n0s), int_array(n0s))
            st.p_end, st.shared = new_end, True
            slots = ledger.admit(ids, prompt)
            fresh, fresh_ids = new, ids
        else:
            fresh = [nr for nr in new if nr.req_id not in ledger]
            fresh_ids, slots = [nr.req_id for nr in fresh], None
            self._sort_new_one_by_one(ids, qs, n0s, lens, spec, st)
        if self._lora_rank is not None:
            self._note_adapters(new)
        if self.accounts is not None and fresh:
            self._open_accounts(fresh, fresh_ids, slots)

    def _open_accounts(self, new: list, ids: list[str], slots: Any) -> None:
        """New requests' tenants: vllm_xargs.tenant (SamplingParams.extra_args), else the LoRA adapter's name,
        else the served model's name."""
        try:
            extras = list(map(_EXTRA_ARGS, new))
        except AttributeError:  # no sampling params (pooling requests)
            extras = [getattr(getattr(nr, "sampling_params", None), "extra_args", None) for nr in new]
        if not any(extras) and (self._lora_rank is None or not any(map(attrgetter("lora_request"), new))):
            self.accounts.open(ids, self.default_tenant, slots)
            return
        declared = []
        for nr, extra in zip(new, extras):
            tenant = extra.get("tenant") if isinstance(extra, dict) else None
            if tenant is None:
                lr = getattr(nr, "lora_request", None)
                tenant = getattr(lr, "lora_name", None) if lr is not None else None
            declared.append(str(tenant) if tenant is not None else self.default_tenant)
        self.accounts.open(ids, declared, slots)

    def _sort_new_one_by_one(self, ids: list[str], qs: list[int], n0s: list[int], lens: list[int], spec: Any,
                             st: "_Sorted") -> None:
        """New requests of a step that also resumes or holds an odd one: each sorted on its own."""
        ledger = self.ledger
        for rid, q, n0, prompt in zip(ids, qs, n0s, lens):
            if rid in ledger:  # resumed (Model Runner V2): its mark before its new prompt length
                st.general.append((rid, q, n0, prompt, self.high_water_mark(rid), 0))
            elif n0 + q > prompt or (spec and rid in spec):  # odd
                st.general.append((rid, q, n0, prompt, 0, n0))
            else:
                st.add_prompt(rid, q, n0, prompt, n0)
            ledger.admit_one(rid, prompt)

    def _sort_cached(self, out: Any, st: "_Sorted") -> None:
        """Cached requests (CachedRequestData): plain decodes stay in vLLM's own lists; those still in their
        prompt, recomputing or resumed are sorted one by one (the next chunk of a prompt, else general)."""
        cr, nst, spec = out.scheduled_cached_reqs, out.num_scheduled_tokens, out.scheduled_spec_decode_tokens
        ledger = self.ledger
        special = {r for r in ledger.prefilling if r in nst} if ledger.prefilling else set()
        if ledger.recomputing:
            special.update(r for r in ledger.recomputing if r in nst)
        if cr.resumed_req_ids:
            special.update(cr.resumed_req_ids)
        if not special:
            return
        st.dec_ids, st.dec_n0 = [], []
        for rid, n0 in zip(cr.req_ids, cr.num_computed_tokens):
            if rid not in special:
                st.dec_ids.append(rid)
                st.dec_n0.append(n0)
                continue
            q, mark, prompt = nst[rid], ledger.high_water_mark(rid), ledger.prompt_of(rid)
            if n0 >= mark and n0 + q <= prompt and not (spec and rid in spec) and rid not in cr.resumed_req_ids:
                st.add_prompt(rid, q, n0, prompt, 0)  # the next chunk of a prompt
                st.n_chunks += 1
            else:
                st.general.append((rid, q, n0, prompt, mark, 0))

    def _close_prompts(self, st: "_Sorted") -> None:
        """Prompts still incomplete keep an explicit mark; complete ones leave `prefilling` (their mark is
        then their prompt's length).  Counts the prompts the prefill batch completes."""
        # the lists are final here (sorting is done): their arrays are the ones the costing reads
        end = st.p_end if st.p_end is not None else int_array(st.p_n0) + int_array(st.p_q)
        open_ = end < int_array(st.p_prompt)
        partial = int(np.count_nonzero(open_))
        st.p_done = len(st.p_ids) - partial
        if partial:
            rows = np.flatnonzero(open_)
            self.ledger.hold(list(map(st.p_ids.__getitem__, rows.tolist())), end[rows])
        if st.n_chunks:  # a continued prompt that is now complete leaves the set
            self.ledger.prompts_done(compress(st.p_ids, (~open_).tolist()))

    def _acceptance(self, out: Any, runner_out: Any, lengths: Any, index: Any, st: "_Sorted") -> None:
        """Decodes: each runs 1 + its drafts (vLLM schedules exactly the drafts it lists); one whose
        scheduled tokens say otherwise goes general.  accepted = min(max(sampled − 1, 0), drafts)."""
        nst, spec, n_dec = out.num_scheduled_tokens, out.scheduled_spec_decode_tokens, len(st.dec_ids)
        other = (sum(st.p_q) if st.p_q else 0) + (sum(g[1] for g in st.general) if st.general else 0)
        if not spec:
            if out.total_num_scheduled_tokens - other != n_dec:  # not all one-token decodes
                st.dec_ids, st.dec_n0 = self._split_odd(st.dec_ids, st.dec_n0, nst, None, st.general)
            return
        # vLLM lists a decode's drafts in the order it schedules them, usually the cached order
        drafts = (list(map(len, spec.values())) if len(spec) == n_dec and list(spec) == st.dec_ids
                  else list(map(len, map(spec.get, st.dec_ids, repeat(())))))
        # vLLM trims a request's drafts to what its token budget scheduled, so q ≥ 1 + drafts for each:
        # equal sums mean each q is 1 + its drafts
        if out.total_num_scheduled_tokens - other != n_dec + sum(drafts):
            st.dec_ids, st.dec_n0 = self._split_odd(st.dec_ids, st.dec_n0, nst, drafts, st.general)
            drafts = list(map(len, map(spec.get, st.dec_ids, repeat(()))))
        n = len(st.dec_ids)
        if lengths is None or not len(lengths):
            got = np.zeros(n, np.int64)
        elif len(lengths) == n and getattr(runner_out, "req_ids", None) == st.dec_ids:
            got = np.asarray(lengths)  # the runner's batch is in the scheduler's order (req_ids[i] has index i)
        else:
            got = np.asarray(lengths)[np.fromiter(map(index.__getitem__, st.dec_ids), np.intp, n)]
        accepted = np.minimum(got - 1, int_array(drafts))
        np.maximum(accepted, 0, out=accepted)  # a request that sampled nothing (its output was dropped)
        st.drafts, st.accepted = drafts, remember(accepted.tolist(), accepted)  # its array: no conversion later

    def _general_rows(self, spec: Any, lengths: Any, index: Any, st: "_Sorted") -> tuple[list[tuple], int, bool]:
        """Each general row with its drafts, accepted, end, kept end and first decode position; the tokens
        the step should have delivered (one per finished prompt, 1 + accepted per decode); and whether any
        general row decodes."""
        expected = st.p_done + len(st.dec_ids) + (sum(st.accepted) if st.accepted else 0)
        decoding = False
        rows = []
        for rid, q, n0, prompt, mark, cached in st.general:
            d = spec.get(rid) if spec else None
            k = len(d) if d else 0
            a = 0
            if k:
                i = index.get(rid) if index is not None else None
                n = (int(lengths[i]) if lengths is not None and i is not None and i < len(lengths) else 0) - 1
                a = k if n > k else (n if n > 0 else 0)
            end = n0 + q
            kept_end = end - (k - a)
            first = max(n0, mark, prompt)
            if end > prompt and end > mark:
                expected += kept_end - first
                decoding = True
            elif end == prompt and end > mark:
                expected += 1
            rows.append((rid, q, n0, prompt, mark, cached, k, a, end, kept_end, first))
        return rows, expected, decoding

    def _delivered(self, result: Any, expected: int, st: "_Sorted") -> dict[str, int] | None:
        """What reached each user, read only when a stop (or a dropped stale output) cut a request short —
        then the delivered total differs from `expected`; the decode batch's cut counts go to `st`."""
        if delivered_tokens(result) == expected:
            return None
        by_id = delivered_by_request(result)
        if st.dec_ids:
            got = list(map(by_id.get, st.dec_ids, repeat(0)))
            if any(map(lt, got, map(add, st.accepted or repeat(0), repeat(1)))):
                st.dec_delivered = got
        return by_id

    def _marks_and_slices(self, rows: list[tuple], delivered_by_id: dict[str, int] | None, st: "_Sorted"
                          ) -> list[Slice]:
        """The high-water marks of the decodes (n0 + 1 + accepted; the plain ones as their n0 alone) and of
        the general rows, which become Slices (with what reached the user where a stop cut it short)."""
        ledger = self.ledger
        if st.dec_ids:
            n0 = int_array(st.dec_n0)  # the same array the costing and the attribution read
            if st.accepted is None:
                ledger.advance(st.dec_ids, n0)
            else:
                ledger.accept(st.dec_ids, n0 + int_array(st.accepted) + 1)
        slices = []
        kv = self._kv
        for rid, q, n0, prompt, mark, cached, k, a, end, kept_end, first in rows:
            ledger.set_mark(rid, kept_end if kept_end > mark else mark, kept_end, prompt)
            delivered = None
            if end > prompt and end > mark and delivered_by_id is not None:  # a decode step: what reached the user
                got_n = delivered_by_id.get(rid, 0)
                if got_n < kept_end - first:  # a stop or max_tokens cut the kept positions short
                    delivered = got_n
            slices.append(Slice(req_id=rid, new_tokens=q, computed_before=n0, prompt_len=prompt, hwm=mark,
                                cached_tokens=0 if kv else cached, draft_tokens=k, accepted_tokens=a,
                                delivered_tokens=delivered))
        return slices

    def _routing(self, runner_out: Any, slices: list[Slice], st: "_Sorted") -> list[list[int]] | None:
        """Tokens routed to each expert per MoE layer, where the engine captured routing."""
        if not getattr(runner_out, "aux_output_connector_output", None):
            return None
        ids = [s.req_id for s in slices] + st.p_ids + st.dec_ids
        qs = [s.new_tokens for s in slices] + st.p_q + (list(map(add, st.drafts, repeat(1))) if st.drafts
                                                        else [1] * len(st.dec_ids))
        n0s = [s.computed_before for s in slices] + st.p_n0 + st.dec_n0
        return moe_routing(runner_out, ids, qs, n0s, self._experts)

    def _graph_padding(self, token: StepCapture, out: Any, prefill: PrefillBatch | None, slices: list[Slice]
                       ) -> tuple[int, bool]:
        """The step's CUDA-graph padding as (padded_tokens, padding_modelled) (serving_mfu.cost.graph_padding):
        exact from the captured `cudagraph_stats` (vLLM's --cudagraph-metrics), else modelled from vLLM's
        dispatch rules on this rank's scheduled tokens (other data-parallel ranks' counts are not known here,
        so padding to their maximum is not modelled).  Nothing when the engine replays no graphs (the CPU
        platform, --enforce-eager): no model runs then."""
        stats = padding_from_stats(token.cudagraph_stats) if token.cudagraph_stats is not None else None
        if stats is not None:
            unpadded, padded = stats
            return (padded - unpadded if padded > unpadded else 0), False
        graph = self.info.graph
        if not graph.enabled:
            return 0, False
        n = out.total_num_scheduled_tokens
        has_lora = graph.lora_active_matters and self.ledger.adapters_in_flight > 0 and \
            bool((self.ledger.adapters(list(out.num_scheduled_tokens)) >= 0).any())
        run = padded_tokens(n, uniform_decode(out, graph, prefill, slices), graph, has_lora=has_lora)
        return (run - n if run > n else 0), True

    def _note_adapters(self, new: list) -> None:
        """Remember the adapter of each new request that has one (its LoRARequest), loading the adapter's
        config the first time it is seen; one that cannot be read counts an anomaly and adds no FLOPs."""
        for nr in new:
            lr = getattr(nr, "lora_request", None)
            if lr is None:
                continue
            key = int(lr.lora_int_id)
            self.ledger.set_adapter(nr.req_id, key)
            if key not in self._adapters:
                name = str(getattr(lr, "lora_name", key))
                self._adapter_names[key] = name
                try:
                    adapter = load_adapter(lr.lora_path, name)
                    useful = lora_flops(adapter, self.info.spec)
                    executed = lora_flops(adapter, self.info.spec, rank=max(self._lora_rank, adapter.rank))
                    self._adapters[key] = LoRAUse(adapter=name, req_ids=[], flops_per_token=useful.per_token,
                                                  flops_per_logit=useful.per_logit,
                                                  executed_per_token=executed.per_token,
                                                  executed_per_logit=executed.per_logit)
                except Exception as exc:
                    self._adapters[key] = None
                    self.tracker.note_anomaly("lora_adapter_unreadable", f"adapter {name!r}: {exc}")

    def _lora_uses(self, nst: dict) -> list[LoRAUse] | None:
        """The step's scheduled requests grouped by adapter, in schedule order (requests without one are
        base-model work)."""
        groups: dict[int, list[str]] = {}
        ids = list(nst)
        for rid, key in zip(ids, self.ledger.adapters(ids).tolist()):
            if key >= 0:
                groups.setdefault(key, []).append(rid)
        uses = [msgspec.structs.replace(a, req_ids=ids) for key, ids in groups.items()
                if (a := self._adapters.get(key)) is not None]
        return uses or None

    def _split_odd(self, ids: list, n0s: list, nst: dict, drafts: list | None, general: list) -> tuple[list, list]:
        """Decodes whose scheduled tokens are not 1 + their drafts go to the general slices."""
        keep_ids, keep_n0 = [], []
        for i, (rid, n0) in enumerate(zip(ids, n0s)):
            if nst[rid] == 1 + (drafts[i] if drafts else 0):
                keep_ids.append(rid)
                keep_n0.append(n0)
            else:
                general.append((rid, nst[rid], n0, self.ledger.prompt_of(rid, max(n0, 1)),
                                self.ledger.high_water_mark(rid), 0))
        return keep_ids, keep_n0

    # ------------------------------------------------------------------ accounting thread
    def _account(self, item: tuple) -> None:
        if item[1] is None:  # finished requests of a step that ran nothing (see _on_schedule)
            self._forget(item[2])
            self.writer.mark_dirty()
            return
        obs = self.observer
        if obs is not None:
            obs.enter("account", item)
        rec = None
        try:
            rec = self.build_record(*item)
            cost = self.tracker.record(rec)
            if cost is not None and self.accounts is not None:
                try:
                    self.accounts.charge(rec, cost)
                except Exception as exc:  # the step stays in the totals
                    self.error("attribution", exc)
            self.writer.mark_dirty()
            if self.trace is not None:
                self.trace.write(rec)
        except Exception as exc:
            self.error("accounting", exc)
        finally:
            if obs is not None:
                obs.exit("account", rec)

    def _account_loop(self) -> None:
        q = self._queue
        assert q is not None
        while True:
            rec = q.get()
            if rec is None:
                return
            if rec[0] is _FLUSH:  # every step before it is accounted
                self._settle()
                rec[1].set()
                continue
            self._account(rec)

    def flush(self) -> None:
        """Wait until every submitted step is accounted and the per-request accounts settled (publisher
        thread, tests, shutdown)."""
        if self._queue is None:
            self._settle()
            return
        accountant = self._accountant
        if accountant is None or not accountant.is_alive():
            return
        done = threading.Event()
        self._queue.put((_FLUSH, done))  # settled on the accounting thread, which owns the ledger
        while not done.wait(1.0):
            if not accountant.is_alive():
                return

    def _settle(self) -> None:
        if self.accounts is not None:
            try:
                self.accounts.settle()
            except Exception as exc:
                self.error("attribution", exc)

    def error(self, where: str, exc: BaseException) -> None:
        """Count a hook failure (logged once per kind); the engine goes on."""
        self.tracker.note_anomaly("hook_errors", f"{where}: {exc!r}")
        self.writer.mark_dirty()

    def close(self) -> None:
        self.flush()
        if self._queue is not None and self._accountant is not None:
            self._queue.put(None)
            self._accountant.join(timeout=5)
        self.gpu.stop()  # before the last write, so that it carries the final GPU sums
        self.writer.close()
        if self.request_log is not None:
            self.request_log.close()
        if self.trace is not None:
            self.trace.close()
