"""Prometheus exposition (DESIGN §8): the series equal the counters, the recording rules' MFU equals
the report's, a failing reader never breaks /metrics, and rules, dashboard and collector agree."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import subprocess
from dataclasses import fields, replace
from pathlib import Path

import msgspec
import pytest

prometheus_client = pytest.importorskip("prometheus_client")
yaml = pytest.importorskip("yaml")

from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from serving_mfu.cost.counters import COUNTERS, Counters  # noqa: E402
from serving_mfu.cost.records import DrafterRecord, IterationRecord, KVTransferRecord, Slice  # noqa: E402
from serving_mfu.model.spec import ModelSpec  # noqa: E402
from serving_mfu.peaks.table import PeakSpec  # noqa: E402
from serving_mfu.runtime.accounts import RequestAccounts  # noqa: E402
from serving_mfu.runtime.aggregate import aggregate_peak  # noqa: E402
from serving_mfu.runtime.ledger import RequestLedger  # noqa: E402
from serving_mfu.runtime.tenants import TenantTable  # noqa: E402
from serving_mfu.runtime.tracker import MFUTracker  # noqa: E402
from serving_mfu.schema.report import build_report  # noqa: E402
from serving_mfu.schema.requests import TENANT_COUNTERS  # noqa: E402
from serving_mfu.schema.snapshot import EngineSnapshot, decode_snapshot, encode_snapshot  # noqa: E402
from serving_mfu.serve import prometheus as prom  # noqa: E402
from serving_mfu.tools.tiny_models import TINY_CONFIGS  # noqa: E402
from tests.prometheus_util import DASHBOARD, NAME_TOKEN, RULES, dashboard_exprs, dashboard_queries, require  # noqa: E402

H100 = PeakSpec(device="h100-sxm", dtype="fp32", flops_per_s=4e13, bandwidth_bytes_per_s=3.35e12,
                source="NVIDIA H100 Tensor Core GPU datasheet, https://example.invalid/h100 (dense figures)")
A100 = PeakSpec(device="a100-sxm-80gb", dtype="fp32", flops_per_s=1.95e13, bandwidth_bytes_per_s=2.0e12,
                source="override (FLOP/s); bandwidth from NVIDIA A100 Tensor Core GPU datasheet, https://x")


def _spec(name: str) -> ModelSpec:
    return ModelSpec.from_hf_config({**TINY_CONFIGS[name], "_name_or_path": f"org/{name}"})


def _steps(offset: float) -> list[IterationRecord]:
    """Prefill with a prefix-cache hit, a mixed step with speculative decoding, recompute, decode."""
    batches = [
        ([Slice(req_id="a", new_tokens=64, computed_before=0, prompt_len=64),
          Slice(req_id="b", new_tokens=32, computed_before=32, prompt_len=64, cached_tokens=32)], None),
        ([Slice(req_id="a", new_tokens=4, computed_before=64, prompt_len=64, hwm=64, draft_tokens=3,
                accepted_tokens=1),
          Slice(req_id="c", new_tokens=50, computed_before=0, prompt_len=100)],
         DrafterRecord(method="eagle", flops=2e6, bytes=1e5, proposed_tokens=3)),
        ([Slice(req_id="d", new_tokens=35, computed_before=0, prompt_len=30, hwm=35)], None),
        ([Slice(req_id="a", new_tokens=1, computed_before=66, prompt_len=64, hwm=66),
          Slice(req_id="b", new_tokens=1, computed_before=64, prompt_len=64, hwm=64),
          Slice(req_id="c", new_tokens=50, computed_before=50, prompt_len=100, hwm=50)], None),
        ([Slice(req_id="a", new_tokens=1, computed_before=67, prompt_len=64, hwm=67)], None),
    ]
    out, t = [], offset
    for step, (slices, drafter) in enumerate(batches):
        busy = 2e-4 * (1 + step)
        out.append(IterationRecord(step=step, t_sched_s=t, t_end_s=t + busy, slices=slices, drafter=drafter))
        t += busy + 1e-3 * step  # idle gaps: wall > busy
    return out


# What each request declared as its tenant: two labels fit the budget (max_tenants=2), so "d" goes to `other`;
# the second one's label is sanitised (`team_b_x`).
DECLARED = {"a": "acme", "b": 'team "b" {x}', "c": "acme", "d": "late-comer"}
TENANT_LABELS = {"acme", "team_b_x", "other"}


def _accounts(tracker: MFUTracker, engine_id: str) -> RequestAccounts:
    """Per-request and per-tenant accounts beside the tracker, as the hook builds them."""
    return RequestAccounts(RequestLedger(), TenantTable(max_tenants=2), tracker.cost_model, tracker.devices,
                           *tracker.engine_peak, engine_id, 0.0)


def _run(tracker: MFUTracker, accounts: RequestAccounts, rec: IterationRecord) -> None:
    """Admit the step's new requests with their tenants, cost the step, charge each request its share."""
    new = [s for s in rec.slices if s.req_id not in accounts.ledger]
    if new:
        ids = [s.req_id for s in new]
        slots = accounts.ledger.admit(ids, [s.prompt_len for s in new])
        accounts.open(ids, [DECLARED[r] for r in ids], slots)
    cost = tracker.record(rec)
    assert cost is not None
    accounts.charge(rec, cost)


