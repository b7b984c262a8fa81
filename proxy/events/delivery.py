"""Hands verified plaintext events to the application's local URL: bounded queue, in order, retried, deduplicated.

Owns the queue, the per-app worker, dedupe by event id and the POST to the application; it does not verify,
decrypt or acknowledge platforms — callers read the `Ticket` and acknowledge by their platform's rules.

When is a platform acknowledged?
- HTTP callbacks ack on *enqueue*. Feishu wants a 2xx within 3 s and DingTalk its encrypted "success" in about
  as long (check_url within 1.5 s); an application that is slow or restarting would otherwise turn every push
  into a platform retry storm, and Feishu/DingTalk give up after a few tries anyway. The price: an event held only
  in this memory queue is lost if the sidecar dies before delivering it. If the queue is full we do NOT ack, so
  the platform redelivers later — back-pressure instead of silent loss.
- Long connections ack on *delivery*: the platform keeps unacked messages and redelivers them, so waiting for the
  application's 2xx costs nothing and makes delivery at-least-once, and dedupe makes it effectively once.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
from collections import OrderedDict
from dataclasses import dataclass

import aiohttp

from proxy.clock import Clock
from proxy.events.jitter import Backoff
from proxy.events.metrics import EventMetrics
from proxy.events.settings import DeliverySettings

log = logging.getLogger(__name__)

# The application answering one of these will not change its mind on a retry: drop the event (and count it).
_PERMANENT_STATUSES = frozenset({400, 401, 403, 404, 405, 410, 413, 415, 422})


@dataclass(frozen=True, slots=True)
class Event:
    """One verified event: the JSON the application receives, and the id dedupe keys on."""

    key: str     # platform event id or message id; a hash of the plaintext when the platform gives none
    body: bytes  # the plaintext JSON, exactly as the HTTP callback would have carried it


class Admission(enum.Enum):
    QUEUED = "queued"        # new: it will be delivered
    DUPLICATE = "duplicate"  # already delivered or already waiting; the ticket follows the original
    FULL = "full"            # the queue is full: do not acknowledge, let the platform redeliver


@dataclass(frozen=True, slots=True)
class Ticket:
    admission: Admission
    delivered: asyncio.Future[bool]  # True once the application accepted the event (or its original)

    @property
    def accepted(self) -> bool:
        """The event is in our hands: safe to acknowledge to an HTTP callback."""
        return self.admission is not Admission.FULL


class SeenIds:
    """Ids of recently delivered events, each remembered for `ttl` seconds of `clock` time, at most `limit`."""

    def __init__(self, ttl: float, limit: int, clock: Clock) -> None:
        self._ttl, self._limit, self._clock = ttl, limit, clock
        self._expiry: OrderedDict[str, float] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        self._expire()
        return key in self._expiry

    def add(self, key: str) -> None:
        self._expiry.pop(key, None)
        self._expiry[key] = self._clock.now() + self._ttl
        while len(self._expiry) > self._limit:
            self._expiry.popitem(last=False)

    def _expire(self) -> None:
        # Insertion order is expiry order (one TTL for all), so only the front needs looking at.
        now = self._clock.now()
        while self._expiry and next(iter(self._expiry.values())) <= now:
            self._expiry.popitem(last=False)


class Delivery:
    """One app's delivery lane: a bounded FIFO and a single worker, so events arrive in the order received."""

    def __init__(self, app: str, settings: DeliverySettings, session: aiohttp.ClientSession,
                 metrics: EventMetrics, clock: Clock, rng: random.Random | None = None) -> None:
        self.app = app
        self._settings = settings
        self._session = session
        self._metrics = metrics
        self._clock = clock
        self._rng = rng or random.Random()
        self._backoff = Backoff(settings.backoff_base, settings.backoff_cap)
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=settings.queue_size)
        self._pending: dict[str, asyncio.Future[bool]] = {}
        self._seen = SeenIds(settings.dedupe_ttl, settings.dedupe_max, clock)
        self._worker: asyncio.Task[None] | None = None

    def submit(self, event: Event) -> Ticket:
        """Admit an event without waiting; the ticket says whether to acknowledge and when it got through."""
        if event.key in self._pending:
            self._metrics.duplicates.labels(self.app).inc()
            return Ticket(Admission.DUPLICATE, self._pending[event.key])
        if event.key in self._seen:
            self._metrics.duplicates.labels(self.app).inc()
            return Ticket(Admission.DUPLICATE, _resolved(True))
        if self._queue.full():
            self._metrics.reject(self.app, "queue_full")
            return Ticket(Admission.FULL, _resolved(False))
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending[event.key] = future
        self._queue.put_nowait(event)
        self._metrics.queue_depth.labels(self.app).set(self._queue.qsize())
        return Ticket(Admission.QUEUED, future)

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._run(), name=f"events-delivery-{self.app}")

    async def close(self) -> None:
        """Stop the worker; events still queued are counted as dropped and their tickets resolve False."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        for key, future in list(self._pending.items()):
            self._finish(key, future, False, "shutdown")

    async def _run(self) -> None:
        while True:
            event = await self._queue.get()
            self._metrics.queue_depth.labels(self.app).set(self._queue.qsize())
            ok, reason = await self._deliver(event)
            future = self._pending.get(event.key)
            if future is not None:
                self._finish(event.key, future, ok, reason)

    def _finish(self, key: str, future: asyncio.Future[bool], ok: bool, reason: str) -> None:
        self._pending.pop(key, None)
        if ok:
            self._seen.add(key)
            self._metrics.delivered.labels(self.app).inc()
        else:
            # Not remembered as seen: a long connection will redeliver it and it deserves another go.
            self._metrics.dropped.labels(self.app, reason).inc()
            log.warning("events: gave up delivering an event of app %s (%s)", self.app, reason)
        if not future.done():
            future.set_result(ok)

    async def _deliver(self, event: Event) -> tuple[bool, str]:
        for attempt in range(1, self._settings.max_attempts + 1):
            if attempt > 1:
                self._metrics.retried.labels(self.app).inc()
                await self._clock.sleep(self._backoff.delay(attempt - 1, self._rng))
            status = await self._post(event)
            if status is not None and 200 <= status < 300:
                return True, ""
            if status in _PERMANENT_STATUSES:
                return False, "app_rejected"
        return False, "attempts_exhausted"

    async def _post(self, event: Event) -> int | None:
        """One POST; the status, or None when the application could not be reached in time."""
        headers = {"Content-Type": "application/json", "X-Imsidecar-Event-App": self.app,
                   "X-Imsidecar-Event-Id": event.key}
        timeout = aiohttp.ClientTimeout(total=self._settings.attempt_timeout)
        try:
            async with self._session.post(self._settings.url, data=event.body, headers=headers,
                                          timeout=timeout) as response:
                await response.read()
                return response.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.info("events: application of %s unreachable: %s", self.app, type(exc).__name__)
            return None


def _resolved(value: bool) -> asyncio.Future[bool]:
    future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future
