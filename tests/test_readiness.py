"""/readyz: ready means this sidecar can serve; token and platform health are in its body, not in its verdict."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from proxy.clock import Clock, VirtualClock, settle
from proxy.config import ConfigError, loads
from proxy.readiness import AppHealth, Readiness, ReadinessSettings
from tests.conftest import Platforms, Running, SidecarFactory

MESSAGE = {"receive_id": "oc_1", "msg_type": "text", "content": '{"text":"hi"}'}


def health(token: str = "ok", attempted: bool = True) -> AppHealth:
    return AppHealth(token, attempted, 7000.0 if token == "ok" else 0.0, {"open": {"circuit": "closed"}})


def test_ready_needs_the_listeners_and_each_apps_first_token_attempt() -> None:
    readiness = Readiness(ReadinessSettings())
    assert readiness.judge(False, {"a": health()}).body["waiting_for"] == ["listeners"]
    waiting = readiness.judge(True, {"a": health(attempted=False), "b": health()})
    assert not waiting.ready and waiting.body["waiting_for"] == ["first token attempt: a"]
    refused = readiness.judge(True, {"a": health("no valid token: app_secret rejected")})
    assert refused.ready and refused.body["apps"]["a"]["token"] == "no valid token: app_secret rejected"


def test_wait_for_tokens_gates_start_up_only() -> None:
    readiness = Readiness(ReadinessSettings(wait_for_tokens=True))
    first = readiness.judge(True, {"a": health(), "b": health("no valid token: fetching")})
    assert not first.ready and first.body["waiting_for"] == ["a token (readiness.wait_for_tokens): b"]
    assert readiness.judge(True, {"a": health(), "b": health()}).ready
    assert readiness.judge(True, {"a": health("no valid token: outage"), "b": health()}).ready   # never unready again


def test_the_readiness_section() -> None:
    app = "apps: [{name: a, platform: feishu, app_id: i, app_secret: s}]\n"
    assert loads(app, env={}).readiness == ReadinessSettings()
    assert loads(app + "readiness: {wait_for_tokens: true}", env={}).readiness.wait_for_tokens
    with pytest.raises(ConfigError) as caught:
        loads(app + "readiness: {tokens: required}", env={})
    assert caught.value.problems == ["readiness.tokens: unknown key"]


async def readyz(http: aiohttp.ClientSession, running: Running) -> tuple[int, dict[str, Any]]:
    async with http.get(f"{running.admin}/readyz") as r:
        return r.status, await r.json()


async def until_ready(http: aiohttp.ClientSession, running: Running, rounds: int = 200) -> dict[str, Any]:
    for _ in range(rounds):
        status, body = await readyz(http, running)
        if status == 200:
            return body
        await asyncio.sleep(0.01)
    raise AssertionError(f"never ready: {body}")


async def test_not_ready_until_the_first_token_attempt_then_ready(start_sidecar: SidecarFactory, platforms: Platforms,
                                                                  http: aiohttp.ClientSession) -> None:
    platforms.feishu.token_delay = 0.3   # real seconds: the first attempt is still out when /readyz is asked
    running = await start_sidecar()
    for _ in range(40):   # DingTalk's fetch has no delay: wait for it (up to 0.2 s), not for Feishu's
        status, body = await readyz(http, running)
        if "first token attempt: ops-ding" not in body["waiting_for"]:
            break
        await asyncio.sleep(0.005)
    assert status == 503 and body["waiting_for"] == ["first token attempt: sales-bot"]
    body = await until_ready(http, running)
    assert body["apps"]["sales-bot"]["token"] == "ok" and body["apps"]["sales-bot"]["token_expires_in"] > 7000
    assert running.metric("imsidecar_token_expiry_seconds", app="sales-bot", kind="tenant") > 7000
    assert body["apps"]["ops-ding"]["upstreams"] == {"oapi": {"circuit": "closed", "network": "healthy"},
                                                     "api": {"circuit": "closed", "network": "healthy"}}


async def test_the_summary_says_the_same_verdict_without_each_apps_report(
        start_sidecar: SidecarFactory, platforms: Platforms, http: aiohttp.ClientSession) -> None:
    platforms.feishu.token_delay = platforms.dingtalk.token_delay = 0.3   # real seconds: both attempts are still
    running = await start_sidecar()                                        # out when /readyz is asked
    async with http.get(f"{running.admin}/readyz?verbose=0") as r:
        assert r.status == 503
        assert await r.json() == {"ready": False,
                                  "waiting_for": ["first token attempt: sales-bot", "first token attempt: ops-ding"]}
    await until_ready(http, running)
    async with http.get(f"{running.admin}/readyz?verbose=0") as r:
        assert r.status == 200 and await r.json() == {"ready": True, "waiting_for": []}
    status, body = await readyz(http, running)   # the full report is still the default
    assert status == 200 and body["apps"]["sales-bot"]["token"] == "ok"


async def test_wrong_credentials_are_reported_without_taking_the_pod_out(
        start_sidecar: SidecarFactory, platforms: Platforms, http: aiohttp.ClientSession) -> None:
    platforms.feishu.apps["cli_test"] = "rotated"
    running = await start_sidecar()
    body = await until_ready(http, running)
    assert "app_id or app_secret rejected" in body["apps"]["sales-bot"]["token"]
    assert body["apps"]["ops-ding"]["token"] == "ok"


async def test_the_old_token_gate_is_an_opt_in(start_sidecar: SidecarFactory, platforms: Platforms,
                                               http: aiohttp.ClientSession) -> None:
    platforms.feishu.apps["cli_test"] = "rotated"
    running = await start_sidecar(extra="\nreadiness: {wait_for_tokens: true}\n")
    for _ in range(50):   # every app's attempt is made; the gate still holds
        status, body = await readyz(http, running)
        if body["waiting_for"] == ["a token (readiness.wait_for_tokens): sales-bot"]:
            break
        await asyncio.sleep(0.01)
    assert status == 503 and body["waiting_for"] == ["a token (readiness.wait_for_tokens): sales-bot"]
    async with http.get(f"{running.admin}/readyz?verbose=0") as r:   # the summary holds the same gate
        assert r.status == 503 and (await r.json())["waiting_for"] == body["waiting_for"]


class TestTokenOutage:
    @pytest.fixture
    def clock(self) -> Clock:
        return VirtualClock()

    async def test_a_platform_outage_longer_than_the_token_keeps_the_sidecar_ready(
            self, start_sidecar: SidecarFactory, platforms: Platforms, clock: VirtualClock,
            http: aiohttp.ClientSession) -> None:
        """The old /readyz turned 503 here, and with a native sidecar the whole pod left its Service."""
        running = await start_sidecar()
        await until_ready(http, running)
        platforms.feishu.token_faults.rates["unavailable"] = 1.0   # Feishu's token endpoint answers 503 from now
        for _ in range(7300 // 300):
            await clock.advance(300)
            await asyncio.sleep(0.01)
        status, body = await readyz(http, running)
        assert status == 200 and body["ready"] is True
        assert body["apps"]["sales-bot"]["token"].startswith("no valid token")
        assert body["apps"]["sales-bot"]["token_expires_in"] == 0
        assert body["apps"]["ops-ding"]["token"] == "ok"   # the other app's token was refreshed as usual
        answer = await self.while_time_moves(clock, http.post(
            f"{running.base}/sales-bot/open-apis/im/v1/messages", json=MESSAGE))
        assert answer.status == 503 and answer.headers["X-Imsidecar-Error"] == "TokenUnavailableError"
        assert running.metric("imsidecar_token_expiry_seconds", app="sales-bot", kind="tenant") == 0

    @staticmethod
    async def while_time_moves(clock: VirtualClock, request: Any) -> aiohttp.ClientResponse:
        """The request's token fetch backs off in virtual time: keep time moving until it is answered."""
        task = asyncio.ensure_future(request)
        while not task.done():
            await clock.advance(1)
            await settle()
            await asyncio.sleep(0.005)
        response: aiohttp.ClientResponse = task.result()
        response.release()
        return response
