"""Per-attempt timeouts for the hot path: one ticking watchdog instead of a timer per attempt.

Owns cancelling attempts that outlive their per-try timeout (within one tick, 10 ms); what a timeout means is the
caller's. `asyncio.timeout` costs a timer-heap insert and removal per attempt, measurable at thousands per second.

A per-try timeout is the platform's time, not the sidecar's: when the event loop is too busy to run the ticker on
time (thousands of requests in flight at once), the time it fell behind is not counted against any attempt. An
attempt that waited for the loop was not slowed by the platform, and cutting it off only sends the same work again
into the same queue (retries that feed the overload they were taken for). The request's deadline is another matter:
it is the client's wall time, and a stall never moves it (`within`). Nor is the time an attempt waits for a free
pooled connection counted (`waiting`/`resumed`, told by proxy/upstream.py's pool): that queue is the sidecar's.

Also owns which attempts their request no longer waits for (`abandoned`): one that had not been sent when it was
cut off, or when its request ended, must never be sent. One in that queue when the deadline comes is cut `QUEUED`;
one cut off while its new connection was being made (`connecting`/`connected`) is cut `CONNECTING`: not sent.
"""

from __future__ import annotations

import asyncio
import enum
import math
from typing import Any

TICK = 0.01


class Cut(enum.Enum):
    """Why the watchdog cut an attempt off."""

    TIMEOUT = "timeout"         # it had its connection (it may have been sent) and no answer came in time
    CONNECTING = "connecting"   # its new connection was still being made (DNS, TCP, TLS, a proxy's tunnel): unsent
    QUEUED = "queued"           # the request's deadline came while it still waited for a free pooled connection


