"""Classification and costing of iterations (DESIGN §2), against the per-position reference."""

from __future__ import annotations

import dataclasses

import pytest

from serving_mfu.cost.accounting import CostModel, cost_iteration
from serving_mfu.cost.records import IterationRecord, Slice
from serving_mfu.model.spec import ModelSpec
from serving_mfu.runtime.tracker import MFUTracker, busy_and_wall_s
from tests.reference import reference_costs

LLAMA = {
    "model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 3,
    "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 1000, "torch_dtype": "bfloat16",
}
GEMMA2 = {  # alternating sliding windows (8 keys) and full attention, head_dim != hidden/heads
    "model_type": "gemma2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 300,
    "sliding_window": 8, "torch_dtype": "bfloat16",
}
MOE = {
    "model_type": "qwen2_moe", "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 80, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_experts": 8, "num_experts_per_tok": 2, "vocab_size": 300,
    "decoder_sparse_step": 1, "mlp_only_layers": [1], "torch_dtype": "bfloat16",
}



def _kinds() -> ModelSpec:
    """Every key rule in one model: full, sliding (8), chunked (16, Llama 4), top-k sparse (24, with
    a DeepSeek-V3.2-style indexer) and a recurrent layer without softmax attention (state only)."""
    base = ModelSpec.from_hf_config(dict(LLAMA, num_hidden_layers=5))
    a = base.layers[0].attention
    rules = [{}, dict(sliding_window=8), dict(chunk_size=16), dict(top_k_keys=24, indexer_heads=2, indexer_head_dim=16),
             dict(num_heads=0, num_kv_heads=0, head_dim=0, v_head_dim=0, state_elements=4096,
                  state_flops_per_token=2 * 512 * 16)]
    layers = tuple(dataclasses.replace(layer, attention=dataclasses.replace(a, **r))
                   for layer, r in zip(base.layers, rules))
    return dataclasses.replace(base, layers=layers)


KINDS = _kinds()


@pytest.fixture(scope="module")
def llama() -> CostModel:
    return CostModel(ModelSpec.from_hf_config(LLAMA))


def run(model: CostModel, slices: list[Slice], busy_s: float = 0.01, peak: float | None = 1e15,
        bw: float | None = 1e12, routing=None):
    rec = IterationRecord(step=0, t_sched_s=0.0, t_end_s=busy_s, slices=slices, moe_routing=routing)
    return cost_iteration(rec, model, busy_s, busy_s, peak, bw)


def check_against_reference(model: CostModel, slices: list[Slice]) -> None:
    flops, tokens = reference_costs(model.spec, slices)
    cost = run(model, slices)
    assert cost.prefill.useful_flops == flops["prefill"]
    assert cost.recompute_flops == flops["recompute"]
    assert cost.prefill.executed_flops == flops["prefill"] + flops["recompute"]
    assert cost.decode.useful_flops == flops["kept"]
    assert cost.rejected_flops == flops["rejected"]
    assert cost.discarded_flops == flops["discarded"]
    assert cost.decode.executed_flops == flops["kept"] + flops["rejected"] + flops["discarded"]
    assert cost.saved_flops == flops["saved"]
    assert cost.prefill.tokens == tokens["prefill"]
    assert cost.decode.tokens == tokens["kept"]
    assert cost.recompute_tokens == tokens["recompute"]
    assert cost.rejected_tokens == tokens["rejected"]
    assert cost.discarded_tokens == tokens["discarded"]


def test_chunked_prefill_costs_the_same_as_one_shot(llama: CostModel) -> None:
    prompt = 100
    chunks = [(0, 40), (40, 40), (80, 20)]
    parts = [run(llama, [Slice(req_id="a", new_tokens=q, computed_before=n0, prompt_len=prompt, hwm=n0)])
             for n0, q in chunks]
    whole = run(llama, [Slice(req_id="a", new_tokens=prompt, computed_before=0, prompt_len=prompt)])
    assert sum(p.prefill.useful_flops for p in parts) == whole.prefill.useful_flops
    assert [p.prefill.tokens for p in parts] == [40, 40, 20]
    # Only the chunk that finishes the prompt produces logits (one LM-head row).
    lm = llama.flop_model.lm_head_flops_per_logit
    no_logits = [llama.flop_model.run_flops(n0, n0 + q) for n0, q in chunks]
    assert [p.prefill.useful_flops - f for p, f in zip(parts, no_logits)] == [0, 0, lm]
    for n0, q in chunks:
        check_against_reference(llama, [Slice(req_id="a", new_tokens=q, computed_before=n0, prompt_len=prompt, hwm=n0)])


