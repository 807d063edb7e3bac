"""Per-request and per-tenant cost, without an engine (DESIGN §12): each request's FLOPs equal the naive
per-position reference of its own positions, a step's shares add up to the step's cost and busy time, the
tenant labels stay bounded and monotonic, and finished requests cross the request log intact."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving_mfu.cost.accounting import cost_iteration
from serving_mfu.cost.attribution import attribute
from serving_mfu.cost.records import DrafterRecord, KVTransferRecord, LoRAUse
from serving_mfu.runtime.request_log import RequestLogReader, RequestLogWriter, log_paths
from serving_mfu.runtime.tenants import TenantTable
from serving_mfu.schema.requests import FinishedRequests, id_keys, sanitize_tenant
from tests.reference import classify as reference_classify
from tests.reference import reference_costs
from tests.test_properties import MODELS, batched_iterations


@st.composite
def costed_steps(draw):
    """A step as the hook builds it, with drafter work, CUDA-graph padding and LoRA on some requests."""
    name, rec = draw(batched_iterations())
    ids = [s.req_id for s in rec.all_slices()]
    drafter = DrafterRecord(method="eagle", flops=float(draw(st.integers(0, 10**9)))) if draw(st.booleans()) \
        else None
    lora = None
    if ids and draw(st.booleans()):
        chosen = draw(st.lists(st.sampled_from(ids), min_size=1, max_size=min(len(ids), 5), unique=True))
        lora = [LoRAUse(adapter="a", req_ids=chosen, flops_per_token=1000, flops_per_logit=10,
                        executed_per_token=1600, executed_per_logit=16)]
    padded = draw(st.integers(0, 64)) if draw(st.booleans()) else 0
    kv = None
    if ids and draw(st.booleans()):  # a connector loaded KV for some requests (vLLM's PrefillStats)
        chosen = draw(st.lists(st.sampled_from(ids), min_size=1, max_size=min(len(ids), 4), unique=True))
        kv = KVTransferRecord(req_ids=chosen, local_cached=[draw(st.integers(0, 64)) for _ in chosen],
                              received=[draw(st.integers(0, 64)) for _ in chosen])
    rec = msgspec.structs.replace(rec, drafter=drafter, lora=lora, padded_tokens=padded, kv=kv)
    busy = draw(st.floats(1e-4, 1.0))
    peak = draw(st.sampled_from([None, 1e12, 1e15]))
    devices = draw(st.integers(1, 8))
    return name, rec, busy, peak, devices


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(costed_steps(), min_size=2, max_size=4))
def test_steps_settled_together_give_what_each_step_gives(cases) -> None:
    """attribute_steps over several steps (of one model) = each step attributed alone, row by row."""
    from serving_mfu.cost.attribution import attribute_steps

    name = cases[0][0]
    model = MODELS[name]
    steps = [(rec, cost_iteration(rec, model, busy, busy, 1e15, 1e13)) for _, rec, busy, _, _ in cases]
    together = attribute_steps(steps, model, 1, 1e15, 1e13)
    alone = {}
    for s, (rec, cost) in enumerate(steps):
        one = attribute(rec, cost, model, 1, 1e15, 1e13)
        if one is not None:
            for i, rid in enumerate(one.ids):
                alone[(s, rid)] = (one.useful_flops[i], one.executed_flops[i], one.prefill_device_s[i],
                                   one.decode_device_s[i], one.delivered_tokens[i], one.cached_tokens[i])
    if together is None:
        assert not alone
        return
    got = {(int(s), rid): (u, e, p, d, o, c) for s, rid, u, e, p, d, o, c in zip(
        together.step, together.ids, together.useful_flops, together.executed_flops, together.prefill_device_s,
        together.decode_device_s, together.delivered_tokens, together.cached_tokens)}
    assert got.keys() == alone.keys()
    for key, values in got.items():
        assert values == pytest.approx(alone[key], rel=1e-12, abs=1e-12), key


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(costed_steps())
def test_shares_add_up_to_the_step_and_follow_the_reference(case) -> None:
    name, rec, busy, peak, devices = case
    model = MODELS[name]
    bw = peak / 50 if peak else None
    cost = cost_iteration(rec, model, busy, busy, peak and peak * devices, bw and bw * devices)
    shares = attribute(rec, cost, model, devices, peak and peak * devices, bw and bw * devices)
    slices = rec.all_slices()
    if not slices:
        assert shares is None
        return
    assert sorted(shares.ids) == sorted(s.req_id for s in slices)
    useful = cost.prefill.useful_flops + cost.decode.useful_flops
    executed = cost.prefill.executed_flops + cost.decode.executed_flops
    assert shares.useful_flops.sum() == pytest.approx(useful, rel=1e-9, abs=1e-6)
    assert shares.executed_flops.sum() == pytest.approx(executed, rel=1e-9, abs=1e-6)
    ran = cost.prefill.time_s + cost.decode.time_s
    assert (shares.prefill_device_s + shares.decode_device_s).sum() == pytest.approx(ran * devices, rel=1e-9)
    assert shares.prefill_device_s.sum() == pytest.approx(cost.prefill.time_s * devices, rel=1e-9, abs=1e-15)
    assert (shares.prefill_device_s >= 0).all() and (shares.decode_device_s >= 0).all()
    # each request's own FLOPs, position by position (the naive reference), where nothing is shared
    by_id = {s.req_id: s for s in slices}
    if rec.drafter is None and not rec.lora and not rec.padded_tokens:
        for rid, u, e in zip(shares.ids, shares.useful_flops, shares.executed_flops):
            flops, _ = reference_costs(model.spec, [by_id[rid]])
            assert u == flops["prefill"] + flops["kept"]
            assert e == sum(v for k, v in flops.items() if k != "saved")
    if rec.kv is not None:  # with a connector, hits and loads are vLLM's, per request
        by_row = dict(zip(shares.ids, zip(shares.cached_tokens.tolist(), shares.received_tokens.tolist())))
        assert {r: by_row[r] for r in rec.kv.req_ids} == dict(zip(rec.kv.req_ids, zip(rec.kv.local_cached,
                                                                                         rec.kv.received)))
    # tokens delivered: each kept decode position, and a prompt position with a logit row (the first token)
    for rid, out in zip(shares.ids, shares.delivered_tokens):
        positions = list(reference_classify(by_id[rid]))
        assert out == sum(1 for _, cls, logits in positions if cls == "kept" or (cls == "prefill" and logits))


def test_device_seconds_follow_each_requests_roofline_cost() -> None:
    """A decode batch of a short and a long context: the long one reads more KV, so on a memory-bound step it
    gets more of the time; without a peak the time follows FLOPs."""
    from serving_mfu.cost.records import DecodeBatch, IterationRecord

    model = MODELS["llama"]
    rec = IterationRecord(step=1, t_sched_s=0.0, t_end_s=0.01, slices=[],
                          decode=DecodeBatch(req_ids=["short", "long"], computed_before=[10, 4000]))
    cost = cost_iteration(rec, model, 0.01, 0.01, 1e15, 1e9)  # far more FLOP/s than bytes/s: memory-bound
    s = attribute(rec, cost, model, 1, 1e15, 1e9)
    short, long_ = s.decode_device_s
    assert long_ > 2 * short and short + long_ == pytest.approx(0.01)
    s2 = attribute(rec, cost, model, 1, None, None)
    ratio = s2.executed_flops[1] / s2.executed_flops[0]
    assert s2.decode_device_s[1] / s2.decode_device_s[0] == pytest.approx(ratio)


def test_tenant_labels_are_bounded_sanitised_and_never_go_away() -> None:
    t = TenantTable(max_tenants=2)
    a, b = t.label_of("team a"), t.label_of('{"b"}')
    assert t.labels[a] == "team_a" and t.labels[b] == "b"
    c, d = t.label_of("c"), t.label_of("d")
    assert c == d and t.labels[c] == "other"  # past the budget
    assert t.label_of("team a") == a  # a tenant keeps its label
    t.accrue(np.array([a, c, c], np.int32), (np.array([1.0, 2.0, 3.0]), 0.0, 0.0, 0.0, 0.0))
    assert {x.tenant: x.useful_flops for x in t.totals()} == {"team_a": 1.0, "b": 0.0, "other": 5.0}
    weird = 'x {"y": "z"} ' * 40  # spaces, quotes, braces, 520 characters
    label = sanitize_tenant(weird)
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:/@+=-")
    expected, last_bad = "", False  # the documented rule, written out character by character
    for ch in weird:
        if ch in allowed:
            expected, last_bad = expected + ch, False
        elif not last_bad:
            expected, last_bad = expected + "_", True
    assert label == expected.strip("_")[:128] and len(label) == 128
    pinned = TenantTable(max_tenants=50, pinned=["gold", "silver"])
    assert [pinned.labels[pinned.label_of(x)] for x in ("silver", "bronze", "gold")] == ["silver", "other", "gold"]


def test_ids_a_client_may_use() -> None:
    assert id_keys("cmpl-my-id-0-1a2b3c4d") == ("cmpl-my-id-0-1a2b3c4d", "cmpl-my-id", "my-id")
    assert id_keys("chatcmpl-abc-1a2b3c4d") == ("chatcmpl-abc-1a2b3c4d", "chatcmpl-abc", "abc")
    assert id_keys("7-1a2b3c4d") == ("7-1a2b3c4d", "7")  # vllm.LLM: its counter, then the suffix
    assert id_keys("1_cmpl-x-0-1a2b3c4d") == ("1_cmpl-x-0-1a2b3c4d", "cmpl-x-0-1a2b3c4d", "cmpl-x", "x")  # n > 1


def _batch(ids: list[str], engine: str = "1-0", tenant: str = "t") -> FinishedRequests:
    n = len(ids)
    ints = np.arange(6 * n, dtype=np.int64).reshape(6, n)
    floats = np.arange(6 * n, dtype=np.float64).reshape(6, n) / 2
    return FinishedRequests.pack(engine, ids, [tenant], np.zeros(n, np.int32), ["lora-a"],
                                 np.array([0] + [-1] * (n - 1), np.int32), ints, floats)


def test_finished_requests_round_trip() -> None:
    rows = msgspec.json.decode(msgspec.json.encode(_batch(["a", "b", "c"])), type=FinishedRequests).rows()
    assert [r.request_id for r in rows] == ["a", "b", "c"]
    assert [r.prompt_tokens for r in rows] == [0, 1, 2] and [r.accepted_tokens for r in rows] == [15, 16, 17]
    assert [r.adapter for r in rows] == ["lora-a", None, None]
    assert rows[1].device_seconds == rows[1].prefill_device_seconds + rows[1].decode_device_seconds == 3.5 + 5.0
    broken = msgspec.structs.replace(_batch(["a", "b"]), request_id=["a"])
    with pytest.raises(ValueError, match="columns"):
        broken.rows()


def test_request_log_appends_rotates_and_is_followed(tmp_path: Path) -> None:
    folder = tmp_path / "publish"
    folder.mkdir(mode=0o700)
    writer = RequestLogWriter(folder, "1-0", segment_records=4)
    reader = RequestLogReader(folder, ring=6)
    writer.add(_batch(["cmpl-x-0-aaaa1111", "cmpl-x-1-aaaa2222"]))
    writer.flush()
    assert [r.request_id for r in reader.find("x")] == ["cmpl-x-1-aaaa2222", "cmpl-x-0-aaaa1111"]
    writer.add(_batch(["c", "d", "e"]))  # 5 lines: the segment rotates
    writer.flush()
    writer.add(_batch(["f", "g"]))
    writer.flush()
    live, previous = log_paths(folder, "1-0")
    assert previous.exists() and oct(live.stat().st_mode & 0o777) == "0o600"
    assert [r.request_id for r in reader.newest(10)] == ["g", "f", "e", "d", "c", "cmpl-x-1-aaaa2222"]
    assert reader.find("cmpl-x-0-aaaa1111") == []  # past the ring of 6
    assert reader.find("x")[0].request_id == "cmpl-x-1-aaaa2222"
    assert [r.request_id for r in reader.newest(10, tenant="nobody")] == []
    with live.open("ab") as fh:  # a torn last line is read once it is complete
        fh.write(b'{"engine": "1-0", "request_id": [')
    assert reader.newest(1)[0].request_id == "g" and reader.bad_lines == 0


def test_request_log_refuses_a_link_and_a_shared_folder(tmp_path: Path) -> None:
    folder = tmp_path / "publish"
    folder.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("keep")
    live, _ = log_paths(folder, "2-0")
    os.symlink(victim, live)
    writer = RequestLogWriter(folder, "2-0")
    writer.add(_batch(["a"]))
    writer.flush()
    assert victim.read_text() == "keep" and writer.dropped == 1
    live.unlink()
    folder.chmod(0o777)
    writer.add(_batch(["b"]))
    writer.flush()
    assert not live.exists() and writer.dropped == 2


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(MODELS)), n0s=st.lists(st.integers(0, 6000), min_size=1, max_size=48),
       k=st.integers(2, 12), peak=st.sampled_from([None, (1e15, 1e13), (1e12, 1e14), (1e14, 1e12), (3e12, 3e10)]),
       busy=st.lists(st.floats(1e-4, 0.2), min_size=12, max_size=12), devices=st.integers(1, 4))
def test_a_decode_run_in_closed_form_equals_row_by_row(name, n0s, k, peak, busy, devices) -> None:
    """k plain decode steps of the same requests (request i at n0_i + t in step t): decode_run's per-request sums
    equal attribute_steps row by row, summed over the steps (1e-9); where it declines (a window that binds, the
    roofline's corner inside a batch) it says so with None, never a different figure."""
    from serving_mfu.cost.attribution import attribute_steps, decode_run
    from serving_mfu.cost.records import DecodeBatch, IterationRecord

    model = MODELS[name]
    pf, bw = peak if peak else (None, None)
    ids = [f"r{i}" for i in range(len(n0s))]
    steps = []
    for t in range(k):
        rec = IterationRecord(step=t, t_sched_s=t, t_end_s=t + busy[t], slices=[],
                              decode=DecodeBatch(req_ids=ids, computed_before=[n + t for n in n0s]))
        steps.append((rec, cost_iteration(rec, model, busy[t], busy[t], pf and pf * devices, bw and bw * devices)))
    run = decode_run(steps, model, devices, pf and pf * devices, bw and bw * devices)
    rows = attribute_steps(steps, model, devices, pf and pf * devices, bw and bw * devices)
    by_step = rows.useful_flops.reshape(k, len(ids)).sum(axis=0), rows.decode_device_s.reshape(k, len(ids)).sum(axis=0)
    binds = any(rule.kind != "full" and max(n0s) + k > rule.size for rule, _, _ in model.batch_groups)
    if run is None:
        assert binds or peak is not None  # declined only for a binding window or a corner inside a batch
        return
    assert (run.steps == k).all() and run.taken == [True]
    assert run.useful_flops == pytest.approx(by_step[0], rel=1e-9)
    assert run.decode_device_s == pytest.approx(by_step[1], rel=1e-9, abs=1e-18)
    assert rows.executed_flops.sum() == pytest.approx(run.useful_flops.sum(), rel=1e-9)
    assert (rows.delivered_tokens == 1).all()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(MODELS)), runs=st.lists(st.tuples(
    st.lists(st.integers(0, 6000), min_size=1, max_size=12), st.integers(1, 6), st.booleans()), min_size=1,
    max_size=5), peak=st.sampled_from([None, (1e15, 1e13), (1e12, 1e14), (3e12, 3e10)]))
