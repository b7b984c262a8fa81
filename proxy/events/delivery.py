"""Hands stored events to the application's local URL: one lane per app, in order, retried until `max_age`.

Owns admission (dedupe and store, through the EventStore), the lane's worker, its retries and back-off, burying
what ages out or is refused, the POST to the application and the delivery lease. It does not verify, decrypt or
acknowledge platforms; callers acknowledge once `submit` says the event is stored (`Admission.stored`).

When is a platform acknowledged? Only after the event is stored: in Redis or the on-disk journal by default, in
memory only when configured so. Then the application may be down for as long as `delivery.max_age` (24 h): the
event waits at the head of its lane, retried with back-off, and after that goes to the dead letters
(`imsidecar events dead-letters`), never silently away. With Redis, one replica at a time delivers an app (the
`deliver` lease); if its application keeps failing it hands the lane to a replica whose application works.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable
from typing import TypeVar

import aiohttp

from proxy.clock import Clock
from proxy.events.jitter import Backoff
from proxy.events.lease import AppHealth, LeaseKeeper
from proxy.events.metrics import EventMetrics
from proxy.events.queue import Admission, Event, EventStore, EventStoreUnavailable, Queued
from proxy.events.settings import DeliverySettings

__all__ = ["Admission", "Delivery", "Event"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# The application answering one of these will not change its mind on a retry: bury the event (an operator may
# replay it once the application is fixed).
_PERMANENT_STATUSES = frozenset({400, 401, 403, 404, 405, 410, 413, 415, 422})
IDLE_WAIT = 5.0   # seconds an idle lane sleeps before looking again (the store wakes it sooner on an arrival)
DEPTH_EVERY = 1.0   # seconds between reads of the queue depth for its gauge while the lane is busy
CLOSE_GRACE = 2.0   # seconds a POST under way may take to finish when the lane stops


class Delivery:
    """One app's delivery lane: a single worker, so events reach the application in the order they were stored."""

    def __init__(self, app: str, settings: DeliverySettings, store: EventStore, session: aiohttp.ClientSession,
                 metrics: EventMetrics, clock: Clock, rng: random.Random | None = None, *,
                 default_limit: int = 100_000, lease_interval: float = 10.0 / 3) -> None:
        self.app, self._settings, self._store = app, settings, store
        self._session, self._metrics, self._clock = session, metrics, clock
        self._rng = rng or random.Random()
        self._limit = settings.limit(default_limit)
        self._backoff = Backoff(settings.backoff_base, settings.backoff_cap)
        self.health = AppHealth(settings.handover_after, settings.handover_cooldown, clock)
        self.keeper = LeaseKeeper(store.lease(app, "deliver", 1), self.health, clock, lease_interval, metrics, app,
                                  "deliver")
        self._head: Queued | None = None
        self._depth_at = float("-inf")
        self._stop = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        metrics.oldest.labels(app).set_function(self._head_age)
        metrics.declare_lane(app)

    # Admission ---------------------------------------------------------------------------------------------------

    async def submit(self, event: Event) -> Admission:
        """Store `event` (or recognise it); raises EventStoreUnavailable when it could not be stored."""
        try:
            admission = await self._store.admit(self.app, event, self._settings.dedupe_ttl, self._limit)
        except EventStoreUnavailable as exc:
            self._metrics.reject(self.app, "store_unavailable")
            log.warning("events: app %s: could not store an event (%s); not acknowledged", self.app, exc)
            raise
        if admission is Admission.DUPLICATE:
            self._metrics.duplicates.labels(self.app).inc()
        elif admission is Admission.FULL:
            self._metrics.reject(self.app, "queue_full")
        return admission

    # Lifecycle ---------------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._worker is None:
            self.keeper.start()
            self._worker = asyncio.create_task(self._run(), name=f"events-delivery-{self.app}")

    async def close(self) -> None:
        """Stop: a POST in flight may finish (within CLOSE_GRACE, so the sidecar's stop fits its drain timeout),
        waits end at once; what is queued stays stored for the next start (or the next owner); then hand the lane
        over. A POST cut short leaves its event at the head: it is sent again after the restart."""
        self._stop.set()
        if self._worker is not None:
            await asyncio.wait({self._worker}, timeout=min(self._settings.attempt_timeout, CLOSE_GRACE))
            self._worker.cancel()
            await asyncio.wait({self._worker}, timeout=1.0)
            self._worker = None
        await self.keeper.close()
        self._head = None

    # The worker --------------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stop.is_set():
            if not await self._unless_stopped(self.keeper.wait_held()):
                return
            item = await self._next()
            if item is not None:
                await self._deliver(item)

    async def _next(self) -> Queued | None:
        try:
            self._head = await self._store.head(self.app)
            await self._refresh_depth()
        except EventStoreUnavailable as exc:
            log.warning("events: app %s: cannot read the queue (%s)", self.app, exc)
            await self._unless_stopped(self._clock.sleep(self._settings.backoff_cap))
            return None
        if self._head is None:
            await self._unless_stopped(self._store.wait(self.app, IDLE_WAIT))
        return self._head

    async def _deliver(self, item: Queued) -> None:
        attempt = 0
        while self.keeper.held and not self._stop.is_set():
            if self._expired(item):
                await self._finish(self._store.bury(self.app, item, "expired", attempt), "expired")
                return
            attempt += 1
            if attempt > 1:
                self._metrics.retried.labels(self.app).inc()
            status = await self._post(item.event, attempt)
            if await self._settled(item, status, attempt):
                return
            await self._unless_stopped(self._clock.sleep(self._wait_before(attempt + 1, item)))
        self._metrics.queue_depth.labels(self.app).set(0)   # another replica (or the next start) goes on

    async def _settled(self, item: Queued, status: int | None, attempt: int) -> bool:
        """Act on one attempt's status; True when the event is done with (delivered or buried)."""
        if status is not None and 200 <= status < 300:
            self.health.record(True)
            await self._finish(self._store.settle(self.app, item), "")
            self._metrics.delivered.labels(self.app).inc()
            self._metrics.delay.labels(self.app).observe(max(0.0, self._clock.wall() - item.event.received_at))
            return True
        self.health.record(status in _PERMANENT_STATUSES)   # a refusal still proves the application is up
        if status in _PERMANENT_STATUSES:
            await self._finish(self._store.bury(self.app, item, "app_rejected", attempt), "app_rejected")
            log.warning("events: app %s: the application refused an event with HTTP %s; dead-lettered",
                        self.app, status)
            return True
        return False

    async def _finish(self, operation: Awaitable[None], dead_reason: str) -> None:
        """Settle or bury. If the store is away the event simply stays at the head: it is tried again (and may
        reach the application twice, with the same X-Imsidecar-Event-Id), never lost."""
        try:
            await operation
        except EventStoreUnavailable as exc:
            log.warning("events: app %s: could not record a delivery (%s); it may be delivered again", self.app, exc)
            return
        if dead_reason:
            self._metrics.dead_lettered.labels(self.app, dead_reason).inc()
        self._head = None

    async def _refresh_depth(self) -> None:
        # One store round trip, so at most once a second while busy (and whenever the queue runs empty).
        now = self._clock.now()
        if self._head is None or now >= self._depth_at + DEPTH_EVERY:
            self._depth_at = now
            self._metrics.queue_depth.labels(self.app).set(await self._store.depth(self.app))

    def _expired(self, item: Queued) -> bool:
        return self._clock.wall() - item.event.received_at >= self._settings.max_age

    def _wait_before(self, attempt: int, item: Queued) -> float:
        remaining = item.event.received_at + self._settings.max_age - self._clock.wall()
        return max(0.0, min(self._backoff.delay(attempt - 1, self._rng), remaining))

    async def _unless_stopped(self, work: Awaitable[T]) -> bool:
        """Run `work` until it ends or the lane is closed; True if it ended on its own."""
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not task.done():
                task.cancel()
        return task.done() and not task.cancelled()

    def _head_age(self) -> float:
        head = self._head
        return max(0.0, self._clock.wall() - head.event.received_at) if head is not None else 0.0

    async def _post(self, event: Event, attempt: int) -> int | None:
        """One POST; the status, or None when the application could not be reached in time."""
        headers = {"Content-Type": "application/json", "X-Imsidecar-Event-App": self.app,
                   "X-Imsidecar-Event-Id": event.key, "X-Imsidecar-Event-Attempt": str(attempt), **dict(event.headers)}
        timeout = aiohttp.ClientTimeout(total=self._settings.attempt_timeout)
        try:
            async with self._session.post(self._settings.url, data=event.body, headers=headers,
                                          timeout=timeout) as response:
                await response.read()
                return response.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.info("events: application of %s unreachable: %s", self.app, type(exc).__name__)
            return None
