"""Shared set-up for the events tests: virtual time, a fresh registry, a fake application, event stores (memory,
the SQLite journal, a real Redis) and delivery lanes to the application.

Owns fixtures and helpers only (a test module imports the fixtures it uses by name); what each test checks stays
in its own file. These override tests/conftest.py's `clock` (a SystemClock) where imported.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from aiohttp.web import Application
from prometheus_client import CollectorRegistry

from proxy.clock import Clock, VirtualClock
from proxy.events.delivery import Delivery
from proxy.events.journal import Journal
from proxy.events.metrics import EventMetrics
from proxy.events.queue import EventStore
from proxy.events.queue_memory import MemoryEventStore
from proxy.events.settings import DeliverySettings
from proxy.fakes.events import FakeApplication
from proxy.store import StoreSettings
from tests.redis_support import running_redis

ServerFactory = Callable[[Application], Awaitable[TestServer]]
LaneFactory = Callable[..., Delivery]


async def serve(aiohttp_server: ServerFactory, app: Application, path: str = "") -> str:
    """Run `app` on a loopback test server; its URL at `path` (with no trailing slash for the bare origin)."""
    return str((await aiohttp_server(app)).make_url(path)).rstrip("/")


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> EventMetrics:
    return EventMetrics(registry)


@pytest.fixture
async def fake_app(aiohttp_server: ServerFactory) -> FakeApplication:
    fake = FakeApplication()
    fake.url = await serve(aiohttp_server, fake.app(), "/events")  # type: ignore[attr-defined]
    return fake


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """The sidecar's outbound session; closed after every lane and client built on it."""
    async with aiohttp.ClientSession() as client_session:
        yield client_session


class Runnable(Protocol):
    def start(self) -> None: ...

    async def close(self) -> None: ...


R = TypeVar("R", bound=Runnable)


@pytest.fixture
async def started(session: aiohttp.ClientSession) -> AsyncIterator[Callable[[R], R]]:
    """`started(lane_or_client)`: start it now, close it at teardown, the last started first (stream clients
    before the lanes they feed), and all of them before the session closes."""
    running: list[Runnable] = []

    def start(runnable: R) -> R:
        runnable.start()
        running.append(runnable)
        return runnable

    yield start
    for runnable in reversed(running):
        await runnable.close()


@asynccontextmanager
async def open_store(kind: str, clock: Clock, workdir: Path, **options: Any) -> AsyncIterator[EventStore]:
    """A started event store of `kind` (memory, journal, redis), closed after; redis starts a redis-server of its own
    (skipped where none is installed, failed in CI)."""
    if kind == "redis":
        async with running_redis(workdir) as server:
            from proxy.events.redis_stream import RedisEventStore
            store: EventStore = RedisEventStore(StoreSettings(backend="redis", url=server.url), clock, 100,
                                                poll_interval=options.pop("poll_interval", 0.05), **options)
            await store.start()
            try:
                yield store
            finally:
                await store.close()
        return
    store = MemoryEventStore(clock, 100) if kind == "memory" else Journal(str(workdir / "events.db"), clock, 100)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def memory_store(clock: VirtualClock, tmp_path: Path) -> AsyncIterator[EventStore]:
    async with open_store("memory", clock, tmp_path) as store:
        yield store


@pytest.fixture(params=["memory", "journal", "redis"])
async def any_store(request: pytest.FixtureRequest, clock: VirtualClock, tmp_path: Path) -> AsyncIterator[EventStore]:
    async with open_store(request.param, clock, tmp_path) as store:
        yield store


@pytest.fixture(params=["journal", "redis"])
async def durable_store(request: pytest.FixtureRequest, clock: VirtualClock,
                        tmp_path: Path) -> AsyncIterator[EventStore]:
    async with open_store(request.param, clock, tmp_path) as store:
        yield store


@pytest.fixture
def make_lane(fake_app: FakeApplication, session: aiohttp.ClientSession, metrics: EventMetrics,
              clock: VirtualClock, memory_store: EventStore, started: Callable[[Delivery], Delivery]) -> LaneFactory:
    """`make_lane(app, rng, store=..., **delivery_settings)`: a delivery lane to the fake application (on the
    memory store unless given one), started (and closed at teardown) unless start=False."""

    def make(name: str, rng: random.Random | None = None, *, start: bool = True, store: EventStore | None = None,
             **overrides: Any) -> Delivery:
        settings = DeliverySettings(url=fake_app.url, **overrides)  # type: ignore[attr-defined]
        lane = Delivery(name, settings, store or memory_store, session, metrics, clock, rng, lease_interval=1.0)
        return started(lane) if start else lane

    return make


async def advance_until(clock: VirtualClock, condition: Callable[[], object], step: float = 1.0, rounds: int = 200,
                        what: str = "not reached in virtual time") -> None:
    """Move virtual time on by `step` until `condition` holds, checking up to `rounds` times; real I/O gets a
    millisecond between steps."""
    for _ in range(rounds):
        if condition():
            return
        await clock.advance(step)
        await asyncio.sleep(0.001)
    raise AssertionError(what)
