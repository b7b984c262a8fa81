import asyncio
from collections.abc import Callable
import math

import pytest

from proxy.clock import VirtualClock, settle
from proxy.ratelimit import (
    DEFAULT_QUOTAS,
    AdaptiveRateLimiter,
    LimiterSettings,
    Quota,
    RateLimiterSet,
    RateLimitExceeded,
)


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


async def run_clients(clock: VirtualClock, limiter: AdaptiveRateLimiter, clients: int, seconds: float) -> list[float]:
    """`clients` callers loop on acquire for `seconds` of virtual time; returns every grant time."""
    grants: list[float] = []

    async def client() -> None:
        while clock.now() < seconds:
            await limiter.acquire(deadline=clock.now() + 120)
            if clock.now() < seconds:
                grants.append(clock.now())

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    await settle()
    for _ in range(round(seconds * 10)):
        await clock.advance(0.1)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return grants


def most_in_any_window(grants: list[float], period: float) -> int:
    grants = sorted(grants)
    return max(sum(1 for t in grants if start <= t < start + period) for start in grants)


async def test_dingtalk_quota_holds_over_a_virtual_minute_and_is_fully_used(clock):
    limiter = AdaptiveRateLimiter(DEFAULT_QUOTAS["dingtalk"], clock)
    grants = await run_clients(clock, limiter, clients=40, seconds=60)
    assert most_in_any_window(grants, 1.0) == 20
    assert len(grants) == 20 * 60


async def test_feishu_tier_honours_both_the_second_and_the_minute_window(clock):
    limiter = AdaptiveRateLimiter(DEFAULT_QUOTAS["feishu"], clock)
    grants = await run_clients(clock, limiter, clients=100, seconds=90)
    assert most_in_any_window(grants, 1.0) == 50  # bursts up to the per-second limit are allowed...
    assert most_in_any_window(grants, 60.0) == 1000  # ...but never more than 1000 in any minute
    assert len([t for t in grants if t < 60]) == 1000


async def test_fails_fast_when_the_slot_would_come_after_the_deadline(clock):
    limiter = AdaptiveRateLimiter(Quota(per_second=1), clock)
    assert await limiter.acquire(deadline=clock.now() + 5) == 0.0
    with pytest.raises(RateLimitExceeded) as raised:
        await limiter.acquire(deadline=clock.now() + 0.5)
    assert raised.value.retry_after == pytest.approx(1.0)
    assert clock.sleepers == 0  # it did not wait to find out
    waiter = asyncio.create_task(limiter.acquire(deadline=clock.now() + 2))
    await settle()
    await clock.advance(1.0)
    assert await waiter == pytest.approx(1.0)


async def test_the_deadline_counts_the_queue_ahead(clock):
    limiter = AdaptiveRateLimiter(Quota(per_second=1), clock)
    queued = [asyncio.create_task(limiter.acquire(deadline=clock.now() + 10)) for _ in range(4)]
    await settle()
    with pytest.raises(RateLimitExceeded) as raised:
        await limiter.acquire(deadline=clock.now() + 3.5)  # four ahead at 1/s: its turn is at t=4
    assert raised.value.retry_after == pytest.approx(4.0)
    await clock.advance(4)
    await asyncio.gather(*queued)


async def test_waiters_are_served_in_arrival_order(clock):
    limiter = AdaptiveRateLimiter(Quota(per_second=1), clock)
    served: list[tuple[str, float]] = []

    async def caller(name: str) -> None:
        await limiter.acquire(deadline=clock.now() + 10)
        served.append((name, clock.now()))

    tasks = []
    for name in "abcde":
        tasks.append(asyncio.create_task(caller(name)))
        await settle()
    await clock.advance(5)
    await asyncio.gather(*tasks)
    assert served == [("a", 0), ("b", 1), ("c", 2), ("d", 3), ("e", 4)]


async def queue_three(clock: VirtualClock, limiter: AdaptiveRateLimiter) -> list[asyncio.Task[float]]:
    await limiter.acquire(deadline=clock.now() + 10)  # uses the slot at t=0
    waiters = [asyncio.create_task(limiter.acquire(deadline=clock.now() + 10)) for _ in range(3)]
    await settle()  # due at t=1, 2 and 3
    return waiters