def test_prefix_cache_hits_are_saved_not_executed(llama: CostModel) -> None:
    hit = Slice(req_id="a", new_tokens=36, computed_before=64, prompt_len=100, hwm=64, cached_tokens=64)
    cold = Slice(req_id="b", new_tokens=100, computed_before=0, prompt_len=100)
    c_hit, c_cold = run(llama, [hit]), run(llama, [cold])
    assert c_hit.hit_tokens == 64 and c_hit.prefill.tokens == 36
    assert c_hit.saved_flops > 0
    # what was saved plus what ran equals the cold prefill
    assert c_hit.saved_flops + c_hit.prefill.executed_flops == c_cold.prefill.executed_flops
    check_against_reference(llama, [hit])


def test_preemption_recompute_is_executed_not_useful(llama: CostModel) -> None:
    # Prompt 10, 5 tokens generated: positions 0..13 were computed and kept; the request is
    # preempted and re-prefilled from scratch with its 15 tokens.
    s = Slice(req_id="a", new_tokens=15, computed_before=0, prompt_len=10, hwm=14)
    cost = run(llama, [s])
    assert cost.recompute_tokens == 14
    assert cost.prefill.tokens == 0 and cost.prefill.useful_flops == 0
    assert cost.prefill.executed_flops == cost.recompute_flops > 0
    assert cost.decode.tokens == 1  # position 14 is new: its token is delivered
    assert cost.decode.useful_flops == llama.flop_model.run_flops(14, 15, logits=1)
    check_against_reference(llama, [s])
    # A partial recompute chunk delivers nothing and samples nothing.
    part = Slice(req_id="a", new_tokens=8, computed_before=0, prompt_len=10, hwm=14)
    cost = run(llama, [part])
    assert cost.recompute_flops == llama.flop_model.run_flops(0, 8) and cost.decode.tokens == 0


@pytest.mark.parametrize("accepted", [0, 1, 3])
def test_spec_decode_rejected_drafts_are_waste(llama: CostModel, accepted: int) -> None:
    k = 3
    s = Slice(req_id="a", new_tokens=1 + k, computed_before=50, prompt_len=20, hwm=50,
              draft_tokens=k, accepted_tokens=accepted)
    cost = run(llama, [s])
    assert cost.decode.tokens == accepted + 1
    assert cost.rejected_tokens == k - accepted
    assert cost.draft_tokens == k and cost.accepted_tokens == accepted
    kept_end = 50 + accepted + 1
    assert cost.decode.useful_flops == llama.flop_model.run_flops(50, kept_end, logits=accepted + 1)
    assert cost.rejected_flops == llama.flop_model.run_flops(kept_end, 54, logits=k - accepted)
    if accepted == k:
        assert cost.decode.executed_flops == cost.decode.useful_flops
    else:
        assert cost.decode.executed_flops > cost.decode.useful_flops
    check_against_reference(llama, [s])


def test_tokens_cut_by_a_stop_are_discarded_not_useful(llama: CostModel) -> None:
    # 3 drafts all accepted (4 kept positions), but max_tokens let only 2 tokens out
    s = Slice(req_id="a", new_tokens=4, computed_before=50, prompt_len=20, hwm=50,
              draft_tokens=3, accepted_tokens=3, delivered_tokens=2)
    cost = run(llama, [s])
    assert cost.decode.tokens == 2 and cost.discarded_tokens == 2 and cost.rejected_tokens == 0
    assert cost.decode.useful_flops == llama.flop_model.run_flops(50, 52, logits=2)
    assert cost.discarded_flops == llama.flop_model.run_flops(52, 54, logits=2)
    assert cost.decode.executed_flops == cost.decode.useful_flops + cost.discarded_flops
    check_against_reference(llama, [s])


