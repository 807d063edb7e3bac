"""Property tests on random iterations: MFU ≤ HFU, the split adds up, repair keeps phases ≤ peak."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving_mfu.cost.accounting import CostModel, cost_iteration
from serving_mfu.cost.records import IterationRecord, Slice
from serving_mfu.cost.time_split import split_time
from serving_mfu.model.spec import ModelSpec
from tests.reference import reference_costs
from tests.test_accounting import GEMMA2, KINDS, LLAMA, MOE

MODELS = {name: CostModel(ModelSpec.from_hf_config(cfg)) for name, cfg in
          (("llama", LLAMA), ("gemma2", GEMMA2), ("moe", MOE))}
MODELS["kinds"] = CostModel(KINDS)


@st.composite
def slices(draw, i: int) -> Slice:
    prompt = draw(st.integers(1, 300))
    hwm = draw(st.integers(0, prompt + 60))
    n0 = draw(st.integers(0, prompt + 80))
    q = draw(st.integers(1, 120))
    c = n0 + q
    decode_positions = c - max(n0, hwm, prompt)
    k = draw(st.integers(0, min(5, decode_positions - 1))) if decode_positions >= 2 else 0
    a = draw(st.integers(0, k))
    cached = draw(st.integers(0, n0)) if draw(st.booleans()) else 0
    delivered = draw(st.integers(0, a + 1)) if draw(st.booleans()) else None
    return Slice(req_id=f"r{i}", new_tokens=q, computed_before=n0, prompt_len=prompt, hwm=hwm,
                 cached_tokens=cached, draft_tokens=k, accepted_tokens=a, delivered_tokens=delivered)


@st.composite
def iterations(draw):
    n = draw(st.integers(1, 12))
    items = [draw(slices(i)) for i in range(n)]
    model = draw(st.sampled_from(sorted(MODELS)))
    busy = draw(st.floats(1e-5, 1.0))
    # peaks from far below to far above what the work needs, so HFU > 1 happens too
    peak = draw(st.floats(1e6, 1e14))
    bw = draw(st.floats(1e6, 1e13))
    split = draw(st.sampled_from(["shapley", "flop_proportional"]))
    routing = None
    if model == "moe" and draw(st.booleans()):
        routing = [draw(st.lists(st.integers(0, 50), min_size=8, max_size=8)) for _ in range(2)]
    return model, items, busy, peak, bw, split, routing


def _cost(model, items, busy, peak, bw, split, routing):
    rec = IterationRecord(step=0, t_sched_s=0.0, t_end_s=busy, slices=items, moe_routing=routing)
    return cost_iteration(rec, MODELS[model], busy, busy, peak, bw, split)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(iterations())
def test_invariants(case) -> None:
    model, items, busy, peak, bw, split, routing = case
    cost = _cost(*case)
    for phase in (cost.prefill, cost.decode):
        assert phase.useful_flops <= phase.executed_flops  # MFU ≤ HFU
        assert phase.time_s >= 0 and phase.bytes >= 0
    executed = cost.prefill.executed_flops + cost.decode.executed_flops
    if executed > 0:
        assert math.isclose(cost.prefill.time_s + cost.decode.time_s, busy, rel_tol=1e-9)
    if cost.hfu is not None and cost.hfu <= 1.0:
        for phase in (cost.prefill, cost.decode):
            if phase.executed_flops:
                assert phase.executed_flops / (phase.time_s * peak) <= 1.0 + 1e-9
    # the closed form agrees with the per-position reference
    flops, tokens = reference_costs(MODELS[model].spec, items)
    assert cost.prefill.useful_flops == flops["prefill"]
    assert cost.decode.useful_flops == flops["kept"]
    assert cost.recompute_flops == flops["recompute"]
    assert cost.rejected_flops == flops["rejected"]
    assert cost.discarded_flops == flops["discarded"]
    assert cost.saved_flops == flops["saved"]
    assert cost.decode.executed_flops == flops["kept"] + flops["rejected"] + flops["discarded"]
    assert cost.decode.tokens == tokens["kept"] and cost.prefill.tokens == tokens["prefill"]


@settings(max_examples=500, deadline=None)
@given(st.floats(1e-6, 10), st.floats(0, 1e15), st.floats(0, 1e15), st.floats(1, 1e12), st.floats(1, 1e12),
       st.floats(0, 1e12), st.floats(1e9, 1e16), st.floats(1e6, 1e13))
def test_split_alone(busy, f_p, f_d, b_p, b_d, extra, peak, bw) -> None:
    b_pd = max(b_p, b_d) + extra  # the union reads at least what either phase alone reads
    t_p, t_d, moved = split_time(busy, f_p, f_d, b_p, b_d, b_pd, peak, bw)
    assert t_p >= 0 and t_d >= 0 and moved >= 0
    assert math.isclose(t_p + t_d, busy, rel_tol=1e-9)
    if f_p + f_d <= busy * peak:
        assert f_p <= t_p * peak * (1 + 1e-9) and f_d <= t_d * peak * (1 + 1e-9)


@st.composite
def batched_iterations(draw):
    """An iteration as the engine hook builds it: a prefill batch, a decode batch (with or without
    drafts) and a few general slices, on a model with or without sliding windows (or with every key
    rule and a recurrent layer, `kinds`)."""
    from serving_mfu.cost.records import DecodeBatch, PrefillBatch

    prefill = decode = None
    n = draw(st.integers(0, 20)) if draw(st.booleans()) else draw(st.integers(64, 100))  # numpy path from 64
    if n:
        prompts = [draw(st.integers(1, 400)) for _ in range(n)]
        n0 = [draw(st.integers(0, p - 1)) for p in prompts]
        q = [draw(st.integers(1, p - s)) for p, s in zip(prompts, n0)]
        cached = [draw(st.integers(0, s)) for s in n0] if draw(st.booleans()) else None
        prefill = PrefillBatch(req_ids=[f"p{i}" for i in range(n)], new_tokens=q, computed_before=n0,
                               prompt_len=prompts, cached_tokens=cached)
    m = draw(st.integers(0, 40)) if draw(st.booleans()) else draw(st.integers(64, 160))  # numpy path from 64
    if m:
        n0 = [draw(st.integers(1, 5000)) for _ in range(m)]
        k = a = delivered = None
        if draw(st.booleans()):
            k = [draw(st.integers(0, 4)) for _ in range(m)]
            a = [draw(st.integers(0, x)) for x in k]
        if draw(st.booleans()):  # a stop cut some requests short
            delivered = [draw(st.integers(0, 1 + (a[i] if a else 0))) for i in range(m)]
        decode = DecodeBatch(req_ids=[f"d{i}" for i in range(m)], computed_before=n0, draft_tokens=k,
                             accepted_tokens=a, delivered_tokens=delivered)
    items = [draw(slices(i)) for i in range(draw(st.integers(0, 3)))]
    return draw(st.sampled_from(sorted(MODELS))), IterationRecord(step=0, t_sched_s=0.0, t_end_s=0.01, slices=items,
                                                                  prefill=prefill, decode=decode)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batched_iterations())
def test_batches_cost_what_their_slices_cost(case) -> None:
    """The closed forms over a batch's columns give exactly what the per-slice classification gives
    for the same positions, and both match the per-position reference."""
    import dataclasses

    import msgspec
    import pytest

    model, rec = case
    expanded = msgspec.structs.replace(rec, slices=rec.all_slices(), prefill=None, decode=None)
    got = cost_iteration(rec, MODELS[model], 0.01, 0.01, 1e12, 1e11)
    want = cost_iteration(expanded, MODELS[model], 0.01, 0.01, 1e12, 1e11)
    for phase in ("prefill", "decode"):
        g, w = dataclasses.asdict(getattr(got, phase)), dataclasses.asdict(getattr(want, phase))
        assert {k: g[k] for k in ("useful_flops", "executed_flops", "tokens")} == \
            {k: w[k] for k in ("useful_flops", "executed_flops", "tokens")}
        assert g["bytes"] == pytest.approx(w["bytes"], rel=1e-12)
        assert g["time_s"] == pytest.approx(w["time_s"], rel=1e-9)
    for name in ("recompute_tokens", "recompute_flops", "rejected_tokens", "rejected_flops", "discarded_tokens",
                 "discarded_flops", "draft_tokens", "accepted_tokens", "hit_tokens", "saved_flops", "mixed"):
        assert getattr(got, name) == getattr(want, name), name
    flops, _ = reference_costs(MODELS[model].spec, expanded.slices)
    assert got.prefill.useful_flops == flops["prefill"] and got.decode.useful_flops == flops["kept"]
    assert got.rejected_flops == flops["rejected"] and got.saved_flops == flops["saved"]
    assert got.discarded_flops == flops["discarded"]


@given(slices(0))
@settings(max_examples=400, deadline=None)
def test_slice_positions_count_what_the_per_position_table_says(s: Slice) -> None:
    """slice_positions (LoRA's per-class position counts) = the naive per-position classification."""
    from collections import Counter as Count

    from serving_mfu.cost.accounting import slice_positions
    from tests.reference import classify

    order = ("prefill", "recompute", "kept", "rejected", "discarded")
    rows = classify(s)
    positions = Count(cls for _, cls, _ in rows)
    logits = Count(cls for _, cls, lg in rows if lg)
    *counts, logit_counts = slice_positions(s)
    assert tuple(counts) == tuple(positions[c] for c in order)
    assert logit_counts == tuple(logits[c] for c in order)
