"""Two replicas on one real redis-server: one delivers each app and one holds its long connection; duplicates
across replicas are caught; the lane and the connection move to the other replica on shutdown, on a crash (after
the lease TTL) and when the owner's application keeps failing.

Real time, with the durations scaled down so a test takes well under a second of waiting: lease TTL 300 ms
(10 s in production), back-off 10-50 ms, hand-over after 2 failed attempts and a 2 s cool-down.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
import lark_oapi.ws.pb.pbbp2_pb2  # noqa: F401 (the fake gateway's codec: imported now, not mid-test, where its
import pytest                      # seconds of import would stall the loop past the leases' 300 ms)
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.clock import SystemClock
from proxy.events.runtime import EventsRuntime
from proxy.events.settings import (
    DeliverySettings,
    EventApp,
    EventsSettings,
    FeishuEvents,
    Mode,
    Platform,
    QueueSettings,
    Secret,
    StreamSettings,
)
from proxy.fakes.events import FakeApplication, FakeFeishuGateway, FeishuPusher
from proxy.store import StoreSettings
from tests.events_support import serve
from tests.redis_support import RedisServer, running_redis

QUEUE = QueueSettings(backend="redis", lease_ttl=0.3, poll_interval=0.02)
DELIVERY = dict(backoff_base=0.01, backoff_cap=0.05, attempt_timeout=1.0, handover_after=2, handover_cooldown=2.0)


async def until(condition: Callable[[], object], bound: float = 10.0, what: str = "condition") -> None:
    give_up = time.monotonic() + bound
    while not condition():
        assert time.monotonic() < give_up, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


@dataclass
class Replica:
    name: str
    runtime: EventsRuntime
    application: FakeApplication
    base: str              # its callback listener
    registry: CollectorRegistry

    def held(self, role: str, app: str = "fs") -> bool:
        return self.registry.get_sample_value("imsidecar_events_lease_held", {"app": app, "role": role}) == 1


@pytest.fixture
async def redis(tmp_path) -> AsyncIterator[RedisServer]:
    async with running_redis(tmp_path) as server:
        yield server


@pytest.fixture
async def replicas(redis, aiohttp_server) -> AsyncIterator[Callable[..., object]]:
    """`await replica(name, stream_domain=None)`: a replica's events runtime, its own application and listener."""
    session = aiohttp.ClientSession()
    made: list[Replica] = []

    async def replica(name: str, stream_domain: str | None = None) -> Replica:
        application = FakeApplication()
        url = await serve(aiohttp_server, application.app(), "/events")
        if stream_domain is None:
            app = EventApp("fs", Platform.FEISHU, Mode.HTTP, DeliverySettings(url=url, **DELIVERY),
                           callback_path="/events/fs",
                           feishu=FeishuEvents(app_id="cli_1", verification_token=Secret("vt")))
        else:
            app = EventApp("fs", Platform.FEISHU, Mode.STREAM, DeliverySettings(url=url, **DELIVERY),
                           feishu=FeishuEvents(app_id="cli_1", app_secret=Secret("sec"), domain=stream_domain),
                           stream=StreamSettings(endpoint_timeout=1.0))
        registry = CollectorRegistry()
        runtime = EventsRuntime(EventsSettings(None, (app,), QUEUE), StoreSettings(backend="redis", url=redis.url),
                                session, registry, SystemClock(), random.Random(name))
        web_app = web.Application()
        runtime.mount(web_app.router)
        await runtime.start()
        made.append(Replica(name, runtime, application, await serve(aiohttp_server, web_app), registry))
        return made[-1]

    yield replica
    for r in made:
        with contextlib.suppress(Exception):
            await r.runtime.close()
    await session.close()


async def push(http: aiohttp.ClientSession, replica: Replica, n: int, event_id: str | None = None) -> int:
    pusher = FeishuPusher("cli_1", "vt", "", now=time.time)
    body = pusher.envelope({"n": n}, event_id=event_id or f"ev-{n}")
    async with http.post(f"{replica.base}/events/fs", data=body, headers={"Content-Type": "application/json"}) as r:
        return r.status


