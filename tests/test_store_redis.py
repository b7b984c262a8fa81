"""Several sidecars on one real Redis: one token fetch cluster-wide, one quota, and life without Redis."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from proxy.clock import VirtualClock
from proxy.store import SharedQuotaExceeded, StoreSettings
from proxy.store_redis import RedisStore
from tests.conftest import Platforms, Running, SidecarFactory
from tests.redis_support import RedisServer, redis_server  # noqa: F401  (fixture)

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
                   extra: str = "") -> list[Running]:
    return [await start_sidecar(extra=store_section(server, extra)) for _ in range(count)]


async def until(condition: Callable[[], bool], tries: int = 1000) -> None:
    """Wait for something the sidecars do in the background (a probe), polling every few milliseconds."""
    for _ in range(tries):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


@pytest.fixture
async def http() -> Any:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        yield session


# ---------------------------------------------------------------------------------------------------------------
# Tokens


async def test_cold_start_of_five_replicas_makes_one_token_call_per_app(
        start_sidecar: SidecarFactory, platforms: Platforms, redis_server: RedisServer,
        http: aiohttp.ClientSession) -> None:
    platforms.feishu.token_delay = platforms.dingtalk.token_delay = 0.05   # let the replicas pile up on the lock
    sidecars = await replicas(start_sidecar, redis_server)
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
    sidecars = await replicas(start_sidecar, redis_server)
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
