"""Forwarding through the sidecar against the fake platforms: what an application sees."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
from typing import Any, AsyncIterator

import aiohttp
from aiohttp import web
from aiohttp.test_utils import unused_port
from prometheus_client import CollectorRegistry
from yarl import URL

from proxy import config
from proxy.app import Sidecar
from proxy.upstream import CLASSIFY_LIMIT
from tests.conftest import Platforms, Running

MESSAGE = {"receive_id": "oc_1", "msg_type": "text", "content": json.dumps({"text": "hi"})}


async def test_feishu_call_gets_tenant_token_and_platform_answer_unchanged(sidecar: Running, platforms: Platforms,
                                                                            http: aiohttp.ClientSession) -> None:
    async with http.post(f"{sidecar.base}/sales-bot/open-apis/im/v1/messages?receive_id_type=chat_id", json=MESSAGE) as r:
        body = await r.json()
        assert r.status == 200
        assert r.headers["X-Imsidecar-Attempts"] == "1"
    assert body["code"] == 0 and body["data"]["message_id"].startswith("om_")
    assert platforms.feishu.messages[0]["receive_id"] == "oc_1"
    assert platforms.feishu.calls == [("/open-apis/im/v1/messages", "t", True)]


async def test_dingtalk_token_goes_in_query_on_oapi_and_header_on_api(sidecar: Running, platforms: Platforms,
                                                                       http: aiohttp.ClientSession) -> None:
    async with http.post(f"{sidecar.base}/dingtalk/topapi/v2/user/get", json={"userid": "manager001"}) as r:
        assert (await r.json())["result"]["name"] == "Zhang San"
    async with http.get(f"{sidecar.base}/dingtalk-api/v1.0/contact/users/manager001") as r:
        assert (await r.json())["nick"] == "Zhang San"
    async with http.get(f"{sidecar.api_base}/v1.0/contact/users/manager001") as r:   # the port of its own
        assert r.status == 200
    assert [ok for _, ok in platforms.dingtalk.calls] == [True, True, True]
    assert platforms.dingtalk.token_calls == 1   # one token serves both hosts


async def test_platform_error_inside_200_is_passed_back_as_is(sidecar: Running, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{sidecar.base}/dingtalk/topapi/v2/user/get", json={"userid": "nobody"}) as r:
        assert r.status == 200
        assert (await r.json()) == {"errcode": 60121, "errmsg": "找不到该用户"}


async def test_query_and_headers_reach_the_platform_unchanged(sidecar: Running, platforms: Platforms,
                                                               http: aiohttp.ClientSession) -> None:
    headers = {"X-Trace": "abc", "Connection": "keep-alive, X-Hop", "X-Hop": "drop-me", "X-Imsidecar-Timeout": "2s"}
    url = URL(f"{sidecar.base}/dingtalk/topapi/v2/user/get?lang=zh_CN&x=%2F1&access_token=stale", encoded=True)
    async with http.post(url,
                         json={"userid": "manager001"}, headers=headers) as r:
        assert r.status == 200
    seen = platforms.dingtalk.requests[-1]
    assert seen.path_qs.startswith("/topapi/v2/user/get?lang=zh_CN&x=%2F1&access_token=dt")
    assert seen.path_qs.count("access_token=") == 1
    assert seen.headers["X-Trace"] == "abc"
    assert "X-Hop" not in seen.headers and "X-Imsidecar-Timeout" not in seen.headers


async def test_unknown_prefix_is_404_and_never_forwarded(sidecar: Running, platforms: Platforms,
                                                        http: aiohttp.ClientSession) -> None:
    async with http.get(f"{sidecar.base}/elsewhere/open-apis/im/v1/messages") as r:
        body = await r.json()
        assert r.status == 404 and r.headers["X-Imsidecar-Error"] == "NoRoute"
    assert body["error"] == "imsidecar.noRoute"
    assert "/sales-bot" in body["prefixes"]
    # a prefix must match on a segment boundary
    async with http.get(f"{sidecar.base}/sales-bot-x/open-apis/im/v1/messages") as r:
        assert r.status == 404
    assert platforms.feishu.calls == []


async def test_user_token_passes_through_untouched(sidecar: Running, platforms: Platforms,
                                                   http: aiohttp.ClientSession) -> None:
    headers = {"Authorization": "Bearer u-user-token"}
    async with http.post(f"{sidecar.base}/sales-bot/open-apis/im/v1/messages", json=MESSAGE, headers=headers) as r:
        assert r.status == 200
    assert platforms.feishu.calls[-1][1] == "u"


async def test_sdk_token_calls_are_answered_locally_with_a_placeholder(sidecar: Running, platforms: Platforms,
                                                                       http: aiohttp.ClientSession) -> None:
    creds = {"app_id": "placeholder", "app_secret": "placeholder"}
    async with http.post(f"{sidecar.base}/sales-bot/open-apis/auth/v3/tenant_access_token/internal", json=creds) as r:
        body = await r.json()
    assert body["code"] == 0 and body["tenant_access_token"] == "t-imsidecar-managed"
    assert 7000 < body["expire"] <= 7200
    async with http.post(f"{sidecar.api_base}/v1.0/oauth2/accessToken", json={"appKey": "x", "appSecret": "y"}) as r:
        ding = await r.json()
    assert ding["accessToken"] == "imsidecar-managed"
    # the placeholder works as a token: the sidecar swaps in the real one
    headers = {"x-acs-dingtalk-access-token": ding["accessToken"]}
    async with http.get(f"{sidecar.api_base}/v1.0/contact/users/manager001", headers=headers) as r:
        assert r.status == 200
    assert platforms.feishu.token_calls == 1 and platforms.dingtalk.token_calls == 1


async def test_oversized_body_gets_413_in_the_platform_shape(start_sidecar, platforms: Platforms,  # type: ignore[no-untyped-def]
                                                             http: aiohttp.ClientSession) -> None:
    running = await start_sidecar(limits="{deadline: 5s, max_request_bytes: 1KiB, replay_buffer_bytes: 512B}")
    async with http.post(f"{running.base}/sales-bot/open-apis/im/v1/files", data=b"x" * 4096) as r:
        body = await r.json()
        assert r.status == 413
    assert body["code"] == 9990413 and "limit" in body["msg"]
    async with http.post(f"{running.base}/dingtalk/topapi/v2/user/get", data=b"x" * 4096) as r:
        assert (await r.json())["errcode"] == 9990413
    async with http.post(f"{running.api_base}/v1.0/robot/oToMessages/batchSend", data=b"x" * 4096) as r:
        assert (await r.json())["code"] == "imsidecar.requestTooLarge"
    assert platforms.feishu.calls == [] and platforms.dingtalk.calls == []


async def test_large_upload_and_download_stream_through(sidecar: Running, platforms: Platforms,
                                                        http: aiohttp.ClientSession) -> None:
    size = 9 * 1024 * 1024 + 17   # above the 4 MiB replay buffer: forwarded as a stream
    async with http.post(f"{sidecar.base}/sales-bot/open-apis/im/v1/files", data=b"y" * size) as r:
        body = await r.json()
    assert body["data"]["size"] == size
    async with http.get(f"{sidecar.base}/sales-bot/open-apis/im/v1/files/file_{size}") as r:
        assert r.status == 200 and r.content_length == size
        received = 0
        async for chunk in r.content.iter_chunked(1 << 16):
            received += len(chunk)
    assert received == size


async def test_admin_endpoints(sidecar: Running, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{sidecar.admin}/healthz") as r:
        assert r.status == 200
    await sidecar.sidecar.tokens["sales-bot"].default.get()
    await sidecar.sidecar.tokens["ops-ding"].default.get()
    async with http.get(f"{sidecar.admin}/readyz") as r:
        apps = (await r.json())["apps"]
        assert r.status == 200 and {name: app["token"] for name, app in apps.items()} == {"sales-bot": "ok",
                                                                                          "ops-ding": "ok"}
    async with http.get(f"{sidecar.admin}/metrics") as r:
        text = await r.text()
    assert "imsidecar_token_refreshes_total" in text and "imsidecar_build_info" in text


async def test_an_upstream_cannot_speak_for_the_sidecar(aiohttp_server, http: aiohttp.ClientSession) -> None:  # type: ignore[no-untyped-def]
    async def impostor(request: web.Request) -> web.Response:
        return web.json_response({"code": 0}, headers={"X-Imsidecar-Error": "CircuitOpen", "X-Imsidecar-Attempts": "9"})

    upstream = web.Application()
    upstream.router.add_route("*", "/{tail:.*}", impostor)
    async with sidecar_before(upstream, aiohttp_server) as base:
        async with http.get(f"{base}/open-apis/x", headers={"Authorization": "Bearer u-1"}) as r:
            assert "X-Imsidecar-Error" not in r.headers and r.headers["X-Imsidecar-Attempts"] == "1"


async def test_a_chunked_text_download_streams_past_the_classification_limit(aiohttp_server,  # type: ignore[no-untyped-def]
                                                                            http: aiohttp.ClientSession) -> None:
    """No Content-Length, a text type: read only up to the classification limit, then streamed. The platform here
    sends 2 MiB and then waits for the client to have received 1.5 MiB before sending the other 18 MiB: a sidecar
    that read the whole answer before relaying would never get there."""
    block, received_enough = b"x" * 65536, asyncio.Event()

    async def download(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for i in range(320):   # 20 MiB
            if i == 32:
                await asyncio.wait_for(received_enough.wait(), 10)
            await response.write(block)
        await response.write_eof()
        return response

    upstream = web.Application()
    upstream.router.add_get("/open-apis/drive/v1/files/{token}/download", download)
    async with sidecar_before(upstream, aiohttp_server) as base:
        received = 0
        async with http.get(f"{base}/open-apis/drive/v1/files/boxcn1/download",
                            headers={"Authorization": "Bearer u-1"}) as r:
            assert r.status == 200 and r.headers["X-Imsidecar-Attempts"] == "1"
            async for chunk in r.content.iter_chunked(65536):
                received += len(chunk)
                if received >= CLASSIFY_LIMIT * 3 // 2:
                    received_enough.set()
        assert received == 320 * len(block)


@contextlib.asynccontextmanager
async def sidecar_before(upstream: web.Application, aiohttp_server: Any) -> AsyncIterator[str]:
    """A sidecar with one Feishu app `a` whose platform is `upstream`; yields the app's base URL."""
    server = await aiohttp_server(upstream)
    listen, admin = unused_port(), unused_port()
    sidecar = Sidecar(config.loads(f"""
listen: 127.0.0.1:{listen}
admin_listen: 127.0.0.1:{admin}
apps: [{{name: a, platform: feishu, app_id: i, app_secret: s, upstreams: {{open: {{base_url: "{server.make_url('')}"}}}}}}]
""", env={}), registry=CollectorRegistry())
    await sidecar.start()
    try:
        yield f"http://127.0.0.1:{listen}/a"
    finally:
        await sidecar.stop()


