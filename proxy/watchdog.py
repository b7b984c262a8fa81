"""Per-attempt timeouts for the hot path: one ticking watchdog instead of a timer per attempt.

Owns cancelling attempts that outlive their per-try timeout (within one tick, 10 ms); what a timeout means is the
caller's. `asyncio.timeout` costs a timer-heap insert and removal per attempt, measurable at thousands per second.
"""

from __future__ import annotations

import asyncio
from typing import Any

TICK = 0.01


class Watchdog:
    def __init__(self, tick: float = TICK) -> None:
        self._tick = tick
        self._due: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._ticker: asyncio.Task[None] | None = None

    def watch(self, seconds: float) -> asyncio.Task[Any]:
        """Cancel the current task if it is still being watched `seconds` from now."""
        task = asyncio.current_task()
        assert task is not None
        loop = task.get_loop()
        self._due[task] = loop.time() + seconds
        if self._ticker is None or self._ticker.done() or self._ticker.get_loop() is not loop:
            self._ticker = loop.create_task(self._run())
        return task

    def release(self, task: asyncio.Task[Any]) -> bool:
        """Stop watching `task`; True when the watchdog had cancelled it (its cancellation is a timeout)."""
        self._due.pop(task, None)
        if task in self._expired:
            self._expired.discard(task)
            task.uncancel()
            return True
        return False

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._due:
            await asyncio.sleep(self._tick)
            now = loop.time()
            for task, due in list(self._due.items()):
                if due <= now:
                    del self._due[task]
                    self._expired.add(task)
                    task.cancel()
