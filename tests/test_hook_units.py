"""Pieces of the engine hook that the CPU engine cannot exercise: measured MoE routing (vLLM's
routed-experts capture needs Model Runner V2) and the cost of model-based drafters."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from scheduler_hooks.capture import StepCapture
from serving_mfu.cost.accounting import CostModel
from serving_mfu.cost.drafter import drafter_cost
from serving_mfu.model.spec import ModelSpec
from serving_mfu.tools.engine_models import ENGINE_CONFIGS
from tests.reference import per_position_linear_flops, position_attention_flops

pytest.importorskip("vllm")
from vllm.distributed.aux_output_connector.connector import AuxRequestOutput  # noqa: E402

from scheduler_hooks.vllm_outputs import moe_routing  # noqa: E402

MOE = ModelSpec.from_hf_config(ENGINE_CONFIGS["tiny-qwen3-moe-engine"])
EXPERTS = MOE.layers[MOE.moe_layer_indices[0]].moe.num_experts


def test_moe_routing_counts_the_step_positions_only() -> None:
    rng = np.random.default_rng(0)
    layers, experts, k = 2, 8, 2
    # request a: rows for tokens 10..19, the step computed positions 15..18 (n0=15, q=4)
    rows_a = np.stack([np.stack([rng.choice(experts, k, replace=False) for _ in range(layers)])
                       for _ in range(10)])
    # request b: a decode at position 30, rows start at 30
    rows_b = np.array([[[1, 2], [3, 4]]])
    runner_out = SimpleNamespace(aux_output_connector_output={
        "a": AuxRequestOutput(token_start=10, rows=rows_a), "b": AuxRequestOutput(token_start=30, rows=rows_b)})
    counts = moe_routing(runner_out, ["a", "b"], [4, 1], [15, 30], EXPERTS)
    assert np.array(counts).shape == (layers, experts)
    expected = np.zeros((layers, experts), dtype=int)
    for rows in (rows_a[5:9], rows_b):
        for t in rows:
            for layer in range(layers):
                for e in t[layer]:
                    expected[layer, e] += 1
    assert counts == expected.tolist()
    assert all(sum(c) == 5 * k for c in counts)  # 5 positions, top-2 each
    # the usual case: every request's rows are exactly its step's positions, counted as they are
    aligned = SimpleNamespace(aux_output_connector_output={
        "a": AuxRequestOutput(token_start=15, rows=rows_a[5:9]), "b": AuxRequestOutput(token_start=30, rows=rows_b)})
    assert moe_routing(aligned, ["a", "b"], [4, 1], [15, 30], EXPERTS) == counts
    # a request the step did not schedule contributes nothing
    extra = SimpleNamespace(aux_output_connector_output={
        **aligned.aux_output_connector_output, "c": AuxRequestOutput(token_start=0, rows=rows_a)})
    assert moe_routing(extra, ["a", "b"], [4, 1], [15, 30], EXPERTS) == counts


def test_moe_routing_joins_rows_of_any_layout_alike() -> None:
    """Rows joined as bytes (contiguous, one dtype) count as np.concatenate would; rows that are not (a
    strided view, another dtype) take the general path with the same result."""
    rng = np.random.default_rng(1)
    rows = {f"r{i}": rng.integers(0, EXPERTS, size=(1 + i % 3, 2, 2)).astype(np.int32) for i in range(40)}
    ids, qs, n0s = list(rows), [len(r) for r in rows.values()], [7] * len(rows)
    expected = np.zeros((2, EXPERTS), int)
    for r in rows.values():
        for layer in range(2):
            np.add.at(expected[layer], r[:, layer, :].reshape(-1), 1)

    def counts(rows_by_id: dict) -> list:
        aux = {rid: AuxRequestOutput(token_start=7, rows=r) for rid, r in rows_by_id.items()}
        return moe_routing(SimpleNamespace(aux_output_connector_output=aux), ids, qs, n0s, EXPERTS)

    assert counts(rows) == expected.tolist()
    mixed = dict(rows, r0=rows["r0"].astype(np.int64), r5=np.repeat(rows["r5"], 2, axis=0)[::2])
    assert not mixed["r5"].flags["C_CONTIGUOUS"]
    assert counts(mixed) == expected.tolist()


def test_moe_routing_absent_without_capture() -> None:
    assert moe_routing(SimpleNamespace(), ["a"], [1], [0], EXPERTS) is None


@pytest.mark.parametrize("k", [1, 3])
def test_drafter_cost_matches_per_position_reference(k: int) -> None:
    draft_spec = ModelSpec.from_hf_config({**ENGINE_CONFIGS["tiny-llama-engine"], "num_hidden_layers": 1})
    lin = per_position_linear_flops(draft_spec)
    lm = 2 * draft_spec.hidden_size * draft_spec.vocab_size
    runs = [(100, 102), (7, 8)]  # a verify step that kept 2 positions; a decode that kept 1
    expected = 0
    for start, end in runs:
        expected += sum(lin + position_attention_flops(draft_spec, p) for p in range(start, end)) + lm
        for j in range(1, k):
            expected += lin + position_attention_flops(draft_spec, end + j - 1) + lm
    flops, bytes_ = drafter_cost(CostModel(draft_spec), k, runs)
    assert flops == expected
    assert bytes_ > 0
    assert drafter_cost(CostModel(draft_spec), 0, runs) == (0.0, 0.0)
    assert drafter_cost(None, k, runs) == (0.0, 0.0)


@pytest.fixture(scope="module")
def hook(tmp_path_factory):
    """An MFUHook built from a real VllmConfig of the tiny model (no engine started)."""
    import os

    from vllm.engine.arg_utils import EngineArgs

    from scheduler_hooks.hook import MFUHook
    from tests.engine_util import DEFAULT_PEAK, environ, model_path

    publish = tmp_path_factory.mktemp("publish")
    config = EngineArgs(model=model_path(), enforce_eager=True, max_model_len=512).create_engine_config()
    with environ({**DEFAULT_PEAK, "SERVING_MFU_DIR": str(publish)}):
        h = MFUHook.from_vllm_config(config)
    yield h
    h.close()
    assert os.path.exists(h.writer.path)


def _out(scheduled: dict[str, int], before: dict[str, int], new: dict[str, int] | None = None):
    """A SchedulerOutput as vLLM builds it: tokens per request, positions computed before the step
    (NewRequestData for first schedules, with their prompts; CachedRequestData for the others)."""
    new = new or {}
    cached = [rid for rid in scheduled if rid not in new]
    return SimpleNamespace(
        finished_req_ids=set(), total_num_scheduled_tokens=sum(scheduled.values()), num_scheduled_tokens=scheduled,
        scheduled_spec_decode_tokens={},
        scheduled_new_reqs=[SimpleNamespace(req_id=rid, num_computed_tokens=before[rid], prompt_token_ids=[1] * n,
                                            prompt_embeds=None) for rid, n in new.items()],
        scheduled_cached_reqs=SimpleNamespace(req_ids=cached, num_computed_tokens=[before[r] for r in cached],
                                              resumed_req_ids=set()))


def _result(delivered: dict[str, int]):
    """update_from_output()'s return: EngineCoreOutputs (by client) with the tokens each request got."""
    outs = [SimpleNamespace(request_id=rid, new_token_ids=[7] * n) for rid, n in delivered.items()]
    return {0: SimpleNamespace(outputs=outs)}


