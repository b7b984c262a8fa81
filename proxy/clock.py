"""Time as a parameter: the real clock, and a virtual clock that tests advance by hand.

Owns `now`/`wall`/`sleep`, and waiting for something at most so long on a clock (`finished_within`); it does not
own deadlines or the timers built on top of them.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Any, Awaitable, Coroutine, Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds, for intervals and deadlines."""

    def wall(self) -> float:
        """Unix seconds, for anything a platform stamps or compares (token expiry, signatures)."""

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` of this clock's time."""


class SystemClock:
    # The functions themselves, not methods calling them: `now()` is read a dozen times per request, and a Python
    # frame around a C call costs more than the call.
    now = staticmethod(time.monotonic)
    wall = staticmethod(time.time)

    def sleep(self, seconds: float) -> Coroutine[Any, Any, None]:
        # asyncio's own coroutine, not one awaiting it: a frame less for every sleeper (1,000 apps' token refreshers
        # sleep at all times)
        return asyncio.sleep(max(0.0, seconds))


class VirtualClock:
    """A clock whose time moves only when a test calls `advance`.

    Sleepers wake in deadline order, each seeing `now()` equal to its own deadline, so code
    that sleeps in a loop behaves as it would in real time, only without the waiting.
    """

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = 0.0
        self._epoch = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._epoch + self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), future))
        await future

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking every sleeper whose deadline falls inside the step."""
        target = self._now + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, future = heapq.heappop(self._sleepers)
            self._now = max(self._now, deadline)
            if not future.done():
                future.set_result(None)
            await settle()
        self._now = max(self._now, target)   # another advance may have run meanwhile: time never goes back
        await settle()

    @property
    def sleepers(self) -> int:
        return sum(1 for _, _, f in self._sleepers if not f.done())


class AutoClock(VirtualClock):
    """Virtual time that jumps to the next sleeper's deadline whenever real work has had a moment to run.

    For integration tests and benchmarks that mix real loopback I/O with short waits (back-off, Retry-After):
    waits cost no real time, while requests in flight still run for real. Timers further away than `max_jump`
    (a token refresh in two hours) are left for the test to reach with `advance`, or time would leap past
    every deadline whenever such a timer exists.
    """

    def __init__(self, start: float = 1_800_000_000.0, step: float = 0.0005, max_jump: float = 60.0) -> None:
        super().__init__(start)
        self._step, self._max_jump = step, max_jump
        self._driver: asyncio.Task[None] | None = None

    async def sleep(self, seconds: float) -> None:
        if self._driver is None or self._driver.done():
            self._driver = asyncio.create_task(self._drive())
        await super().sleep(seconds)

    async def _drive(self) -> None:
        while self._pending_within_reach():
            await asyncio.sleep(self._step)
            if self._pending_within_reach():
                await self.advance(max(0.0, self._sleepers[0][0] - self._now))

    def _pending_within_reach(self) -> bool:
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)   # a cancelled sleeper
        return bool(self._sleepers) and self._sleepers[0][0] - self._now <= self._max_jump


async def settle(rounds: int = 20) -> None:
    """Let every ready task run until it blocks again (on I/O or a sleep)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def finished_within(clock: Clock, awaitable: Awaitable[object], seconds: float) -> bool:
    """Wait for `awaitable` at most `seconds` of `clock` time. True if it finished (or failed) in time; if not, it
    is cancelled. Pass a task or future to read its result afterwards."""
    work = asyncio.ensure_future(awaitable)
    timer = asyncio.ensure_future(clock.sleep(seconds))
    try:
        await asyncio.wait((work, timer), return_when=asyncio.FIRST_COMPLETED)
    finally:
        timer.cancel()
        finished = work.done()
        if not finished:
            work.cancel()
    return finished and not work.cancelled()
