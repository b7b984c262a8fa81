"""The read cache in virtual time: fresh answers for their TTL, only successes, no-cache, stale-if-error within its
bound, one identity's answers never served to another, bounded memory, and one copy for all replicas on Redis."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.clock import VirtualClock
from proxy.errors import CircuitOpen, DeadlineExceeded, RequestTooLarge
from proxy.saving.cache import ReadCache
from proxy.saving.cache_store import Entry, MemoryEntries
from proxy.saving.reads import ReadRoutes
from proxy.store import StoreSettings
from proxy.upstream import Answer
from tests.redis_support import running_redis
from tests.saving_support import guard, DING_APP, FakeCall, app_config, binding, body, exchange, json_answer, savings_metrics

USER = "/open-apis/contact/v3/users/ou_7d8a6e6df7621556"
CACHE = "cache: {stale_if_error: 10m}"


def cache(app, clock: VirtualClock, values=None):  # type: ignore[no-untyped-def]
    metrics, registry = savings_metrics()
    return ReadCache({app.name: app.cache}, ReadRoutes({app.name: app.cache}), values, clock, metrics,
                     guard(registry)), registry


class Platform:
    """What the cache's next stage answers: a numbered success, or the failure a test scripts."""

    def __init__(self) -> None:
        self.failure: Answer | Exception | None = None
        self.call = FakeCall(answer=self.answer)

    def answer(self, e, b):  # type: ignore[no-untyped-def]
        if isinstance(self.failure, Exception):
            raise self.failure
        if self.failure is not None:
            return self.failure
        return json_answer({"code": 0, "msg": "success", "data": {"n": self.call.calls}})


def number(answer: Answer) -> int:
    return json.loads(answer.body)["data"]["n"]


def lookups(registry, result: str, route: str = "/open-apis/contact/v3/users/:user_id") -> float:  # type: ignore[no-untyped-def]
    return registry.get_sample_value("imsidecar_cache_lookups_total", {"app": "bot", "route": route, "result": result}) or 0


async def test_a_fresh_answer_is_served_for_its_ttl_then_asked_again() -> None:
    clock, app, platform = VirtualClock(), app_config(sections=CACHE), Platform()
    stage, registry = cache(app, clock)
    first = exchange(binding(app), "GET", USER)
    assert number(await stage.through(first, body(), platform.call)) == 1 and first.marks["X-Imsidecar-Cache"] == "miss"
    await clock.advance(59)
    again = exchange(binding(app), "GET", USER)
    assert number(await stage.through(again, body(), platform.call)) == 1
    assert again.marks == {"X-Imsidecar-Cache": "hit", "Age": "59"}
    await clock.advance(2)   # the curated TTL of a user read is 60 s
    assert number(await stage.through(exchange(binding(app), "GET", USER), body(), platform.call)) == 2
    assert platform.call.calls == 2
    assert (lookups(registry, "hit"), lookups(registry, "miss")) == (1, 2)


async def test_routes_outside_the_table_and_apps_without_a_cache_section_are_never_cached() -> None:
    clock, platform = VirtualClock(), Platform()
    for app, path in ((app_config(), USER), (app_config(sections=CACHE), "/open-apis/im/v1/messages/om_12345678")):
        stage, _ = cache(app, clock)
        for _ in range(2):
            await stage.through(exchange(binding(app), "GET", path), body(), platform.call)
    assert platform.call.calls == 4


async def test_config_routes_add_and_remove_routes() -> None:
    clock, platform = VirtualClock(), Platform()
    app = app_config(sections="cache: {routes: {/open-apis/im/v1/messages/:message_id: 10s, "
                              "/open-apis/contact/v3/users/:user_id: 0}}")
    stage, _ = cache(app, clock)
    for path in ("/open-apis/im/v1/messages/om_12345678", USER) * 2:
        await stage.through(exchange(binding(app), "GET", path), body(), platform.call)
    assert platform.call.calls == 3   # the message read cached, the (now uncached) user read asked twice