def test_sliding_window_layers_clamp_context() -> None:
    model = CostModel(ModelSpec.from_hf_config(GEMMA2))
    slices = [Slice(req_id="a", new_tokens=1, computed_before=40, prompt_len=10, hwm=40),
              Slice(req_id="b", new_tokens=12, computed_before=3, prompt_len=30, hwm=3)]
    check_against_reference(model, slices)
    # decode at context 41: windowed layers see 8 keys, full layers 41
    coef = [g.flops_per_pair for g in model.flop_model.attention_groups]
    assert model.flop_model.score_flops(40, 41) == coef[0] * 41 + coef[1] * 8


def test_mixed_iteration_split_adds_up(llama: CostModel) -> None:
    slices = [Slice(req_id="p", new_tokens=64, computed_before=0, prompt_len=200),
              Slice(req_id="d", new_tokens=1, computed_before=300, prompt_len=100, hwm=300)]
    cost = run(llama, slices, busy_s=0.02)
    assert cost.mixed
    assert cost.prefill.time_s > 0 and cost.decode.time_s > 0
    assert cost.prefill.time_s + cost.decode.time_s == pytest.approx(0.02)


def test_moe_measured_routing_and_expected_fallback() -> None:
    model = CostModel(ModelSpec.from_hf_config(MOE))
    slices = [Slice(req_id="a", new_tokens=4, computed_before=0, prompt_len=4)]
    measured = [[4, 0, 0, 0, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]]  # 2 MoE layers (layer 1 dense)
    cost = run(model, slices, routing=measured)
    assert cost.moe_measured and cost.moe_active_experts == [3.0, 8.0]
    # layer 0: max 4 tokens vs mean 1 → 4; layer 1: uniform → 1
    assert cost.moe_imbalance == pytest.approx((4.0 + 1.0) / 2)
    expected = run(model, slices)
    e, k, t = 8, 2, 4
    assert not expected.moe_measured
    assert expected.moe_active_experts == pytest.approx([e * (1 - (1 - k / e) ** t)] * 2)
    bad = run(model, slices, routing=[[1, 2]])  # wrong number of layers → expected, flagged
    assert "moe_routing_shape_mismatch" in bad.anomalies and not bad.moe_measured


def test_bad_slices_are_rejected_with_clear_messages() -> None:
    """Records from outside (traces) are checked: cross-field rules, bounds and types, each named."""
    from serving_mfu.cost.records import RecordError, check_record, check_slice, decode_record, encode_record

    with pytest.raises(ValueError, match="accepted_tokens=3 > draft_tokens=2"):
        check_slice(Slice(req_id="x", new_tokens=3, computed_before=10, prompt_len=5, draft_tokens=2,
                          accepted_tokens=3))
    with pytest.raises(ValueError, match="draft tokens need at least"):
        check_slice(Slice(req_id="x", new_tokens=3, computed_before=0, prompt_len=5, draft_tokens=2))
    with pytest.raises(ValueError, match="before t_sched_s"):
        check_record(IterationRecord(step=1, t_sched_s=2.0, t_end_s=1.0, slices=[]))
    with pytest.raises(RecordError, match="new_tokens"):
        check_record(IterationRecord(step=1, t_sched_s=1.0, t_end_s=2.0,
                                     slices=[Slice(req_id="x", new_tokens=-1, computed_before=0, prompt_len=5)]))
    good = IterationRecord(step=1, t_sched_s=1.0, t_end_s=2.0,
                           slices=[Slice(req_id="x", new_tokens=3, computed_before=0, prompt_len=5)])
    assert decode_record(encode_record(good)) == good == check_record(good)
    line = encode_record(good).decode()
    for bad, words in ((line.replace('"prompt_len":5', '"prompt_len":0'), "prompt_len"),
                       (line.replace('"new_tokens":3', '"new_tokens":"3"'), "new_tokens"),
                       (line.replace('"engine":"0"', '"engine":"0","extra":1'), "extra"),
                       (line.replace('"t_end_s":2.0', '"t_end_s":0.5'), "before t_sched_s"),
                       ("{not json", "")):
        with pytest.raises(RecordError, match=words):
            decode_record(bad)


