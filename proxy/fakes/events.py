"""Fake event sources and a fake application: an HTTP pusher that encrypts and signs like Feishu and DingTalk,
websocket gateways that ping, redeliver, split and drop, and an app that records what reached it.

Owns test doubles only; production code never imports it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class FakeApplication:
    """The intranet application: records every event body it accepts; `fail_next` makes it answer 503 first."""

    received: list[dict] = field(default_factory=list)
    fail_next: int = 0
    status_when_failing: int = 503
    seen_headers: list[dict[str, str]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        application = web.Application()
        application.router.add_post("/events", self._handle)
        return application

    async def _handle(self, request: web.Request) -> web.Response:
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.json_response({"error": "busy"}, status=self.status_when_failing)
        self.received.append(await request.json())
        self.seen_headers.append(dict(request.headers))
        self.arrived.set()
        return web.json_response({"ok": True})


async def wait_for(condition: Callable[[], bool], rounds: int = 500) -> None:
    """Yield to real I/O until `condition` holds; each round is at most a millisecond, never seconds."""
    for _ in range(rounds):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"condition not reached: {condition.__code__.co_firstlineno}")


def event_json(**fields: object) -> bytes:
    return json.dumps(fields).encode()