async def test_a_cancelled_waiter_in_the_middle_of_the_queue_gives_its_slot_back(clock):
    limiter = AdaptiveRateLimiter(Quota(per_second=1), clock)
    first, second, third = await queue_three(clock, limiter)
    second.cancel()
    await clock.advance(2)
    assert await first == pytest.approx(1.0)
    assert third.done() and await third == pytest.approx(2.0)
    assert limiter.waiting == 0


async def test_a_cancelled_head_of_the_queue_hands_its_slot_to_the_next_in_line(clock):
    limiter = AdaptiveRateLimiter(Quota(per_second=1), clock)
    first, second, third = await queue_three(clock, limiter)
    first.cancel()
    await clock.advance(1)
    assert second.done() and await second == pytest.approx(1.0)
    await clock.advance(1)
    assert await third == pytest.approx(2.0)


async def test_a_throttle_lowers_the_rate_and_successes_bring_it_back(clock):
    limiter = AdaptiveRateLimiter(Quota(per_second=20), clock)
    await run_clients(clock, limiter, clients=30, seconds=2)  # the measured sending rate is now ~20/s
    limiter.on_throttle(None)
    assert limiter.current_rate == pytest.approx(14.0, rel=0.1)  # beta 0.7 × what we were sending
    limiter.on_throttle(None)  # the rest of the same burst of 429s: one congestion event, one cut
    assert limiter.current_rate == pytest.approx(14.0, rel=0.1)

    rates = []
    for _ in range(10):
        await clock.advance(0.5)
        limiter.on_success()
        rates.append(limiter.current_rate)
    assert rates == sorted(rates)  # recovers steadily...
    assert rates[-1] == 20  # ...to the quota, and never beyond it
    assert rates[0] < 20


async def test_while_throttled_requests_are_paced_at_the_lowered_rate(clock):
    limiter = AdaptiveRateLimiter(Quota(per_second=20), clock, LimiterSettings(scale=0.0001))  # slow recovery
    await run_clients(clock, limiter, clients=30, seconds=2)
    limiter.on_throttle(None)
    start = clock.now()
    grants = [t - start for t in await run_clients(clock, limiter, clients=30, seconds=start + 10) if t >= start]
    rate = (len(grants) - 1) / (grants[-1] - grants[0])
    assert 13 <= rate <= 15  # ~14/s, not the 20/s the quota alone would allow
    assert most_in_any_window(grants, 1.0) <= 15  # paced, not in bursts


async def test_the_platforms_retry_after_holds_every_slot_back(clock):
    limiter = AdaptiveRateLimiter(Quota(per_second=20), clock)
    limiter.on_throttle(retry_after=3.0)
    with pytest.raises(RateLimitExceeded) as raised:
        await limiter.acquire(deadline=clock.now() + 1)
    assert raised.value.retry_after == pytest.approx(3.0)


async def test_an_unlimited_quota_never_waits_until_throttled(clock):
    limiter = AdaptiveRateLimiter(Quota(), clock)
    assert limiter.current_rate == math.inf
    for _ in range(1000):
        assert await limiter.acquire(deadline=clock.now()) == 0.0


async def test_limiters_are_kept_per_app_and_route_with_a_bound(clock):
    slow_route = "/open-apis/im/v1/messages/:message_id/urgent_app"
    limiters = RateLimiterSet(clock, DEFAULT_QUOTAS["feishu"], routes={slow_route: Quota(per_second=5)}, max_size=3)
    a = limiters.get("app-a", "/open-apis/im/v1/messages")
    assert limiters.get("app-a", "/open-apis/im/v1/messages") is a
    assert limiters.get("app-b", "/open-apis/im/v1/messages") is not a
    assert limiters.get("app-a", slow_route).current_rate == 5
    limiters.get("app-c", slow_route)
    assert len(limiters) == 3
    assert limiters.get("app-b", "/open-apis/im/v1/messages") is not None
    assert limiters.get("app-a", "/open-apis/im/v1/messages") is not a  # the least recently used went first


def test_quota_windows_round_fractional_limits_to_whole_requests():
    assert Quota(per_second=0.5).windows() == ((1, 2.0),)
    assert Quota(per_second=50, per_minute=1000).sustained_rate == pytest.approx(1000 / 60)
    with pytest.raises(ValueError):
        Quota(per_second=0)