def test_records_are_keyword_only() -> None:
    """Every record refuses positional fields, so a reordered field can never silently take another's value."""
    import msgspec

    from serving_mfu.cost import records

    positional = {
        records.Slice: ("a", 1, 0, 1),
        records.PrefillBatch: (["a"], [1], [0], [1]),
        records.DecodeBatch: (["a"], [1]),
        records.DrafterRecord: ("eagle",),
        records.KVTransferRecord: (["a"], [0], [1]),
        records.LoRAUse: ("x", ["a"], 1),
        records.IterationRecord: (0, 0.0, 1.0, []),
    }
    structs = {c for c in vars(records).values()
               if isinstance(c, type) and issubclass(c, msgspec.Struct) and c is not msgspec.Struct}
    assert structs == set(positional)  # a new record type must be listed (and keyword-only) too
    for cls, args in positional.items():
        assert cls.__match_args__ == (), cls.__name__  # msgspec leaves keyword-only fields out
        with pytest.raises(TypeError, match="positional"):
            cls(*args)
    assert Slice(req_id="a", new_tokens=1, computed_before=0, prompt_len=1).new_tokens == 1


def test_busy_time_excludes_idle_and_overlap() -> None:
    # synchronous: scheduled after the previous step ended → busy from t_sched
    assert busy_and_wall_s(10.0, 10.5, 9.0) == (0.5, 1.5)
    # async scheduling: scheduled before the previous step ended → busy from previous end
    assert busy_and_wall_s(10.0, 10.5, 10.2) == pytest.approx((0.3, 0.3))


def test_tracker_windows_and_never_raising() -> None:
    spec = ModelSpec.from_hf_config(LLAMA)
    from serving_mfu.peaks.spec import PeakSpec

    peak = PeakSpec(device="test", dtype="bf16", flops_per_s=1e13, bandwidth_bytes_per_s=1e11, source="test")
    t = MFUTracker(spec, peak, clock=None, bucket_s=1.0, max_window_s=100)
    for step in range(20):  # one decode step per second for 20 s
        t.record(IterationRecord(step=step, t_sched_s=step, t_end_s=step + 0.5, slices=[
            Slice(req_id="a", new_tokens=1, computed_before=100 + step, prompt_len=100, hwm=100 + step)]))
    full, last5 = t.report(), t.report(window_s=5)
    assert full.decode.tokens == 20 and full.overall.iterations == 20
    assert last5.decode.tokens == 5
    assert full.overall.busy_s == pytest.approx(10.0)
    assert full.overall.wall_mfu < full.overall.mfu  # idle halves wall MFU
    with pytest.raises(ValueError, match="window must be"):
        t.report(window_s=-1)
    # A record the accounting cannot handle is counted, not raised.
    broken = IterationRecord(step=99, t_sched_s=30.0, t_end_s=31.0, slices=[None])  # not checked when built
    assert t.record(broken) is None
    assert t.report().anomalies.counts.get("accounting_error") == 1
    assert t.report().decode.tokens == 20


def test_data_parallel_engines_aggregate_by_capacity() -> None:
    """Two engines' counters add up; MFU divides by each engine's own seconds × peak × devices."""
    from serving_mfu.peaks.spec import PeakSpec
    from serving_mfu.schema.report import build_report

    spec = ModelSpec.from_hf_config(LLAMA)
    peak = PeakSpec(device="t", dtype="bf16", flops_per_s=1e12, bandwidth_bytes_per_s=1e11, source="test")
    engines = [MFUTracker(spec, peak, devices=d, clock=None) for d in (1, 4)]
    for tracker, busy in zip(engines, (0.5, 0.1)):
        tracker.record(IterationRecord(step=0, t_sched_s=0.0, t_end_s=busy, slices=[
            Slice(req_id="a", new_tokens=1, computed_before=100, prompt_len=100, hwm=100)]))
    total = engines[0].counters + engines[1].counters
    report = build_report(total, engines[0].peak_report(), engines[0].model_report(), "shapley")
    useful = sum(t.counters.decode_useful_flops for t in engines)
    assert report.decode.mfu == pytest.approx(useful / (0.5 * 1e12 * 1 + 0.1 * 1e12 * 4))
    assert report.decode.time_s == pytest.approx(0.6)