def _snapshot(tracker: MFUTracker, engine_id: str, pid: int,
              accounts: RequestAccounts | None = None) -> EngineSnapshot:
    counters, recent = tracker.snapshot()
    if accounts is not None:
        accounts.settle()  # as the engine does before every publish
    return EngineSnapshot(engine_id=engine_id, pid=pid, ppid=1, started_at=1000.0, updated_at=1010.0 + pid,
                          model=tracker.model_report(), peak=tracker.peak_report(),
                          time_split=tracker.time_split, counters=counters, recent=recent,
                          kv_role=tracker.kv_role, tenants=accounts.tenants.totals() if accounts else [])


class FakeReader:
    def __init__(self, snaps: list[EngineSnapshot]):
        self.snaps = snaps

    def refresh(self) -> list[EngineSnapshot]:
        return self.snaps


class RaisingReader:
    def refresh(self) -> list[EngineSnapshot]:
        raise OSError("snapshot folder vanished")


@pytest.fixture(scope="module")
def engines() -> dict:
    """Two engines of one model on different devices, a prefill engine (KV producer) and a decode engine (KV
    consumer, which received 32 prompt positions after 16 local hits), scraped twice (after 1 and 5 steps);
    their requests are charged to three tenant labels (DECLARED)."""
    spec = _spec("tiny-llama")
    trackers = [MFUTracker(spec, H100, devices=2, clock=None, kv_role="producer"),
                MFUTracker(spec, A100, devices=1, clock=None, kv_role="consumer")]
    ids = ["101-0", "202-1"]
    accounts = [_accounts(tracker, ids[i]) for i, tracker in enumerate(trackers)]
    early, late = [], []
    for i, tracker in enumerate(trackers):
        recs = _steps(offset=10.0 * i)
        for rec in recs[:1]:
            _run(tracker, accounts[i], rec)
        early.append(_snapshot(tracker, ids[i], 101 * (i + 1), accounts[i]))
        for rec in recs[1:]:
            if rec.step == 2:
                kv = (KVTransferRecord(req_ids=["d"], local_cached=[16], received=[32]) if i
                      else KVTransferRecord(sent_tokens=48))
                rec = msgspec.structs.replace(rec, kv=kv)
            _run(tracker, accounts[i], rec)
        tracker.note_anomaly("hook_error", "test")
        late.append(_snapshot(tracker, ids[i], 101 * (i + 1), accounts[i]))
    return {"trackers": trackers, "early": early, "late": late}