def _ours(thing: object) -> bool:
    """Made by the sidecar's own code (its fakes are the platforms'): an instance of its classes, or its frames."""
    code = getattr(thing, "f_code", None) or getattr(thing, "cr_code", None)
    where = code.co_filename if code is not None else type(thing).__module__ or ""
    return ("/proxy/" in where or where.startswith("proxy.")) and "fakes" not in where


async def test_the_forwarding_paths_make_no_cyclic_garbage(sidecar: Running, platforms: Platforms,
                                                          http: aiohttp.ClientSession) -> None:
    """The collector runs rarely (proxy/cli.py GC_THRESHOLDS): garbage only it can free must not come from requests."""
    url = f"{sidecar.base}/sales-bot/open-apis/im/v1/messages?receive_id_type=chat_id"
    async with http.post(url, json=MESSAGE) as r:   # warm: the token, metric children, pooled connections
        await r.read()
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)   # what the collector finds is kept in gc.garbage instead of freed
    try:
        for _ in range(3):
            async with http.post(url, json=MESSAGE) as r:   # answered
                await r.read()
            platforms.feishu.faults.script.extend(["unavailable"] * 5)   # failed at the platform, retried
            async with http.post(url, json=MESSAGE) as r:
                await r.read()
            async with http.post(url, json=MESSAGE, headers={"Connection": "close"}) as r:   # a connection each
                await r.read()
            platforms.feishu.faults.script.append("hang")
            gone = asyncio.create_task(http.post(url, json=MESSAGE))
            await asyncio.sleep(0.05)
            gone.cancel()   # the client gives up while the platform works
            await asyncio.gather(gone, return_exceptions=True)
        await asyncio.sleep(0.6)   # the hung calls end
        gc.collect()
        found = [type(thing).__name__ for thing in gc.garbage if _ours(thing)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert found == []
