import asyncio

from proxy.clock import AutoClock, VirtualClock


async def test_virtual_sleepers_wake_in_deadline_order_at_their_own_time():
    clock = VirtualClock()
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append((name, clock.now()))

    tasks = [asyncio.create_task(sleeper("late", 30)), asyncio.create_task(sleeper("early", 10))]
    await asyncio.sleep(0)
    await clock.advance(20)
    assert woke == [("early", 10)]
    await clock.advance(20)
    assert woke == [("early", 10), ("late", 30)]
    assert clock.now() == 40
    await asyncio.gather(*tasks)


async def test_wall_time_moves_with_virtual_time():
    clock = VirtualClock(start=1000.0)
    await clock.advance(7200)
    assert clock.wall() == 8200.0


async def test_auto_clock_skips_short_waits_but_not_far_timers():
    clock = AutoClock()
    far = asyncio.create_task(clock.sleep(7200))
    await clock.sleep(1.5)   # returns at once in real time
    assert clock.now() == 1.5
    await asyncio.sleep(0.01)
    assert not far.done() and clock.now() == 1.5
    far.cancel()
