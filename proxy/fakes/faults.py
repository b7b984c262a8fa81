"""Switchable faults for the fake platforms: scripted ones for exact tests, random ones for the demo and benchmarks.

Owns choosing a fault for a request; each fake decides what the fault looks like on its platform.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from dataclasses import dataclass, field

from aiohttp import web

# Before the platform acts: nothing was written. `throttle_400` is Feishu's older APIs' 99991400 on HTTP 400.
BEFORE = ("unavailable", "throttle", "throttle_400", "busy", "reset_before", "hang")
# After the platform acted: the write happened, but the client cannot know (500, a gateway's 504, a reset).
AFTER = ("error_after", "gateway_after", "reset_after")


@dataclass
class Faults:
    """`script` is consumed first, one fault per request; then each `rates` entry is drawn with its probability."""

    rates: dict[str, float] = field(default_factory=dict)
    script: deque[str | None] = field(default_factory=deque)
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    hang_seconds: float = 0.5
    latency: float = 0.0                  # real seconds every guarded request takes before it is handled...
    latency_spread: float = 0.0           # ...give or take up to this much, uniformly (800 ± 400 ms)
    enabled_paths: tuple[str, ...] = ()   # only requests whose path contains one of these (all when empty)

    def delay(self) -> float:
        """How long this request takes before it is handled."""
        if not self.latency_spread:
            return self.latency
        return max(0.0, self.latency + self.latency_spread * (2 * self.rng.random() - 1))

    def pick(self, path: str) -> str | None:
        if self.enabled_paths and not any(p in path for p in self.enabled_paths):
            return None
        if self.script:
            return self.script.popleft()
        roll = self.rng.random()
        for name, rate in self.rates.items():
            if roll < rate:
                return name
            roll -= rate
        return None


def drop_connection(request: web.Request) -> web.Response:
    """A connection reset: the transport is closed under the client's feet, no answer is written."""
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=204)


async def hang(faults: Faults) -> None:
    await asyncio.sleep(faults.hang_seconds)


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path_qs: str
    headers: dict[str, str]


def recorder(into: list[SeenRequest]):  # type: ignore[no-untyped-def]
    """Middleware that notes every request as it arrived, so tests can see what the sidecar sent."""
    @web.middleware
    async def record(request: web.Request, handler):  # type: ignore[no-untyped-def]
        into.append(SeenRequest(request.method, request.raw_path, dict(request.headers)))
        return await handler(request)
    return record


def finishing(app: web.Application) -> web.Application:
    """A platform finishes what it received though its caller hangs up: its gateway does not cancel the backend's
    work, so a write the caller abandoned (a timeout, a client gone, a shutdown) may still be applied. aiohttp's test
    server cancels a handler whose connection is lost instead, which would hide every bug of that kind; here each
    request's handling runs in a task of its own that a lost connection does not reach (cancelled only when the
    fake itself shuts down). A JSON body is read first, as the gateway buffers it whole before the backend sees it
    (an upload is left to stream to its handler)."""
    pending: set[asyncio.Task[web.StreamResponse]] = set()

    @web.middleware
    async def finish(request: web.Request, handler):  # type: ignore[no-untyped-def]
        if request.content_type == "application/json":
            await request.read()   # kept by aiohttp for the handler's request.json()
        work = asyncio.ensure_future(handler(request))
        pending.add(work)
        work.add_done_callback(pending.discard)
        return await asyncio.shield(work)

    async def stop(app: web.Application) -> None:
        for work in list(pending):
            work.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    app.middlewares.insert(0, finish)
    app.on_shutdown.append(stop)
    return app

