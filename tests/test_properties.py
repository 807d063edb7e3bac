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
from tests.test_accounting import GEMMA2, LLAMA, MOE

MODELS = {name: CostModel(ModelSpec.from_hf_config(cfg)) for name, cfg in
          (("llama", LLAMA), ("gemma2", GEMMA2), ("moe", MOE))}


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