def numbers(application: FakeApplication) -> list[int]:
    return [e["event"]["n"] for e in application.received]


async def test_two_replicas_never_deliver_one_event_twice_and_keep_the_order(replicas, http):
    a = await replicas("a")
    await until(lambda: a.held("deliver"), what="a to own delivery")
    b = await replicas("b")
    for n in range(20):
        first, second = (a, b) if n % 2 else (b, a)
        assert await push(http, first, n) == 200
        assert await push(http, second, n) == 200      # Feishu pushing the same event again, to the other replica
    await until(lambda: len(a.application.received) + len(b.application.received) >= 20)
    await asyncio.sleep(0.1)
    assert numbers(a.application) == list(range(20)) and b.application.received == []
    duplicates = sum(r.registry.get_sample_value("imsidecar_events_duplicates_dropped_total", {"app": "fs"})
                     for r in (a, b))
    assert duplicates == 20


async def test_a_replica_whose_application_keeps_failing_hands_delivery_over(replicas, http):
    a = await replicas("a")
    await until(lambda: a.held("deliver"))
    b = await replicas("b")
    a.application.down = True
    for n in range(5):
        assert await push(http, a, n) == 200
    await until(lambda: numbers(b.application) == list(range(5)), what="b to deliver everything")
    assert a.application.received == [] and not a.held("deliver")
    assert a.registry.get_sample_value("imsidecar_events_lease_handovers_total",
                                       {"app": "fs", "role": "deliver", "reason": "unhealthy"}) == 1


async def test_shutdown_hands_the_queue_over_at_once(replicas, http):
    a = await replicas("a")
    await until(lambda: a.held("deliver"))
    b = await replicas("b")
    a.application.down = True
    a.runtime.lanes["fs"].health._after = 1_000   # a stays owner while its application is down ...
    for n in range(3):
        assert await push(http, b, n) == 200
    await until(lambda: len(a.application.started) >= 2)
    started = time.monotonic()
    await a.runtime.close()                         # ... until SIGTERM
    await until(lambda: numbers(b.application) == [0, 1, 2], what="b to take over")
    assert time.monotonic() - started < 2.0


async def test_a_crashed_owners_event_is_redelivered_by_the_other_replica(replicas, http):
    a = await replicas("a")
    await until(lambda: a.held("deliver"))
    b = await replicas("b")
    a.application.gate = asyncio.Event()            # a takes event 0 and never answers: then it is killed
    assert await push(http, a, 0) == 200
    assert await push(http, a, 1) == 200
    await until(lambda: a.application.started)
    lane = a.runtime.lanes["fs"]
    for task in (lane._worker, lane.keeper._task):   # SIGKILL: no settle, no release, no goodbye
        task.cancel()
    await until(lambda: numbers(b.application) == [0, 1], what="b to redeliver after the lease TTL")


async def test_one_replica_holds_the_long_connection_and_hands_it_over(replicas, aiohttp_server, http):
    gateway = FakeFeishuGateway("cli_1", "sec")
    domain = await serve(aiohttp_server, gateway.app())
    a = await replicas("a", domain)
    await until(lambda: gateway.live is not None and a.held("deliver"))
    b = await replicas("b", domain)
    await asyncio.sleep(0.5)                         # more than the lease TTL: b stays standing by
    assert len(gateway.connections) == 1 and not b.held("connection")
    a.application.down = True                        # a's application fails: a gives up the lane and the connection
    pushed = await gateway.push({"schema": "2.0", "header": {"event_id": "e-1", "event_type": "x"}, "event": {"n": 7}})
    await until(lambda: numbers(b.application) == [7], what="b to deliver")
    await until(lambda: b.held("connection") and len(gateway.connections) == 2, what="b to take the connection")
    assert gateway.connections[0].closed and not a.held("connection")
    assert gateway.responses[0][0] == pushed and gateway.responses[0][1]["code"] == 200
    await b.runtime.close()                          # b stops: a (cooled down, healthy again) takes it back
    a.application.down = False
    await until(lambda: a.held("connection") and len(gateway.connections) == 3, bound=15, what="a to take it back")