def test_async_scheduling_overlap_is_not_double_counted(hook) -> None:
    """Step 2 is scheduled before step 1's output arrives (async scheduling): its busy time starts
    when step 1 ended, and each step's slice keeps the positions it was scheduled with."""
    sched = SimpleNamespace(requests={})  # the hook reads the step from the SchedulerOutput, not the Request
    out1 = _out({"a": 10}, {"a": 0}, new={"a": 10})
    hook.on_schedule(sched, out1)
    out2 = _out({"a": 1}, {"a": 10})
    hook.on_schedule(sched, out2)
    runner = SimpleNamespace(req_id_to_index={"a": 0}, sampled_token_ids=[[5]])
    token1 = hook.before_output(sched, out1, runner)
    hook.after_output(token1, _result({"a": 1}))
    token2 = hook.before_output(sched, out2, runner)
    hook.after_output(token2, _result({"a": 1}))
    hook.flush()  # the accounting runs on its own thread
    first, second = hook.tracker.recent(2)
    assert first["prefill"]["tokens"] == 10 and second["decode"]["tokens"] == 1
    t_end_1, t_end_2 = token1.t_end_s, token2.t_end_s
    assert second["busy_s"] == pytest.approx(t_end_2 - t_end_1)  # not from step 2's (earlier) schedule time
    assert hook.high_water_mark("a") == 11


