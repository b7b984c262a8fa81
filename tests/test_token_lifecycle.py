"""Tokens end to end through the sidecar: cold start, lifetimes in virtual time, revocation, bad credentials."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import pytest

from proxy.clock import Clock, VirtualClock, settle
from tests.conftest import DING_SECRET, FEISHU_SECRET, Platforms, Running, SidecarFactory

MESSAGE = {"receive_id": "oc_1", "msg_type": "text", "content": json.dumps({"text": "hi"})}


async def feishu_send(http: aiohttp.ClientSession, running: Running) -> int:
    async with http.post(f"{running.base}/sales-bot/open-apis/im/v1/messages", json=MESSAGE) as r:
        return (await r.json())["code"]


async def ding_get(http: aiohttp.ClientSession, running: Running) -> int:
    async with http.post(f"{running.base}/dingtalk/topapi/v2/user/get", json={"userid": "manager001"}) as r:
        return (await r.json())["errcode"]


async def test_cold_start_of_a_thousand_requests_makes_one_token_call_per_app(
        start_sidecar: SidecarFactory, platforms: Platforms) -> None:
    platforms.feishu.token_delay = platforms.dingtalk.token_delay = 0.05
    running = await start_sidecar(ratelimit="{enabled: false}")   # 1,000 at once is far above any API quota
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        codes = await asyncio.gather(*(feishu_send(http, running) for _ in range(500)),
                                     *(ding_get(http, running) for _ in range(500)))
    assert set(codes) == {0}
    assert platforms.feishu.token_calls == 1
    assert platforms.dingtalk.token_calls == 1


class TestInVirtualTime:
    @pytest.fixture
    def clock(self) -> Clock:
        return VirtualClock()

    async def test_three_lifetimes_without_an_expired_token(self, start_sidecar: SidecarFactory, platforms: Platforms,
                                                            clock: VirtualClock, http: aiohttp.ClientSession) -> None:
        running = await start_sidecar()
        for _ in range(3 * 7200 // 120 + 5):
            await clock.advance(120)
            assert await feishu_send(http, running) == 0
            assert await ding_get(http, running) == 0
            await settle()
        assert platforms.feishu.expired_calls == [] and platforms.dingtalk.expired_calls == []
        # Feishu: a new token each lifetime; DingTalk: the same token, extended by every refresh.
        assert 3 <= platforms.feishu.token_calls <= 5
        assert len({t for t in platforms.feishu.tokens}) >= 3
        assert len({t for t in platforms.dingtalk.tokens}) == 1


async def test_revoked_token_is_refreshed_and_the_post_replayed_once(sidecar: Running, platforms: Platforms,
                                                                     http: aiohttp.ClientSession) -> None:
    assert await feishu_send(http, sidecar) == 0
    platforms.feishu.revoke("cli_test")
    async with http.post(f"{sidecar.base}/sales-bot/open-apis/im/v1/messages", json=MESSAGE) as r:
        body = await r.json()
        assert r.headers["X-Imsidecar-Attempts"] == "2"
        assert r.headers["X-Imsidecar-Retry-Reasons"] == "token_invalid"
    assert body["code"] == 0
    assert len(platforms.feishu.messages) == 2   # the refused attempt wrote nothing; the replay wrote once
    assert sidecar.metric("imsidecar_token_replays_total", app="sales-bot") == 1

    assert await ding_get(http, sidecar) == 0
    platforms.dingtalk.revoke("ding_test")
    async with http.get(f"{sidecar.api_base}/v1.0/contact/users/manager001") as r:   # the header-token host
        assert r.status == 200 and r.headers["X-Imsidecar-Retry-Reasons"] == "token_invalid"
    platforms.dingtalk.revoke("ding_test")
    assert await ding_get(http, sidecar) == 0                                        # the query-token host
    assert platforms.dingtalk.token_calls == 3


async def test_a_token_refused_twice_is_not_replayed_again(sidecar: Running, platforms: Platforms,
                                                           http: aiohttp.ClientSession) -> None:
    platforms.feishu.valid = lambda token: False  # type: ignore[method-assign]
    async with http.post(f"{sidecar.base}/sales-bot/open-apis/im/v1/messages", json=MESSAGE) as r:
        body = await r.json()
        assert r.headers["X-Imsidecar-Attempts"] == "2"
    assert body["code"] == 99991663   # the platform's own answer, after one replay


async def test_wrong_secret_is_said_plainly_in_the_platform_shape(start_sidecar: SidecarFactory, platforms: Platforms,
                                                                  http: aiohttp.ClientSession) -> None:
    platforms.feishu.apps["cli_test"] = "rotated"
    platforms.dingtalk.apps["ding_test"] = "rotated"
    running = await start_sidecar()
    async with http.post(f"{running.base}/sales-bot/open-apis/im/v1/messages", json=MESSAGE) as r:
        body = await r.json()
        assert r.status == 503
    assert body["code"] == 9990503
    assert "sales-bot" in body["msg"] and "app_secret rejected" in body["msg"]
    async with http.post(f"{running.base}/dingtalk/topapi/v2/user/get", json={}) as r:
        assert r.status == 503 and "app_key or app_secret rejected" in (await r.json())["errmsg"]
    async with http.get(f"{running.api_base}/v1.0/contact/users/x") as r:
        assert (await r.json())["code"] == "imsidecar.tokenUnavailable"
    async with http.get(f"{running.admin}/readyz") as r:   # reported there, without making the pod unready
        ready = await r.json()
        assert r.status == 200 and "rejected" in ready["apps"]["sales-bot"]["token"]


async def test_no_secret_or_token_reaches_logs_metrics_or_errors(start_sidecar: SidecarFactory, platforms: Platforms,
                                                                  http: aiohttp.ClientSession,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    running = await start_sidecar()
    assert await feishu_send(http, running) == 0
    assert await ding_get(http, running) == 0
    async with http.post(f"{running.base}/dingtalk/topapi/v2/user/get?access_token=app-own-secret-token", json={}) as r:
        assert r.status == 200   # an application's own stale token is replaced, and never logged
    platforms.feishu.revoke("cli_test")
    assert await feishu_send(http, running) == 0
    platforms.feishu.apps["cli_test"] = "rotated"
    platforms.feishu.revoke("cli_test")
    async with http.post(f"{running.base}/sales-bot/open-apis/im/v1/messages", json=MESSAGE) as r:
        error_text = await r.text()
    async with http.get(f"{running.admin}/metrics") as r:
        metrics_text = await r.text()
    issued = list(platforms.feishu.tokens) + list(platforms.dingtalk.tokens) + list(platforms.feishu.current.values())
    assert issued
    for secret in [FEISHU_SECRET, DING_SECRET, "rotated", "app-own-secret-token", *issued]:
        assert secret not in caplog.text
        assert secret not in metrics_text
        assert secret not in error_text
    assert "access" in {r.name.split(".")[-1] for r in caplog.records}   # the access log did run


async def test_a_large_upload_refused_for_a_stale_token_still_drops_that_token(
        start_sidecar: SidecarFactory, platforms: Platforms, http: aiohttp.ClientSession) -> None:
    """Too large to replay, so the refused upload itself fails; but the next one gets a new token, without any
    small call in between to notice the revocation."""
    running = await start_sidecar(limits="{deadline: 5s, replay_buffer_bytes: 1KiB}")
    upload = f"{running.base}/sales-bot/open-apis/im/v1/files"
    async with http.post(upload, data=b"z" * 4096) as r:
        assert r.status == 200
    platforms.feishu.revoke("cli_test")
    async with http.post(upload, data=b"z" * 4096) as r:
        assert (await r.json())["code"] == 99991663 and r.headers["X-Imsidecar-Attempts"] == "1"
        assert r.headers["X-Imsidecar-Outcome"] == "not-applied"
    async with http.post(upload, data=b"z" * 4096) as r:
        assert r.status == 200 and (await r.json())["code"] == 0
    assert platforms.feishu.token_calls == 2


@pytest.mark.parametrize("authorization", [
    "Bearer eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJvdV91c2VyIn0.c2lnbmF0dXJl",   # a JWT user_access_token
    "bearer u-user-token",                                                # any scheme case
    "Bearer a-an-app-token-the-caller-holds",
])
async def test_any_authorization_that_is_not_the_placeholder_passes_through_untouched(
        sidecar: Running, platforms: Platforms, http: aiohttp.ClientSession, authorization: str) -> None:
    async with http.post(f"{sidecar.base}/sales-bot/open-apis/im/v1/messages", json=MESSAGE,
                         headers={"Authorization": authorization}) as r:
        await r.read()
    seen = [req for req in platforms.feishu.requests if req.path_qs == "/open-apis/im/v1/messages"]
    assert seen[-1].headers["Authorization"] == authorization    # never swapped for the app's tenant token
    assert platforms.feishu.calls[-1][1] != "t"


@pytest.mark.parametrize("placeholder", ["Bearer t-imsidecar-managed", "BEARER  t-imsidecar-managed", "", "Bearer"])
async def test_the_placeholder_in_any_case_or_no_token_gets_the_apps_token(
        sidecar: Running, platforms: Platforms, http: aiohttp.ClientSession, placeholder: str) -> None:
    async with http.post(f"{sidecar.base}/sales-bot/open-apis/im/v1/messages", json=MESSAGE,
                         headers={"Authorization": placeholder} if placeholder else {}) as r:
        assert (await r.json())["code"] == 0
    assert platforms.feishu.calls[-1][1:] == ("t", True)


async def test_start_up_fetches_many_apps_tokens_a_few_at_a_time_and_every_app_is_warmed(aiohttp_server) -> None:
    """1,000 apps fetching at one instant opened 1,000 connections to the token endpoint and kept them all."""
    from aiohttp import web
    from aiohttp.test_utils import unused_port
    from prometheus_client import CollectorRegistry

    from proxy import config
    from proxy.app import WARM_UP_AT_ONCE, Sidecar

    in_flight, most, fetched = 0, 0, set()
    apps_count = 3 * WARM_UP_AT_ONCE

    async def token(request: web.Request) -> web.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.005)
        in_flight -= 1
        fetched.add((await request.json())["app_id"])
        return web.json_response({"code": 0, "msg": "ok", "tenant_access_token": "t-x", "expire": 7200})

    platform = web.Application()
    platform.router.add_post("/open-apis/auth/v3/tenant_access_token/internal", token)
    server = await aiohttp_server(platform)
    apps = "\n".join(f"  - {{name: a{i}, platform: feishu, app_id: cli_{i}, app_secret: s, "
                     f"upstreams: {{open: {{base_url: \"{server.make_url('')}\"}}}}}}" for i in range(apps_count))
    sidecar = Sidecar(config.loads(f"listen: 127.0.0.1:{unused_port()}\nadmin_listen: 127.0.0.1:{unused_port()}\n"
                                   f"apps:\n{apps}\n", env={}), registry=CollectorRegistry())
    await sidecar.start()
    try:
        for _ in range(400):
            if sidecar.readiness().ready:   # every app's first token attempt has finished
                break
            await asyncio.sleep(0.01)
        report = sidecar.readiness()
        assert report.ready and {app["token"] for app in report.body["apps"].values()} == {"ok"}
    finally:
        await sidecar.stop()
    assert fetched == {f"cli_{i}" for i in range(apps_count)}
    assert 1 < most <= WARM_UP_AT_ONCE
