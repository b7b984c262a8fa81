"""Label cardinality under load: thousands of distinct IDs through a running sidecar must not grow the series count.

Drives bitable app tokens and table ids, message ids, user ids and unknown paths through the sidecar in front of the
fake platforms, and counts the series its /metrics serves, as Prometheus would scrape them.
"""

from __future__ import annotations

import asyncio
import secrets
import string
from collections import Counter as Tally
from typing import Awaitable, Callable

import aiohttp
import aiohttp.http_parser
import aiohttp.web_protocol
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.platforms.routes import shapes
from proxy.routing import OTHER_ROUTE
from tests.conftest import Running

CONCURRENCY = 32
ROUTE_CAP = 200   # RouteLabels' default limit per app


def token(prefix: str, size: int = 20) -> str:
    """An ID shaped like the platform's: `bascn` + mixed case letters and digits."""
    return prefix + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(size))


def word(size: int = 10) -> str:
    """A lower-case path segment: the kind of segment a route template keeps (it looks like a verb)."""
    return "".join(secrets.choice(string.ascii_lowercase) for _ in range(size))


async def scrape(http: aiohttp.ClientSession, running: Running) -> dict[str, set[tuple[tuple[str, str], ...]]]:
    """Metric family → the set of series (label sets) in the sidecar's /metrics."""
    async with http.get(f"{running.admin}/metrics") as response:
        text = await response.text()
    series: dict[str, set[tuple[tuple[str, str], ...]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(family.name, set()).add((("__name__", sample.name), *sorted(sample.labels.items())))
    return series


def count(series: dict[str, set[tuple[tuple[str, str], ...]]]) -> int:
    return sum(len(s) for s in series.values())


def label_values(series: dict[str, set[tuple[tuple[str, str], ...]]], label: str) -> set[str]:
    return {value for family in series.values() for labels in family for name, value in labels if name == label}


Call = Callable[[aiohttp.ClientSession], Awaitable[None]]


async def drive(http: aiohttp.ClientSession, calls: list[Call]) -> None:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(call: Call) -> None:
        async with gate:
            await call(http)

    await asyncio.gather(*(one(call) for call in calls))


def distinct_id_calls(running: Running, n: int) -> list[Call]:
    """n calls per shape, every one with IDs never seen before."""
    feishu, ding = f"{running.base}/sales-bot/open-apis", f"{running.base}/dingtalk-api/v1.0"

    def get(url: str) -> Call:
        async def call(http: aiohttp.ClientSession) -> None:
            async with http.get(url) as response:
                await response.read()
        return call

    def post(url: str, body: dict) -> Call:
        async def call(http: aiohttp.ClientSession) -> None:
            async with http.post(url, json=body) as response:
                await response.read()
        return call

    calls: list[Call] = []
    for _ in range(n):
        app_token, table = token("bascn"), token("tbl", 12)
        calls += [
            post(f"{feishu}/bitable/v1/apps/{app_token}/tables/{table}/records/batch_create",
                 {"records": [{"fields": {"n": 1}}]}),
            get(f"{feishu}/bitable/v1/apps/{token('bascn')}/tables/{token('tbl', 12)}/records?page_token={token('p')}"),
            get(f"{feishu}/im/v1/messages/om_{secrets.token_hex(16)}"),
            post(f"{feishu}/im/v1/messages/om_{secrets.token_hex(16)}/reply", {"msg_type": "text", "content": "{}"}),
            get(f"{ding}/contact/users/{token('', 19)}"),
            get(f"{feishu}/contact/v3/users/ou_{secrets.token_hex(16)}?user_id_type=open_id"),
        ]
    return calls


def unknown_path_calls(running: Running, n: int) -> list[Call]:
    """Paths no template knows, each distinct and made of Feishu's own route words (any other segment reads `:id`,
    so only these can make new labels): only the per-app cap stands between them and the series count."""
    words = sorted({s for t in shapes("feishu").templates() for s in t.split("/") if s and not s.startswith(":")})
    async def call(http: aiohttp.ClientSession) -> None:
        path = "/".join(secrets.SystemRandom().sample(words, 4))
        async with http.get(f"{running.base}/sales-bot/open-apis/{path}") as response:
            await response.read()
    return [call] * n


async def test_thousands_of_distinct_ids_do_not_grow_the_series_count(start_sidecar, http) -> None:
    # The limiter stays on (its series are counted too) with a quota that does not pace 3,000 requests.
    sidecar = await start_sidecar(ratelimit="{per_second: 100000}")
    await drive(http, distinct_id_calls(sidecar, 20))
    warm = await scrape(http, sidecar)

    await drive(http, distinct_id_calls(sidecar, 500))    # 3,000 requests, 3,500 fresh IDs
    after = await scrape(http, sidecar)
    assert count(after) == count(warm), _growth(warm, after)

    routes = label_values(after, "route")
    assert routes == {
        "/open-apis/bitable/v1/apps/:app_token/tables/:table_id/records/batch_create",
        "/open-apis/bitable/v1/apps/:app_token/tables/:table_id/records",
        "/open-apis/im/v1/messages/:message_id",
        "/open-apis/im/v1/messages/:message_id/reply",
        "/open-apis/contact/v3/users/:user_id",
        "/v1.0/contact/users/:union_id",
    }
    assert sidecar.metric("imsidecar_requests_total", app="sales-bot", upstream="open", method="GET",
                          route="/open-apis/im/v1/messages/:message_id", status_class="4xx",
                          outcome="client_error") == 520   # every call was counted, under its template


async def test_distinct_unknown_routes_stop_at_the_cap_and_fall_into_other(sidecar: Running, http) -> None:
    await drive(http, unknown_path_calls(sidecar, ROUTE_CAP + 50))
    capped = await scrape(http, sidecar)
    routes = label_values(capped, "route")
    assert OTHER_ROUTE in routes and len(routes) == ROUTE_CAP + 1

    await drive(http, unknown_path_calls(sidecar, 1000))
    after = await scrape(http, sidecar)
    assert count(after) == count(capped), _growth(capped, after)
    assert requests_by_route(sidecar)[OTHER_ROUTE] == 1050   # everything past the cap is still counted, as `other`


async def test_made_up_http_methods_do_not_become_label_values(sidecar: Running, http, monkeypatch) -> None:
    """aiohttp's pure-Python parser (AIOHTTP_NO_EXTENSIONS=1, or no C wheel) takes any token as a method; the C
    parser refuses unknown ones. Under the permissive one, a client inventing methods must not mint series."""
    monkeypatch.setattr(aiohttp.web_protocol, "HttpRequestParser", aiohttp.http_parser.HttpRequestParserPy)
    host, port = sidecar.base.removeprefix("http://").split(":")
    for i in range(50):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"X{word(6).upper()}{i} /sales-bot/open-apis/im/v1/messages HTTP/1.1\r\nHost: x\r\n"
                     "Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        assert (await reader.read()).startswith(b"HTTP/1.1 ")
        writer.close()
        await writer.wait_closed()
    methods = label_values(await scrape(http, sidecar), "method")
    assert methods == {"other"}, methods
    assert requests_by_route(sidecar)["/open-apis/im/v1/messages"] == 50


async def test_an_upstream_answering_ever_new_codes_and_headers_cannot_mint_series(
        start_sidecar, aiohttp_server, http) -> None:
    """A gateway (or a platform having a bad day) chooses the error code in its body, which becomes the attempt's
    `reason` (capped); an `X-Imsidecar-Error` header it sends is dropped, so it never becomes the `outcome`."""
    async def handle(request: web.Request) -> web.Response:
        if request.path.endswith("tenant_access_token/internal"):
            return web.json_response({"code": 0, "tenant_access_token": "t-rogue", "expire": 7200})
        code = secrets.randbelow(10**9)
        return web.json_response({"code": code, "msg": "no"}, status=400, headers={"X-Imsidecar-Error": f"E{code}"})

    rogue = web.Application()
    rogue.router.add_route("*", "/{tail:.*}", handle)
    server = await aiohttp_server(rogue)
    running = await start_sidecar(extra=f"""
  - name: rogue
    platform: feishu
    app_id: cli_rogue
    app_secret: rogue-secret-0123456789
    upstreams: {{open: {{base_url: "{str(server.make_url("")).rstrip("/")}"}}}}
    expose: [{{upstream: open, prefix: /rogue}}]
    ratelimit: {{per_second: 100000}}
    coalesce: {{enabled: false}}   # every one of the identical GETs must reach the rogue upstream
""")

    async def call(session: aiohttp.ClientSession) -> None:
        async with session.get(f"{running.base}/rogue/open-apis/im/v1/chats") as response:
            await response.read()

    await drive(http, [call] * 300)
    series = await scrape(http, running)
    reasons = {dict(s)["reason"] for s in series["imsidecar_upstream_attempts"] if dict(s).get("app") == "rogue"}
    outcomes = {dict(s)["outcome"] for s in series["imsidecar_requests"] if dict(s).get("app") == "rogue"}
    assert len(reasons) <= 101 and "other" in reasons, len(reasons)
    assert outcomes == {"client_error"}, outcomes   # a 4xx with a code no table knows: the caller's request
    assert requests_by_route(running)["/open-apis/im/v1/chats"] == 300


def requests_by_route(running: Running) -> Tally[str]:
    tally: Tally[str] = Tally()
    for family in running.registry.collect():
        for sample in family.samples:
            if sample.name == "imsidecar_requests_total":
                tally[sample.labels["route"]] += int(sample.value)
    return tally


def _growth(before: dict[str, set], after: dict[str, set]) -> str:
    grown = {name: sorted(after[name] - before.get(name, set()))[:5] for name in after
             if len(after[name]) != len(before.get(name, set()))}
    return f"series grew: {grown}"