def test_engine_info_reads_devices_dtype_and_peak(hook) -> None:
    info = hook.info
    assert info.devices == 1 and info.dp_rank == 0
    assert info.spec.model_type == "llama" and info.spec.compute_dtype == "bf16"
    # no peak setting and no cached calibration: the CPU default, this machine's ISA peak
    assert info.peak is not None and info.peak.source.startswith("ISA peak of ")
    assert info.peak.flops_per_s == info.peak.isa_flops_per_s > 0 and info.peak.bandwidth_bytes_per_s > 0
    assert info.spec_method is None and info.num_spec_tokens == 0


@pytest.mark.parametrize("async_scheduling,flavour", [(True, "MFUAsyncScheduler"), (False, "MFUScheduler")])
def test_scheduler_flavour_follows_async_scheduling(async_scheduling: bool, flavour: str) -> None:
    """vLLM instantiates a custom scheduler class as given: ours must become the AsyncScheduler
    flavour itself when the engine overlaps scheduling, or GPU engines would lose async scheduling."""
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    from scheduler_hooks.scheduler import MFUScheduler

    config = SimpleNamespace(scheduler_config=SimpleNamespace(async_scheduling=async_scheduling))
    obj = MFUScheduler.__new__(MFUScheduler, vllm_config=config)
    assert type(obj).__name__ == flavour
    assert isinstance(obj, MFUScheduler)
    assert isinstance(obj, AsyncScheduler) == async_scheduling


def _hook_for(tmp_path, **engine_args):
    """An MFUHook (accounting inline) from a real VllmConfig of the tiny model with `engine_args`."""
    from vllm.engine.arg_utils import EngineArgs

    from scheduler_hooks.hook import MFUHook
    from serving_mfu.runtime.settings import Settings
    from tests.engine_util import DEFAULT_PEAK, environ, model_path

    config = EngineArgs(model=model_path(), enforce_eager=True, max_model_len=512, **engine_args).create_engine_config()

    def build() -> MFUHook:
        with environ(DEFAULT_PEAK):
            return MFUHook.from_vllm_config(config, settings=Settings(dir=tmp_path, sync_accounting=True),
                                            publish=False)
    return config, build


def test_unknown_kv_cache_dtype_is_guessed_and_counted_not_fatal(tmp_path) -> None:
    """A KV-cache dtype newer than our table (vLLM 0.33's octave_*): the engine is still tracked, its KV
    bytes at a stated guess of the width, and the anomaly says so."""
    config, build = _hook_for(tmp_path)
    object.__setattr__(config.cache_config, "cache_dtype", "octave_3bit")
    hook = build()
    try:
        assert hook.tracker.cost_model.byte_model.kv_bytes_per_elem == 0.5  # 3 bits → the next width up, 4 bits
        counts = hook.tracker.counters.anomalies
        assert counts.get("unknown_kv_cache_dtype") == 1, counts
        out = _step(hook, {"a": 10}, {"a": 0}, new={"a": 10})
        hook.after_output(hook.before_output(None, out, SimpleNamespace(req_id_to_index={}, sampled_token_ids=[])),
                          _result({"a": 1}))
        report = hook.tracker.report()
        assert report.prefill.tokens == 10 and report.prefill.bytes > 0
    finally:
        hook.close()


