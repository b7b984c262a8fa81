"""Several sidecars on one real Redis: one token fetch cluster-wide, one quota, and life without Redis."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from proxy.clock import VirtualClock
from proxy.store import SharedQuotaExceeded, StoreSettings
from proxy.store_redis import RedisStore
from tests.conftest import Platforms, Running, SidecarFactory
from tests.redis_support import LockstepClock, RedisServer, running_redis

MESSAGE = {"receive_id": "oc_1", "msg_type": "text", "content": json.dumps({"text": "hi"})}
REPLICAS = 5
FAST_PROBE = "probe_interval: 10ms, probe_max: 50ms"   # so rejoining takes milliseconds, not seconds


def store_section(server: RedisServer, extra: str = "") -> str:
    return f"\nstore: {{backend: redis, url: '{server.url}', replicas: {REPLICAS}{', ' + extra if extra else ''}}}\n"


async def feishu_send(http: aiohttp.ClientSession, running: Running) -> int:
    async with http.post(f"{running.base}/sales-bot/open-apis/im/v1/messages", json=MESSAGE) as r:
        return int((await r.json())["code"])


async def ding_get(http: aiohttp.ClientSession, running: Running) -> int:
    async with http.post(f"{running.base}/dingtalk/topapi/v2/user/get", json={"userid": "manager001"}) as r:
        return int((await r.json())["errcode"])


async def replicas(start_sidecar: SidecarFactory, server: RedisServer, count: int = REPLICAS,
                   extra: str = "", **options: str) -> list[Running]:
    return [await start_sidecar(extra=store_section(server, extra), **options) for _ in range(count)]


async def until(condition: Callable[[], bool], tries: int = 1000) -> None:
    """Wait for something the sidecars do in the background (a probe), polling every few milliseconds."""
    for _ in range(tries):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with running_redis(tmp_path) as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        yield session


# ---------------------------------------------------------------------------------------------------------------
# Tokens


async def test_cold_start_of_five_replicas_makes_one_token_call_per_app(
        start_sidecar: SidecarFactory, platforms: Platforms, redis_server: RedisServer,
        http: aiohttp.ClientSession) -> None:
    platforms.feishu.token_delay = platforms.dingtalk.token_delay = 0.05   # let the replicas pile up on the lock
    # A thousand requests in one process on a busy CI machine: deadlines long enough that load is not a failure.
    sidecars = await replicas(start_sidecar, redis_server, limits="{deadline: 60s}", ratelimit="{enabled: false}",
                              retry="{backoff_base: 1ms, backoff_cap: 5ms, per_try_timeout: 60s}")
    codes = await asyncio.gather(*(send(http, running) for running in sidecars for send in [feishu_send, ding_get]
                                   for _ in range(100)))
    assert len(codes) == REPLICAS * 200 and set(codes) == {0}
    assert platforms.feishu.token_calls == 1
    assert platforms.dingtalk.token_calls == 1
    assert len(set(platforms.feishu.tokens)) == 1       # every replica holds the same token
    assert all(r.metric("imsidecar_store_up") == 1 for r in sidecars)


async def test_without_the_store_each_replica_fetches_its_own(
        start_sidecar: SidecarFactory, platforms: Platforms, http: aiohttp.ClientSession) -> None:
    """The control for the test above: what Redis saves."""
    sidecars = [await start_sidecar() for _ in range(REPLICAS)]
    assert set(await asyncio.gather(*(feishu_send(http, r) for r in sidecars))) == {0}
    assert platforms.feishu.token_calls == REPLICAS


async def test_a_token_refused_on_every_replica_is_refreshed_once_cluster_wide(
        start_sidecar: SidecarFactory, platforms: Platforms, redis_server: RedisServer,
        http: aiohttp.ClientSession) -> None:
    sidecars = await replicas(start_sidecar, redis_server, ratelimit="{enabled: false}")   # tokens only here
    assert set(await asyncio.gather(*(feishu_send(http, r) for r in sidecars))) == {0}
    assert platforms.feishu.token_calls == 1
    platforms.feishu.token_delay = 0.05
    platforms.feishu.revoke("cli_test")                 # 99991663 on every replica's next call
    codes = await asyncio.gather(*(feishu_send(http, r) for r in sidecars for _ in range(20)))
    assert set(codes) == {0}                             # refused, refreshed, replayed
    assert platforms.feishu.token_calls == 2
    assert sum(r.metric("imsidecar_token_replays_total", app="sales-bot") for r in sidecars) >= REPLICAS


async def test_a_late_refusal_of_an_old_token_does_not_drop_the_new_one(redis_server: RedisServer) -> None:
    clock = VirtualClock()
    store = RedisStore(StoreSettings(backend="redis", url=redis_server.url), clock, CollectorRegistry())
    issued = iter(["t-old", "t-new", "t-extra"])

    async def fetch() -> Any:
        return type("Grant", (), {"value": next(issued), "expires_in": 7200.0})()

    try:
        assert (await store.tokens.get_or_fetch("sales-bot", "tenant", fetch, 600)).value == "t-old"
        await store.tokens.invalidate("sales-bot", "tenant", "t-old")
        assert (await store.tokens.get_or_fetch("sales-bot", "tenant", fetch, 600)).value == "t-new"
        await store.tokens.invalidate("sales-bot", "tenant", "t-old")     # another replica, reporting late
        assert (await store.tokens.get_or_fetch("sales-bot", "tenant", fetch, 600)).value == "t-new"
    finally:
        await store.close()


async def test_a_crashed_token_fetcher_blocks_the_others_only_until_its_lock_expires(
        redis_server: RedisServer) -> None:
    clock = VirtualClock()
    settings = StoreSettings(backend="redis", url=redis_server.url, lock_ttl=0.2)
    registry = CollectorRegistry()
    store = RedisStore(settings, clock, registry)
    client = await redis_server.client()
    await client.set("imsidecar:lock:sales-bot:tenant", "a-replica-that-died", px=200)

    async def fetch() -> Any:
        return type("Grant", (), {"value": "t-1", "expires_in": 7200.0})()

    try:
        waiter = asyncio.create_task(store.tokens.get_or_fetch("sales-bot", "tenant", fetch, 600))
        while not waiter.done():              # virtual time for the polls; the lock expires in Redis's own time
            await clock.advance(0.005)   # no faster than real time, so the lock expires before the waiter gives up
            await asyncio.sleep(0.005)
        assert (await waiter).value == "t-1"
        assert await client.get("imsidecar:lock:sales-bot:tenant") is None   # released after publishing
        assert registry.get_sample_value("imsidecar_store_fallbacks_total", {"op": "tokens"}) == 0
    finally:
        await client.aclose()
        await store.close()


# ---------------------------------------------------------------------------------------------------------------
# Quotas, in virtual time: Lua computes with the time it is given, so the replicas pass the virtual wall clock.

ROUTE = "ops-ding:/topapi/v2/user/get"


class Counter:
    """The platform's view: when each request arrived, in milliseconds of wall time."""

    def __init__(self, clock: VirtualClock) -> None:
        self.clock, self.arrivals = clock, list[int]()

    def hit(self) -> None:
        self.arrivals.append(round(self.clock.wall() * 1000))

    def between(self, start: float, end: float) -> list[int]:
        base = round(self.clock.wall() * 1000) - round(self.clock.now() * 1000)
        return sorted(t for t in self.arrivals if base + start * 1000 <= t < base + end * 1000)

    def busiest_second(self, start: float = 0.0, end: float = 1e9) -> int:
        """The most arrivals in any 1 s window [t, t + 1 s) inside [start, end)."""
        times = self.between(start, end)
        return max((sum(1 for u in times[i:] if u < t + 1000) for i, t in enumerate(times)), default=0)


