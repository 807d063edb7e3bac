"""What each request and tenant cost, seen from the load generator (issue 27), against the stub's fabricated
records: the join by X-Request-Id, the distributions, the prices, --tenant, missing records, an older server
without the endpoints, and `wrap`'s per-tenant differences.  Expected figures are computed here from the
requests' own shapes with the stub's formula (loadgen/stub_costs.py), not read back from the loadgen."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from rich.console import Console

from loadgen import RunConfig, run_benchmark
from loadgen.cli import main
from loadgen.stub import StubConfig
from loadgen.stub_costs import DECODE_S_PER_TOKEN, PREFILL_S_PER_TOKEN
from loadgen.stub_server import StubThread
from loadgen.summary import print_summary
from loadgen.wrap import WrapResult

P = 1e9  # the stub's fake_params
PRICE = 2.5  # USD per device-hour


def expected(prompt: int, output: int) -> dict[str, float]:
    """The stub's record for a request of this shape, written out independently."""
    prefill, decode = prompt * PREFILL_S_PER_TOKEN, output * DECODE_S_PER_TOKEN
    return {"useful_flops": 2 * P * (prompt + output), "executed_flops": 2 * P * (prompt + 2 * output),
            "prefill_device_seconds": prefill, "decode_device_seconds": decode, "device_seconds": prefill + decode}


@pytest.fixture(scope="module")
def stub():
    """Records published 0.3 s after each stream ends: the loadgen has to poll for the last ones."""
    with StubThread(StubConfig(fake_costs=True, fake_costs_delay_s=0.3, fake_params=P)) as s:
        yield s


def _seen(stub) -> dict[str, dict]:
    return {x["x_request_id"]: x for x in stub.app.state.stats.seen}


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
async def test_each_record_joins_the_request_that_carried_its_id(stub, endpoint):
    config = RunConfig(base_url=stub.url, endpoint=endpoint, num_prompts=24, request_rate=200, mfu=False,
                       input={"dist": "uniform", "mean": 40, "spread": 0.8},
                       output={"dist": "uniform", "mean": 6, "spread": 0.5}, device_hour_price=PRICE, quiet=True)
    r = await run_benchmark(config)
    seen = _seen(stub)
    assert r.completed == 24 and r.request_costs_error is None
    c = r.request_costs
    assert (c.looked_up, c.joined, c.missing, c.server_records) == (24, 24, 0, 24)
    assert len({rec.prompt_tokens for rec in r.records}) > 5  # shapes differ: a wrong join would show
    assert len({rec.request_id for rec in r.records}) == 24
    for rec in r.records:
        # the id went out as X-Request-Id, vLLM-style ids came back, and the costs are this request's own
        internal = seen[rec.request_id]["request_id"]
        assert rec.cost.request_ids == [internal] and rec.request_id in internal
        got = {k: getattr(rec.cost, k) for k in expected(0, 0)}
        assert got == pytest.approx(expected(rec.prompt_tokens, rec.completion_tokens), rel=1e-12)
        assert (rec.cost.prompt_tokens, rec.cost.output_tokens) == (rec.prompt_tokens, rec.completion_tokens)
    # the warm-up request carried an id too, outside the run's
    assert any(x and x.endswith("-w0") and x.split("-")[0] == r.records[0].request_id.split("-")[0] for x in seen)


