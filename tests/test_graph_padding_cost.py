"""CUDA-graph padding from a record to the report: `cost_iteration` costs a record's padded positions as
executed waste (`graph_padding`), `graph_config` reads vLLM's settings (GPU- and CPU-shaped fakes), and the
hook fills `padded_tokens` exactly from a runner output's `cudagraph_stats`, else from the model of vLLM's
dispatch rules (`padding_modelled`).  No engine runs; the hook tests build a VllmConfig of the tiny model."""

from __future__ import annotations

import logging
from types import SimpleNamespace as NS

import msgspec
import pytest

from scheduler_hooks.capture import StepCapture
from scheduler_hooks.engine_info import graph_config
from serving_mfu.cost.accounting import CostModel, cost_iteration
from serving_mfu.cost.graph_padding import GraphConfig, default_capture_sizes, padded_tokens
from serving_mfu.cost.records import DecodeBatch, IterationRecord, PrefillBatch, Slice, decode_record, encode_record
from serving_mfu.model.spec import ModelSpec
from serving_mfu.peaks.table import lookup_peak
from serving_mfu.runtime.tracker import MFUTracker
from serving_mfu.tools.public_configs import PUBLIC_CONFIGS

SPEC = ModelSpec.from_hf_config(PUBLIC_CONFIGS["llama-3-70b"])
PEAK = lookup_peak("h100-sxm", "bf16")
SIZES = default_capture_sizes(max_num_seqs=256, max_num_batched_tokens=8192)
GPU = GraphConfig(mode="FULL_AND_PIECEWISE", capture_sizes=SIZES, max_num_seqs=256)

# a mixed step: two prompt chunks (30 + 17 positions), one recomputing slice (5 positions below its mark)
# and five decodes, two verifying 3 drafts (1 + 1 accepted); 47 + 5 prefill-phase, 5 + 6 decode positions
MIXED = IterationRecord(
    step=1, t_sched_s=0.0, t_end_s=0.02,
    slices=[Slice(req_id="r", new_tokens=5, computed_before=10, prompt_len=8, hwm=15)],
    prefill=PrefillBatch(req_ids=["p", "q"], new_tokens=[30, 17], computed_before=[0, 100], prompt_len=[64, 117]),
    decode=DecodeBatch(req_ids=[f"d{i}" for i in range(5)], computed_before=[200, 300, 400, 500, 600],
                       draft_tokens=[3, 3, 0, 0, 0], accepted_tokens=[1, 0, 0, 0, 0]))
DECODE = IterationRecord(step=1, t_sched_s=0.0, t_end_s=0.01, slices=[],
                         decode=DecodeBatch(req_ids=["a", "b", "c"], computed_before=[100, 200, 300]))


def _cost(rec: IterationRecord, **padding):
    return cost_iteration(msgspec.structs.replace(rec, **padding), CostModel(SPEC), 0.02, 0.02, PEAK.flops_per_s,
                          PEAK.bandwidth_bytes_per_s)


@pytest.mark.parametrize("modelled", [False, True])
def test_padded_positions_cost_their_linear_flops_split_by_tokens(modelled: bool) -> None:
    lin = CostModel(SPEC).linear_flops_per_token
    base, padded = _cost(MIXED), _cost(MIXED, padded_tokens=13, padding_modelled=modelled)
    tokens_p, tokens_d = 30 + 17 + 5, 5 + 3 + 3
    waste_p, waste_d = padded.prefill.graph_padding_flops, padded.decode.graph_padding_flops
    assert waste_p == lin * 13 * tokens_p // (tokens_p + tokens_d) and waste_p + waste_d == lin * 13  # exactly
    assert waste_d > 0 and base.prefill.graph_padding_flops == base.decode.graph_padding_flops == 0
    assert padded.prefill.executed_flops == base.prefill.executed_flops + waste_p
    assert padded.decode.executed_flops == base.decode.executed_flops + waste_d
    for phase in ("prefill", "decode"):  # nothing useful, no byte, no token
        a, b = getattr(base, phase), getattr(padded, phase)
        assert (a.useful_flops, a.bytes, a.tokens) == (b.useful_flops, b.bytes, b.tokens)
    assert padded.hfu > base.hfu
    assert padded.graph_padding_modelled_iterations == int(modelled) and base.graph_padding_modelled_iterations == 0
    assert _cost(MIXED, padding_modelled=True).graph_padding_modelled_iterations == 0  # modelled, but no padding


