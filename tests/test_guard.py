"""Nothing a stage does can stop forwarding: guarded stages fail open, are counted and logged once; a bug in the
pipeline itself still answers in the platform's shape."""

from __future__ import annotations

import json
import logging
from typing import Any, NoReturn

import aiohttp
import pytest

from proxy.breaker import CircuitBreaker
from proxy.budget import RetryBudget
from proxy.clock import AutoClock, Clock
from proxy.metrics import FastHistogram
from proxy.network import NetworkMonitor
from proxy.pipeline import Pipeline
from proxy.ratelimit import AdaptiveRateLimiter
from tests.conftest import Platforms, Running, SidecarFactory

MESSAGE = {"receive_id": "oc_1", "msg_type": "text", "content": json.dumps({"text": "hi"})}
MESSAGES = "/sales-bot/open-apis/im/v1/messages?receive_id_type=chat_id"


@pytest.fixture
def clock() -> Clock:
    return AutoClock()


def boom(*args: Any, **kwargs: Any) -> NoReturn:
    raise ZeroDivisionError("float division by zero")


async def boom_async(*args: Any, **kwargs: Any) -> NoReturn:
    raise ZeroDivisionError("float division by zero")


async def send(http: aiohttp.ClientSession, running: Running) -> tuple[int, dict[str, Any]]:
    async with http.post(running.base + MESSAGES, json=MESSAGE) as r:
        return r.status, await r.json()


def failures(running: Running, stage: str) -> float:
    return running.metric("imsidecar_stage_failures_total", stage=stage)


async def test_three_timeouts_then_quiet_the_app_still_forwards(start_sidecar: SidecarFactory, platforms: Platforms,
                                                                clock: AutoClock, http: aiohttp.ClientSession) -> None:
    # The reproduction: a timeout run outlives the window's timeouts. Whatever the monitor makes of
    # that, the next request must reach the platform.
    running = await start_sidecar(limits="{deadline: 50ms}", retry="{per_try_timeout: 50ms}")
    platforms.feishu.faults.hang_seconds = 1.0
    for _ in range(3):
        platforms.feishu.faults.script.append("hang")
        async with http.post(running.base + MESSAGES, json=MESSAGE) as r:
            assert r.status == 504
    await clock.advance(31)
    status, body = await send(http, running)
    assert status == 200 and body["code"] == 0
    assert len(platforms.feishu.messages) == 1


@pytest.mark.parametrize("stage, target, name", [
    ("monitor", NetworkMonitor, "record"),
    ("monitor", NetworkMonitor, "retry_params"),
    ("breaker", CircuitBreaker, "allow"),
    ("breaker", CircuitBreaker, "record"),
    ("limiter", AdaptiveRateLimiter, "take_free"),   # the free slot at once: what most requests call
    ("limiter", AdaptiveRateLimiter, "acquire"),     # the wait for one (take_free says none is free)
    ("limiter", AdaptiveRateLimiter, "on_success"),
    ("budget", RetryBudget, "record_request"),
    ("metrics", FastHistogram, "observe"),
])
async def test_a_failing_stage_fails_open_is_counted_and_logged_once(
        start_sidecar: SidecarFactory, platforms: Platforms, http: aiohttp.ClientSession,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, stage: str, target: type, name: str) -> None:
    running = await start_sidecar(retry="{adaptive: true, backoff_base: 1ms}")
    monkeypatch.setattr(target, name, boom_async if name == "acquire" else boom)
    if name == "acquire":
        monkeypatch.setattr(target, "take_free", lambda self: False)
    caplog.set_level(logging.ERROR, logger="imsidecar.guard")
    for _ in range(3):
        status, body = await send(http, running)
        assert status == 200 and body["code"] == 0
    assert len(platforms.feishu.messages) == 3
    assert failures(running, stage) >= 3
    lines = [r for r in caplog.records if r.name == "imsidecar.guard"]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert stage in lines[0].getMessage() and "ZeroDivisionError" in lines[0].getMessage()


async def test_a_failing_budget_withholds_the_retry_and_answers_with_the_platform(
        start_sidecar: SidecarFactory, platforms: Platforms, http: aiohttp.ClientSession,
        monkeypatch: pytest.MonkeyPatch) -> None:
    running = await start_sidecar()
    monkeypatch.setattr(RetryBudget, "try_spend", boom)
    platforms.feishu.faults.script.append("unavailable")
    async with http.post(running.base + MESSAGES, json=MESSAGE) as r:
        assert r.status == 503 and r.headers["X-Imsidecar-Attempts"] == "1"   # the platform's own 503
        assert "X-Imsidecar-Error" not in r.headers
    assert failures(running, "budget") == 1


async def test_metrics_are_still_served_when_the_monitor_fails(start_sidecar: SidecarFactory,
                                                               http: aiohttp.ClientSession,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    running = await start_sidecar()
    monkeypatch.setattr(NetworkMonitor, "snapshot", boom)
    monkeypatch.setattr(NetworkMonitor, "state", property(boom))
    async with http.get(running.admin + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    assert 'imsidecar_network_state{app="sales-bot",state="healthy",upstream="open"} 1.0' in text


async def test_a_bug_inside_a_request_gets_a_platform_shaped_500_counted_and_logged(
        start_sidecar: SidecarFactory, platforms: Platforms, http: aiohttp.ClientSession,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    running = await start_sidecar()
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(type(running.sidecar.router.resolve(running.sidecar.config.listen, "/dingtalk").target.platform),
                        "classify", boom)
    async with http.post(f"{running.base}/dingtalk/topapi/v2/user/get", json={"userid": "manager001"}) as r:
        assert r.status == 500 and r.headers["X-Imsidecar-Error"] == "InternalError"
        body = await r.json()
    assert body["errcode"] == 9990500 and "failure is logged" in body["errmsg"]
    assert running.metric("imsidecar_requests_total", app="ops-ding", upstream="oapi", route="/topapi/v2/user/get",
                          method="POST", status_class="5xx", outcome="sidecar_error") == 1
    assert running.metric("imsidecar_sidecar_errors_total", app="ops-ding", upstream="oapi", error="InternalError") == 1
    assert failures(running, "pipeline") == 1
    access = [r for r in caplog.records if r.name == "imsidecar.access"]
    assert access and " 500 " in access[-1].getMessage()


async def test_a_bug_before_routing_still_gets_json(start_sidecar: SidecarFactory, http: aiohttp.ClientSession,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    running = await start_sidecar()
    monkeypatch.setattr(Pipeline, "start", boom)
    async with http.get(f"{running.api_base}/v1.0/contact/users/manager001") as r:   # DingTalk api's own port
        assert r.status == 500 and r.headers["X-Imsidecar-Error"] == "InternalError"
        body = await r.json()
    assert body["code"] == "imsidecar.internalError" and "message" in body
    assert failures(running, "pipeline") == 1