class Watchdog:
    def __init__(self, tick: float = TICK) -> None:
        self._tick = tick
        self._due: dict[asyncio.Task[Any], tuple[float, float]] = {}   # (platform time due, wall time due)
        self._expired: dict[asyncio.Task[Any], Cut] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._stalled = 0.0   # seconds the loop ran the ticker late, in all: not the platform's time
        # waiting for the sidecar: (platform time left, since, the task that waits: the attempt's own, if it has one)
        self._paused: dict[asyncio.Task[Any], tuple[float, float, asyncio.Task[Any]]] = {}
        self._queued: dict[asyncio.Task[Any], float] = {}   # seconds an attempt waited for the sidecar, in all
        self._runs_in: dict[asyncio.Task[Any], asyncio.Task[Any]] = {}   # a task of its own → the watched task
        self._abandoned: set[asyncio.Task[Any]] = set()   # attempts' own tasks that no request waits for any more
        self._connecting: dict[asyncio.Task[Any], asyncio.Task[Any]] = {}   # watched → the task making its connection
        self._left_unsent: set[asyncio.Task[Any]] = set()   # watched tasks whose attempt was cancelled unsent

    def watch(self, seconds: float, within: float = math.inf,
              runs_in: asyncio.Task[Any] | None = None) -> asyncio.Task[Any]:
        """Cancel the current task if it is still being watched after `seconds` of the platform's time (the loop's
        stalls not counted) or `within` seconds of wall time, whichever comes first. `runs_in`: the attempt runs
        in that task of its own (the current task awaits it), which is the one that says it is `waiting`."""
        task = asyncio.current_task()
        assert task is not None
        loop = task.get_loop()
        now = loop.time()
        self._due[task] = (now - self._stalled + seconds, now + within)
        if runs_in is not None:   # an attempt heard out: until `release`, its pool waits are the watched task's
            self._runs_in[runs_in] = task
        if self._ticker is None or self._ticker.done() or self._ticker.get_loop() is not loop:
            self._ticker = loop.create_task(self._run())
        return task

    def waiting(self) -> None:
        """The current task's attempt waits for the sidecar itself (a free pooled connection), not for the
        platform: its platform clock stops until `resumed`. Its wall-time bound (`within`) keeps running."""
        current = asyncio.current_task()
        watched = self._watched(current)
        due = self._due.get(watched) if watched is not None else None
        if current is None or watched is None or due is None or watched in self._paused:
            return
        now = asyncio.get_running_loop().time()
        self._paused[watched] = (due[0] - (now - self._stalled), now, current)
        self._due[watched] = (math.inf, due[1])

    def resumed(self) -> None:
        watched = self._watched(asyncio.current_task())
        paused = self._paused.pop(watched, None) if watched is not None else None
        due = self._due.get(watched) if watched is not None else None
        if watched is None or paused is None or due is None:
            return
        left, since, _ = paused
        now = asyncio.get_running_loop().time()
        self._due[watched] = (now - self._stalled + left, due[1])
        self._queued[watched] = self._queued.get(watched, 0.0) + now - since

    def connecting(self) -> None:
        """The current task's attempt makes a new connection (asked only then: a pooled one is not made), so
        nothing of it has been sent: cut off now, it is cut `CONNECTING`, and never sent once connected."""
        current = asyncio.current_task()
        watched = self._watched(current)
        if current is not None and watched in self._due:
            self._connecting[watched] = current

    def connected(self) -> None:
        watched = self._watched(asyncio.current_task())
        if watched is not None:
            self._connecting.pop(watched, None)

    def unsent(self, task: asyncio.Task[Any]) -> bool:
        """Whether `task`'s attempt is still waiting for a pooled connection or for its new one to be made, or
        was cancelled while it did (`left_unsent`)."""
        return task in self._paused or task in self._connecting or task in self._left_unsent

    def left_unsent(self) -> None:
        """The current task's attempt is cancelled while it waits for a connection (told by the pool before the
        cancellation unwinds through `resumed` and `connected`)."""
        watched = self._watched(asyncio.current_task())
        if watched in self._due:
            self._left_unsent.add(watched)

    def queued(self, task: asyncio.Task[Any]) -> float:
        """Seconds `task`'s attempt has waited for the sidecar (`waiting` to `resumed`): not the platform's time."""
        return self._queued.get(task, 0.0)

    def _watched(self, task: asyncio.Task[Any] | None) -> asyncio.Task[Any] | None:
        """The watched task `task`'s attempt stands for: itself, or the request that runs it in a task of its own."""
        return self._runs_in.get(task, task) if task is not None else None

    def release(self, task: asyncio.Task[Any], runs_in: asyncio.Task[Any] | None = None) -> Cut | None:
        """Stop watching `task`, and the attempt's own task `runs_in`: if still running, it may go on to be heard
        out, and is `abandoned` from now on. Why, when the watchdog had cut `task` off (its cancellation is then
        the watchdog's: a timeout, or the deadline in the pool's queue); None when it had not."""
        if runs_in is not None:
            self._runs_in.pop(runs_in, None)
            if not runs_in.done():
                self._abandon(runs_in)
        self._due.pop(task, None)
        self._paused.pop(task, None)
        self._queued.pop(task, None)
        self._connecting.pop(task, None)
        self._left_unsent.discard(task)
        cut = self._expired.pop(task, None)
        if cut is not None:
            task.uncancel()
        return cut

    def abandoned(self) -> bool:
        """Whether the current task is an attempt's own whose request has stopped waiting for it. One not sent
        yet must not be: its client may have been answered already."""
        return bool(self._abandoned) and asyncio.current_task() in self._abandoned   # mostly none: no syscall

    def _abandon(self, attempt: asyncio.Task[Any]) -> None:
        if attempt not in self._abandoned:
            self._abandoned.add(attempt)
            attempt.add_done_callback(self._abandoned.discard)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        ticked = loop.time()
        while self._due:
            await asyncio.sleep(self._tick)
            now = loop.time()
            self._stalled += max(0.0, now - ticked - 2 * self._tick)   # a tick of slack for ordinary jitter
            ticked, platform_now = now, now - self._stalled
            for task, (due, wall_due) in list(self._due.items()):
                if due <= platform_now or wall_due <= now:
                    self._cut(task)

    def _cut(self, task: asyncio.Task[Any]) -> None:
        del self._due[task]
        paused, connecting = self._paused.get(task), self._connecting.get(task)
        self._expired[task] = (Cut.QUEUED if paused is not None else Cut.CONNECTING if connecting is not None
                               else Cut.TIMEOUT)
        waits = paused[2] if paused is not None else connecting
        if waits is not None and waits is not task:
            self._abandon(waits)   # now: it may get its connection, and be sent, before `task` runs again
        task.cancel()
