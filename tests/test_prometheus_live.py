"""A live Prometheus (DESIGN §8) scraping two real vLLM CPU servers with the plugin: the recording
rules' prefill and decode MFU equal `/metrics/mfu`'s over the same window, the fleet figure is the
capacity-weighted sum of the models' (never a mean of ratios), and every Grafana query parses and
names series that exist."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serving_mfu.schema.snapshot import Totals
from serving_mfu.tools.engine_models import CORPUS
from tests.prometheus_util import NAME_TOKEN, PrometheusServer, dashboard_queries

pytestmark = pytest.mark.engine
# series only an MoE model, a GPU or a KV connector / LoRA engine produces (neither server here has them)
CONDITIONAL = re.compile(r"serving_mfu_(moe_|gpu_|kv_|lora_)|serving_mfu_role:kv_")


def _counters(base: str) -> Totals:
    """The server's cumulative counters, covering every step finished before now."""
    r = httpx.get(base + "/metrics/mfu/counters", params={"min_as_of": f"{time.time():.6f}", "timeout": "15"},
                  timeout=30)
    assert r.status_code == 200, r.text
    return Totals.model_validate(r.json())


def _load(server: dict, n: int = 6) -> None:
    def one(i: int) -> None:
        r = httpx.post(server["base"] + "/v1/completions", timeout=120, json={
            "model": server["model"], "prompt": CORPUS[i * 70: i * 70 + 300], "max_tokens": 24,
            "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(n)))


def _by_model(vector: list[dict]) -> dict[tuple[str, str | None], float]:
    return {(v["metric"].get("model"), v["metric"].get("phase")): float(v["value"][1]) for v in vector}


@pytest.fixture(scope="module")
def live(plugin_server, bpe512_server, tmp_path_factory):
    """Prometheus scrapes both servers; flat counters (A), load on both at once, flat again (B)."""
    servers = [plugin_server, bpe512_server]
    targets = [s["base"].removeprefix("http://") for s in servers]
    # The same load once before A: rate() extrapolates a counter's increase to the window's start, but no
    # further back than where the counter would reach zero (Prometheus' extrapolatedRate: durationToZero
    # = sampled span × first value / increase).  A counter that was near zero at A (a server that had
    # decoded little before) would be extrapolated less than its partner and the ratio of two rates would
    # no longer be the ratio of the two increases; with each counter at A at least about its increase,
    # the zero point lies farther back than the window's start for every series.
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(_load, servers))
    # A first, then Prometheus: the engines may still be publishing the end of earlier tests' work (the
    # time split of a step can land in a later snapshot than its FLOPs), so every sample in the window
    # must come after the counters settled; checked by reading them again once Prometheus has them.
    before = [_counters(s["base"]) for s in servers]
    time.sleep(2.0)
    with PrometheusServer(targets, tmp_path_factory.mktemp("prometheus")) as prom:
        # two scrapes of each server with the serving-mfu series before anything happens
        prom.wait_for('count(count_over_time(serving_mfu_useful_flops_total{phase="decode"}[10s]) >= 2) == 2')
        settled = [_counters(s["base"]) for s in servers]
        flops = [{k: v for k, v in a.counters.to_dict().items() if k.endswith("_flops")} for a in before]
        assert [{k: getattr(a.counters, k) for k in f} for a, f in zip(settled, flops)] == flops, \
            "counters moved while idle"
        time.sleep(2.5)  # scrapes that see the flat counters A
        t_load = time.time()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(_load, servers))
        after = [_counters(s["base"]) for s in servers]
        time.sleep(3.5)  # scrapes of B, then a rule evaluation over both
        at = time.time()
        assert at - t_load < 50, "load took too long for a 1m window to hold it with flat ends"
        labels = {}
        for s, target in zip(servers, targets):
            got = prom.query(f'serving_mfu_useful_flops_total{{instance="{target}",phase="decode"}}', at)
            assert len(got) == 1, got
            labels[s["base"]] = got[0]["metric"]["model"]
        yield {"prom": prom, "servers": servers, "targets": targets, "before": before, "after": after, "at": at,
               "models": [labels[s["base"]] for s in servers]}


def test_window_holds_the_load_with_flat_ends(live) -> None:
    """Prometheus' 1m window at the check time starts on A and ends on B (else the comparison means nothing)."""
    prom = live["prom"]
    for target, a, b in zip(live["targets"], live["before"], live["after"]):
        for phase in ("prefill", "decode"):
            for kind in ("useful", "capacity"):
                series = prom.query(f'serving_mfu_{kind}_flops_total{{instance="{target}",phase="{phase}"}}[1m]',
                                    live["at"])
                values = [float(v) for _, v in series[0]["values"]]
                # a counter that ever went down would read to rate() as a reset and inflate its increase
                assert all(x <= y for x, y in zip(values, values[1:])), (target, phase, kind, "not monotonic", values)
                want_a = getattr(a.counters, f"{phase}_{kind}_flops")
                want_b = getattr(b.counters, f"{phase}_{kind}_flops")
                assert want_b > want_a, (target, phase, kind)
                assert values[0] == pytest.approx(want_a, rel=1e-12), (target, phase, kind, "window start")
                assert values[-1] == pytest.approx(want_b, rel=1e-12), (target, phase, kind, "window end")


