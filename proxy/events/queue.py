"""The durable event queue every app's delivery lane stands on: what it stores, what it promises, which backend.

Owns the records (`Event`, `Queued`, `DeadLetter`), the `EventStore` protocol its three backends implement (Redis
Stream, SQLite journal, memory) and choosing one from config; it does not deliver, verify or acknowledge anything.

The promises, for every backend:
- `admit` returns only once the event is stored as durably as the backend can (a Redis write, a committed journal
  transaction); only then may a platform be acknowledged. It checks dedupe and stores in one atomic step, so an
  event is either new and queued, or a duplicate of one already queued or delivered within `dedupe_ttl`.
- Per app, `head` gives the oldest event not yet settled; it stays the head (across restarts and crashes) until
  `settle` (delivered) or `bury` (moved to the dead letters). So delivery is in order and at least once.
- Dead letters stay until an operator replays them (`replay`, back to the tail of the queue) or the store trims
  the oldest beyond `dead_letter_max`.

    EventStoreError          the store cannot be opened at all (bad path, wrong backend): the sidecar does not start
    EventStoreUnavailable    one operation failed (Redis away, disk full): do not acknowledge; try again later
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from proxy.clock import Clock, finished_within

if TYPE_CHECKING:
    from proxy.events.lease import Lease
    from proxy.events.settings import QueueSettings
    from proxy.store import StoreSettings

BACKENDS = ("redis", "journal", "memory")


class EventStoreError(Exception):
    """The event store could not be opened; the message names the setting to fix (never a password)."""


class EventStoreUnavailable(Exception):
    """One store operation failed; nothing was changed that the caller has to undo."""


class Admission(enum.Enum):
    QUEUED = "queued"        # new: stored, it will be delivered
    DUPLICATE = "duplicate"  # already queued or delivered within the dedupe TTL: acknowledge, do not store again
    FULL = "full"            # the app's queue is at its limit: do not acknowledge, let the platform push it again

    @property
    def stored(self) -> bool:
        """The event is in our hands (now or before): safe to acknowledge."""
        return self is not Admission.FULL


Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Event:
    """One verified event: the body the application receives, the headers that go with it, the dedupe key."""

    key: str                     # platform event id or message id; a hash of the plaintext when the platform has none
    body: bytes                  # the JSON the application receives
    headers: Headers = ()        # X-Imsidecar-Event-* headers sent with it (type, topic, corp id...)
    received_at: float = 0.0     # wall time the sidecar took it; `delivery.max_age` counts from here


@dataclass(frozen=True, slots=True)
class Queued:
    """An event as stored: the backend's id for it (a stream id, a journal row) and the event."""

    id: str
    event: Event


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event given up on: why, when, after how many attempts. Listed and replayed with `imsidecar events`."""

    id: str
    app: str
    event: Event
    reason: str           # expired (older than delivery.max_age) | app_rejected (the application answered 4xx)
    died_at: float        # wall time
    attempts: int


class EventStore(Protocol):
    """One backend, shared by every events app of this sidecar (keys and rows are per app)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def admit(self, app: str, event: Event, dedupe_ttl: float, limit: int) -> Admission:
        """Store `event` unless its key was admitted within `dedupe_ttl` or `limit` events wait already."""

    async def head(self, app: str) -> Queued | None:
        """The oldest event of `app` not yet settled or buried (the same one until it is)."""

    async def settle(self, app: str, item: Queued) -> None:
        """The application accepted it: forget it (its key stays remembered for dedupe)."""

    async def bury(self, app: str, item: Queued, reason: str, attempts: int) -> None:
        """Move it to the dead letters."""

    async def depth(self, app: str) -> int: ...

    async def wait(self, app: str, seconds: float) -> None:
        """Return when an event may have arrived for `app`, or after `seconds` (the injected clock's)."""

    async def dead_letters(self, app: str, limit: int) -> list[DeadLetter]:
        """The oldest `limit` dead letters of `app`."""

    async def replay(self, app: str, ids: Sequence[str] | None) -> int:
        """Queue the named dead letters (all when None) again, at the tail, as if just received; the count."""

    def lease(self, app: str, role: str, slots: int) -> Lease:
        """A lease among replicas sharing this store (`deliver`, `connection`); always granted when not shared."""


@dataclass
class Arrivals:
    """Wakes an app's lane when this process admits an event for it (other replicas are found by polling)."""

    _events: dict[str, asyncio.Event] = field(default_factory=dict)

    def notify(self, app: str) -> None:
        self._get(app).set()

    async def wait(self, app: str, seconds: float, clock: Clock) -> None:
        signal = self._get(app)
        if signal.is_set():
            signal.clear()
            return
        await finished_within(clock, signal.wait(), seconds)
        signal.clear()

    def _get(self, app: str) -> asyncio.Event:
        return self._events.setdefault(app, asyncio.Event())


def backend_for(queue: QueueSettings, store: StoreSettings) -> str:
    """The configured backend, or the default: Redis when replicas share one, else the on-disk journal."""
    if queue.backend:
        return queue.backend
    return "redis" if store.shared else "journal"


def open_event_store(queue: QueueSettings, store: StoreSettings, clock: Clock) -> EventStore:
    """The backend the settings ask for; sqlite3 and redis are imported only when chosen."""
    backend = backend_for(queue, store)
    if backend == "memory":
        from proxy.events.queue_memory import MemoryEventStore
        return MemoryEventStore(clock, queue.dead_letter_max)
    if backend == "journal":
        from proxy.events.journal import Journal
        return Journal(queue.path, clock, queue.dead_letter_max, queue.poll_interval)
    if not store.shared:
        raise EventStoreError("events.queue.backend: redis needs `store: {backend: redis, ...}` for the connection")
    from proxy.events.redis_stream import RedisEventStore
    return RedisEventStore(store, clock, queue.dead_letter_max, queue.poll_interval, queue.lease_ttl)