def _step(hook, scheduled, before, new=None, **fields):
    out = _out(scheduled, before, new)
    for k, v in fields.items():
        setattr(out, k, v)
    hook.on_schedule(None, out)
    return out


@pytest.mark.parametrize("skip", [False, True])
def test_skip_drafts_proposes_nothing(tmp_path, skip: bool) -> None:
    """vLLM 0.33 (Model Runner V2) marks steps whose drafts are skipped: no drafter work, no proposals."""
    from tests.engine_util import NGRAM

    _, build = _hook_for(tmp_path, speculative_config=NGRAM)
    hook = build()
    try:
        out = _out({"a": 10}, {"a": 0}, new={"a": 10})
        if skip:
            out.skip_drafts = True
        runner = SimpleNamespace(req_id_to_index={"a": 0}, sampled_token_ids=[[5]])
        capture = StepCapture(t_sched_s=0.0, t_end_s=1e-3, out=out, runner_out=runner)
        rec = hook.build_record(1, capture, _result({"a": 1}))
        assert rec.drafter is not None and rec.drafter.method == "ngram"
        assert rec.drafter.proposed_tokens == (0 if skip else 3)  # the finished prompt drafts k=3 next
    finally:
        hook.close()


def _verify_step(hook, log_stats: bool):
    """A step verifying k=3 drafts for four decodes, run through before_output → vLLM's trim →
    after_output as update_from_output() does it: `a` accepts 2, `b` 0, and `c` and `d` accept all 3
    but stop after their 2nd and 1st token (their sampled lists are trimmed in place to what they
    delivered).  vLLM's SpecDecodingStats counts the accepted drafts before the trim (2+0+3+3)."""
    scheduled = {"a": 4, "b": 4, "c": 4, "d": 4}
    before = {"a": 20, "b": 30, "c": 40, "d": 50}
    out = _step(hook, scheduled, before, scheduled_spec_decode_tokens={r: [9, 9, 9] for r in scheduled})
    sampled = [[1, 2, 3], [1], [1, 2, 3, 4], [1, 2, 3, 4]]
    runner = SimpleNamespace(req_ids=list(scheduled), req_id_to_index={r: i for i, r in enumerate(scheduled)},
                             sampled_token_ids=sampled)
    token = hook.before_output(SimpleNamespace(log_stats=log_stats), out, runner)
    del sampled[2][2:]  # update_from_output(): `c` stopped after 2 tokens, `d` after 1
    del sampled[3][1:]
    outs = [SimpleNamespace(request_id=r, new_token_ids=list(toks), finish_reason="stop" if r in "cd" else None)
            for r, toks in zip(scheduled, sampled)]
    stats = SimpleNamespace(spec_decoding_stats=SimpleNamespace(num_accepted_tokens=2 + 0 + 3 + 3)) \
        if log_stats else None
    result = {0: SimpleNamespace(outputs=outs, scheduler_stats=stats)}
    return hook.build_record(1, token, result)


@pytest.mark.parametrize("log_stats", [False, True])
def test_accepted_drafts_survive_a_stop_with_or_without_the_engine_copy(tmp_path, log_stats: bool) -> None:
    """With vLLM's stats on, the engine thread copies nothing on a draft step; the accounting thread
    reads the (trimmed) lengths and takes the accepted drafts a stop hid from SpecDecodingStats — the
    record is the one the engine-thread copy gives: accepted 2, 0, 3, 3; delivered 3, 1, 2, 1."""
    from tests.engine_util import NGRAM

    _, build = _hook_for(tmp_path, speculative_config=NGRAM)
    hook = build()
    try:
        slices = _verify_step(hook, log_stats).all_slices()
        assert [s.req_id for s in slices] == ["a", "b", "c", "d"]
        assert [s.accepted_tokens for s in slices] == [2, 0, 3, 3]
        delivered = [1 + s.accepted_tokens if s.delivered_tokens is None else s.delivered_tokens for s in slices]
        assert delivered == [3, 1, 2, 1]
    finally:
        hook.close()