@pytest.mark.parametrize("failure", [
    json_answer({"code": 99992402, "msg": "field validation failed"}, status=400),   # the platform's own "no"
    json_answer({"code": 1663, "msg": "internal error"}),                           # an error inside HTTP 200
    Answer(200, CIMultiDictProxy(CIMultiDict({"Content-Type": "application/octet-stream"})), None, None),   # streamed
])
async def test_only_successes_read_whole_are_kept(failure: Answer) -> None:
    clock, app, platform = VirtualClock(), app_config(sections=CACHE), Platform()
    stage, _ = cache(app, clock)
    platform.failure = failure
    await stage.through(exchange(binding(app), "GET", USER), body(), platform.call)
    platform.failure = None
    assert number(await stage.through(exchange(binding(app), "GET", USER), body(), platform.call)) == 2


async def test_an_answer_over_the_entry_limit_is_not_kept() -> None:
    clock, platform = VirtualClock(), Platform()
    app = app_config(sections="cache: {max_entry_bytes: 10B}")
    stage, _ = cache(app, clock)
    for _ in range(2):
        await stage.through(exchange(binding(app), "GET", USER), body(), platform.call)
    assert platform.call.calls == 2


async def test_no_cache_asks_the_platform_and_refreshes_the_entry() -> None:
    clock, app, platform = VirtualClock(), app_config(sections=CACHE), Platform()
    stage, registry = cache(app, clock)
    await stage.through(exchange(binding(app), "GET", USER), body(), platform.call)
    fresh = exchange(binding(app), "GET", USER, headers={"Cache-Control": "no-cache"})
    assert number(await stage.through(fresh, body(), platform.call)) == 2 and fresh.marks["X-Imsidecar-Cache"] == "bypass"
    assert number(await stage.through(exchange(binding(app), "GET", USER), body(), platform.call)) == 2   # refreshed
    assert lookups(registry, "bypass") == 1


@pytest.mark.parametrize("failure", [
    json_answer({"code": 99991400, "msg": "request trigger frequency limit"}, status=429),   # throttled
    json_answer({"code": 1500, "msg": "internal error"}, status=500),                     # the platform failed
    json_answer({"code": 99991403, "msg": "This month's API call quota has been exceeded"}, status=429),
    DeadlineExceeded("no answer"),
    CircuitOpen("the open upstream is failing", retry_after=3.0),
])
async def test_stale_if_error_serves_the_last_good_answer_within_its_bound(failure: Answer | Exception) -> None:
    clock, app, platform = VirtualClock(), app_config(sections=CACHE), Platform()
    stage, registry = cache(app, clock)
    await stage.through(exchange(binding(app), "GET", USER), body(), platform.call)
    platform.failure = failure
    await clock.advance(60 + 9 * 60)   # past its 60 s TTL, inside the 10 min bound
    stale = exchange(binding(app), "GET", USER)
    answer = await stage.through(stale, body(), platform.call)
    assert number(answer) == 1 and stale.marks == {"X-Imsidecar-Cache": "stale", "Age": "600"}
    assert lookups(registry, "stale") == 1
    await clock.advance(61)   # past TTL + bound: the failure is the answer
    late = exchange(binding(app), "GET", USER)
    if isinstance(failure, Exception):
        with pytest.raises(type(failure)):
            await stage.through(late, body(), platform.call)
    else:
        assert (await stage.through(late, body(), platform.call)) is failure
    assert late.marks["X-Imsidecar-Cache"] == "miss"


async def test_a_permanent_answer_or_the_clients_own_error_is_not_covered_up() -> None:
    clock, app, platform = VirtualClock(), app_config(sections=CACHE), Platform()
    stage, _ = cache(app, clock)
    await stage.through(exchange(binding(app), "GET", USER), body(), platform.call)
    await clock.advance(61)
    refused = json_answer({"code": 99991672, "msg": "Access denied: the app has no scope"}, status=400)
    platform.failure = refused
    assert (await stage.through(exchange(binding(app), "GET", USER), body(), platform.call)) is refused
    platform.failure = RequestTooLarge("too large")
    with pytest.raises(RequestTooLarge):
        await stage.through(exchange(binding(app), "GET", USER), body(), platform.call)


