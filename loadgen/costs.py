"""What the run's requests and the server's tenants cost (DESIGN §12), read from the server.

After a run, `fetch_costs` looks each completed request up by the X-Request-Id it carried
(`GET /metrics/mfu/requests/{id}`), at most `cost_concurrency` at once, and polls the ones not there yet
every `POLL_S` until `cost_timeout_s`: engines publish finished requests about every 0.5 s.  Requests still
missing then are counted, never dropped.  `join` puts each answer on the record that carried its id (a
server record whose ids do not derive from that X is refused); `section` gives the distributions, totals and
prices.  `read_tenants` and `tenant_differences` give `wrap` each tenant's share of a window.  A server
without these endpoints (an older serving-mfu, or no plugin) gives a one-line reason, never an error.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

import aiohttp

from loadgen.config import RunConfig
from loadgen.records import Cost, RequestRecord
from loadgen.results import RequestCostSection, TenantCost
from loadgen.stats import cost_stats
from serving_mfu.schema.requests import RequestCostModel, RequestsResponse, TenantModel, TenantsResponse, id_keys

POLL_S = 0.25  # how often the requests not published yet are asked for again
COSTS = ("useful_flops", "executed_flops", "prefill_device_seconds", "decode_device_seconds", "device_seconds")
TOKENS = ("prompt_tokens", "output_tokens")
TENANT_SUMS = ("requests", "useful_flops", "executed_flops", "device_seconds", "prompt_tokens", "output_tokens")


@dataclass
class Lookup:
    """The server's records by X-Request-Id, the ids it never answered for, and the last odd answer."""

    found: dict[str, list[RequestCostModel]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    note: str | None = None


async def _get(session: aiohttp.ClientSession, url: str, timeout_s: float) -> tuple[int | None, bytes]:
    """(status, body); (None, why) when no answer came: never raises for the network."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            return r.status, await r.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return None, f"{type(exc).__name__}: {exc}".encode()


def _answer(url: str, status: int | None, body: bytes) -> str:
    text = body[:200].decode(errors="replace")
    return f"cannot read {url}: {text}" if status is None else f"{url} answered {status}: {text}"


async def unavailable(session: aiohttp.ClientSession, base_url: str, timeout_s: float = 10.0) -> str | None:
    """None when the server serves request costs, else why not, in one line (404: an older server)."""
    url = base_url.rstrip("/") + "/metrics/mfu/requests?limit=1"
    status, body = await _get(session, url, timeout_s)
    if status == 404:
        return "GET /metrics/mfu/requests answered 404: a server without serving-mfu's request costs (older?)"
    if status != 200:
        return _answer(url, status, body)
    try:
        RequestsResponse.model_validate_json(body)
    except ValueError as exc:
        return f"{url} sent no request list: {exc!s:.200}"
    return None


async def fetch_costs(session: aiohttp.ClientSession, base_url: str, ids: Iterable[str], timeout_s: float,
                      concurrency: int = 16, poll_s: float = POLL_S,
                      clock: Callable[[], float] = time.monotonic) -> Lookup:
    """Each id's records (`GET /metrics/mfu/requests/{id}`), asking again for those not published yet."""
    base = base_url.rstrip("/") + "/metrics/mfu/requests/"
    out = Lookup()
    slots = asyncio.Semaphore(concurrency)

    async def one(x: str) -> None:
        async with slots:
            status, body = await _get(session, base + quote(x, safe=""), timeout_s)
        if status == 404:  # not finished, or not published yet
            return
        if status != 200:
            out.note = _answer(base + x, status, body)
            return
        try:
            records = RequestsResponse.model_validate_json(body).requests
        except ValueError as exc:
            out.note = f"{base + x} sent no request list: {exc!s:.200}"
            return
        if mine := [r for r in records if x in id_keys(r.request_id)]:
            out.found[x] = mine

    pending = list(dict.fromkeys(ids))
    deadline = clock() + timeout_s
    while pending:
        await asyncio.gather(*(one(x) for x in pending))
        pending = [x for x in pending if x not in out.found]
        if not pending or clock() + poll_s > deadline:
            break
        await asyncio.sleep(poll_s)
    out.missing = pending
    return out


def join(records: Sequence[RequestRecord], found: dict[str, list[RequestCostModel]]) -> None:
    """Set each record's `cost` from the server records its X-Request-Id matched (summed: n > 1)."""
    for rec in records:
        matched = found.get(rec.request_id) if rec.request_id else None
        if matched:
            sums = {k: sum(getattr(m, k) for m in matched) for k in COSTS + TOKENS}
            rec.cost = Cost(tenant=matched[0].tenant, records=len(matched),
                            request_ids=[m.request_id for m in matched], **sums)


def per_million(device_seconds: float, tokens: int, price: float | None) -> float | None:
    """USD per 1M tokens: device_seconds / 3600 × price / tokens × 1e6 (None without a price or tokens)."""
    if price is None or tokens <= 0:
        return None
    return device_seconds / 3600.0 * price / tokens * 1e6


def priced(t: TenantCost, price: float | None) -> TenantCost:
    """The tenant's figures with their cost at `price` USD per device-hour."""
    if price is None:
        return t
    return t.model_copy(update={"usd": t.device_seconds / 3600.0 * price,
                                "usd_per_1m_tokens": per_million(t.device_seconds, t.prompt_tokens + t.output_tokens,
                                                                 price)})


def by_tenant(costs: Sequence[Cost], price: float | None) -> list[TenantCost]:
    """The joined requests summed by the tenant label the server charged them to; largest first."""
    groups: dict[str, list[Cost]] = defaultdict(list)
    for c in costs:
        groups[c.tenant].append(c)
    out = [priced(TenantCost(tenant=name, requests=len(cs), **{k: sum(getattr(c, k) for c in cs) for k in
                                                               ("useful_flops", "executed_flops", "device_seconds",
                                                                *TOKENS)}), price)
           for name, cs in groups.items()]
    return sorted(out, key=lambda t: (-t.device_seconds, t.tenant))


def section(records: Sequence[RequestRecord], lookup: Lookup, price: float | None) -> RequestCostSection:
    """Distributions, totals and prices of the run's joined requests, and how many were missing."""
    looked = [r for r in records if r.ok and r.request_id]
    costs = [r.cost for r in looked if r.cost is not None]
    prompt, output = sum(c.prompt_tokens for c in costs), sum(c.output_tokens for c in costs)
    stats = {k: cost_stats(getattr(c, k) for c in costs) for k in COSTS}
    return RequestCostSection(
        looked_up=len(looked), joined=len(costs), missing=len(looked) - len(costs),
        server_records=sum(c.records for c in costs), prompt_tokens=prompt, output_tokens=output, **stats,
        device_hour_price=price,
        usd_per_1m_input_tokens=per_million(stats["prefill_device_seconds"].total, prompt, price),
        usd_per_1m_output_tokens=per_million(stats["decode_device_seconds"].total, output, price),
        usd=None if price is None else stats["device_seconds"].total / 3600.0 * price,
        tenants=by_tenant(costs, price), note=lookup.note)


async def request_costs(config: RunConfig, session: aiohttp.ClientSession,
                        records: Sequence[RequestRecord]) -> tuple[RequestCostSection | None, str | None]:
    """Look the run's completed requests up, join and summarise them; (None, why) when the server cannot."""
    if not config.request_costs:
        return None, "disabled"
    try:
        if why := await unavailable(session, config.base_url, config.cost_timeout_s):
            return None, why
        ids = [r.request_id for r in records if r.ok and r.request_id]
        lookup = await fetch_costs(session, config.base_url, ids, config.cost_timeout_s, config.cost_concurrency)
        join(records, lookup.found)
        return section(records, lookup, config.device_hour_price), None
    except Exception as exc:  # an odd answer must not lose the run's results
        return None, f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------ tenants (wrap)
async def read_tenants(session: aiohttp.ClientSession, base_url: str,
                       timeout_s: float = 10.0) -> tuple[list[TenantModel] | None, str | None]:
    """The server's cumulative per-tenant totals, or (None, why) in one line (404: an older server)."""
    url = base_url.rstrip("/") + "/metrics/mfu/tenants"
    status, body = await _get(session, url, timeout_s)
    if status == 404:
        return None, "GET /metrics/mfu/tenants answered 404: a server without serving-mfu's tenant totals (older?)"
    if status != 200:
        return None, _answer(url, status, body)
    try:
        return TenantsResponse.model_validate_json(body).tenants, None
    except ValueError as exc:
        return None, f"{url} sent no tenant list: {exc!s:.200}"


def tenant_differences(before: Sequence[TenantModel], after: Sequence[TenantModel],
                       price: float | None) -> list[TenantCost]:
    """Each tenant's totals after − before (a tenant new in `after` counts from 0); tenants that did nothing
    in between are left out; largest device-seconds first."""
    prev = {t.tenant: t for t in before}
    out = []
    for t in after:
        p = prev.get(t.tenant)
        diff = {k: getattr(t, k) - (getattr(p, k) if p else 0) for k in TENANT_SUMS}
        if any(diff.values()):
            out.append(priced(TenantCost(tenant=t.tenant, **diff), price))
    return sorted(out, key=lambda t: (-t.device_seconds, t.tenant))
