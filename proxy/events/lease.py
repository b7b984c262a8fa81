"""One owner among replicas: who delivers an app's events and who holds its long connection, and when to hand over.

Owns the `Lease` protocol (Redis implements it in proxy/events/redis_stream.py; one process gets `LocalLease`), an
app's delivery health as this replica sees it, and `LeaseKeeper`, which acquires, renews and gives a lease up — on
shutdown, when it is lost, or when this replica's application keeps failing and another replica stands by.
It does not know what the lease guards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from proxy.clock import Clock, finished_within
from proxy.events.metrics import EventMetrics

log = logging.getLogger(__name__)
CLOSE_BOUND = 1.0   # seconds close() gives the store to answer


class Lease(Protocol):
    async def acquire(self) -> bool:
        """Take a free slot now; False when every slot is held by someone else."""

    async def renew(self) -> bool:
        """Extend the slot we hold; False when it was lost (expired and taken)."""

    async def release(self) -> None: ...

    async def announce(self, willing: bool) -> None:
        """Say whether this replica stands by, ready to take the lease over."""

    async def others_waiting(self) -> bool:
        """Whether another replica stands by (so handing over is worth it)."""


class LocalLease:
    """A lease nobody else wants: one process, one owner, nobody to hand over to."""

    async def acquire(self) -> bool:
        return True

    async def renew(self) -> bool:
        return True

    async def release(self) -> None:
        return None

    async def announce(self, willing: bool) -> None:
        return None

    async def others_waiting(self) -> bool:
        return False


class AppHealth:
    """How this replica's application takes deliveries: after `handover_after` failed attempts in a row it is
    unwilling to own the app's leases for `cooldown` seconds, so a replica with a working application takes over."""

    def __init__(self, handover_after: int, cooldown: float, clock: Clock) -> None:
        self._after, self._cooldown, self._clock = handover_after, cooldown, clock
        self._failures = 0
        self._until = float("-inf")
        self.changed = asyncio.Event()

    def record(self, ok: bool) -> None:
        self._failures = 0 if ok else self._failures + 1
        if self._failures >= self._after and self.willing():
            self._until = self._clock.now() + self._cooldown
            self._failures = 0
            self.changed.set()

    def willing(self) -> bool:
        return self._clock.now() >= self._until


# What a lease operation may raise when its store is away; the keeper then keeps its current state.
def _store_errors() -> tuple[type[BaseException], ...]:
    from proxy.events.queue import EventStoreUnavailable
    return (EventStoreUnavailable, OSError, asyncio.TimeoutError)


class LeaseKeeper:
    """Holds `lease` for this replica while it is willing; checks every `interval` seconds (a third of the TTL)."""

    def __init__(self, lease: Lease, health: AppHealth, clock: Clock, interval: float, metrics: EventMetrics,
                 app: str, role: str) -> None:
        self._lease, self._health, self._clock, self._interval = lease, health, clock, interval
        self._metrics, self.app, self.role = metrics, app, role
        self.held = False
        self._held = asyncio.Event()
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        metrics.declare_lease(app, role)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"events-lease-{self.role}-{self.app}")

    async def wait_held(self) -> None:
        await self._held.wait()

    async def wait_lost(self) -> None:
        """Return once the lease is no longer ours (lost, handed over, or closing)."""
        await self._lost.wait()

    async def close(self) -> None:
        """Stop keeping it and hand it over at once, so another replica need not wait for it to expire. Bounded:
        a store that does not answer must not hold up shutdown (the lease then expires by itself)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=CLOSE_BOUND)
            self._task = None
        if self.held:
            with contextlib.suppress(asyncio.TimeoutError, *_store_errors()):
                await asyncio.wait_for(self._lease.release(), CLOSE_BOUND)
            self._set(False, "shutdown")

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(*_store_errors()):   # store away: keep what we have, try again later
                await (self._keep() if self.held else self._try())
            await self._pause()

    async def _pause(self) -> None:
        self._health.changed.clear()
        await finished_within(self._clock, self._health.changed.wait(), self._interval)

    async def _try(self) -> None:
        willing = self._health.willing()
        await self._lease.announce(willing)
        if willing and await self._lease.acquire():
            await self._lease.announce(False)
            self._set(True, "")

    async def _keep(self) -> None:
        if not self._health.willing() and await self._lease.others_waiting():
            await self._lease.release()
            self._set(False, "unhealthy")
            log.warning("events: app %s: the application keeps failing deliveries; %s handed to another replica",
                        self.app, self.role)
        elif not await self._lease.renew():
            self._set(False, "lost")
            log.warning("events: app %s: the %s lease expired before it was renewed (this process stalled longer "
                        "than its TTL, or Redis lost it); taking it again unless another replica has", self.app,
                        self.role)

    def _set(self, held: bool, reason: str) -> None:
        self.held = held
        if held:
            self._lost.clear()
            self._held.set()
        else:
            self._held.clear()
            self._lost.set()
            self._metrics.handovers.labels(self.app, self.role, reason).inc()
        self._metrics.owner.labels(self.app, self.role).set(1 if held else 0)