def quota_replicas(server: RedisServer, clock: VirtualClock, count: int = REPLICAS,
                   **settings: Any) -> list[tuple[RedisStore, CollectorRegistry]]:
    made = []
    for _ in range(count):
        registry = CollectorRegistry()
        made.append((RedisStore(StoreSettings(backend="redis", url=server.url, **settings), clock, registry),
                     registry))
    return made


async def send_forever(store: RedisStore, clock: VirtualClock, counter: Counter,
                       rate: Callable[[], float] = lambda: 20.0) -> None:
    """A replica's worker: a slot from the shared quota (1 s deadline), then one request to the platform."""
    while True:
        try:
            await store.quota.acquire(ROUTE, rate(), 1, deadline=clock.now() + 1.0)
        except SharedQuotaExceeded as exc:
            await clock.sleep(exc.retry_after - 0.5)   # a client told 429 comes back later
            continue
        counter.hit()


async def run_workers(clock: Any, stores: list[RedisStore], counter: Counter, until: float,
                      per_replica: int = 4, **kwargs: Any) -> list[asyncio.Task[None]]:
    tasks = [asyncio.create_task(send_forever(s, clock, counter, **kwargs)) for s in stores for _ in range(per_replica)]
    await clock.run(tasks, until)
    return tasks


async def stop_all(tasks: list[asyncio.Task[None]], stores: list[RedisStore]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(*(s.close() for s in stores))


async def test_five_replicas_send_at_most_a_shared_20_qps_quota_over_10_s(redis_server: RedisServer) -> None:
    clock = LockstepClock()
    counter = Counter(clock)
    stores = [s for s, _ in quota_replicas(redis_server, clock)]
    tasks = await run_workers(clock, stores, counter, until=10.0)
    await stop_all(tasks, stores)
    sent = counter.between(0, 10)
    assert 195 <= len(sent) <= 200        # the quota, used: 5 replicas x 4 workers each asking for more
    assert counter.busiest_second() <= 20


async def test_a_lowered_rate_passed_by_the_replicas_lowers_the_shared_rate_at_once(
        redis_server: RedisServer) -> None:
    """The adaptive limiter lowers its rate after throttles; each call carries it, so the cluster follows."""
    clock = LockstepClock()
    counter = Counter(clock)
    stores = [s for s, _ in quota_replicas(redis_server, clock)]
    tasks = await run_workers(clock, stores, counter, until=10.0, rate=lambda: 20.0 if clock.now() < 5 else 8.0)
    await stop_all(tasks, stores)
    assert counter.busiest_second(0, 5) <= 20
    # Slots reserved before the cut (up to the 1 s deadline ahead) are honoured; after them, 8 per second.
    assert counter.busiest_second(6, 10) <= 8
    assert len(counter.between(6, 10)) >= 30


async def test_redis_stopped_mid_run_each_replica_keeps_its_share_and_rejoins(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "imsidecar.store")
    clock = LockstepClock()
    counter = Counter(clock)
    made = quota_replicas(redis_server, clock, fallback_share=0.2)   # replicas: 5
    stores, registries = [s for s, _ in made], [r for _, r in made]
    tasks = [asyncio.create_task(send_forever(s, clock, counter)) for s in stores for _ in range(4)]
    await clock.run(tasks, 5.0)
    await redis_server.stop()
    await clock.run(tasks, 10.0)
    assert all(r.get_sample_value("imsidecar_store_up") == 0 for r in registries)
    assert all((r.get_sample_value("imsidecar_store_fallbacks_total", {"op": "quota"}) or 0) > 0 for r in registries)
    # Once the slots reserved in Redis (up to the 1 s deadline, so up to 6.0 s) have passed, each replica
    # sends at most 20 x 0.2 = 4 per second.
    assert counter.busiest_second(6.001, 10) <= 20
    assert len(counter.between(6.001, 10)) >= 70
    await redis_server.start()
    await clock.run(tasks, 30.0)
    await stop_all(tasks, stores)
    assert all(r.get_sample_value("imsidecar_store_up") == 1 for r in registries)
    assert counter.busiest_second(20, 30) <= 20
    lines = [rec.getMessage() for rec in caplog.records]
    assert sum("unreachable" in line for line in lines) == REPLICAS    # one line per transition, not per request
    assert sum("is back" in line for line in lines) == REPLICAS


# ---------------------------------------------------------------------------------------------------------------
# Redis trouble, seen from the applications


async def test_requests_keep_succeeding_while_redis_is_down_and_the_replicas_rejoin(
        start_sidecar: SidecarFactory, platforms: Platforms, redis_server: RedisServer,
        http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "imsidecar.store")
    sidecars = await replicas(start_sidecar, redis_server, count=3, extra=FAST_PROBE,
                              ratelimit="{enabled: false}")   # token fallback here; quota fallback has its own test
    assert set(await asyncio.gather(*(feishu_send(http, r) for r in sidecars))) == {0}
    assert platforms.feishu.token_calls == 1

    await redis_server.stop()
    platforms.feishu.revoke("cli_test")     # every replica needs a new token while Redis is gone
    codes = await asyncio.gather(*(feishu_send(http, r) for r in sidecars for _ in range(20)))
    assert set(codes) == {0}
    assert platforms.feishu.token_calls == 1 + 3                # each replica fetched its own, as without a store
    for r in sidecars:
        assert r.metric("imsidecar_store_up") == 0
        assert r.metric("imsidecar_store_fallbacks_total", op="tokens") == 1
        assert r.metric("imsidecar_store_fallbacks_total", op="invalidate") == 1

    await redis_server.start()
    await until(lambda: all(r.metric("imsidecar_store_up") == 1 for r in sidecars))
    platforms.feishu.revoke("cli_test")
    assert set(await asyncio.gather(*(feishu_send(http, r) for r in sidecars for _ in range(20)))) == {0}
    assert platforms.feishu.token_calls == 1 + 3 + 1            # shared again: one refresh for all
    lines = [rec.getMessage() for rec in caplog.records]
    assert sum("unreachable" in line for line in lines) == 3   # one line per replica and transition
    assert sum("is back;" in line for line in lines) == 3


async def test_a_replica_started_while_redis_is_down_serves_and_joins_later(
        start_sidecar: SidecarFactory, platforms: Platforms, redis_server: RedisServer,
        http: aiohttp.ClientSession) -> None:
    await redis_server.stop()
    (running,) = await replicas(start_sidecar, redis_server, count=1, extra=FAST_PROBE)
    assert await feishu_send(http, running) == 0
    assert running.metric("imsidecar_store_up") == 0
    await redis_server.start()
    await until(lambda: running.metric("imsidecar_store_up") == 1)


async def test_the_password_reaches_redis_and_no_log_line(
        start_sidecar: SidecarFactory, platforms: Platforms, tmp_path: Path, http: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    password = "redis-pass-0f7e1c2b9a"
    async with running_redis(tmp_path, password) as server:
        good, bad = tmp_path / "good", tmp_path / "bad"
        good.write_text(password)
        bad.write_text(password[::-1])
        sharing = await start_sidecar(extra=store_section(server, f"password_file: {good}"))
        wrong = await start_sidecar(extra=store_section(server, f"password_file: {bad}, {FAST_PROBE}"))
        assert await feishu_send(http, sharing) == 0 and await feishu_send(http, wrong) == 0
        assert sharing.metric("imsidecar_store_up") == 1
        assert wrong.metric("imsidecar_store_up") == 0           # refused by Redis: local tokens, still serving
        client = await server.client()
        assert await client.exists("imsidecar:token:sales-bot:tenant") == 1
        await client.aclose()
    logged = caplog.text + "".join(repr(r.args) for r in caplog.records)
    assert password not in logged and password[::-1] not in logged
    assert "unreachable" in caplog.text


async def test_replicas_share_one_quota_through_the_forwarding_path(
        start_sidecar: SidecarFactory, platforms: Platforms, redis_server: RedisServer,
        http: aiohttp.ClientSession) -> None:
    """Three sidecars, each allowing 5/s on their own, together send the platform no more than 5/s."""
    sidecars = await replicas(start_sidecar, redis_server, count=3, ratelimit="{per_second: 5}",
                              limits="{deadline: 1500ms}")

    async def call(running: Running) -> int:
        async with http.post(running.base + "/dingtalk/topapi/v2/user/get", json={"userid": "manager001"}) as r:
            return r.status

    started = asyncio.get_running_loop().time()
    statuses = await asyncio.gather(*(call(s) for s in sidecars for _ in range(10)))
    elapsed = asyncio.get_running_loop().time() - started
    sent = len(platforms.dingtalk.calls)
    assert sent == statuses.count(200) and 429 in statuses
    assert sent <= 5 * elapsed + 3   # a shared 5/s (spaced 1/rate apart) over the burst, plus each pod's first slot


async def test_at_rejoin_the_slots_reserved_during_the_outage_count_against_the_shared_quota(
        redis_server: RedisServer) -> None:
    """Three replicas, a shared 30/s. While Redis is away each reserves its third locally, up to its 3 s deadline
    ahead; when Redis is back those slots are still being sent. They join the shared schedule first, or for up to a
    deadline the platform would get the local thirds and the whole shared quota at once (60 in a second against 30,
    as this test measures without the hand-over)."""
    clock = LockstepClock()
    counter = Counter(clock)
    made = quota_replicas(redis_server, clock, count=3, replicas=3, fallback_share=1 / 3, probe_interval=0.2,
                          probe_max=0.2)
    stores = [s for s, _ in made]

    async def send(store: RedisStore) -> None:
        while True:
            try:
                await store.quota.acquire(ROUTE, 30.0, 1, deadline=clock.now() + 3.0)
            except SharedQuotaExceeded as exc:
                await clock.sleep(min(exc.retry_after, 0.2))
                continue
            counter.hit()

    tasks = [asyncio.create_task(send(s)) for s in stores for _ in range(40)]   # far more than the quota
    await clock.run(tasks, 2.0)
    await redis_server.stop()
    await clock.run(tasks, 6.0)          # local reservations made now reach up to 9 s
    await redis_server.start()
    while not all(s.health.up for s in stores):   # each replica's probe in virtual time, its ping in real time
        await clock.run(tasks, clock.now() + 0.02)
        await asyncio.sleep(0.005)
    await clock.run(tasks, 14.0)
    await stop_all(tasks, stores)
    assert all(r.get_sample_value("imsidecar_store_up") == 1 for _, r in made)
    # The quota; plus each replica's first slot at the switch, and what a replica that has not yet noticed Redis is
    # back (its probe runs every 0.2 s) sends beside the others' shared slots.
    assert counter.busiest_second(6.0, 14.0) <= 30 + 3 + 2
    assert len(counter.between(10.0, 14.0)) >= 4 * 30 - 10   # and the quota is used, not starved