async def test_distributions_and_prices_are_numpys_and_the_formula(stub):
    config = RunConfig(base_url=stub.url, num_prompts=30, request_rate=300, mfu=False, quiet=True,
                       input={"dist": "lognormal", "mean": 50, "spread": 0.7},
                       output={"dist": "uniform", "mean": 5, "spread": 0.8}, device_hour_price=PRICE)
    r = await run_benchmark(config)
    shapes = [(rec.prompt_tokens, rec.completion_tokens) for rec in r.records]
    want = {k: np.array([expected(i, o)[k] for i, o in shapes]) for k in expected(0, 0)}
    c = r.request_costs
    for name, values in want.items():
        s = getattr(c, name)
        assert s.count == 30
        assert (s.p50, s.p90, s.p99) == pytest.approx(tuple(np.percentile(values, [50, 90, 99])), rel=1e-12)
        assert s.total == pytest.approx(values.sum(), rel=1e-12) and s.mean == pytest.approx(values.mean())
    prompt, output = sum(i for i, _ in shapes), sum(o for _, o in shapes)
    assert (c.prompt_tokens, c.output_tokens) == (prompt, output)
    prefill_s = sum(i * 1e-4 for i, _ in shapes)
    decode_s = sum(o * 1e-3 for _, o in shapes)
    usd_in, usd_out = prefill_s / 3600 * PRICE / prompt * 1e6, decode_s / 3600 * PRICE / output * 1e6
    assert (c.usd_per_1m_input_tokens, c.usd_per_1m_output_tokens) == pytest.approx((usd_in, usd_out), rel=1e-12)
    assert c.usd == pytest.approx((prefill_s + decode_s) / 3600 * PRICE, rel=1e-12)
    console = Console(record=True, width=160)
    print_summary(r, console)
    text = console.export_text()
    assert "30 of 30 completed requests joined" in text and "0 missing" in text
    for what, usd in (("input", usd_in), ("output", usd_out)):
        shown = re.search(rf"\$([\d.,]+) per 1M {what} tokens", text).group(1)
        assert float(shown.replace(",", "")) == pytest.approx(usd, rel=1e-3)  # 4 significant digits


def test_tenant_flag_reaches_the_body_and_the_request_lines(stub, tmp_path):
    """--tenant on every request; a trace line's own tenant wins; both are columns of --requests-out."""
    trace = tmp_path / "t.jsonl"
    lines = [{"timestamp": i * 0.005, "input_len": 10 + i, "output_len": 3} for i in range(9)]
    for line in lines[::3]:
        line["tenant"] = "gold"
    trace.write_text("\n".join(json.dumps(x) for x in lines))
    out, reqs = tmp_path / "r.json", tmp_path / "r.jsonl"
    rc = main(["run", "--base-url", stub.url, "--trace", str(trace), "--tenant", "team {a}", "--no-mfu",
               "--prompt-format", "text", "--device-hour-price", "4", "--out", str(out), "--requests-out",
               str(reqs), "--quiet"])
    assert rc == 0
    rows = [json.loads(x) for x in reqs.read_text().splitlines()]
    seen = _seen(stub)
    assert [row["tenant"] for row in rows] == ["gold" if i % 3 == 0 else "team {a}" for i in range(9)]
    assert all(seen[row["request_id"]]["tenant"] == row["tenant"] for row in rows)  # what the stub received
    assert {row["cost"]["tenant"] for row in rows} == {"gold", "team_a"}  # the server's sanitised labels
    data = json.loads(out.read_text())
    tenants = {t["tenant"]: t for t in data["request_costs"]["tenants"]}
    assert {k: t["requests"] for k, t in tenants.items()} == {"gold": 3, "team_a": 6}
    gold = [(10 + i, 3) for i in range(0, 9, 3)]
    ds = sum(expected(i, o)["device_seconds"] for i, o in gold)
    assert tenants["gold"]["device_seconds"] == pytest.approx(ds, rel=1e-12)
    assert tenants["gold"]["usd"] == pytest.approx(ds / 3600 * 4, rel=1e-12)
    assert tenants["gold"]["usd_per_1m_tokens"] == pytest.approx(ds / 3600 * 4 / sum(i + o for i, o in gold) * 1e6)


async def test_records_never_published_are_counted_missing(stub, tmp_path):
    trace = tmp_path / "t.jsonl"
    prompts = ["one two three", "STUB_UNRECORDED four five", "six seven", "STUB_UNRECORDED eight", "nine"]
    trace.write_text("\n".join(json.dumps({"timestamp": 0, "prompt": p, "output_len": 2}) for p in prompts))
    config = RunConfig(base_url=stub.url, arrival="trace", trace_path=str(trace), mfu=False, cost_timeout_s=0.8,
                       quiet=True)
    r = await run_benchmark(config)
    c = r.request_costs
    assert r.completed == 5 and (c.looked_up, c.joined, c.missing) == (5, 3, 2)
    assert [rec.cost is None for rec in r.records] == ["STUB_UNRECORDED" in p for p in prompts]
    assert c.device_seconds.count == 3


async def test_a_server_publishing_too_late_leaves_all_missing_in_bounded_time():
    with StubThread(StubConfig(fake_costs=True, fake_costs_delay_s=30)) as s:
        r = await run_benchmark(RunConfig(base_url=s.url, num_prompts=4, output={"mean": 2}, mfu=False,
                                          cost_timeout_s=0.5, quiet=True))
    c = r.request_costs
    assert (c.looked_up, c.joined, c.missing) == (4, 0, 4) and c.device_seconds.count == 0
    assert r.duration_s < 5


