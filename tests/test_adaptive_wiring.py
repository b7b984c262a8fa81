"""The adaptive stages in the forwarding path: breaker answers, network state and parameters exported, pins kept."""

from __future__ import annotations

import json

import aiohttp
import pytest

from proxy.clock import AutoClock, Clock
from proxy.config import RetrySettings
from proxy.fakes.faults import Faults
from proxy.retry import adaptive_settings
from tests.conftest import Platforms, SidecarFactory

MESSAGE = {"receive_id": "oc_1", "msg_type": "text", "content": json.dumps({"text": "hi"})}


def test_parameters_set_in_config_are_pinned_and_the_rest_adapt() -> None:
    settings = adaptive_settings(RetrySettings(per_try_timeout=2.0, pinned=frozenset({"per_try_timeout"})))
    assert settings.per_try_timeout == 2.0 and settings.backoff_base is None and settings.max_attempts is None


class TestBreaker:
    @pytest.fixture
    def clock(self) -> Clock:
        return AutoClock()

    async def test_a_down_upstream_gets_503_at_once_then_is_probed_back(
            self, start_sidecar: SidecarFactory, platforms: Platforms, clock: AutoClock,
            http: aiohttp.ClientSession) -> None:
        running = await start_sidecar(retry="{backoff_base: 1ms, backoff_cap: 5ms, per_try_timeout: 2s}")
        app = running.sidecar.config.apps[0]
        assert app.name == "sales-bot"
        platforms.feishu.faults = Faults(rates={"unavailable": 1.0})
        url = f"{running.base}/sales-bot/open-apis/bitable/v1/apps/bascnX/tables/tblY/records"
        for _ in range(20):   # the default breaker opens at half of 20 attempts failing
            async with http.get(url) as r:
                await r.read()
            if running.metric("imsidecar_circuit_state", app="sales-bot", upstream="open") == 2:
                break
        seen = len(platforms.feishu.requests)
        async with http.get(url) as r:
            body = await r.json()
            assert r.status == 503 and r.headers["X-Imsidecar-Error"] == "CircuitOpen"
            assert 1 <= int(r.headers["Retry-After"]) <= 4
        assert body["code"] == 9990513 and "recovers" in body["msg"]
        assert len(platforms.feishu.requests) == seen   # refused without touching the platform
        assert running.metric("imsidecar_circuit_state", app="sales-bot", upstream="open") == 2

        platforms.feishu.faults = Faults()   # the platform is back
        await clock.advance(4)
        async with http.get(url) as r:
            assert r.status == 200
        assert running.metric("imsidecar_circuit_state", app="sales-bot", upstream="open") == 0
        for state in ("open", "half_open", "closed"):
            assert running.metric("imsidecar_circuit_transitions_total", app="sales-bot", upstream="open",
                                  state=state) == 1

    async def test_requests_refused_by_the_breaker_use_no_rate_limit_slot(
            self, start_sidecar: SidecarFactory, platforms: Platforms, http: aiohttp.ClientSession) -> None:
        running = await start_sidecar(retry="{backoff_base: 1ms, backoff_cap: 5ms}", ratelimit="{per_second: 30}")
        platforms.feishu.faults = Faults(rates={"unavailable": 1.0})
        url = f"{running.base}/sales-bot/open-apis/bitable/v1/apps/bascnX/tables/tblY/records"
        for _ in range(20):
            async with http.get(url) as r:
                await r.read()
            if running.metric("imsidecar_circuit_state", app="sales-bot", upstream="open") == 2:
                break
        refusals = []
        for _ in range(40):   # more than the quota allows in a second: only the breaker may answer them
            async with http.get(url, headers={"X-Imsidecar-Timeout": "200ms"}) as r:
                refusals.append(r.headers.get("X-Imsidecar-Error"))
        assert set(refusals) == {"CircuitOpen"}

    async def test_circuit_breaker_counts_only_network_and_server_failures(
            self, start_sidecar: SidecarFactory, platforms: Platforms, http: aiohttp.ClientSession) -> None:
        running = await start_sidecar()
        for _ in range(10):   # application errors inside answers: the platform is working
            async with http.post(f"{running.base}/dingtalk/topapi/v2/user/get", json={"userid": "nobody"}) as r:
                assert (await r.json())["errcode"] == 60121
        assert running.metric("imsidecar_circuit_state", app="ops-ding", upstream="oapi") == 0


async def test_network_state_and_adaptive_parameters_are_exported(start_sidecar: SidecarFactory,
                                                                  http: aiohttp.ClientSession) -> None:
    running = await start_sidecar()
    async with http.post(f"{running.base}/sales-bot/open-apis/im/v1/messages", json=MESSAGE) as r:
        assert r.status == 200
    assert running.metric("imsidecar_network_state", app="sales-bot", upstream="open", state="healthy") == 1
    assert running.metric("imsidecar_network_state", app="sales-bot", upstream="open", state="down") == 0
    assert running.metric("imsidecar_adaptive_per_try_timeout_seconds", app="sales-bot", upstream="open") == 2.0
    assert running.metric("imsidecar_adaptive_max_attempts", app="sales-bot", upstream="open") == 3
