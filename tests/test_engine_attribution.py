"""What each request and tenant cost, on real engines (DESIGN §12): per-request tokens equal vLLM's own
(`usage`, RequestOutput, its counters), the requests' FLOPs and device-seconds add up to the report's, and
tenants come from vllm_xargs, a LoRA adapter, or the served model."""

from __future__ import annotations

import time

import httpx
import pytest

from serving_mfu.schema.requests import RequestCost
from serving_mfu.tools.engine_models import CORPUS

WEIRD_TENANT = ('acme corp {"plan": "gold"} ' * 15)[:400]  # spaces, quotes, braces, 400 characters


def _wait_for(find, ids: list[str], timeout_s: float = 15.0) -> dict[str, list[RequestCost]]:
    """Each id's records, once every id has one (engines publish finished requests about every 0.5 s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = {i: find(i) for i in ids}
        if all(found.values()) or time.monotonic() > deadline:
            missing = [i for i, recs in found.items() if not recs]
            assert not missing, f"no record for {missing}"
            return found
        time.sleep(0.2)


# ------------------------------------------------------------------ the OpenAI server, n-gram speculation
@pytest.fixture(scope="module")
def served(plugin_server):
    base = plugin_server["base"]
    sent = []
    with httpx.Client(base_url=base, timeout=120) as client:
        for i, tenant in enumerate(["team-a", "team-b", "team-a", WEIRD_TENANT, None]):
            x = f"attr-{i}-{time.monotonic_ns()}"
            body = {"model": plugin_server["model"], "prompt": CORPUS[i * 50: i * 50 + 300 + 40 * i],
                    "max_tokens": 10 + 3 * i, "temperature": 0, "ignore_eos": True}
            if tenant is not None:
                body["vllm_xargs"] = {"tenant": tenant}
            if i == 2:
                body.update(n=2, temperature=1.0, seed=7)  # one X, two requests
            r = client.post("/v1/completions", json=body, headers={"X-Request-Id": x})
            assert r.status_code == 200, r.text
            sent.append((x, tenant, r.json()))

        def find(x: str) -> list[dict]:
            r = client.get(f"/metrics/mfu/requests/{x}")
            assert r.status_code in (200, 404), r.text
            return r.json()["requests"] if r.status_code == 200 else []

        found = _wait_for(find, [x for x, _, _ in sent])
        time.sleep(1.0)  # every other finished request published too
        everything = client.get("/metrics/mfu/requests", params={"limit": 10000}).json()["requests"]
        counters = client.get("/metrics/mfu/counters").json()
        tenants = client.get("/metrics/mfu/tenants").json()["tenants"]
        metrics = client.get("/metrics").text
    return {"sent": sent, "found": found, "all": everything, "counters": counters, "tenants": tenants,
            "metrics": metrics, "model": plugin_server["model"]}


def test_each_request_has_vllms_token_counts(served) -> None:
    for x, _, response in served["sent"]:
        records = served["found"][x]
        usage = response["usage"]
        assert len(records) == len(response["choices"])  # n = 2: two requests under one X
        assert all(f"{response['id']}-0-" in r["request_id"] for r in records)  # one prompt: cmpl-{X}-0-…
        assert sum(r["output_tokens"] for r in records) == usage["completion_tokens"]
        assert all(r["prompt_tokens"] == usage["prompt_tokens"] for r in records)
        assert all(0 < r["useful_flops"] <= r["executed_flops"] and r["device_seconds"] > 0 for r in records)
        assert all(r["draft_tokens"] >= r["accepted_tokens"] for r in records)
    assert sum(r["draft_tokens"] for x, _, _ in served["sent"] for r in served["found"][x]) > 0  # n-gram ran


def test_tenants_come_from_vllm_xargs_or_the_served_model(served) -> None:
    for x, tenant, _ in served["sent"]:
        for r in served["found"][x]:
            if tenant is None:
                assert r["tenant"] == served["model"]
            elif tenant == WEIRD_TENANT:
                label = r["tenant"]
                assert len(label) == 128 and label.startswith("acme_corp_plan_:_gold_acme")
                assert not set(label) & set(' {}"')
            else:
                assert r["tenant"] == tenant
    labels = {t["tenant"] for t in served["tenants"]}
    assert {"team-a", "team-b", served["model"]} <= labels
    assert 'tenant="team-a"' in served["metrics"] and "serving_mfu_tenant_device_seconds_total" in served["metrics"]


def test_all_requests_add_up_to_the_engines_totals(served) -> None:
    """Every request the server ran has finished: their FLOPs are the report's, their device-seconds the busy
    time × devices, and the tenants' sums are the requests' (to 1e-9)."""
    c = served["counters"]["counters"]
    devices = served["counters"]["peak"]["devices"]
    recs = served["all"]
    useful = sum(r["useful_flops"] for r in recs)
    executed = sum(r["executed_flops"] for r in recs)
    assert useful == pytest.approx(c["prefill_useful_flops"] + c["decode_useful_flops"], rel=1e-9)
    assert executed == pytest.approx(c["prefill_executed_flops"] + c["decode_executed_flops"], rel=1e-9)
    assert sum(r["device_seconds"] for r in recs) == pytest.approx(c["busy_s"] * devices, rel=1e-9)
    assert sum(r["prefill_device_seconds"] for r in recs) == pytest.approx(c["prefill_time_s"] * devices, rel=1e-9)
    t = served["tenants"]
    assert sum(x["requests"] for x in t) == len(recs)
    assert sum(x["device_seconds"] for x in t) == pytest.approx(c["busy_s"] * devices, rel=1e-9)
    assert sum(x["prompt_tokens"] for x in t) == sum(r["prompt_tokens"] for r in recs)
    assert sum(x["output_tokens"] for x in t) == sum(r["output_tokens"] for r in recs)