def test_recording_rules_equal_the_endpoint_over_the_same_window(live) -> None:
    prom, at = live["prom"], live["at"]
    mfu = _by_model(prom.query("serving_mfu:mfu:ratio_rate1m", at))
    hfu = _by_model(prom.query("serving_mfu:hfu:ratio_rate1m", at))
    busy = _by_model(prom.query("serving_mfu:busy_mfu:ratio_rate1m", at))
    for model, a, b in zip(live["models"], live["before"], live["after"]):
        report = b.report_since(a)
        for phase in ("prefill", "decode"):
            want = getattr(report, phase)
            assert 0 < want.mfu <= want.hfu <= 1
            assert mfu[(model, phase)] == pytest.approx(want.mfu, rel=1e-9), (model, phase)
            assert hfu[(model, phase)] == pytest.approx(want.hfu, rel=1e-9), (model, phase)
        assert busy[(model, None)] == pytest.approx(report.overall.mfu, rel=1e-9), model


def test_speed_of_light_rules_equal_the_endpoint(live) -> None:
    """sol and every part of the waterfall, per phase and overall, as the rules record them (DESIGN §11)."""
    prom, at = live["prom"], live["at"]
    rules = {name: _by_model(prom.query(f"serving_mfu:{name}:ratio_rate1m", at)) for name in (
        "sol", "waterfall_waste", "waterfall_memory_bound", "waterfall_beyond_roofline", "busy_sol",
        "overall_waterfall_useful", "overall_waterfall_waste", "overall_waterfall_memory_bound",
        "overall_waterfall_beyond_roofline", "overall_waterfall_idle")}
    for model, a, b in zip(live["models"], live["before"], live["after"]):
        report = b.report_since(a)
        for phase in ("prefill", "decode"):
            want = getattr(report, phase)
            w = want.waterfall
            assert want.sol is not None and w is not None, (model, phase)
            assert rules["sol"][(model, phase)] == pytest.approx(want.sol, rel=1e-9), (model, phase)
            for part in ("waste", "memory_bound", "beyond_roofline"):
                assert rules[f"waterfall_{part}"][(model, phase)] == pytest.approx(getattr(w, part), rel=1e-9,
                                                                                    abs=1e-12), (model, phase, part)
        o = report.overall
        assert rules["busy_sol"][(model, None)] == pytest.approx(o.sol, rel=1e-9), model
        for part in ("useful", "waste", "memory_bound", "beyond_roofline", "idle"):
            assert rules[f"overall_waterfall_{part}"][(model, None)] == pytest.approx(
                getattr(o.waterfall, part), rel=1e-9, abs=1e-12), (model, part)


def test_fleet_mfu_is_the_capacity_weighted_sum_of_the_models(live) -> None:
    """Two engines of different models: Σ useful rate / Σ capacity rate, which no mean of the two MFUs gives."""
    prom, at = live["prom"], live["at"]
    fleet = _by_model(prom.query("serving_mfu_fleet:mfu:ratio_rate1m", at))
    useful = _by_model(prom.query("serving_mfu:useful_flops_per_second:rate1m", at))
    capacity = _by_model(prom.query("serving_mfu:capacity_flops_per_second:rate1m", at))
    reports = [b.report_since(a) for a, b in zip(live["before"], live["after"])]
    apart = []
    for phase in ("prefill", "decode"):
        u = sum(useful[(m, phase)] for m in live["models"])
        c = sum(capacity[(m, phase)] for m in live["models"])
        assert fleet[(None, phase)] == pytest.approx(u / c, rel=1e-9)
        # against the endpoints: rate() divides each server's increase by its own sampled span (its scrape
        # times), so weigh each engine's useful and capacity FLOPs by that server's factor rate / increase
        weight = [capacity[(m, phase)] / (getattr(r, phase).useful_flops / getattr(r, phase).mfu)
                  for m, r in zip(live["models"], reports)]
        want = sum(w * getattr(r, phase).useful_flops for w, r in zip(weight, reports)) / sum(
            w * getattr(r, phase).useful_flops / getattr(r, phase).mfu for w, r in zip(weight, reports))
        assert fleet[(None, phase)] == pytest.approx(want, rel=1e-9)
        mean = sum(getattr(r, phase).mfu for r in reports) / len(reports)
        apart.append(abs(mean / fleet[(None, phase)] - 1))
    # the same shapes but for the vocabulary: prefill MFUs can coincide; decode (n-gram drafts on one) differs
    assert max(apart) > 1e-3, f"the two engines' MFUs are too alike to tell a sum from a mean: {apart}"


def test_every_dashboard_query_parses_and_names_live_series(live) -> None:
    prom = live["prom"]
    names = prom.names()
    queries = dashboard_queries()
    assert len(queries) > 20
    empty = []
    for expr in queries:
        result = prom.query(expr, live["at"])  # raises with Prometheus' own parse error
        for name in NAME_TOKEN.findall(expr):
            assert name in names or CONDITIONAL.match(name), f"{name} in {expr!r} is neither scraped nor recorded"
        alarm = re.search(r"\) > 0\b", expr)  # shows only when something is wrong (e.g. HFU > 1 steps)
        if not result and not alarm and not all(CONDITIONAL.match(n) for n in NAME_TOKEN.findall(expr)):
            empty.append(expr)
    # everything but the MoE / GPU / KV / LoRA panels and the alarms has data from these two servers
    assert not empty, empty