def test_decode_runs_of_several_runs_equal_each_alone(name, runs, peak) -> None:
    """Several runs at once (some declined: one step, a skipped position) give each taken run's entries as that
    run alone does, in run order, and decline the same runs."""
    from serving_mfu.cost.attribution import decode_run, decode_runs, plain_decode
    from serving_mfu.cost.records import DecodeBatch, IterationRecord

    model = MODELS[name]
    pf, bw = peak if peak else (None, None)
    given = []
    for r, (n0s, k, skip) in enumerate(runs):
        ids = [f"r{r}-{i}" for i in range(len(n0s))]
        steps = []
        for t in range(k):
            n0 = [n + t + (1 if skip and t == k - 1 and i == 0 else 0) for i, n in enumerate(n0s)]
            rec = IterationRecord(step=t, t_sched_s=t, t_end_s=t + 0.01 * (r + 1), slices=[],
                                  decode=DecodeBatch(req_ids=ids, computed_before=n0))
            steps.append((rec, cost_iteration(rec, model, 0.01 * (r + 1), 0.01 * (r + 1), pf, bw)))
        given.append(steps)
    together = decode_runs([[plain_decode(rec, cost) for rec, cost in steps] for steps in given], model, 1, pf, bw)
    alone = [decode_run(steps, model, 1, pf, bw) for steps in given]
    assert together.taken == [a is not None for a in alone]
    taken = [a for a in alone if a is not None]
    if not taken:
        assert len(together.useful_flops) == 0
        return
    assert together.useful_flops == pytest.approx(np.concatenate([a.useful_flops for a in taken]), rel=1e-12)
    assert together.decode_device_s == pytest.approx(np.concatenate([a.decode_device_s for a in taken]), rel=1e-12)
    assert (together.steps == np.concatenate([a.steps for a in taken])).all()


