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
from itertools import repeat
from operator import add, attrgetter, eq, ne
from typing import Any, Callable

import numpy as np

from scheduler_hooks.engine_info import EngineInfo, engine_info
from serving_mfu.cost.accounting import CostModel
from serving_mfu.cost.drafter import drafter_cost
from serving_mfu.cost.records import DecodeBatch, DrafterRecord, IterationRecord, PrefillBatch, Slice
from serving_mfu.runtime.gpu_util import sampler_for_engine
from serving_mfu.runtime.report import ModelReport
from serving_mfu.runtime.settings import Settings, load_settings
from serving_mfu.runtime.trace import TraceHeader, TraceWriter
from serving_mfu.runtime.tracker import MFUTracker
from serving_mfu.runtime.transport import SnapshotWriter

log = logging.getLogger("serving_mfu.hook")
_NEW_TOKEN_IDS = attrgetter("new_token_ids")


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
        # accounting-side state, in step order: high-water marks (explicit, and a plain decode's n0),
        # first sightings, prompt lengths, and the few requests still in their prompt or recomputing
        self.hwm: dict[str, int] = {}
        self.plain_before: dict[str, int] = {}
        self.seen: set[str] = set()
        self.prompt_lens: dict[str, int] = {}
        self.prefilling: set[str] = set()
        self.recomputing: set[str] = set()
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
    # Request objects, whose counters move on (never read).  Every request is first seen as a
    # NewRequestData: the hook starts with the scheduler.
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
        return t_sched, t_end, out, runner_out, lengths

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
    def high_water_mark(self, rid: str) -> int:
        """Positions of `rid` computed and kept so far (0 for a request not seen): the max of the
        explicit mark and, for a request whose last steps were plain decodes, its last n0 + 1."""
        return max(self.hwm.get(rid, 0), self.plain_before.get(rid, -1) + 1)

    def build_record(self, step: int, token: tuple, result: Any) -> IterationRecord:
        """One IterationRecord from a step's capture.

        Most requests of a step fit a batch costed in closed form: first-time prompt chunks
        (`PrefillBatch`) and decodes past the prompt and the high-water mark (`DecodeBatch`, vLLM's
        own `req_ids` / `num_computed_tokens` lists when every cached request is one).  What does not
        fit — a resumed (preempted) request, recomputation, a chunk past its prompt, a verify step a
        stop cut short — becomes a general `Slice`.  The sets of requests still in their prompt or
        recomputing are small, so sorting a step costs O(those + new requests), plus one dict
        update over the decodes (their high-water marks) and, on draft steps, the accepted counts.
        """
        t_sched, t_end, out, runner_out, lengths = token
        hwm, plain, seen, prompts = self.hwm, self.plain_before, self.seen, self.prompt_lens
        prefilling, recomputing = self.prefilling, self.recomputing
        for rid in out.finished_req_ids:
            hwm.pop(rid, None)
            plain.pop(rid, None)
            seen.discard(rid)
            prompts.pop(rid, None)
            prefilling.discard(rid)
            recomputing.discard(rid)
        nst = out.num_scheduled_tokens
        spec = out.scheduled_spec_decode_tokens
        index = runner_out.req_id_to_index if lengths is not None else None
        general: list[tuple[str, int, int, int, int, int]] = []  # (rid, q, n0, prompt, mark, cached)
        p_ids: list[str] = []
        p_q: list[int] = []
        p_n0: list[int] = []
        p_prompt: list[int] = []
        p_cached: list[int] = []
        for nr in out.scheduled_new_reqs:
            rid, n0 = nr.req_id, nr.num_computed_tokens
            q = nst[rid]
            ids = nr.prompt_token_ids
            prompt = prompts[rid] = len(ids) if ids is not None else int(nr.prompt_embeds.shape[0])
            if rid in seen or n0 + q > prompt or (spec and rid in spec):  # resumed (Model Runner V2), odd
                general.append((rid, q, n0, prompt, self.high_water_mark(rid), 0 if rid in seen else n0))
                seen.add(rid)
                continue
            seen.add(rid)  # first schedule: what it starts from was served by the prefix cache
            p_ids.append(rid)
            p_q.append(q)
            p_n0.append(n0)
            p_prompt.append(prompt)
            p_cached.append(n0)
        cr = out.scheduled_cached_reqs
        dec_ids, dec_n0 = cr.req_ids, cr.num_computed_tokens
        special = {r for r in prefilling if r in nst}
        special.update(r for r in recomputing if r in nst)
        special.update(cr.resumed_req_ids)
        if special:
            dec_ids, dec_n0 = [], []
            for rid, n0 in zip(cr.req_ids, cr.num_computed_tokens):
                if rid not in special:
                    dec_ids.append(rid)
                    dec_n0.append(n0)
                    continue
                q, mark, prompt = nst[rid], self.high_water_mark(rid), prompts[rid]
                if n0 >= mark and n0 + q <= prompt and not (spec and rid in spec) and rid not in cr.resumed_req_ids:
                    p_ids.append(rid)  # the next chunk of a prompt
                    p_q.append(q)
                    p_n0.append(n0)
                    p_prompt.append(prompt)
                    p_cached.append(0)
                else:
                    general.append((rid, q, n0, prompt, mark, 0))
        for rid, q, end, prompt in zip(p_ids, p_q, map(add, p_n0, p_q), p_prompt):
            hwm[rid] = end
            if end < prompt:
                prefilling.add(rid)
            else:
                prefilling.discard(rid)
        # decodes: each runs 1 + its drafts (vLLM schedules exactly the drafts it lists)
        drafts = accepted = None
        n_dec = len(dec_ids)
        if n_dec:
            other = sum(p_q) + sum(g[1] for g in general)
            if not spec:
                if out.total_num_scheduled_tokens - other != n_dec:  # not all one-token decodes
                    dec_ids, dec_n0 = self._split_odd(dec_ids, dec_n0, nst, None, general)
            else:
                drafts = list(map(len, map(spec.get, dec_ids, repeat(()))))
                if any(map(ne, map(nst.__getitem__, dec_ids), map(add, drafts, repeat(1)))):
                    dec_ids, dec_n0 = self._split_odd(dec_ids, dec_n0, nst, drafts, general)
                    drafts = list(map(len, map(spec.get, dec_ids, repeat(()))))
                got = list(map(lengths.__getitem__, map(index.__getitem__, dec_ids))) if lengths else [0] * len(dec_ids)
                accepted = [(k if n > k else n) if n > 0 else 0 for n, k in zip(map(add, got, repeat(-1)), drafts)]
        # what reached the users: one token per finished prompt, 1 + accepted per decode, unless a stop
        # (or a dropped stale output) cut a request short — then the sums differ (delivered ≤ kept)
        expected = p_done = sum(map(eq, map(add, p_n0, p_q), p_prompt))
        expected += len(dec_ids) + (sum(accepted) if accepted else 0)
        g_rows = []
        for rid, q, n0, prompt, mark, cached in general:
            d = spec.get(rid) if spec else None
            k = len(d) if d else 0
            a = 0
            if k:
                i = index.get(rid) if index is not None else None
                n = (lengths[i] if lengths and i is not None else 0) - 1
                a = k if n > k else (n if n > 0 else 0)
            end = n0 + q
            kept_end = end - (k - a)
            first = max(n0, mark, prompt)
            if end > prompt and end > mark:
                expected += kept_end - first
            elif end == prompt and end > mark:
                expected += 1
            g_rows.append((rid, q, n0, prompt, mark, cached, k, a, end, kept_end, first))
        delivered_by_id = None
        if _delivered_tokens(result) != expected:
            delivered_by_id = _delivered(result)
            if dec_ids:
                cut = [r for r, a in zip(dec_ids, accepted or repeat(0)) if delivered_by_id.get(r, 0) < 1 + a]
                if cut:
                    dec_ids, dec_n0, drafts, accepted = self._split_cut(set(cut), dec_ids, dec_n0, drafts, accepted,
                                                                        prompts, g_rows)
        # high-water marks of the decodes: n0 + 1 (+ accepted); the plain ones as their n0 alone
        if accepted is None:
            plain.update(zip(dec_ids, dec_n0))
        else:
            hwm.update(zip(dec_ids, map(add, dec_n0, map(add, accepted, repeat(1)))))
        slices = []
        runs = [] if self.draft_model is not None else None
        n_drafting = p_done + len(dec_ids)
        for rid, q, n0, prompt, mark, cached, k, a, end, kept_end, first in g_rows:
            new_mark = kept_end if kept_end > mark else mark
            hwm[rid] = new_mark
            if kept_end < new_mark:
                recomputing.add(rid)
            else:
                recomputing.discard(rid)
            if kept_end < prompt:
                prefilling.add(rid)
            else:
                prefilling.discard(rid)
            delivered = None
            if end > prompt and end > mark:  # a decode step: what reached the user
                if delivered_by_id is not None:
                    got_n = delivered_by_id.get(rid, 0)
                    if got_n < kept_end - first:  # a stop or max_tokens cut the kept positions short
                        delivered = got_n
                if runs is not None:
                    runs.append((n0 if n0 > mark else mark, kept_end))
            elif runs is not None and end == prompt and end > mark:  # a finished prefill drafts too
                runs.append((n0 if n0 > mark else mark, kept_end))
            if end >= prompt:
                n_drafting += 1
            slices.append(Slice(rid, q, n0, prompt, mark, cached, k, a, delivered))
        prefill = PrefillBatch(p_ids, p_q, p_n0, p_prompt, p_cached if any(p_cached) else None) if p_ids else None
        decode = DecodeBatch(dec_ids, dec_n0, drafts, accepted) if dec_ids else None
        drafter = None
        if self.spec_method:
            if runs is not None:
                runs += [(n0, e) for n0, e, p in zip(p_n0, map(add, p_n0, p_q), p_prompt) if e == p]
                runs += zip(dec_n0, map(add, dec_n0, map(add, accepted or repeat(0), repeat(1))))
                n_drafting = len(runs)
            flops, bytes_ = (0.0, 0.0) if runs is None else drafter_cost(self.draft_model, self.num_spec_tokens, runs)
            drafter = DrafterRecord(self.spec_method, flops, bytes_, self.num_spec_tokens * n_drafting)
        routing = None
        if self.tracker.spec.is_moe and getattr(runner_out, "aux_output_connector_output", None):
            entries = [(s.req_id, s.new_tokens, s.computed_before) for s in slices]
            entries += zip(p_ids, p_q, p_n0)
            entries += zip(dec_ids, map(add, drafts or repeat(0), repeat(1)), dec_n0)
            routing = moe_routing(runner_out, entries, self.tracker.spec)
        return IterationRecord(step, t_sched, t_end, slices, drafter, routing, self.engine_id, prefill, decode)

    def _split_odd(self, ids: list, n0s: list, nst: dict, drafts: list | None, general: list) -> tuple[list, list]:
        """Decodes whose scheduled tokens are not 1 + their drafts go to the general slices."""
        keep_ids, keep_n0 = [], []
        for i, (rid, n0) in enumerate(zip(ids, n0s)):
            if nst[rid] == 1 + (drafts[i] if drafts else 0):
                keep_ids.append(rid)
                keep_n0.append(n0)
            else:
                general.append((rid, nst[rid], n0, self.prompt_lens.get(rid, max(n0, 1)), self.high_water_mark(rid), 0))
        return keep_ids, keep_n0

    @staticmethod
    def _split_cut(cut: set, ids: list, n0s: list, drafts: list | None, accepted: list | None, prompts: dict,
                   g_rows: list) -> tuple[list, list, list | None, list | None]:
        """Decodes a stop cut short leave the batch: general slices with their delivered count."""
        keep = [i for i, rid in enumerate(ids) if rid not in cut]
        for i, rid in enumerate(ids):
            if rid in cut:
                k, a = (drafts[i], accepted[i]) if drafts else (0, 0)
                n0 = n0s[i]
                g_rows.append((rid, 1 + k, n0, min(prompts.get(rid, n0), n0), n0, 0, k, a, n0 + 1 + k, n0 + 1 + a, n0))
        pick = [ids[i] for i in keep], [n0s[i] for i in keep]
        if drafts is None:
            return pick[0], pick[1], None, None
        return pick[0], pick[1], [drafts[i] for i in keep], [accepted[i] for i in keep]

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


def _delivered_tokens(result: Any) -> int:
    """Tokens delivered to all users in this step (Σ len(new_token_ids) over the EngineCoreOutputs)."""
    return sum(sum(map(len, map(_NEW_TOKEN_IDS, outputs.outputs))) for outputs in (result or {}).values())


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
