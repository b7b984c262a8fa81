"""The watchdog's per-try timeouts: a late attempt is cancelled as a timeout, a prompt one untouched."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Callable

import pytest

from proxy.watchdog import Cut, Watchdog


async def attempt(dog: Watchdog, takes: float, allowed: float, within: float = math.inf) -> str:
    task = dog.watch(allowed, within)
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


def stall_loop(seconds: float) -> None:
    """What thousands of requests in flight do to the event loop: nothing else runs for a while."""
    time.sleep(seconds)


async def test_time_the_loop_was_too_busy_to_run_is_not_charged_to_an_attempt() -> None:
    # The attempt's platform answers after 40 ms of its 60 ms, but 20 ms in the loop stalls for 100 ms: the ticker
    # then runs first (its timer is the earliest) and, charging the stall to the attempt, would cut it off.
    dog = Watchdog(tick=0.005)
    asyncio.get_running_loop().call_later(0.02, stall_loop, 0.1)
    assert await attempt(dog, 0.04, 0.06) == "answered"


async def test_a_slow_attempt_still_times_out_when_the_loop_was_stalled_too() -> None:
    dog = Watchdog(tick=0.005)
    asyncio.get_running_loop().call_later(0.01, stall_loop, 0.1)
    assert await attempt(dog, 0.5, 0.03) == "timed out"


async def test_the_deadline_is_wall_time_that_no_stall_extends() -> None:
    dog = Watchdog(tick=0.005)
    asyncio.get_running_loop().call_later(0.01, stall_loop, 0.1)
    # a per-try timeout of 1 s, but only 50 ms left of the request's deadline
    assert await attempt(dog, 0.5, 1.0, within=0.05) == "timed out"


async def test_an_earlier_attempt_heard_out_cannot_pause_the_next_attempts_clock() -> None:
    """Attempt 1 runs in a task of its own and is released (it timed out; it goes on to be heard out). Should it
    then wait for a pooled connection, that wait is nobody's now: attempt 2, watched in the same request task,
    still times out on its own clock."""
    dog = Watchdog(tick=0.005)
    loop = asyncio.get_running_loop()
    first_waits, first_resumes = asyncio.Event(), asyncio.Event()

    async def first_attempt() -> None:
        await first_waits.wait()
        dog.waiting()          # told by the pool, in the attempt's own task
        await first_resumes.wait()
        dog.resumed()

    own = loop.create_task(first_attempt())
    task = dog.watch(10.0, runs_in=own)
    dog.release(task, own)
    first_waits.set()
    assert await attempt(dog, 0.3, 0.03) == "timed out"   # its 30 ms, not paused by attempt 1's wait
    first_resumes.set()
    await own
    assert dog.queued(task) == 0.0



async def cut_while_unsent(dog: Watchdog, enter: Callable[[], None], leave: Callable[[], None], seconds: float,
                           within: float = math.inf) -> tuple[Cut | None, list[bool]]:
    """An attempt in a task of its own tells the watchdog it waits for its connection (`enter`, as the pool
    does) until the request is cut off; the connection comes (`leave`) before the request has handled its cut.
    Why it was cut, and whether the attempt was abandoned when the pool asked, before it could be sent."""
    loop = asyncio.get_running_loop()
    seen: list[bool] = []
    connection = asyncio.Event()

    async def unsent_attempt() -> None:
        enter()
        await connection.wait()
        leave()
        seen.append(dog.abandoned())   # what the pool asks before the attempt may be sent

    own = loop.create_task(unsent_attempt())
    task = dog.watch(seconds, within=within, runs_in=own)
    cut = None
    try:
        await asyncio.sleep(1.0)
    except asyncio.CancelledError:
        connection.set()
        await asyncio.sleep(0)   # the attempt runs before this request has released anything
        cut = dog.release(task, own)
    await own
    return cut, seen


async def test_the_deadline_in_the_pools_queue_is_told_apart_and_leaves_the_waiting_attempt_abandoned() -> None:
    """The request's deadline comes while its attempt waits for a free pooled connection: the cut says QUEUED
    (the sidecar's queue: nothing was sent), and the attempt is abandoned from that moment, before the request
    has handled its cut: a connection given to it in between must not carry it out."""
    dog = Watchdog(tick=0.005)
    assert await cut_while_unsent(dog, dog.waiting, dog.resumed, 10.0, within=0.02) == (Cut.QUEUED, [True])


async def test_a_cut_while_the_attempts_connection_is_made_says_connecting_and_leaves_the_attempt_abandoned() -> None:
    """The per-try timeout comes while the attempt makes a new connection: the cut says CONNECTING (nothing was
    sent), and the attempt is abandoned from that moment: the connection made before the request has handled its
    cut must not carry it out. Its per-try time kept running (the platform's time)."""
    dog = Watchdog(tick=0.005)
    assert await cut_while_unsent(dog, dog.connecting, dog.connected, 0.02) == (Cut.CONNECTING, [True])


async def test_once_connected_a_cut_is_a_timeout_again() -> None:
    dog = Watchdog(tick=0.005)
    task = dog.watch(0.02)
    dog.connecting()
    await asyncio.sleep(0)
    dog.connected()   # the request may be on the wire from here on
    try:
        await asyncio.sleep(1.0)
    except asyncio.CancelledError:
        cut = dog.release(task)
    assert cut is Cut.TIMEOUT and not dog._connecting


async def test_a_cut_while_the_attempt_is_at_the_platform_is_a_timeout_and_abandons_nothing_else() -> None:
    dog = Watchdog(tick=0.005)
    task = dog.watch(0.02)
    try:
        await asyncio.sleep(1.0)
    except asyncio.CancelledError:
        cut = dog.release(task)
    assert cut is Cut.TIMEOUT
    assert not dog.abandoned()   # the request's own task goes on (a retry) and may send again
