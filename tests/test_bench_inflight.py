"""bench.inflight's platform: it answers the token endpoint, so the proxies can start, and holds every other request."""

from __future__ import annotations

import asyncio

import pytest

from bench.inflight import hold


async def test_the_token_endpoint_is_answered_and_any_other_request_is_held() -> None:
    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /open-apis/auth/v3/tenant_access_token/internal HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 2\r\n\r\n{}")
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 OK")
        assert b"tenant_access_token" in await reader.read(200)
        writer.write(b"GET /open-apis/im/v1/messages/om_1 HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.2)   # held: no answer, the connection open
        writer.close()
    finally:
        server.close()