def test_graph_padding_raises_hfu_not_mfu_and_is_its_own_waste_cause() -> None:
    reports, counters = [], []
    for padding in ({}, {"padded_tokens": 1, "padding_modelled": True}):  # 3 decodes run as a graph of 4
        tracker = MFUTracker(SPEC, PEAK, clock=None)
        tracker.record(msgspec.structs.replace(DECODE, **padding))
        reports.append(tracker.report())
        counters.append(tracker.counters)
    base, padded = reports
    lin = CostModel(SPEC).linear_flops_per_token
    assert padded.decode.mfu == base.decode.mfu and padded.overall.mfu == base.overall.mfu
    assert padded.decode.hfu > base.decode.hfu and padded.overall.hfu > base.overall.hfu
    assert padded.decode.executed_flops - base.decode.executed_flops == lin
    assert padded.decode.waste_by_cause["graph_padding"] == lin == padded.overall.waste_by_cause["graph_padding"]
    assert base.decode.waste_by_cause["graph_padding"] == 0
    assert sum(padded.decode.waste_by_cause.values()) == pytest.approx(
        padded.decode.executed_flops - padded.decode.useful_flops, rel=1e-12)
    assert counters[1].decode_graph_padding_flops == lin and counters[1].graph_padding_modelled_iterations == 1
    assert counters[0].graph_padding_modelled_iterations == 0

    tracker = MFUTracker(SPEC, PEAK, clock=None)  # a mixed step: each phase's cause holds its share
    tracker.record(msgspec.structs.replace(MIXED, padded_tokens=13))
    report, cost = tracker.report(), _cost(MIXED, padded_tokens=13)
    assert report.prefill.waste_by_cause["graph_padding"] == cost.prefill.graph_padding_flops
    assert report.decode.waste_by_cause["graph_padding"] == cost.decode.graph_padding_flops
    assert report.overall.waste_by_cause["graph_padding"] == lin * 13


def test_records_carry_padding_and_older_traces_still_decode() -> None:
    rec = msgspec.structs.replace(DECODE, padded_tokens=1, padding_modelled=True)
    assert decode_record(encode_record(rec)) == rec
    old = decode_record(b'{"step":1,"t_sched_s":0.0,"t_end_s":0.01,"slices":[]}')
    assert old.padded_tokens == 0 and old.padding_modelled is False


# ---- graph_config: vLLM's settings as a GraphConfig ---------------------------------------------------------

def _vllm_config(mode: str = "FULL_AND_PIECEWISE", sizes=SIZES, device: str = "cuda", **kw):
    """A VllmConfig-shaped fake (only what graph_config reads), a GPU engine's by default."""
    cc = NS(cudagraph_mode=NS(name=mode), cudagraph_capture_sizes=list(sizes),
            max_cudagraph_capture_size=max(sizes) if sizes else 0, cudagraph_specialize_lora=kw.pop("specialize", True))
    return NS(compilation_config=cc, scheduler_config=NS(max_num_seqs=256), device_config=NS(device_type=device),
              speculative_config=kw.pop("speculative_config", None), lora_config=kw.pop("lora_config", None),
              parallel_config=NS(data_parallel_size=kw.pop("dp", 1)), **kw)


