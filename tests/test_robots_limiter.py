import asyncio

import pytest

from proxy.clock import VirtualClock
from proxy.robots.errors import RateLimited
from proxy.robots.limiter import DINGTALK, FEISHU, MARK_PERIOD, RobotLimiter


async def send_many(clock: VirtualClock, limiter: RobotLimiter, count: int, deadline: float, run_for: float) -> list[float]:
    sent: list[float] = []

    async def one() -> None:
        await limiter.acquire(deadline)
        sent.append(clock.now())

    tasks = [asyncio.create_task(one()) for _ in range(count)]
    await clock.advance(0)
    step = 0.5
    for _ in range(int(run_for / step)):
        await clock.advance(step)
    await asyncio.gather(*tasks)
    return sent


def most_in_any_window(times: list[float], period: float) -> int:
    return max(sum(1 for u in times if t <= u < t + period) for t in times)


async def test_dingtalk_never_sends_more_than_20_in_any_rolling_minute():
    clock = VirtualClock()
    sent = await send_many(clock, RobotLimiter(DINGTALK, clock), 50, deadline=1000, run_for=200)
    assert len(sent) == 50
    assert most_in_any_window(sent, 60.0) == 20
    # ...and it does not over-wait: the 21st goes as soon as the first has aged out (plus the 1 s margin).
    assert sorted(sent)[20] == pytest.approx(61.0, abs=0.5)


async def test_a_slot_past_the_deadline_fails_at_once_with_the_time_to_wait():
    clock = VirtualClock()
    limiter = RobotLimiter(DINGTALK, clock)
    for _ in range(20):
        await limiter.acquire(deadline=30)
    await clock.advance(10)
    with pytest.raises(RateLimited) as caught:
        await limiter.acquire(deadline=clock.now() + 30)
    assert caught.value.retry_after == pytest.approx(51.0)
    assert clock.sleepers == 0  # failed fast: nobody is left waiting


async def test_after_a_too_fast_answer_dingtalk_holds_the_robot_for_its_penalty():
    clock = VirtualClock()
    limiter = RobotLimiter(DINGTALK, clock)
    limiter.penalize()
    with pytest.raises(RateLimited) as caught:
        await limiter.acquire(deadline=30)
    assert caught.value.retry_after == pytest.approx(600.0)


async def test_feishu_keeps_to_5_per_second_and_100_per_minute():
    clock = VirtualClock(start=MARK_PERIOD * 1000 + 600)  # well clear of :00/:30
    sent = await send_many(clock, RobotLimiter(FEISHU, clock, rand=lambda: 0.0), 130, deadline=1000, run_for=150)
    assert most_in_any_window(sent, 1.0) <= 5
    assert most_in_any_window(sent, 60.0) <= 100
    assert len(sent) == 130


@pytest.mark.parametrize("offset", [-0.5, 0.0, 2.0])
async def test_feishu_moves_sends_out_of_the_seconds_around_the_half_hour(offset):
    clock = VirtualClock(start=MARK_PERIOD * 1000 + offset)
    limiter = RobotLimiter(FEISHU, clock, rand=lambda: 0.5)
    task = asyncio.create_task(limiter.acquire(deadline=60))
    await clock.advance(0)
    await clock.advance(20)
    waited = await task
    phase = (clock.wall() - 20 + waited) % MARK_PERIOD
    assert phase == pytest.approx(7.5)  # mark + 5 s quiet + half of the 5 s spread


async def test_feishu_sends_inside_the_quiet_zone_rather_than_miss_the_deadline():
    clock = VirtualClock(start=MARK_PERIOD * 1000)
    waited = await RobotLimiter(FEISHU, clock).acquire(deadline=2.0)
    assert waited == 0.0


async def test_a_cancelled_wait_gives_its_slot_back():
    clock = VirtualClock()
    limiter = RobotLimiter(DINGTALK, clock)
    for _ in range(20):
        await limiter.acquire(deadline=1)
    waiting = asyncio.create_task(limiter.acquire(deadline=100))
    await clock.advance(1)
    waiting.cancel()
    await clock.advance(0)
    await clock.advance(60)
    for _ in range(20):  # a full minute's worth, which the abandoned reservation must not eat into
        assert await limiter.acquire(deadline=clock.now() + 1) == 0.0