def test_engine_thread_copies_no_lengths_when_stats_are_on(tmp_path) -> None:
    """The capture on a draft step is O(1) with stats on: the lengths are left for the accounting thread."""
    from scheduler_hooks.vllm_outputs import FROM_STATS
    from tests.engine_util import NGRAM

    _, build = _hook_for(tmp_path, speculative_config=NGRAM)
    hook = build()
    try:
        out = _step(hook, {"a": 4}, {"a": 20}, scheduled_spec_decode_tokens={"a": [9, 9, 9]})
        runner = SimpleNamespace(req_id_to_index={"a": 0}, sampled_token_ids=[[1, 2]])
        assert hook.before_output(SimpleNamespace(log_stats=True), out, runner).lengths is FROM_STATS
        out = _step(hook, {"a": 4}, {"a": 22}, scheduled_spec_decode_tokens={"a": [9, 9, 9]})
        assert hook.before_output(SimpleNamespace(log_stats=False), out, runner).lengths == [2]
    finally:
        hook.close()


def test_a_full_accounting_queue_drops_and_counts_never_waits(tmp_path) -> None:
    """The engine thread never waits for the accounting thread: past _QUEUE_LIMIT steps waiting, a hand-over
    is dropped and counted; flush still drains what was queued, and returns."""
    import threading
    import time

    from scheduler_hooks import hook as hook_module
    from serving_mfu.runtime.settings import Settings
    from tests.engine_util import DEFAULT_PEAK, environ

    config, _ = _hook_for(tmp_path)
    with environ(DEFAULT_PEAK):
        hook = hook_module.MFUHook.from_vllm_config(config, settings=Settings(dir=tmp_path), publish=False)
    release = threading.Event()

    class Blocking:  # holds the accounting thread on the first step it accounts
        def enter(self, kind, *args):
            if kind == "account":
                release.wait(30)

        def exit(self, kind, result):
            pass

    hook.observer = Blocking()
    try:
        hook.hand_over(1, StepCapture(t_sched_s=0.0, t_end_s=1.0, out=None, runner_out=None), None)
        deadline = time.monotonic() + 10
        while hook._queue.qsize() and time.monotonic() < deadline:  # the accounting thread took it, and waits
            time.sleep(0.01)
        t0 = time.perf_counter()
        for _ in range(hook_module._QUEUE_LIMIT + 5):
            hook.hand_over(0, None, ())  # a step that ran nothing: only its finished requests
        assert time.perf_counter() - t0 < 5  # never waited for the blocked thread
        assert hook.tracker.counters.anomalies.get("dropped_records") == 5
        release.set()
        hook.flush()
        assert hook._queue.qsize() == 0
        assert hook.tracker.counters.anomalies.get("hook_errors") == 1  # the first step's capture was empty
    finally:
        release.set()
        hook.close()


def test_the_ledger_is_sized_for_the_engines_requests(tmp_path) -> None:
    """As vLLM's InputBatch: slots for max_num_seqs in flight, and with attribution on for the finished requests
    waiting for their settle, so that the ledger never grows while the engine serves."""
    from serving_mfu.runtime.accounts import SETTLE_FINISHED, ledger_slots

    config, build = _hook_for(tmp_path, max_num_seqs=96)
    hook = build()
    try:
        assert hook.info.max_num_seqs == 96
        assert len(hook.ledger.prompt_len) == ledger_slots(96) == 96 + SETTLE_FINISHED
    finally:
        hook.close()