def test_graph_config_of_a_gpu_engine(monkeypatch) -> None:
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    g = graph_config(_vllm_config())
    assert g == GPU and g.enabled and g.model_runner_v2  # V2 unless said otherwise (vLLM 0.32's default)
    assert padded_tokens(3, True, g) == 4 and padded_tokens(13, False, g) == 16
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    assert not graph_config(_vllm_config()).model_runner_v2
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    assert not graph_config(_vllm_config(use_v2_model_runner=False)).model_runner_v2  # vLLM's own answer wins
    # k = 3 drafts, LoRA without specialization, two data-parallel ranks, V1
    g = graph_config(_vllm_config(speculative_config=NS(num_speculative_tokens=3), lora_config=NS(max_lora_rank=8),
                                  specialize=False, dp=2, use_v2_model_runner=False))
    assert (g.uniform_decode_query_len, g.lora_enabled, g.specialize_lora, g.dp_size) == (4, True, False, 2)
    assert g.lora_active_matters and padded_tokens(12, True, g, has_lora=True) == 16  # V1: sizes rounded to 4s
    assert padded_tokens(13, False, g, has_lora=True) == 16 and padded_tokens(13, False, g, has_lora=False) == 13
    # VllmConfig.uniform_decode_query_len, where it exists, is the decode length
    assert graph_config(_vllm_config(uniform_decode_query_len=2)).uniform_decode_query_len == 2


def test_graph_config_of_a_cpu_engine_pads_nothing(caplog) -> None:
    for config in (_vllm_config("NONE", ()), _vllm_config("NONE"), _vllm_config(device="cpu"),
                   _vllm_config(sizes=()), NS(), None):
        g = graph_config(config)
        assert g == GraphConfig() and not g.enabled
        assert all(padded_tokens(n, u, g) == n for n in (1, 3, 13, 600) for u in (True, False))
    with caplog.at_level(logging.WARNING):  # an unreadable setting costs the padding, never the engine
        assert graph_config(_vllm_config("SOMETIMES")) == GraphConfig()
    assert "CUDA-graph settings" in caplog.text


def test_graph_config_of_vllms_own_cpu_config() -> None:
    """A real VllmConfig on this (CPU) machine, CUDA graphs not turned off: vLLM's CPU platform has none."""
    pytest.importorskip("vllm")
    from vllm.engine.arg_utils import EngineArgs

    from tests.engine_util import model_path

    config = EngineArgs(model=model_path(), max_model_len=512).create_engine_config()
    assert graph_config(config) == GraphConfig()


# ---- the hook: exact from cudagraph_stats, else modelled ----------------------------------------------------

def test_uniform_decode_follows_each_model_runner() -> None:
    from scheduler_hooks.vllm_outputs import uniform_decode

    def out(**scheduled):
        return NS(num_scheduled_tokens=scheduled, total_num_scheduled_tokens=sum(scheduled.values()))

    v1, v2 = (GraphConfig(mode="FULL_AND_PIECEWISE", capture_sizes=SIZES, model_runner_v2=r) for r in (False, True))
    assert uniform_decode(out(a=1, b=1, c=1), v2, None, [])
    assert not uniform_decode(out(a=1, b=2), v2, None, []) and not uniform_decode(out(), v2, None, [])
    chunks = PrefillBatch(req_ids=["a", "b"], new_tokens=[1, 1], computed_before=[0, 7], prompt_len=[4, 8])
    assert uniform_decode(out(a=1, b=1), v1, chunks, [])  # V1 looks at the token counts alone
    assert not uniform_decode(out(a=1, b=1), v2, chunks, [])  # V2: `a` is a prompt from its start
    resumed = msgspec.structs.replace(chunks, computed_before=[3, 7])
    assert uniform_decode(out(a=1, b=1), v2, resumed, [])  # one new token over computed ones runs as a decode
    recompute = Slice(req_id="a", new_tokens=1, computed_before=0, prompt_len=4, hwm=9)
    assert not uniform_decode(out(a=1), v2, None, [recompute]) and uniform_decode(out(a=1), v1, None, [recompute])
    q4 = GraphConfig(mode="FULL_AND_PIECEWISE", capture_sizes=SIZES, uniform_decode_query_len=4)
    assert uniform_decode(out(a=4, b=4), q4, None, [])
    assert not uniform_decode(out(a=3, b=5), q4, None, [])  # the same sum, not every request at 1 + k


