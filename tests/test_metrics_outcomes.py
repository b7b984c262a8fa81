"""How a finished request is counted: once, under the class of what its client got, read from the platform's own
classification of the final answer (an errcode inside HTTP 200 is an error); retries counted when sent; every
series whose labels are known up front at 0; no `_created` series; the process's own metrics."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.errors import client_facing_kinds
from proxy.metrics import CLIENT_ERROR, OUTCOME_CLASSES, PLATFORM_ERROR, SUCCESS, THROTTLED, outcome_class
from proxy.outcome import Outcome, Signal, Verdict
from tests.conftest import Platforms, Running

USER_GET = "/dingtalk/topapi/v2/user/get"
MESSAGES = "/sales-bot/open-apis/im/v1/messages"


def by_outcome(running: Running, app: str, upstream: str) -> dict[tuple[str, str], float]:
    """(outcome, status_class) → requests, over every route and method of one (app, upstream)."""
    found: dict[tuple[str, str], float] = {}
    for family in running.registry.collect():
        for s in family.samples:
            if s.name == "imsidecar_requests_total" and (s.labels["app"], s.labels["upstream"]) == (app, upstream):
                key = (s.labels["outcome"], s.labels["status_class"])
                found[key] = found.get(key, 0) + s.value
    return {k: v for k, v in found.items() if v}


async def post(http: aiohttp.ClientSession, url: str, body: object, **headers: str) -> tuple[int, dict, dict]:
    async with http.post(url, json=body, headers=headers) as r:
        return r.status, await r.json(), dict(r.headers)


async def test_a_dingtalk_oapi_error_inside_http_200_is_counted_as_the_error_it_is(
        sidecar: Running, platforms: Platforms, http: aiohttp.ClientSession) -> None:
    platforms.dingtalk.faults.rates = {"busy": 1.0}   # errcode -1 "system busy" on every attempt, in HTTP 200
    status, body, _ = await post(http, sidecar.base + USER_GET, {"userid": "manager001"})
    assert (status, body["errcode"]) == (200, -1)
    platforms.dingtalk.faults.rates = {}
    platforms.dingtalk.faults.script.append("throttle")   # 90018; the 1 s it asks for does not fit 300 ms
    status, body, _ = await post(http, sidecar.base + USER_GET, {"userid": "manager001"}, **{"X-Imsidecar-Timeout": "300ms"})
    assert (status, body["errcode"]) == (200, 90018)
    status, body, _ = await post(http, sidecar.base + USER_GET, {"userid": "nobody"})   # 60121 user not found
    assert (status, body["errcode"]) == (200, 60121)
    status, body, _ = await post(http, sidecar.base + USER_GET, {"userid": "manager001"})
    assert (status, body["errcode"]) == (200, 0)
    assert by_outcome(sidecar, "ops-ding", "oapi") == {
        ("platform_error", "2xx"): 1, ("throttled", "2xx"): 1, ("client_error", "2xx"): 1, ("success", "2xx"): 1}


async def test_feishu_answers_and_the_sidecars_own_errors_each_get_their_class(
        start_sidecar, platforms: Platforms, http: aiohttp.ClientSession) -> None:
    running = await start_sidecar(limits="{deadline: 5s, max_request_bytes: 1KiB}")
    message = {"receive_id": "oc_1", "msg_type": "text", "content": '{"text":"hi"}'}
    platforms.feishu.faults.script.append("throttle")   # 99991400 / HTTP 429 asking for 1 s: no room in 300 ms
    assert (await post(http, running.base + MESSAGES, message, **{"X-Imsidecar-Timeout": "300ms"}))[0] == 429
    assert (await post(http, running.base + MESSAGES, {"receive_id": "oc_1"}))[0] == 400   # 230001 bad params
    status, _, headers = await post(http, running.base + MESSAGES, {"text": "x" * 2048})
    assert (status, headers["X-Imsidecar-Error"]) == (413, "RequestTooLarge")
    assert (await post(http, running.base + MESSAGES, message))[0] == 200
    assert by_outcome(running, "sales-bot", "open") == {
        ("throttled", "4xx"): 1, ("client_error", "4xx"): 2, ("success", "2xx"): 1}
    assert running.metric("imsidecar_sidecar_errors_total", app="sales-bot", upstream="open",
                          error="RequestTooLarge") == 1


async def test_an_unreachable_platform_is_the_sidecars_error_and_its_local_429_is_throttling(
        start_sidecar, aiohttp_server, http: aiohttp.ClientSession) -> None:
    closed = await aiohttp_server(web.Application())
    url = str(closed.make_url("")).rstrip("/")
    await closed.close()   # nothing listens there any more: every connect is refused
    running = await start_sidecar(extra=f"""
  - name: gone
    platform: dingtalk
    app_key: ding_gone
    app_secret: gone-secret-0123456789
    upstreams: {{oapi: {{base_url: "{url}"}}, api: {{base_url: "{url}"}}}}
    expose: [{{upstream: oapi, prefix: /gone}}]