def _send(url: str, requests: list[tuple[str | None, int]]) -> list[str]:
    """A command that posts one streamed completion per (tenant, prompt words) to the stub, 4 tokens each."""
    script = ("import json,sys,urllib.request as u\n"
              "o=u.build_opener(u.ProxyHandler({}))\n"
              "for t,n in json.loads(sys.argv[2]):\n"
              " b={'model':'m','prompt':' '.join(['w']*n),'max_tokens':4,'stream':True}\n"
              " if t: b['vllm_xargs']={'tenant':t}\n"
              " o.open(u.Request(sys.argv[1]+'/v1/completions',json.dumps(b).encode(),"
              "{'Content-Type':'application/json'})).read()\n")
    return [sys.executable, "-c", script, url, json.dumps(requests)]


def test_wrap_reports_each_tenants_difference(tmp_path, capsys):
    with StubThread(StubConfig(fake_costs=True, fake_mfu=True, fake_params=P)) as s:
        subprocess.run(_send(s.url, [("a", 100), ("z", 50)]), check=True)  # before the window
        during = [("a", 10), ("a", 20), ("b c", 30), (None, 40)]
        rc = main(["wrap", "--base-url", s.url, "--device-hour-price", str(PRICE), "--mfu-fresh-timeout-s", "1",
                   "--out", str(tmp_path / "w.json"), "--", *_send(s.url, during)])
    assert rc == 0
    w = WrapResult.model_validate_json((tmp_path / "w.json").read_text())
    assert w.tenants_error is None
    got = {t.tenant: t for t in w.tenants}
    assert set(got) == {"a", "b_c", "m"}  # z did nothing in the window; no tenant → the model's name
    for name, shapes in (("a", [10, 20]), ("b_c", [30]), ("m", [40])):
        t = got[name]
        ds = sum(expected(n, 4)["device_seconds"] for n in shapes)
        assert (t.requests, t.prompt_tokens, t.output_tokens) == (len(shapes), sum(shapes), 4 * len(shapes))
        assert t.useful_flops == pytest.approx(sum(expected(n, 4)["useful_flops"] for n in shapes), rel=1e-12)
        assert t.executed_flops == pytest.approx(sum(expected(n, 4)["executed_flops"] for n in shapes), rel=1e-12)
        assert t.device_seconds == pytest.approx(ds, rel=1e-12)
        assert t.usd == pytest.approx(ds / 3600 * PRICE, rel=1e-12)
        assert t.usd_per_1m_tokens == pytest.approx(ds / 3600 * PRICE / (sum(shapes) + 4 * len(shapes)) * 1e6)
    text = capsys.readouterr().out
    assert "what each tenant cost during the command" in text and "b_c" in text


def test_an_older_server_gives_one_line_and_a_normal_result(tmp_path, capsys, monkeypatch):
    """No /metrics/mfu/requests nor /metrics/mfu/tenants (404): the run and the wrap go on and say so once."""
    monkeypatch.setenv("COLUMNS", "200")  # rich's width: a line that fits is one line
    with StubThread(StubConfig()) as s:
        rc = main(["run", "--base-url", s.url, "--num-prompts", "3", "--output-len", "2", "--tenant", "t",
                   "--out", str(tmp_path / "r.json"), "--quiet"])
        run_text = capsys.readouterr().out
        wrc = main(["wrap", "--base-url", s.url, "--out", str(tmp_path / "w.json"), "--",
                    *_send(s.url, [("t", 5)])])
        wrap_text = capsys.readouterr().out
    assert rc == 0 and wrc == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["completed"] == 3 and data["request_costs"] is None and "404" in data["request_costs_error"]
    lines = [x for x in run_text.splitlines() if "per-request cost" in x]
    assert len(lines) == 1 and "not available" in lines[0] and "404" in lines[0]
    w = WrapResult.model_validate_json((tmp_path / "w.json").read_text())
    assert w.returncode == 0 and w.tenants is None and "404" in w.tenants_error
    lines = [x for x in wrap_text.splitlines() if "per-tenant cost" in x]
    assert len(lines) == 1 and "not available" in lines[0]