class _Records:
    """An observer keeping each accounted step's record."""

    def __init__(self) -> None:
        self.records: list = []

    def enter(self, kind, *args) -> None:
        pass

    def exit(self, kind, result) -> None:
        if kind == "account":
            self.records.append(result)


def test_the_hook_reads_cudagraph_stats_exactly_and_models_without_them(tmp_path) -> None:
    pytest.importorskip("vllm")
    from tests.test_hook_units import _hook_for, _result, _step

    _, build = _hook_for(tmp_path)
    hook = build()
    seen = _Records()
    hook.observer = seen

    def run(scheduled, before, new=None, stats=None):
        out = _step(hook, scheduled, before, new)
        runner = NS(req_id_to_index={r: i for i, r in enumerate(scheduled)}, sampled_token_ids=[[5]] * len(scheduled),
                    **({} if stats is None else {"cudagraph_stats": stats}))
        token = hook.before_output(NS(log_stats=False), out, runner)
        assert token.cudagraph_stats is stats  # captured by reference on the engine thread
        hook.after_output(token, _result({r: 1 for r in scheduled}))
        rec = seen.records[-1]
        return rec.padded_tokens, rec.padding_modelled

    try:
        assert hook.info.graph == GraphConfig()  # a CPU engine: nothing pads, nothing is modelled
        assert run({"a": 5, "b": 5, "c": 5}, {"a": 0, "b": 0, "c": 0}, new={"a": 5, "b": 5, "c": 5}) == (0, False)
        hook.info.graph = GPU  # the same hook as on a GPU engine (V2, FULL_AND_PIECEWISE)
        assert run({"a": 1, "b": 1, "c": 1}, {"a": 5, "b": 5, "c": 5}) == (1, True)  # a uniform decode: 3 → 4
        assert run({"a": 1, "b": 1, "c": 1, "d": 10}, {"a": 6, "b": 6, "c": 6, "d": 0},
                   new={"d": 10}) == (3, True)  # mixed: 13 → 16
        # --cudagraph-metrics on: vLLM's counts, exactly, whatever the model says (here DP padding to 8)
        stat = NS(num_unpadded_tokens=4, num_padded_tokens=8, num_paddings=4, runtime_mode="FULL")
        assert run({"a": 1, "b": 1, "c": 1, "d": 1}, {"a": 7, "b": 7, "c": 7, "d": 10}, stats=stat) == (4, False)
        eager = NS(num_unpadded_tokens=4, num_padded_tokens=4, num_paddings=0, runtime_mode="NONE")
        assert run({"a": 1, "b": 1, "c": 1, "d": 1}, {"a": 8, "b": 8, "c": 8, "d": 11}, stats=eager) == (0, False)
        c = hook.tracker.counters
        lin = hook.tracker.cost_model.linear_flops_per_token
        assert c.graph_padding_modelled_iterations == 2
        assert c.prefill_graph_padding_flops + c.decode_graph_padding_flops == lin * (1 + 3 + 4)
        mixed_p = lin * 3 * 10 // 13  # the mixed step's padding split by tokens: 10 prompt, 3 decode positions
        assert c.prefill_graph_padding_flops == mixed_p and c.decode_graph_padding_flops == lin * (1 + 3 + 4) - mixed_p
        # an old capture (five fields, no stats): the model
        out = _step(hook, {"a": 1, "b": 1, "c": 1, "d": 1}, {"a": 9, "b": 9, "c": 9, "d": 12})
        capture = StepCapture(t_sched_s=0.0, t_end_s=1e-3, out=out, runner_out=NS(req_id_to_index={}))
        rec = hook.build_record(99, capture, _result({}))
        assert (rec.padded_tokens, rec.padding_modelled) == (0, True)  # 4 is a capture size
    finally:
        hook.close()
