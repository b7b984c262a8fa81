"""The sidecar's own rate limit in the forwarding path: waits inside the deadline, 429 at once past it, and slows
down when the platform throttles."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from proxy import config
from proxy.config import ConfigError
from proxy.ratelimit import Quota
from tests.conftest import Platforms, SidecarFactory

USER_GET = "/dingtalk/topapi/v2/user/get"


async def test_a_burst_over_the_quota_waits_or_fails_fast_in_the_platform_shape(
        start_sidecar: SidecarFactory, platforms: Platforms) -> None:
    running = await start_sidecar(ratelimit="{per_second: 5}")
    async with aiohttp.ClientSession() as http:
        async def call() -> tuple[int, dict]:
            async with http.post(running.base + USER_GET, json={"userid": "manager001"},
                                 headers={"X-Imsidecar-Timeout": "1500ms"}) as r:
                return r.status, await r.json()
        answers = await asyncio.gather(*(call() for _ in range(20)))
    passed = [b for s, b in answers if s == 200]
    refused = [b for s, b in answers if s == 429]
    assert len(passed) + len(refused) == 20
    assert 5 <= len(passed) <= 10          # the first second's five, and those whose slot came before the deadline
    assert refused and all(b["errcode"] == 9990429 for b in refused)
    assert len(platforms.dingtalk.calls) == len(passed)   # nothing refused reached the platform
    assert running.metric("imsidecar_ratelimit_rejections_total", app="ops-ding",
                          route="/topapi/v2/user/get") == len(refused)


async def test_the_limit_comes_down_after_the_platform_throttles(start_sidecar: SidecarFactory,
                                                                 platforms: Platforms) -> None:
    running = await start_sidecar(ratelimit="{per_second: 20}")
    platforms.dingtalk.faults.script.append("throttle")   # 90018: the per-app per-API QPS limit
    async with aiohttp.ClientSession() as http:
        async with http.post(running.base + USER_GET, json={"userid": "manager001"}) as r:
            assert r.status == 200   # retried after the platform's one second
    rate = running.metric("imsidecar_ratelimit_rate", app="ops-ding", route="/topapi/v2/user/get")
    assert 0 < rate < 20
    # no request was refused: the rejections series is there, at 0 (a dashboard's rate() needs it before the first)
    assert running.metric("imsidecar_ratelimit_rejections_total", app="ops-ding", route="/topapi/v2/user/get") == 0


async def test_only_requests_that_waited_for_a_slot_are_counted_as_waits(start_sidecar: SidecarFactory) -> None:
    running = await start_sidecar(ratelimit="{per_second: 5}")
    async with aiohttp.ClientSession() as http:
        for _ in range(5):   # the quota's first second: every slot free at once
            async with http.post(running.base + USER_GET, json={"userid": "manager001"}) as r:
                assert r.status == 200
        waits = {"app": "ops-ding", "route": "/topapi/v2/user/get"}
        assert running.metric("imsidecar_ratelimit_wait_seconds_count", **waits) == 0
        async with http.post(running.base + USER_GET, json={"userid": "manager001"}) as r:
            assert r.status == 200   # the sixth waits for the next second's slot
    assert running.metric("imsidecar_ratelimit_wait_seconds_count", **waits) == 1
    assert running.metric("imsidecar_ratelimit_wait_seconds_sum", **waits) > 0.1
    lane = {"app": "ops-ding", "lane": "interactive"}
    assert running.metric("imsidecar_priority_wait_seconds_count", **lane) == 6   # every request, in its lane


def test_route_quotas_are_read_from_config() -> None:
    c = config.loads("""
apps:
  - name: a
    platform: feishu
    app_id: i
    app_secret: s
    ratelimit:
      per_second: 40
      routes:
        /open-apis/im/v1/messages: {per_second: 5}
""", env={})
    assert c.apps[0].ratelimit.default == Quota(per_second=40)
    assert c.apps[0].ratelimit.routes["/open-apis/im/v1/messages"] == Quota(per_second=5)
    with pytest.raises(ConfigError) as caught:
        config.loads("apps: [{name: a, platform: feishu, app_id: i, app_secret: s, ratelimit: {per_second: 0}}]",
                     env={})
    assert any("apps[0].ratelimit: a quota must be positive" in p for p in caught.value.problems)