async def test_one_identitys_answers_never_reach_another() -> None:
    clock, app, platform = VirtualClock(), app_config(sections=CACHE), Platform()
    stage, _ = cache(app, clock)
    who = [dict(), dict(headers={"Authorization": "Bearer u-alice"}, token_kind=None),
           dict(headers={"Authorization": "Bearer u-bob"}, token_kind=None)]
    seen = [number(await stage.through(exchange(binding(app), "GET", USER, **w), body(), platform.call)) for w in who]
    assert seen == [1, 2, 3]   # tenant, Alice and Bob each asked the platform
    again = [number(await stage.through(exchange(binding(app), "GET", USER, **w), body(), platform.call)) for w in who]
    assert again == [1, 2, 3]  # ... and each got back its own answer
    unknown = exchange(binding(app), "GET", USER, token_kind=None)   # an identity that cannot be told: not cached
    await stage.through(unknown, body(), platform.call)
    await stage.through(exchange(binding(app), "GET", USER, token_kind=None), body(), platform.call)
    assert platform.call.calls == 5


async def test_dingtalk_post_reads_are_keyed_by_their_body() -> None:
    clock, app, platform = VirtualClock(), app_config(DING_APP, CACHE), Platform()
    stage, _ = cache(app, clock)
    for userid in ("manager001", "user002", "manager001"):
        e = exchange(binding(app, "oapi"), "POST", "/topapi/v2/user/get", token_kind="app")
        await stage.through(e, body({"userid": userid}), platform.call)
    assert platform.call.calls == 2


async def test_memory_is_bounded_by_entries_and_bytes_least_recently_used_first() -> None:
    clock = VirtualClock()
    entries = MemoryEntries(max_entries=3, max_bytes=10_000, wall=clock.wall)
    make = lambda n: Entry(200, (), b"x" * n, clock.wall(), 60.0)   # noqa: E731
    for key in "abc":
        await entries.put(key, make(10), 60)
    await entries.get("a")          # a is used again: b is now the oldest
    await entries.put("d", make(10), 60)
    assert [k for k in "abcd" if await entries.get(k) is not None] == ["a", "c", "d"]
    await entries.put("e", make(9_500), 60)   # over the byte bound: the oldest go until it fits
    assert entries.count == 1 and entries.bytes <= 10_000
    await entries.put("huge", make(20_000), 60)   # never fits: not kept, nothing else lost for it
    assert await entries.get("huge") is None and await entries.get("e") is not None
    await clock.advance(61)
    assert await entries.get("e") is None and entries.count == 0


async def test_the_entries_gauges_say_what_is_held() -> None:
    clock, app, platform = VirtualClock(), app_config(sections=CACHE), Platform()
    stage, registry = cache(app, clock)
    for user in ("ou_7d8a6e6df7621556", "ou_8e9b7f7ea8732667"):
        await stage.through(exchange(binding(app), "GET", f"/open-apis/contact/v3/users/{user}"), body(), platform.call)
    assert registry.get_sample_value("imsidecar_cache_entries", {"app": "bot"}) == 2
    assert registry.get_sample_value("imsidecar_cache_bytes", {"app": "bot"}) > 0


async def test_replicas_share_one_cache_through_redis_and_keep_their_own_while_it_is_away(tmp_path: Path) -> None:
    from proxy.store_redis import RedisStore
    from prometheus_client import CollectorRegistry

    async with running_redis(tmp_path) as server:
        clock, app, platform = VirtualClock(), app_config(sections=CACHE), Platform()
        stores = [RedisStore(StoreSettings(backend="redis", url=server.url, timeout=0.2), clock, CollectorRegistry())
                  for _ in range(2)]
        (one, _), (two, _) = cache(app, clock, stores[0].values), cache(app, clock, stores[1].values)
        await one.through(exchange(binding(app), "GET", USER), body(), platform.call)
        assert number(await two.through(exchange(binding(app), "GET", USER), body(), platform.call)) == 1
        keys = await (await server.client()).keys("*")
        assert len(keys) == 1 and keys[0].startswith("imsidecar:cache:") and "ou_" not in keys[0]
        await server.stop()
        await two.through(exchange(binding(app), "GET", USER), body(), platform.call)   # store away: asks ...
        assert number(await two.through(exchange(binding(app), "GET", USER), body(), platform.call)) == 2   # ... keeps
        assert platform.call.calls == 2
        for store in stores:
            await store.close()
