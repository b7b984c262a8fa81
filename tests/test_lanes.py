"""Priority lanes around a real rate limiter in virtual time: interactive first, bulk never starved past its bound
(nor its deadline), the quota itself never exceeded, and each request's lane decided the documented way."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from proxy.clock import VirtualClock, settle
from proxy.errors import BadRequest
from proxy.metrics import Metrics, SavingsMetrics
from proxy.saving.lanes import CURRENT_LANE, LanedLimiters, PriorityLanes
from proxy.drain import Drain
from tests.saving_support import app_config, binding, exchange, guard

ROUTE = "/open-apis/im/v1/messages"


def laned(sections: str = "ratelimit: {per_second: 10}"):  # type: ignore[no-untyped-def]
    clock, registry = VirtualClock(), CollectorRegistry()
    app = app_config(sections=sections)
    savings = SavingsMetrics(registry)
    limiters = LanedLimiters(app, clock, Metrics(registry), None, app.priority, savings, guard=guard(), drain=Drain())
    return clock, limiters, limiters.get(ROUTE, ROUTE), registry


def acquirer(clock: VirtualClock, limiters, limiter, granted: list, deadline: float = 1e9):  # type: ignore[no-untyped-def]
    async def take(lane: str, name: str) -> None:
        CURRENT_LANE.set(lane)
        await limiters.acquire(limiter, ROUTE, deadline)
        granted.append((name, round(clock.now(), 3)))
    return take


async def run(clock: VirtualClock, seconds: float, step: float = 0.01) -> None:
    for _ in range(round(seconds / step)):
        await clock.advance(step)


async def test_an_interactive_request_goes_before_the_bulk_queued_ahead_of_it() -> None:
    clock, limiters, limiter, registry = laned("ratelimit: {per_second: 10}, priority: {bulk_share: 1}")
    granted: list = []
    take = acquirer(clock, limiters, limiter, granted)
    bulk = [asyncio.ensure_future(take("bulk", f"b{n}")) for n in range(30)]   # a sync, paced to the full 10/s
    await run(clock, 0.25)
    reply = asyncio.ensure_future(take("interactive", "reply"))
    await run(clock, 1.0)
    assert reply.done()
    after = [name for name, when in granted if when > 0.25]
    assert after[0] == "reply"   # the first slot after it came, not the one after the bulk queued ahead of it
    assert dict(granted)["reply"] <= 0.25 + 0.1 + 0.011
    await run(clock, 4)
    assert all(t.done() for t in bulk)
    assert registry.get_sample_value("imsidecar_priority_wait_seconds_count", {"app": "bot", "lane": "bulk"}) == 30


async def test_bulk_is_paced_to_its_share_so_a_burst_cannot_take_a_whole_window() -> None:
    clock, limiters, limiter, _ = laned("ratelimit: {per_second: 10, per_minute: 300}, priority: {bulk_share: 0.5}")
    granted: list = []
    take = acquirer(clock, limiters, limiter, granted)
    bulk = [asyncio.ensure_future(take("bulk", f"b{n}")) for n in range(100)]
    await run(clock, 30)
    times = [when for _, when in granted]
    assert len(times) == 75 and times[-1] <= 30   # half of the sustained 5/s: one every 0.4 s, no burst
    assert all(b - a >= 0.4 - 0.011 for a, b in zip(times, times[1:]))
    reply = asyncio.ensure_future(take("interactive", "reply"))
    await run(clock, 0.02)
    assert reply.done()   # the window was never full: an interactive request is sent at once
    for task in bulk:
        task.cancel()
    await settle()


async def test_without_lanes_the_same_reply_waits_behind_the_whole_sync() -> None:
    """The control for the test above: everything in one lane is first come, first served."""
    clock, limiters, limiter, _ = laned()
    granted: list = []
    take = acquirer(clock, limiters, limiter, granted)
    bulk = [asyncio.ensure_future(take("interactive", f"b{n}")) for n in range(30)]
    await run(clock, 0.25)
    reply = asyncio.ensure_future(take("interactive", "reply"))
    await run(clock, 4)
    assert reply.done() and all(t.done() for t in bulk)
    assert dict(granted)["reply"] == pytest.approx(3.0, abs=0.011)


async def test_bulk_is_not_overtaken_once_its_bound_has_passed() -> None:
    clock, limiters, limiter, registry = laned("ratelimit: {per_second: 10}, priority: {max_bulk_wait: 2s}")
    granted: list = []
    take = acquirer(clock, limiters, limiter, granted)
    arrived: dict[str, float] = {}
    stream = []

    def interactive(name: str) -> None:
        arrived[name] = clock.now()
        stream.append(asyncio.ensure_future(take("interactive", name)))

    for n in range(12):   # the quota's second is already spoken for
        interactive(f"burst{n}")
    await settle()
    job = asyncio.ensure_future(take("bulk", "sync"))
    for n in range(60):   # and interactive requests keep coming faster than the quota serves them
        interactive(f"i{n}")
        await run(clock, 0.05)
    await run(clock, 8)
    assert job.done()
    when = dict(granted)["sync"]
    overtook = [name for name, at in granted if at < when and arrived[name] > 2.0 + 1e-6]
    assert overtook == []   # no interactive request that came after its bound went before it
    assert when < 6.0       # and it did not wait for the interactive stream to end
    assert registry.get_sample_value("imsidecar_priority_aged_total", {"app": "bot"}) == 1
    for task in stream:
        task.cancel()
    await settle()


async def test_bulk_stands_aside_no_longer_than_its_deadline_allows() -> None:
    from proxy.ratelimit import RateLimitExceeded

    clock, limiters, limiter, _ = laned("ratelimit: {per_second: 10}, priority: {max_bulk_wait: 10s}")
    granted: list = []
    busy = acquirer(clock, limiters, limiter, granted)
    soon = acquirer(clock, limiters, limiter, granted, deadline=1.0)
    stream = [asyncio.ensure_future(busy("interactive", f"i{n}")) for n in range(30)]
    await settle()
    job = asyncio.ensure_future(soon("bulk", "sync"))
    await run(clock, 0.8)
    # It stood aside until 0.25 s before its deadline, then asked for a slot: none before the deadline, so it is
    # told so at once (a 429 to its client) instead of waiting past its deadline.
    assert job.done() and isinstance(job.exception(), RateLimitExceeded)
    for task in stream:
        task.cancel()
    await settle()


async def test_lanes_never_let_more_through_than_the_quota() -> None:
    clock, limiters, limiter, _ = laned()
    granted: list = []
    take = acquirer(clock, limiters, limiter, granted)
    tasks = [asyncio.ensure_future(take("bulk" if n % 3 else "interactive", str(n))) for n in range(40)]
    for n in range(40):
        tasks.append(asyncio.ensure_future(take("interactive" if n % 2 else "bulk", f"late{n}")))
        await run(clock, 0.05)
    await run(clock, 10)
    assert all(t.done() for t in tasks) and len(granted) == 80
    times = sorted(t for _, t in granted)
    assert all(b - a >= 1.0 - 1e-6 for a, b in zip(times, times[10:]))   # never 11 in any second


async def test_a_bulk_request_whose_client_vanishes_leaves_nothing_behind() -> None:
    clock, limiters, limiter, _ = laned()
    granted: list = []
    take = acquirer(clock, limiters, limiter, granted)
    first = [asyncio.ensure_future(take("interactive", f"i{n}")) for n in range(12)]
    gone = asyncio.ensure_future(take("bulk", "gone"))
    await settle()
    gone.cancel()
    await run(clock, 2)
    assert gone.cancelled() and all(t.done() for t in first) and "gone" not in dict(granted)
    assert limiter.waiting == 0


def test_a_requests_lane_comes_from_its_header_its_route_the_platform_or_the_default() -> None:
    app = app_config(sections="priority: {default: bulk, routes: {/open-apis/im/v1/chats: interactive}}")
    metrics = SavingsMetrics(CollectorRegistry())
    lanes = PriorityLanes({app.name: app.priority}, metrics, guard())
    cases = [
        ("/open-apis/im/v1/messages", {"X-Imsidecar-Priority": "Interactive"}, "interactive"),
        ("/open-apis/im/v1/chats", {}, "interactive"),                                   # the app's routes
        ("/open-apis/im/v1/messages", {}, "bulk"),                                        # the app's default
    ]
    for path, headers, lane in cases:
        e = exchange(binding(app), "POST", path)
        lanes.assign(e, headers)
        assert e.priority == lane, path
    plain = app_config()
    lanes = PriorityLanes({plain.name: plain.priority}, metrics, guard())
    batch = exchange(binding(plain), "POST", "/open-apis/bitable/v1/apps/bascn1234567/tables/tbl1234567/records/batch_create")
    lanes.assign(batch, {})
    assert batch.priority == "bulk"   # the platform's batch routes
    with pytest.raises(BadRequest, match="X-Imsidecar-Priority must be interactive or bulk"):
        lanes.assign(exchange(binding(plain), "GET", "/open-apis/bot/v3/info"), {"X-Imsidecar-Priority": "urgent"})


async def test_lanes_that_fail_give_the_slot_as_the_plain_limiter_would() -> None:
    clock, limiters, limiter, registry = laned()

    async def broken(*args: object) -> float:
        raise ZeroDivisionError("a bug in the lanes")

    limiters._in_lane = broken   # type: ignore[method-assign]
    CURRENT_LANE.set("bulk")
    assert await limiters.acquire(limiter, ROUTE, 1e9) == 0.0   # granted: the limiter had a free slot
    assert limiter.inner.waiting == 0
