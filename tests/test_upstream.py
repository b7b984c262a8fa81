"""The upstream client: what it sends to the platform besides the client's own request, and what it keeps."""

from __future__ import annotations

from typing import Awaitable, Callable

from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from proxy.upstream import UpstreamClient


async def test_a_cookie_the_platform_sets_is_relayed_and_never_replayed_by_the_sidecar(
        aiohttp_server: Callable[..., Awaitable[TestServer]]) -> None:
    seen: list[str | None] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Cookie"))
        response = web.json_response({"code": 0})
        response.set_cookie("session", "client-a-secret")
        return response

    app = web.Application()
    app.router.add_get("/open-apis/x", handler)
    server = await aiohttp_server(app)
    # By name, as a platform is reached: aiohttp's jar would keep no cookie of a bare IP address.
    client = UpstreamClient(f"http://localhost:{server.port}", connect_timeout=1)
    try:
        first = await client.send("GET", "/open-apis/x", CIMultiDict(), None, 5.0)
        assert "client-a-secret" in first.headers.getone("Set-Cookie")   # the client that asked gets it
        await client.send("GET", "/open-apis/x", CIMultiDict(), None, 5.0)   # another client's call
        await client.send("GET", "/open-apis/x", CIMultiDict({"Cookie": "own=1"}), None, 5.0)
    finally:
        await client.close()
    assert seen == [None, None, "own=1"]   # only what a client itself sent, never a cookie the sidecar kept
