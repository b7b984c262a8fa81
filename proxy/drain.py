"""The drain on SIGTERM: which requests are in flight, which are only waiting, and cutting both short in time.

Owns the in-flight set, the interruptible waits (back-off, rate limiter) and the end of the drain; the order of
shutting down is the app's, what a cut-short request answers is the pipeline's and the retry loop's.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from proxy.clock import Clock, finished_within
from proxy.errors import ShuttingDown


class Drain:
    """Open until `begin()`; then waits end at once, and at `cut()` every request still in flight is cancelled."""

    def __init__(self) -> None:
        self.draining = False
        self._in_flight: set[asyncio.Task[object]] = set()
        self._waiting: set[asyncio.Task[object]] = set()
        self._cut: set[asyncio.Task[object]] = set()   # cancelled by the drain, not by their client
        self._idle: asyncio.Event | None = None
        self._ended = False   # the drain's end has cut what was in flight: anything adopted later is cut at once

    # Requests ----------------------------------------------------------------------------------------------------

    def enter(self) -> asyncio.Task[object]:
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        return task

    def leave(self, task: asyncio.Task[object]) -> None:
        self._in_flight.discard(task)
        if not self._in_flight and self._idle is not None:
            self._idle.set()

    def adopt(self, work: asyncio.Task[object]) -> None:
        """In flight until done, though no request's handler waits for it (what a client that left started)."""
        self._in_flight.add(work)
        work.add_done_callback(self.leave)
        if self._ended:
            self._interrupt(work)

    def cutting(self, task: asyncio.Task[object]) -> bool:
        """Whether `task`'s cancellation is the drain's (as `was_cut`, without taking it back)."""
        return task in self._cut

    def was_cut(self, task: asyncio.Task[object]) -> bool:
        """True when `task`'s cancellation is the drain's (it is uncancelled: it still has an answer to give)."""
        if not self.cutting(task):
            return False
        self._cut.discard(task)
        task.uncancel()
        return True

    def interruptible(self) -> Interruptible:
        """`with drain.interruptible(): await wait` raises ShuttingDown when the drain begins during the wait.

        A wait that starts once the drain has begun is not refused (a free slot costs nothing); the end of the
        drain still cuts it short.
        """
        return Interruptible(self)

    async def sleep(self, clock: Clock, seconds: float) -> bool:
        """A back-off wait: True when it ran its course, False when the drain began first (or had begun)."""
        if self.draining:
            return False
        try:
            with self.interruptible():
                await clock.sleep(seconds)
        except ShuttingDown:
            return False
        return True

    # The sidecar's side ------------------------------------------------------------------------------------------

    def begin(self) -> None:
        """Stop waiting: every request in back-off or queued for a rate-limit slot is answered now."""
        self.draining = True
        for task in list(self._waiting):
            self._interrupt(task)

    async def settle(self, clock: Clock, seconds: float) -> int:
        """Wait up to `seconds` for the in-flight requests to finish; cut the rest short. Returns how many were cut."""
        if self._in_flight:
            self._idle = asyncio.Event()
            await finished_within(clock, self._idle.wait(), seconds)
        late = list(self._in_flight)
        self._ended = True
        for task in late:
            self._interrupt(task)
        return len(late)

    async def finished(self, seconds: float) -> None:
        """Give cut-short requests a moment (real time: it is the writing of their answers) to leave."""
        if self._in_flight:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), seconds)
            except TimeoutError:
                pass

    def _interrupt(self, task: asyncio.Task[object]) -> None:
        if not task.done() and task not in self._cut:
            self._cut.add(task)
            task.cancel()


class Interruptible:
    __slots__ = ("_drain", "_task")

    def __init__(self, drain: Drain) -> None:
        self._drain = drain
        self._task: asyncio.Task[object] | None = None

    def __enter__(self) -> None:
        self._task = asyncio.current_task()
        assert self._task is not None
        self._drain._waiting.add(self._task)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        assert self._task is not None
        self._drain._waiting.discard(self._task)
        if kind is asyncio.CancelledError and self._drain.was_cut(self._task):
            raise ShuttingDown("the sidecar is shutting down") from exc


__all__ = ["Drain", "Interruptible"]