def scrape(reader) -> dict[tuple[str, frozenset], float]:
    """Render like /metrics does and parse it back: {(sample name, labels): value}."""
    registry = CollectorRegistry()
    prom.register(reader, registry=registry)
    text = generate_latest(registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def total(samples: dict, name: str, **match: str) -> float:
    """Σ over series of `name` whose labels include `match` (what `sum by (…)` does)."""
    return sum(v for (n, labels), v in samples.items()
               if n == name and all(dict(labels).get(k) == m for k, m in match.items()))


# ---------------------------------------------------------------------------------------- values
def test_series_equal_the_counters(engines: dict) -> None:
    samples = scrape(FakeReader(engines["late"]))
    for snap in engines["late"]:
        c = snap.counters
        base = {"engine": snap.engine_id, "model": "org/tiny-llama", "kv_role": snap.kv_role}
        for phase in prom.PHASES:
            lab = {**base, "phase": phase}
            assert value(samples, "serving_mfu_useful_flops_total", **lab) == getattr(c, f"{phase}_useful_flops")
            assert value(samples, "serving_mfu_executed_flops_total", **lab) == getattr(c, f"{phase}_executed_flops")
            assert value(samples, "serving_mfu_attributed_seconds_total", **lab) == getattr(c, f"{phase}_time_s")
            assert value(samples, "serving_mfu_moved_bytes_total", **lab) == getattr(c, f"{phase}_bytes")
            assert value(samples, "serving_mfu_tokens_total", **lab) == getattr(c, f"{phase}_tokens")
            assert value(samples, "serving_mfu_capacity_flops_total", **lab) == getattr(c, f"{phase}_capacity_flops")
            assert value(samples, "serving_mfu_capacity_bytes_total", **lab) == getattr(c, f"{phase}_capacity_bytes")
        assert value(samples, "serving_mfu_busy_seconds_total", **base) == c.busy_s
        assert value(samples, "serving_mfu_wall_seconds_total", **base) == c.wall_s
        assert value(samples, "serving_mfu_mixed_busy_seconds_total", **base) == c.mixed_busy_s > 0
        assert value(samples, "serving_mfu_busy_capacity_flops_total", **base) == c.busy_capacity_flops
        assert value(samples, "serving_mfu_wall_capacity_flops_total", **base) == c.wall_capacity_flops
        assert value(samples, "serving_mfu_busy_capacity_bytes_total", **base) == c.busy_capacity_bytes
        assert value(samples, "serving_mfu_iterations_total", **base) == c.iterations == 5
        assert value(samples, "serving_mfu_spec_draft_tokens_total", **base) == c.draft_tokens == 3
        assert value(samples, "serving_mfu_spec_accepted_tokens_total", **base) == c.accepted_tokens == 1
        assert value(samples, "serving_mfu_spec_rejected_flops_total", **base) == c.rejected_flops > 0
        assert value(samples, "serving_mfu_spec_drafter_flops_total", **base) == c.drafter_flops == 2e6
        consumer = snap.kv_role == "consumer"
        assert value(samples, "serving_mfu_prefix_cache_hit_tokens_total", **base) == c.hit_tokens == 32 + 16 * consumer
        assert value(samples, "serving_mfu_kv_received_tokens_total", **base) == c.kv_received_tokens == 32 * consumer
        assert value(samples, "serving_mfu_kv_sent_tokens_total", **base) == c.kv_sent_tokens == 48 * (not consumer)
        cfg = TINY_CONFIGS["tiny-llama"]  # K and V of every layer per position, at the model's dtype
        kv_bytes = cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * (
            cfg["hidden_size"] // cfg["num_attention_heads"]) * {"float32": 4, "bfloat16": 2}[cfg["torch_dtype"]]
        assert value(samples, "serving_mfu_kv_received_bytes_total", **base) == c.kv_received_bytes == \
            32 * consumer * kv_bytes
        assert value(samples, "serving_mfu_kv_sent_bytes_total", **base) == c.kv_sent_bytes == \
            48 * (not consumer) * kv_bytes
        assert value(samples, "serving_mfu_prefix_cache_saved_flops_total", **base) == c.saved_flops > 0
        assert value(samples, "serving_mfu_recompute_tokens_total", **base) == c.recompute_tokens > 0
        assert value(samples, "serving_mfu_recompute_flops_total", **base) == c.recompute_flops > 0
        assert value(samples, "serving_mfu_hfu_over_1_iterations_total", **base) == c.hfu_over_1_iterations
        assert value(samples, "serving_mfu_anomalies_total", **base, kind="hook_error") == 1
        assert value(samples, "serving_mfu_anomalies_total", **base, kind="accounting_error") == 0  # seeded
        # every table entry, phase or not, is the field it names
        for row in COUNTERS:
            if row.prom and not row.phased:
                assert value(samples, row.prom + "_total", **base) == getattr(c, row.name)
        peak = snap.peak
        plab = {**base, "device": peak.device, "dtype": "fp32", "source": prom.source_label(peak.source)}
        assert value(samples, "serving_mfu_peak_flops_per_second", **plab) == peak.flops_per_s
        assert value(samples, "serving_mfu_peak_bandwidth_bytes_per_second", **plab) == peak.bandwidth_bytes_per_s
        assert value(samples, "serving_mfu_devices", **plab) == peak.devices
        assert value(samples, "serving_mfu_engine_info", **base, model_type="llama", approximate="false",
                     time_split="shapley") == 1
        assert value(samples, "serving_mfu_snapshot_timestamp_seconds", **base) == snap.updated_at
    assert value(samples, "serving_mfu_engines") == 2
    assert value(samples, "serving_mfu_collector_errors_total") == 0


def test_tenant_series_equal_the_snapshots_tenant_totals(engines: dict) -> None:
    """One counter sample per (engine, tenant label) for each TENANT_COUNTERS entry, equal to the snapshot's
    TenantTotals; over an engine's tenants, its busy device-seconds and its useful and executed FLOPs."""
    registry = CollectorRegistry()
    prom.register(FakeReader(engines["late"]), registry=registry)
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    want: dict[tuple[str, frozenset], float] = {}
    for snap in engines["late"]:
        assert {t.tenant for t in snap.tenants} == TENANT_LABELS  # bounded (`other`) and sanitised
        for t in snap.tenants:
            labels = frozenset({"engine": snap.engine_id, "model": "org/tiny-llama", "kv_role": snap.kv_role,
                                "tenant": t.tenant}.items())
            for name in TENANT_COUNTERS:
                want[(f"serving_mfu_tenant_{name}_total", labels)] = float(getattr(t, name))
    got: dict[tuple[str, frozenset], float] = {}
    for name in TENANT_COUNTERS:
        family = families[f"serving_mfu_tenant_{name}"]
        assert family.type == "counter"
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in got, key  # one sample per engine and tenant
            got[key] = s.value
    assert got == want and len(got) == 2 * len(TENANT_LABELS) * len(TENANT_COUNTERS)
    samples = scrape(FakeReader(engines["late"]))
    for snap in engines["late"]:
        e, c = snap.engine_id, snap.counters
        assert total(samples, "serving_mfu_tenant_device_seconds_total", engine=e) == pytest.approx(
            c.busy_s * snap.peak.devices, rel=1e-9)
        for kind in ("useful", "executed"):
            assert total(samples, f"serving_mfu_tenant_{kind}_flops_total", engine=e) == pytest.approx(
                total(samples, f"serving_mfu_{kind}_flops_total", engine=e), rel=1e-9)
        assert total(samples, "serving_mfu_tenant_output_tokens_total", engine=e) > 0


def test_every_counter_field_is_exposed() -> None:
    assert prom.counter_fields() == {f.name for f in fields(Counters)}


def test_source_label_is_short_and_keeps_the_provenance() -> None:
    assert prom.source_label(H100.source) == "NVIDIA H100 Tensor Core GPU datasheet"
    assert prom.source_label(A100.source) == "override (FLOP/s)"
    assert prom.source_label("override") == "override"
    assert prom.source_label(None) == "unknown"
    calibrated = ("measured by serving-mfu calibrate on NVIDIA H100 80GB HBM3 at 2025-01-02T03:04:05: best of "
                  "5 timed runs")
    label = prom.source_label(calibrated)
    assert label.startswith("measured by serving-mfu calibrate") and len(label) <= prom.SOURCE_MAX_CHARS


# ---------------------------------------------------------------------------------------- MFU as PromQL
def test_rule_style_mfu_equals_the_report(engines: dict) -> None:
    """Σ rate(numerator) / Σ rate(capacity) over two engines with different peaks = report over Σ counters."""
    before, after = scrape(FakeReader(engines["early"])), scrape(FakeReader(engines["late"]))

    def rate(name: str, **match: str) -> float:  # increase over the window; the window length cancels
        return total(after, name, **match) - total(before, name, **match)

    diff = sum((s.counters for s in engines["late"]), Counters()) - sum(
        (s.counters for s in engines["early"]), Counters())
    report = build_report(diff, aggregate_peak(engines["late"]), engines["late"][0].model, "shapley")
    for phase in prom.PHASES:
        want = getattr(report, phase)
        cap = rate("serving_mfu_capacity_flops_total", phase=phase)
        assert rate("serving_mfu_useful_flops_total", phase=phase) / cap == pytest.approx(want.mfu, rel=1e-12)
        assert rate("serving_mfu_executed_flops_total", phase=phase) / cap == pytest.approx(want.hfu, rel=1e-12)
        mbu = rate("serving_mfu_moved_bytes_total", phase=phase) / rate("serving_mfu_capacity_bytes_total", phase=phase)
        assert mbu == pytest.approx(want.mbu, rel=1e-12)
    useful = rate("serving_mfu_useful_flops_total")
    assert useful / rate("serving_mfu_busy_capacity_flops_total") == pytest.approx(report.overall.mfu, rel=1e-12)
    assert (rate("serving_mfu_executed_flops_total") / rate("serving_mfu_busy_capacity_flops_total")
            == pytest.approx(report.overall.hfu, rel=1e-12))
    assert (rate("serving_mfu_moved_bytes_total") / rate("serving_mfu_busy_capacity_bytes_total")
            == pytest.approx(report.overall.mbu, rel=1e-12))
    assert useful / rate("serving_mfu_wall_capacity_flops_total") == pytest.approx(report.overall.wall_mfu, rel=1e-12)
    assert (rate("serving_mfu_mixed_busy_seconds_total") / rate("serving_mfu_busy_seconds_total")
            == pytest.approx(report.overall.mixed_time_fraction, rel=1e-12))
    # the engines really differ, so a mean of per-engine ratios would be wrong
    per_engine = [rate("serving_mfu_useful_flops_total", engine=e)
                  / rate("serving_mfu_busy_capacity_flops_total", engine=e) for e in ("101-0", "202-1")]
    assert abs(sum(per_engine) / 2 - report.overall.mfu) > 1e-3 * report.overall.mfu
    # wall MFU's clock denominator: Σ peak × devices = the aggregated peak of the report
    peaks = {dict(k[1])["engine"]: v for k, v in after.items() if k[0] == "serving_mfu_peak_flops_per_second"}
    devices = {dict(k[1])["engine"]: v for k, v in after.items() if k[0] == "serving_mfu_devices"}
    assert sum(peaks[e] * devices[e] for e in peaks) == pytest.approx(report.peak.flops_per_s * report.peak.devices)
    spec = rate("serving_mfu_spec_accepted_tokens_total") / rate("serving_mfu_spec_draft_tokens_total")
    assert spec == pytest.approx(report.spec_decode.acceptance_rate)


def test_moe_summaries_match_the_report() -> None:
    spec = _spec("tiny-qwen2-moe")
    tracker = MFUTracker(spec, H100, devices=1, clock=None)
    shape = tracker.cost_model.byte_model.moe_shape  # (experts, top_k) per MoE layer
    assert shape
    for i, rec in enumerate(_steps(0.0)):  # measured routing on odd steps, expected on even ones
        routing = [[(j * 7 + layer) % 5 for j in range(e)] for layer, (e, _) in enumerate(shape)] if i % 2 else None
        tracker.record(msgspec.structs.replace(rec, moe_routing=routing))
    snap = _snapshot(tracker, "303-0", 303)
    samples = scrape(FakeReader([snap]))
    report = tracker.report()
    base = {"engine": "303-0", "model": "org/tiny-qwen2-moe", "kv_role": "none"}
    count = value(samples, "serving_mfu_moe_active_experts_count", **base)
    assert count == tracker.counters.moe_iterations > 0
    assert value(samples, "serving_mfu_moe_active_experts_sum", **base) / count == pytest.approx(
        report.moe.mean_active_experts)
    measured = value(samples, "serving_mfu_moe_imbalance_ratio_count", **base)
    assert measured == tracker.counters.moe_measured_iterations
    assert 0 < measured < count and report.moe.source == "mixed"
    assert value(samples, "serving_mfu_moe_imbalance_ratio_sum", **base) / measured == pytest.approx(
        report.moe.imbalance)


# ---------------------------------------------------------------------------------------- robustness
def test_a_failing_reader_never_breaks_the_endpoint(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    collector = prom.register(RaisingReader(), registry=registry)
    with caplog.at_level(logging.WARNING, logger="serving_mfu.serve.prometheus"):
        for _ in range(3):
            text = generate_latest(registry).decode()
    assert "serving_mfu_collector_errors_total 3.0" in text
    assert collector.errors == 3
    assert not re.search(r"^serving_mfu_engines ", text, re.M)  # unknown, not zero
    assert len([r for r in caplog.records if "collector" in r.getMessage()]) == 1  # logged once


def test_a_bad_snapshot_is_skipped_and_the_others_exposed(engines: dict) -> None:
    good = engines["late"][0]
    bad = msgspec.structs.replace(good, engine_id="999-9", counters=replace(good.counters, busy_s=None))
    samples = scrape(FakeReader([bad, good, good]))  # the duplicate is read once
    assert value(samples, "serving_mfu_engines") == 1
    assert value(samples, "serving_mfu_collector_errors_total") == 1
    engines_seen = {dict(k[1]).get("engine") for k in samples if k[0] == "serving_mfu_busy_seconds_total"}
    assert engines_seen == {good.engine_id}
    # a counter a newer engine has and this reader lacks is ignored, a missing one is 0; a file of another
    # format version is refused when read, naming both versions
    data = json.loads(encode_snapshot(good))
    data["counters"] = {"busy_s": 1.5, "field_from_the_future": 7}
    odd = decode_snapshot(json.dumps(data))
    assert odd.counters.busy_s == 1.5 and odd.counters.iterations == 0
    samples = scrape(FakeReader([odd]))
    assert value(samples, "serving_mfu_busy_seconds_total", engine=good.engine_id, model="org/tiny-llama",
                 kv_role=good.kv_role) == 1.5
    data["format"] = "serving-mfu-snapshot/1"
    with pytest.raises(ValueError, match="snapshot format 'serving-mfu-snapshot/1'"):
        decode_snapshot(json.dumps(data))


def test_no_peak_exposes_no_peak_gauge(engines: dict) -> None:
    snap = engines["late"][0]
    nopeak = msgspec.structs.replace(snap, peak=snap.peak.model_copy(update={"flops_per_s": None,
                                                                             "bandwidth_bytes_per_s": None}))
    samples = scrape(FakeReader([nopeak]))
    assert not [k for k in samples if k[0] == "serving_mfu_peak_flops_per_second"]
    assert [k for k in samples if k[0] == "serving_mfu_devices"]


def test_register_is_idempotent(engines: dict) -> None:
    registry = CollectorRegistry()
    first = prom.register(FakeReader(engines["late"]), registry=registry)
    assert prom.register(FakeReader([]), registry=registry) is first
    other = CollectorRegistry()
    assert prom.register(FakeReader([]), registry=other) is not first
    text = generate_latest(registry).decode()
    assert text.count("# TYPE serving_mfu_useful_flops_total counter") == 1


# ---------------------------------------------------------------------------------------- rules & dashboard
def _rules() -> list[dict]:
    data = yaml.safe_load(RULES.read_text())
    assert isinstance(data, dict) and list(data) == ["groups"]
    rules = []
    for group in data["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"record", "expr", "labels"}, rule
            assert isinstance(rule.get("record"), str) and isinstance(rule.get("expr"), str), rule
            rules.append(rule)
    return rules


def _exposed_names() -> set[str]:
    suffixes = {"counter": ["_total"], "summary": ["_sum", "_count"], "info": ["_info"], "gauge": [""]}
    return {fam.name + s for fam in prom.MFUCollector(FakeReader([])).describe() for s in suffixes[fam.type]}


def test_rules_file_is_valid() -> None:
    rules = _rules()
    names = [r["record"] for r in rules]
    assert len(names) == len(set(names))
    for name in names:
        assert re.fullmatch(r"serving_mfu(_[a-z]+)?:[a-z0-9_]+:[a-z0-9_]+", name), name


def test_rules_and_dashboard_use_only_existing_series(engines: dict) -> None:
    rules = _rules()
    records = {r["record"] for r in rules}
    exposed = _exposed_names()
    rendered = {k[0] for k in scrape(FakeReader(engines["late"]))}
    assert exposed - rendered <= {"serving_mfu_moe_active_experts_sum", "serving_mfu_moe_active_experts_count",
                                  "serving_mfu_moe_imbalance_ratio_sum", "serving_mfu_moe_imbalance_ratio_count"}
    for source, exprs in (("rules", [r["expr"] for r in rules]), ("dashboard", dashboard_exprs())):
        used = {t for e in exprs for t in NAME_TOKEN.findall(e)}
        assert used, source
        unknown = used - exposed - records
        assert not unknown, f"{source} uses series nobody produces: {sorted(unknown)}"
    dashboard_used = {t for e in dashboard_exprs() for t in NAME_TOKEN.findall(e)}
    undocumented = {r for r in records if r not in dashboard_used and r not in (prom.__doc__ or "")}
    assert not undocumented, f"recording rules neither on the dashboard nor documented: {sorted(undocumented)}"


def test_ratio_rules_match_numerator_and_denominator_labels() -> None:
    """A ratio whose sides aggregate by different labels silently returns nothing."""
    for rule in _rules():
        sides = re.split(r"\n\s*/\s", rule["expr"])
        if len(sides) == 2:
            by = [sorted(set(re.findall(r"(?:sum|count) (?:by \(([^)]*)\) )?\(", s))) for s in sides]
            assert by[0] and by[0] == by[1], rule["record"]


def test_dashboard_shape() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] >= 36 and dash["uid"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "label_values(" in variables["model"]["definition"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}"
        for t in panel["targets"]:
            assert t["datasource"]["uid"] == "${datasource}" and t["expr"]
            if re.search(r"serving_mfu(_(?!fleet)[a-z]+)?:", t["expr"]):  # a per-model recorded series
                assert '$model' in t["expr"], t["expr"]
    boxes = [(p["id"], p["gridPos"]) for p in dash["panels"]]
    for i, (pid, a) in enumerate(boxes):
        assert 0 <= a["x"] and a["x"] + a["w"] <= 24, pid
        for other, b in boxes[:i]:
            overlap = (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
                       and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"])
            assert not overlap, f"panels {other} and {pid} overlap"


# ---------------------------------------------------------------------------------------- promtool
def _promtool_test(promtool: str, tmp_path: Path, series: list[dict], tests: list[dict]) -> None:
    """`promtool test rules` of the rule file on input series sampled every 15 s."""
    shutil.copy(RULES, tmp_path / "rules.yml")
    (tmp_path / "test.yml").write_text(yaml.safe_dump({
        "rule_files": ["rules.yml"], "evaluation_interval": "15s",
        "tests": [{"interval": "15s", "input_series": series, "promql_expr_test": tests}]}))
    result = subprocess.run([promtool, "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _close_to(expr: str, want: float, labels: str, at: str) -> dict:
    """A promtool test: `expr` (one sample, with `labels`) is within 1e-9 of `want` at time `at`."""
    return {"expr": f"abs({expr} / {want!r} - 1) < bool 1e-9", "eval_time": at,
            "exp_samples": [{"labels": labels, "value": 1}]}


def test_promtool_checks_the_rule_file() -> None:
    check = subprocess.run([require("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in check.stdout, check.stdout


def test_promtool_evaluates_the_rules_to_the_reports_mfu(engines: dict, tmp_path: Path) -> None:
    """Feed the two engines' counters to Prometheus as linear series; the recorded MFU equals the report's."""
    promtool = require("promtool")
    before, after = scrape(FakeReader(engines["early"])), scrape(FakeReader(engines["late"]))
    steps = 20  # one sample every 15 s for 5 minutes, growing linearly from `before` to `after`
    series = []
    for (name, labels), v1 in after.items():
        if not name.startswith("serving_mfu_") or name == "serving_mfu_collector_errors_total":
            continue
        v0 = before.get((name, labels), 0.0)
        lab = ",".join(f'{k}="{v}"' for k, v in sorted({**dict(labels), "instance": "node-" + dict(labels)
                                                         .get("engine", "x")[:3], "job": "vllm"}.items()))
        if name.endswith("_total") or name.endswith("_sum") or name.endswith("_count"):
            values = f"{v0!r}+{(v1 - v0) / steps!r}x{steps}"
        else:
            values = f"{v1!r}x{steps}"
        series.append({"series": f"{name}{{{lab}}}", "values": values})
    diff = sum((s.counters for s in engines["late"]), Counters()) - sum(
        (s.counters for s in engines["early"]), Counters())
    report = build_report(diff, aggregate_peak(engines["late"]), engines["late"][0].model, "shapley")
    model = 'model="org/tiny-llama"'
    checks = {f'serving_mfu:mfu:ratio_rate1m{{{model},phase="{p}"}}': getattr(report, p).mfu for p in prom.PHASES}
    checks |= {f'serving_mfu:hfu:ratio_rate1m{{{model},phase="{p}"}}': getattr(report, p).hfu for p in prom.PHASES}
    checks |= {f'serving_mfu:mbu:ratio_rate1m{{{model},phase="{p}"}}': getattr(report, p).mbu for p in prom.PHASES}
    checks |= {f"serving_mfu:busy_mfu:ratio_rate1m{{{model}}}": report.overall.mfu,
               f"serving_mfu:busy_hfu:ratio_rate1m{{{model}}}": report.overall.hfu,
               f"serving_mfu:busy_mbu:ratio_rate1m{{{model}}}": report.overall.mbu,
               f"serving_mfu:mixed_busy:ratio_rate1m{{{model}}}": report.overall.mixed_time_fraction,
               f"serving_mfu:spec_acceptance:ratio_rate1m{{{model}}}": report.spec_decode.acceptance_rate,
               'serving_mfu_fleet:mfu:ratio_rate1m{phase="decode"}': report.decode.mfu,
               "serving_mfu_fleet:busy_mfu:ratio_rate1m": report.overall.mfu,
               # over the clock: useful FLOP/s over Σ peak × devices of the live engines
               f"serving_mfu:wall_mfu:ratio_rate1m{{{model}}}":
                   report.overall.useful_flops / 300 / (report.peak.flops_per_s * report.peak.devices),
               f"serving_mfu:busy:ratio_rate1m{{{model}}}": report.overall.busy_s / 300 / 2}
    for snap, early in zip(engines["late"], engines["early"]):  # one engine per instance here
        d = snap.counters - early.counters
        useful = d.prefill_useful_flops + d.decode_useful_flops
        checks[f'serving_mfu_instance:busy_mfu:ratio_rate1m{{instance="node-{snap.engine_id[:3]}",{model}}}'] = (
            useful / d.busy_capacity_flops)
    for snap, early in zip(engines["late"], engines["early"]):  # one engine per KV role: each role's own MFU
        d = snap.counters - early.counters
        for p in prom.PHASES:
            checks[f'serving_mfu_role:mfu:ratio_rate1m{{kv_role="{snap.kv_role}",{model},phase="{p}"}}'] = (
                getattr(d, f"{p}_useful_flops") / getattr(d, f"{p}_capacity_flops"))
    # executed − useful = the wasted kinds together
    waste = report.prefill.executed_flops + report.decode.executed_flops - report.overall.useful_flops
    tests = [_close_to(expr, want, "{" + re.search(r"\{(.*)\}", expr).group(1) + "}" if "{" in expr else "{}", "4m")
             for expr, want in checks.items()]
    tests.append({"expr": f"abs(sum(serving_mfu:wasted_flops_per_second:rate1m) * 300 / {waste!r} - 1)"
                          " < bool 1e-9", "eval_time": "4m", "exp_samples": [{"labels": "{}", "value": 1}]})

    # per tenant over the whole 5 minutes, from the snapshots' TenantTotals: device-seconds per second, and per
    # 1M output tokens (none for a tenant without output in the window)
    def grew(label: str, name: str) -> float:
        return sum(getattr(t, name) for s in engines["late"] for t in s.tenants if t.tenant == label) - sum(
            getattr(t, name) for s in engines["early"] for t in s.tenants if t.tenant == label)

    for label in sorted(TENANT_LABELS):
        labels = f'{{{model},tenant="{label}"}}'
        dev, out = grew(label, "device_seconds"), grew(label, "output_tokens")
        assert dev > 0
        tests.append(_close_to(f"serving_mfu_tenant:device_seconds:rate5m{labels}", dev / 300, labels, "5m"))
        ratio = f"serving_mfu_tenant:device_seconds_per_1m_output_tokens:ratio_rate5m{labels}"
        tests.append(_close_to(ratio, 1e6 * dev / out, labels, "5m") if out else
                     {"expr": ratio, "eval_time": "5m", "exp_samples": []})
    assert not grew("other", "output_tokens")  # the empty case is exercised too
    # the dashboard's queries parse (as rules), with Grafana's variables filled in
    dash_rules = [{"record": f"dashboard_query_{i}", "expr": e} for i, e in enumerate(dashboard_queries())]
    (tmp_path / "dash.yml").write_text(yaml.safe_dump({"groups": [{"name": "dash", "rules": dash_rules}]}))
    check = subprocess.run([promtool, "check", "rules", str(tmp_path / "dash.yml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    _promtool_test(promtool, tmp_path, series, tests)
    assert math.isfinite(report.overall.mfu)


def test_promtool_evaluates_the_tenant_cost_rule(tmp_path: Path) -> None:
    """Device-seconds per 1M output tokens per tenant on counters of known rates: a tenant's engines are
    summed before dividing, models stay apart, and a tenant without output gets no sample (not +Inf)."""
    promtool = require("promtool")
    rates = {  # (engine, model, tenant): (device-seconds per second, output tokens per second)
        ("1-0", "m1", "acme"): (0.5, 100.0), ("2-0", "m1", "acme"): (0.25, 50.0),
        ("1-0", "m1", "team-b"): (0.1, 40.0), ("2-0", "m1", "batch"): (0.05, 0.0),
        ("3-0", "m2", "acme"): (1.0, 10.0)}
    series = []
    for (engine, model, tenant), (dev, out) in rates.items():
        lab = (f'{{engine="{engine}",instance="node-{engine[0]}",job="vllm",kv_role="none",model="{model}",'
               f'tenant="{tenant}"}}')
        series += [{"series": f"serving_mfu_tenant_device_seconds_total{lab}", "values": f"12.5+{dev * 15!r}x40"},
                   {"series": f"serving_mfu_tenant_output_tokens_total{lab}", "values": f"300+{out * 15!r}x40"}]
    ratio = "serving_mfu_tenant:device_seconds_per_1m_output_tokens:ratio_rate5m"
    tests = [  # worked by hand: 1e6 × Σ device-seconds/s ÷ Σ output tokens/s of the tenant's engines
        _close_to(f'{ratio}{{model="m1",tenant="acme"}}', 5000.0, '{model="m1",tenant="acme"}', "10m"),  # .75/150
        _close_to(f'{ratio}{{model="m1",tenant="team-b"}}', 2500.0, '{model="m1",tenant="team-b"}', "10m"),  # .1/40
        _close_to(f'{ratio}{{model="m2",tenant="acme"}}', 100000.0, '{model="m2",tenant="acme"}', "10m"),  # 1/10
        {"expr": f'{ratio}{{tenant="batch"}}', "eval_time": "10m", "exp_samples": []},
        {"expr": f"count({ratio})", "eval_time": "10m", "exp_samples": [{"labels": "{}", "value": 3}]},
        _close_to('serving_mfu_tenant:device_seconds:rate5m{model="m1",tenant="acme"}', 0.75,
                  '{model="m1",tenant="acme"}', "10m"),
        _close_to('serving_mfu_tenant:device_seconds:rate5m{model="m1",tenant="batch"}', 0.05,
                  '{model="m1",tenant="batch"}', "10m"),
        _close_to('serving_mfu_tenant:output_tokens_per_second:rate5m{model="m1",tenant="acme"}', 150.0,
                  '{model="m1",tenant="acme"}', "10m"),
    ]
    _promtool_test(promtool, tmp_path, series, tests)
