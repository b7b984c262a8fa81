"""The watchdog's per-try timeouts: a late attempt is cancelled as a timeout, a prompt one untouched."""

from __future__ import annotations

import asyncio

import pytest

from proxy.watchdog import Watchdog


async def attempt(dog: Watchdog, takes: float, allowed: float) -> str:
    task = dog.watch(allowed)
    try:
        await asyncio.sleep(takes)
        return "answered"
    except asyncio.CancelledError:
        if dog.release(task):
            return "timed out"
        raise
    finally:
        dog.release(task)


async def test_late_attempts_time_out_and_prompt_ones_do_not() -> None:
    dog = Watchdog(tick=0.005)
    results = await asyncio.gather(attempt(dog, 0.2, 0.02), attempt(dog, 0.001, 0.05))
    assert results == ["timed out", "answered"]
    assert asyncio.current_task().cancelling() == 0   # type: ignore[union-attr]


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    dog = Watchdog(tick=0.005)
    task = asyncio.create_task(attempt(dog, 1.0, 10.0))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_timed_out_task_goes_on_normally_afterwards() -> None:
    dog = Watchdog(tick=0.005)
    assert await attempt(dog, 0.2, 0.01) == "timed out"
    await asyncio.sleep(0.02)   # no pending cancellation is left behind
    assert await attempt(dog, 0.001, 1.0) == "answered"
