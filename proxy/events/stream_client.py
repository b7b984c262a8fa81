"""What the DingTalk Stream and Feishu long-connection clients share: their constructor and start/close lifecycle,
owning the connection only while this replica holds its lease, the idle watchdog, bounded connection set-up,
storing a pushed event before it is acknowledged, and the short per-event tasks they spawn.

No protocol, endpoint or reconnect policy lives here; each platform's client writes its own.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import aiohttp

from proxy.clock import Clock
from proxy.events.cards import CardRelay
from proxy.events.delivery import Delivery
from proxy.events.lease import LeaseKeeper
from proxy.events.metrics import EventMetrics
from proxy.events.queue import Admission, Event, EventStoreUnavailable
from proxy.events.settings import StreamSettings

log = logging.getLogger(__name__)
T = TypeVar("T")
CLOSE_GRACE = 1.0   # seconds close() lets an acknowledgement under way finish before cancelling it


class Liveness:
    """When the connection last heard anything from the server; silence longer than a limit means it is dead
    even though TCP looks open (a hung gateway), so the client reconnects instead of waiting forever."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.last = clock.now()

    def touch(self) -> None:
        self.last = self._clock.now()

    async def silent_for(self, limit: Callable[[], float]) -> None:
        """Return once nothing was heard for `limit()` seconds (read again at each look: servers retune it)."""
        while True:
            idle = self._clock.now() - self.last
            if idle >= limit():
                return
            await self._clock.sleep(limit() - idle)


class StreamClient:
    """One app's outbound connection, run as one long task by `run` (each platform writes its own, with its own
    reconnect rules); per-event tasks started with `_spawn` get a moment to finish on `close`, then are cancelled."""

    task_prefix = "events-stream"

    def __init__(self, name: str, stream: StreamSettings, delivery: Delivery, session: aiohttp.ClientSession,
                 metrics: EventMetrics, clock: Clock, rng: random.Random | None = None, *,
                 keeper: LeaseKeeper | None = None, cards: CardRelay | None = None) -> None:
        self.name, self._stream = name, stream
        self._delivery, self._session, self._metrics, self._clock = delivery, session, metrics, clock
        self._rng = rng or random.Random()
        self._keeper, self._cards = keeper, cards
        self._task: asyncio.Task[None] | None = None
        self._children: set[asyncio.Task[Any]] = set()

    async def run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        if self._task is None:
            if self._keeper is not None:
                self._keeper.start()
            self._task = asyncio.create_task(self.run(), name=f"{self.task_prefix}-{self.name}")

    async def close(self) -> None:
        """Stop intake: close the connection (the platform pushes what it had not sent us to another connection, or
        again later), let acknowledgements under way finish, then hand the connection lease over."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=CLOSE_GRACE)   # closing the websocket, bounded
            self._task = None
        if self._children:
            await asyncio.wait(set(self._children), timeout=CLOSE_GRACE)
        for task in list(self._children):
            task.cancel()
        if self._children:
            await asyncio.wait(set(self._children), timeout=CLOSE_GRACE)
        if self._keeper is not None:
            await self._keeper.close()
        self._metrics.connected.labels(self.name).set(0)

    # Ownership and liveness --------------------------------------------------------------------------------------

    async def _wait_owned(self) -> None:
        """Connect only while this replica holds one of the app's connection slots (always, without Redis)."""
        if self._keeper is not None:
            await self._keeper.wait_held()

    async def _hold(self, reader: asyncio.Task[str], liveness: Liveness, limit: Callable[[], float],
                    *also: tuple[Awaitable[Any], str]) -> str:
        """Wait until the reader ends (its result), the connection goes silent ("idle"), the lease is lost
        ("lease"), or one of `also` happens (its name). The reader is left running; the caller decides."""
        watchers = {asyncio.ensure_future(liveness.silent_for(limit)): "idle"}
        if self._keeper is not None:
            watchers[asyncio.ensure_future(self._keeper.wait_lost())] = "lease"
        watchers |= {asyncio.ensure_future(awaitable): name for awaitable, name in also}
        try:
            done, _ = await asyncio.wait({reader, *watchers}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for watcher in watchers:
                watcher.cancel()
        if reader in done:
            return reader.result()
        reason = next(watchers[w] for w in watchers if w in done)
        if reason == "idle":
            log.warning("events: %s: nothing heard for %.0fs; reconnecting", self.name, limit())
        return reason

    async def _bounded(self, work: Awaitable[T]) -> T:
        """Connection set-up within `endpoint_timeout` (the session's own timeout is minutes: a hung gateway
        must not hold reconnection that long)."""
        return await asyncio.wait_for(work, self._stream.endpoint_timeout)

    # Intake ------------------------------------------------------------------------------------------------------

    async def _store(self, event: Event) -> bool:
        """Store a pushed event; True when it is safe to acknowledge (stored now, or a duplicate of a stored one)."""
        try:
            admission = await self._delivery.submit(event)
        except EventStoreUnavailable:
            return False
        return admission is not Admission.FULL

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        # Held until done, so close() can let it finish or cancel it.
        task = asyncio.create_task(work)
        self._children.add(task)
        task.add_done_callback(self._children.discard)