""", ratelimit="{per_second: 1}")
    status, _, headers = await post(http, running.base + "/gone/topapi/v2/user/get", {"userid": "u"})
    assert status in (502, 503) and headers["X-Imsidecar-Error"] in client_facing_kinds()
    answers = [await post(http, running.base + USER_GET, {"userid": "manager001"}, **{"X-Imsidecar-Timeout": "200ms"})
               for _ in range(2)]
    assert [a[0] for a in answers] == [200, 429]   # one slot a second: the second has no slot before its deadline
    assert by_outcome(running, "gone", "oapi") == {("sidecar_error", f"{status // 100}xx"): 1}
    assert by_outcome(running, "ops-ding", "oapi") == {("success", "2xx"): 1, ("throttled", "4xx"): 1}
    assert running.metric("imsidecar_sidecar_errors_total", app="ops-ding", upstream="oapi",
                          error="LocallyRateLimited") == 1


async def test_a_retry_the_limiter_refuses_is_not_counted_as_sent(
        start_sidecar, platforms: Platforms, http: aiohttp.ClientSession) -> None:
    running = await start_sidecar(ratelimit="{per_second: 1}")
    platforms.dingtalk.faults.script.append("busy")   # -1: retryable, but the retry has no limiter slot in 300 ms
    status, body, headers = await post(http, running.base + USER_GET, {"userid": "manager001"},
                                       **{"X-Imsidecar-Timeout": "300ms"})
    assert (status, body["errcode"], headers["X-Imsidecar-Attempts"]) == (200, -1, "1")
    assert running.metric("imsidecar_retries_total", app="ops-ding", upstream="oapi", reason="code_-1") == 0
    assert by_outcome(running, "ops-ding", "oapi") == {("platform_error", "2xx"): 1}

    platforms.dingtalk.faults.script.append("busy")   # with a slot a second later: retried, and counted once
    status, body, headers = await post(http, running.base + USER_GET, {"userid": "manager001"})
    assert (status, body["errcode"], headers["X-Imsidecar-Attempts"]) == (200, 0, "2")
    assert running.metric("imsidecar_retries_total", app="ops-ding", upstream="oapi", reason="code_-1") == 1


@pytest.mark.parametrize("verdict, sidecar_token, expected", [
    (Verdict(Outcome.SUCCESS, "ok", Signal.OK), True, SUCCESS),
    (Verdict(Outcome.RETRYABLE, "code_-1", Signal.SERVER_ERROR, processed=False), True, PLATFORM_ERROR),
    (Verdict(Outcome.THROTTLED, "code_90018", Signal.THROTTLED, processed=False), True, THROTTLED),
    (Verdict(Outcome.PERMANENT, "code_90006", Signal.THROTTLED), True, THROTTLED),   # a temporary ban for rate
    (Verdict(Outcome.PERMANENT, "code_99991672", Signal.OK), True, CLIENT_ERROR),   # scope missing
    (Verdict(Outcome.TOKEN_INVALID, "code_99991668", Signal.OK), False, CLIENT_ERROR),   # the caller's user token
    (Verdict(Outcome.TOKEN_INVALID, "code_99991663", Signal.OK), True, PLATFORM_ERROR),  # the sidecar's, refreshed
])
def test_the_class_of_a_platform_answer(verdict: Verdict, sidecar_token: bool, expected: str) -> None:
    assert outcome_class(verdict, sidecar_token) == expected in OUTCOME_CLASSES


async def test_known_series_exist_at_zero_and_no_created_series_is_served(
        sidecar: Running, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{sidecar.admin}/metrics") as r:
        text = await r.text()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    names = {name for name, _ in samples}
    assert not [n for n in names if n.endswith("_created")]
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
            "process_start_time_seconds", "python_info", "imsidecar_build_info"} <= names

    def value(name: str, **labels: str) -> float | None:
        return samples.get((name, tuple(sorted(labels.items()))))

    for app, upstream in (("sales-bot", "open"), ("ops-ding", "oapi"), ("ops-ding", "api")):
        assert value("imsidecar_retry_budget_exhausted_total", app=app, upstream=upstream) == 0
        assert value("imsidecar_deadline_exceeded_total", app=app, upstream=upstream) == 0
        assert value("imsidecar_retries_total", app=app, upstream=upstream, reason="timeout") == 0
        assert value("imsidecar_retries_withheld_total", app=app, upstream=upstream, why="budget") == 0
        assert value("imsidecar_circuit_transitions_total", app=app, upstream=upstream, state="open") == 0
        assert value("imsidecar_sidecar_errors_total", app=app, upstream=upstream, error="CircuitOpen") == 0
    assert value("imsidecar_retries_total", app="sales-bot", upstream="open", reason="code_99991400") == 0
    assert value("imsidecar_retries_total", app="ops-ding", upstream="oapi", reason="code_90018") == 0
    assert value("imsidecar_retries_total", app="ops-ding", upstream="api",
                 reason="code_Forbidden.AccessDenied.QpsLimitForAppkeyAndApi") == 0
    for app, kind in (("sales-bot", "tenant"), ("ops-ding", "app")):
        assert value("imsidecar_token_refreshes_total", app=app, kind=kind, result="failure") == 0
        assert value("imsidecar_token_replays_total", app=app) == 0


def test_every_retried_reason_a_platform_names_is_one_it_prepares(platforms: Platforms) -> None:
    """The tables the series at zero come from cover what the classification and the network errors produce."""
    from proxy.errors import AttemptTimeout, ConnectFailure, ConnectionReset
    from proxy.platforms.dingtalk import DingTalk
    from tests.conftest import make_config

    cfg, _ = make_config(platforms)
    ding = DingTalk(next(a for a in cfg.apps if a.name == "ops-ding"))
    for error in (ConnectFailure, AttemptTimeout, ConnectionReset):
        assert error.verdict.reason in ding.retry_reasons("api")
    busy = ding.classify("oapi", 200, {}, b'{"errcode":-1,"errmsg":"busy"}')
    qps = ding.classify("api", 403, {}, b'{"code":"Forbidden.AccessDenied.QpsLimitForAppkeyAndApi","message":"x"}')
    gateway = ding.classify("oapi", 502, {}, b"<html>502</html>")
    assert busy.reason in ding.retry_reasons("oapi") and gateway.reason in ding.retry_reasons("oapi")
    assert qps.reason in ding.retry_reasons("api")
