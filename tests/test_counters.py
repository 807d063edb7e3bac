"""The counter table is the one place a counter is declared: a row added there (and nowhere else)
reaches the per-step cost, the cumulative sums, the report, the Prometheus output and the docs table."""

from __future__ import annotations

import dataclasses

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from serving_mfu.cost.accounting import CostModel, cost_iteration
from serving_mfu.cost.counters import COUNTERS, Counter, Counters, docs_table, make_types
from serving_mfu.cost.records import IterationRecord, Slice
from serving_mfu.model.spec import ModelSpec
from serving_mfu.schema.report import ModelReport, PeakReport, build_report, make_report_types
from serving_mfu.schema.snapshot import EngineSnapshot
from serving_mfu.serve.prometheus import MFUCollector
from tests.test_accounting import LLAMA

PEAK = PeakReport(device="t", flops_per_s=1e12, bandwidth_bytes_per_s=1e11, dtype="bf16", source="test", devices=1)
MODEL = ModelReport(name="m", model_type="llama", approximate=False)


class _Reader:
    def __init__(self, snaps: list) -> None:
        self.snaps = snaps

    def refresh(self) -> list:
        return self.snaps


def _records() -> list[IterationRecord]:
    """A prefill step of two prompts, then two decode steps of both."""
    return [IterationRecord(step=0, t_sched_s=0.0, t_end_s=0.01, slices=[
                Slice(req_id="a", new_tokens=40, computed_before=0, prompt_len=40),
                Slice(req_id="b", new_tokens=24, computed_before=0, prompt_len=24)]),
            IterationRecord(step=1, t_sched_s=0.01, t_end_s=0.012, slices=[
                Slice(req_id="a", new_tokens=1, computed_before=40, prompt_len=40, hwm=40),
                Slice(req_id="b", new_tokens=1, computed_before=24, prompt_len=24, hwm=24)]),
            IterationRecord(step=2, t_sched_s=0.012, t_end_s=0.014, slices=[
                Slice(req_id="a", new_tokens=1, computed_before=41, prompt_len=40, hwm=41),
                Slice(req_id="b", new_tokens=1, computed_before=25, prompt_len=24, hwm=25)])]


def test_a_counter_added_in_one_place_reaches_report_prometheus_and_docs() -> None:
    # one row: twice the decode tokens (a step expression over what every step's cost already carries)
    row = Counter("widget_tokens", "tokens", "Twice the decode tokens (a test's counter)",
                  step="2 * c.decode.tokens", report="widgets.doubled_tokens", prom="serving_mfu_widget_tokens")
    types = make_types(COUNTERS + (row,))
    model = CostModel(ModelSpec.from_hf_config(LLAMA))
    c = types.Counters()
    for rec in _records():
        c.add_cost(cost_iteration(rec, model, 0.002, 0.002, 1e12, 1e11), 1e12, 1e11)
    assert c.decode_tokens == 4 and c.widget_tokens == 8

    report = build_report(c, PEAK, MODEL, "shapley", types=make_report_types(types))
    assert report.widgets.doubled_tokens == 8
    assert report.model_dump()["widgets"] == {"doubled_tokens": 8}
    assert report.decode.tokens == 4  # and the rest of the report is as before

    snap = EngineSnapshot(engine_id="e1", pid=1, ppid=0, started_at=0.0, updated_at=1.0, model=MODEL, peak=PEAK,
                          time_split="shapley", counters=c)
    registry = CollectorRegistry()
    registry.register(MFUCollector(_Reader([snap]), types=types))
    samples = {s.name: s.value for fam in text_string_to_metric_families(generate_latest(registry).decode())
               for s in fam.samples if s.labels.get("engine") == "e1"}
    assert samples["serving_mfu_widget_tokens_total"] == 8

    table = docs_table(types.rows)
    line = next(x for x in table.splitlines() if "`widget_tokens`" in x)
    assert "serving_mfu_widget_tokens_total" in line and "widgets.doubled_tokens" in line and "tokens" in line


def test_a_counter_a_step_carries_becomes_a_field_of_the_cost() -> None:
    row = Counter("widget_flops", "flops", "FLOPs of widgets (a test's counter)", report="widgets.flops")
    types = make_types(COUNTERS + (row,))
    cost = types.IterationCost(step=0, engine="0", t_end_s=1.0, busy_s=0.5, wall_s=0.5, widget_flops=3.0)
    c = types.Counters()
    c.add_cost(cost)
    c.add_cost(cost)
    assert c.widget_flops == 6.0 and c.iterations == 2 and (c - c).widget_flops == 0
    assert "widget_flops" not in {f.name for f in dataclasses.fields(Counters)}  # the engine's table is untouched


@pytest.mark.parametrize("bad,message", [
    (Counter("busy_s", "seconds", "again"), "already declared"),
    (Counter("x", "flops", "x", prom="serving_mfu_busy_seconds"), "already declared"),
    (Counter("x", "flops", "x", step="c.{phase}.time_s"), "not phased"),
    (Counter("x", "flops", "x", report="no_section"), "section.field"),
])
def test_a_table_that_cannot_work_is_refused(bad: Counter, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_types(COUNTERS + (bad,))
