"""The Python floor for the overhead benchmark: an aiohttp reverse proxy that adds a bearer token and nothing else.

Run: python -m bench.naive_proxy LISTEN_PORT UPSTREAM_URL [--uvloop]
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
from aiohttp import web

HOP = {"connection", "keep-alive", "transfer-encoding", "host", "content-length"}


async def main(port: int, upstream: str) -> None:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))

    async def handle(request: web.BaseRequest) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        headers["Authorization"] = "Bearer t-naive"
        body = await request.read()
        async with session.request(request.method, upstream + request.path_qs, headers=headers, data=body) as r:
            payload = await r.read()
            out = {k: v for k, v in r.headers.items() if k.lower() not in HOP}
            return web.Response(status=r.status, headers=out, body=payload)

    runner = web.ServerRunner(web.Server(handle, access_log=None))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    if "--uvloop" in sys.argv:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