async def offered(clock: VirtualClock, limiter: AdaptiveRateLimiter, rate: float, seconds: float,
                  throttled: Callable[[float], bool]) -> list[tuple[float, float]]:
    """Open-loop load at `rate` per second: each request takes a slot, then its answer is a throttle (with a
    one-second reset header) when `throttled(roll)` says so. Returns when each request came and its wait."""
    import random

    rng, waits = random.Random(4), []

    async def one() -> None:
        came = clock.now()
        waits.append((came, await limiter.acquire(deadline=clock.now() + 30)))
        if throttled(rng.random()):
            limiter.on_throttle(1.0)
        else:
            limiter.on_success()

    tasks = []
    for _ in range(round(rate * seconds)):
        tasks.append(asyncio.create_task(one()))
        await clock.advance(1 / rate)
    for _ in range(300):
        await clock.advance(0.1)
    await asyncio.gather(*tasks)
    return waits


async def test_random_throttles_among_answers_that_go_through_do_not_hold_the_rate_down(clock):
    """10% of answers are 429 at random (another sender, the platform's noise) at 30/s, under a 50/s quota: the
    application's own rate is what the limiter must allow, not a rate cut at every throttle."""
    limiter = AdaptiveRateLimiter(Quota(per_second=50, per_minute=3000), clock)
    came = await offered(clock, limiter, rate=30, seconds=60, throttled=lambda roll: roll < 0.1)
    waits = sorted(wait for _, wait in came)
    assert waits[len(waits) // 2] == 0.0
    # A throttle among the very first answers is taken at its word (nothing says otherwise yet); after that, none.
    settled = sorted(wait for at, wait in came if at >= 5.0)
    assert settled[int(len(settled) * 0.99)] <= 0.05
    assert limiter.current_rate >= 30


async def test_after_a_burst_of_throttles_the_rate_climbs_back_within_seconds(clock):
    limiter = AdaptiveRateLimiter(Quota(per_second=50), clock)
    burst_until = [5.0]
    rates: list[tuple[float, float]] = []

    def throttled(_: float) -> bool:
        rates.append((clock.now(), limiter.current_rate))
        return 4.0 <= clock.now() < burst_until[0]   # a second of everything throttled, then none
    await offered(clock, limiter, rate=30, seconds=15, throttled=throttled)
    assert min(rate for at, rate in rates if 4.0 <= at < 6.0) < 30   # it did cut while every answer was a 429
    assert all(rate >= 30 for at, rate in rates if at >= 9.0)        # and was back at the offered load 4 s later


async def test_a_quota_overrun_still_cuts_the_rate(clock):
    """The other side: a platform quota below the offered load throttles every request past it, in runs."""
    limiter = AdaptiveRateLimiter(Quota(per_second=50), clock)
    sent: list[float] = []

    def throttled(_: float) -> bool:
        second = int(clock.now())
        sent.append(second)
        return sent.count(second) > 20   # the platform's real quota: 20 per second
    await offered(clock, limiter, rate=30, seconds=20, throttled=throttled)
    assert limiter.current_rate < 30


async def test_a_free_slot_taken_at_once_never_jumps_the_queue_and_counts_against_the_quota(clock):
    limiter = AdaptiveRateLimiter(Quota(per_second=2), clock)
    assert limiter.take_free() and limiter.take_free()   # the second's two slots
    assert not limiter.take_free()                          # none left: nothing taken
    waiter = asyncio.create_task(limiter.acquire(deadline=clock.now() + 10))
    await settle()
    clock._now += 1   # the instant a slot is free again, before the waiter has woken: it is first in line
    assert not limiter.take_free()
    await clock.advance(0)
    assert waiter.done() and await waiter == pytest.approx(1)
    assert limiter.take_free() and not limiter.take_free()   # the waiter took one of the new second's two


@pytest.mark.parametrize("seconds", [3.0])
async def test_taking_free_slots_and_waiting_for_them_together_keep_the_quota(clock, seconds):
    limiter = AdaptiveRateLimiter(Quota(per_second=5, per_minute=200), clock)
    grants: list[float] = []

    async def client(i: int) -> None:
        while clock.now() < seconds:
            if i % 2 == 0 and limiter.take_free():
                grants.append(clock.now())
                await clock.sleep(0.01)
                continue
            await limiter.acquire(deadline=clock.now() + 10)
            grants.append(clock.now())

    tasks = [asyncio.create_task(client(i)) for i in range(6)]
    for _ in range(int(seconds * 100) + 200):
        await clock.advance(0.01)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert most_in_any_window(grants, 1.0) <= 5
    assert len(grants) >= 5 * seconds