def test_a_decode_run_declines_what_is_not_one() -> None:
    """Drafts, a request that did not advance one position a step, or a changed batch: no closed form."""
    from serving_mfu.cost.attribution import decode_run
    from serving_mfu.cost.records import DecodeBatch, IterationRecord

    model = MODELS["llama"]

    def steps(n0_by_step, **decode):
        out = []
        for t, n0 in enumerate(n0_by_step):
            rec = IterationRecord(step=t, t_sched_s=t, t_end_s=t + 0.01, slices=[], decode=DecodeBatch(
                req_ids=[f"r{i}" for i in range(len(n0))], computed_before=n0, **decode))
            out.append((rec, cost_iteration(rec, model, 0.01, 0.01, 1e15, 1e13)))
        return out

    assert decode_run(steps([[5, 9], [6, 10], [7, 11]]), model, 1, 1e15, 1e13) is not None
    assert decode_run(steps([[5, 9], [6, 10], [8, 11]]), model, 1, 1e15, 1e13) is None  # r0 skipped a position
    assert decode_run(steps([[5, 9], [6, 10, 3]]), model, 1, 1e15, 1e13) is None  # the batch changed
    assert decode_run(steps([[5, 9]]), model, 1, 1e15, 1e13) is None  # one step
    assert decode_run(steps([[5, 9], [6, 10]], draft_tokens=[1, 1], accepted_tokens=[0, 1]), model, 1, 1e15,
                      1e13) is None
