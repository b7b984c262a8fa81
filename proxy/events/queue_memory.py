"""The in-memory event store: `events.queue.backend: memory`, an explicit choice for tests and throwaway set-ups.

Owns per-app FIFOs, dedupe and dead letters in this process's memory; nothing survives a restart, which is why
it is never the default (the journal is). It shares nothing with other replicas: its leases are always granted.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import replace

from proxy.clock import Clock
from proxy.events.lease import Lease, LocalLease
from proxy.events.queue import Admission, Arrivals, DeadLetter, Event, Queued


class SeenKeys:
    """Keys admitted recently, each until its own expiry (wall time); at most `limit`, oldest forgotten first."""

    def __init__(self, clock: Clock, limit: int) -> None:
        self._clock, self._limit = clock, limit
        self._expiry: OrderedDict[str, float] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        expiry = self._expiry.get(key)
        return expiry is not None and expiry > self._clock.wall()

    def add(self, key: str, ttl: float) -> None:
        self._expiry.pop(key, None)
        self._expiry[key] = self._clock.wall() + ttl
        while len(self._expiry) > self._limit:
            self._expiry.popitem(last=False)


class MemoryEventStore:
    def __init__(self, clock: Clock, dead_letter_max: int, dedupe_max: int = 100_000) -> None:
        self._clock, self._dead_max, self._dedupe_max = clock, dead_letter_max, dedupe_max
        self._queues: dict[str, deque[Queued]] = {}
        self._seen: dict[str, SeenKeys] = {}
        self._dead: dict[str, OrderedDict[str, DeadLetter]] = {}
        self._ids = itertools.count(1)
        self._arrivals = Arrivals()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def admit(self, app: str, event: Event, dedupe_ttl: float, limit: int) -> Admission:
        seen = self._seen.setdefault(app, SeenKeys(self._clock, self._dedupe_max))
        if event.key in seen:
            return Admission.DUPLICATE
        queue = self._queue(app)
        if len(queue) >= limit:
            return Admission.FULL
        queue.append(Queued(str(next(self._ids)), event))
        seen.add(event.key, dedupe_ttl)
        self._arrivals.notify(app)
        return Admission.QUEUED

    async def head(self, app: str) -> Queued | None:
        queue = self._queue(app)
        return queue[0] if queue else None

    async def settle(self, app: str, item: Queued) -> None:
        queue = self._queue(app)
        if queue and queue[0].id == item.id:
            queue.popleft()

    async def bury(self, app: str, item: Queued, reason: str, attempts: int) -> None:
        await self.settle(app, item)
        dead = self._dead.setdefault(app, OrderedDict())
        dead[item.id] = DeadLetter(item.id, app, item.event, reason, self._clock.wall(), attempts)
        while len(dead) > self._dead_max:
            dead.popitem(last=False)

    async def depth(self, app: str) -> int:
        return len(self._queue(app))

    async def wait(self, app: str, seconds: float) -> None:
        await self._arrivals.wait(app, seconds, self._clock)

    async def dead_letters(self, app: str, limit: int) -> list[DeadLetter]:
        return list(self._dead.get(app, {}).values())[:limit]

    async def replay(self, app: str, ids: Sequence[str] | None) -> int:
        dead = self._dead.get(app, OrderedDict())
        chosen = list(dead) if ids is None else [i for i in ids if i in dead]
        for dead_id in chosen:
            letter = dead.pop(dead_id)
            event = replace(letter.event, received_at=self._clock.wall())
            self._queue(app).append(Queued(str(next(self._ids)), event))
        if chosen:
            self._arrivals.notify(app)
        return len(chosen)

    def lease(self, app: str, role: str, slots: int) -> Lease:
        return LocalLease()

    def pending(self) -> int:
        """Events still queued, which a restart loses: counted and logged at shutdown."""
        return sum(len(queue) for queue in self._queues.values())

    def _queue(self, app: str) -> deque[Queued]:
        return self._queues.setdefault(app, deque())
