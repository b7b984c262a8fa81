"""Priority lanes: when interactive requests (a reply someone waits for) and bulk ones (a nightly sync) wait for
the same send slot, interactive goes first; a bulk request stands aside at most `max_bulk_wait` (and never past
its deadline), then takes its turn like any other. Bulk is also paced to `bulk_share` of the route's sustained rate
(when its deadline leaves time for that), so a sync never spends a whole quota window in a burst and leaves an
interactive request arriving later no slot for the rest of the window.

Owns each request's lane — `X-Imsidecar-Priority`, else the app's `priority.routes`, else the platform's bulk
routes, else the app's default — and the wait around the rate limiter's acquire (`LanedLimiters`); the slots
themselves, and their order within a lane, are proxy/ratelimit.py's.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable, Mapping

from proxy.bindings import AppLimiters
from proxy.clock import Clock
from proxy.config import AppConfig
from proxy.drain import Drain
from proxy.errors import BadRequest, ShuttingDown
from proxy.guard import Guard
from proxy.metrics import Metrics, SavingsMetrics
from proxy.ratelimit import AdaptiveRateLimiter, RateLimitExceeded
from proxy.saving.settings import BULK, INTERACTIVE, LANES, PrioritySettings
from proxy.store import SharedQuota

if TYPE_CHECKING:
    from proxy.pipeline import Exchange

PRIORITY_HEADER = "X-Imsidecar-Priority"
MIN_USEFUL = 0.25   # a bulk request stops standing aside this long before its deadline, to still be sent
# The lane of the request whose platform call is being made in this task: set by `PriorityLanes.enter` just before
# the retry loop, read by `LanedLimiters.acquire` (whose signature is the rate limiter's).
CURRENT_LANE: ContextVar[str] = ContextVar("imsidecar_lane", default=INTERACTIVE)
NO_PRIORITIES = PrioritySettings()   # an app with none configured (made once: a frozen dataclass costs ~1 us)


class PriorityLanes:
    def __init__(self, settings: Mapping[str, PrioritySettings], metrics: SavingsMetrics, guard: Guard) -> None:
        self._settings, self._metrics, self._guard = settings, metrics, guard

    def assign(self, exchange: Exchange, headers: Mapping[str, str]) -> None:
        """Decide the request's lane from what it asked, or its route; a lane that does not exist is a 400."""
        asked = headers.get(PRIORITY_HEADER)
        if asked is not None and asked.strip().lower() not in LANES:
            raise BadRequest(f"{PRIORITY_HEADER} must be {' or '.join(LANES)}")
        try:
            lane = asked.strip().lower() if asked is not None else self._default(exchange)
            self._metrics.hot_lane_requests(exchange.binding.app.name, lane).inc()
        except Exception as exc:   # fail open: the request goes in the default lane
            self._guard.failed("lanes", exc)
            lane = INTERACTIVE
        exchange.priority = lane

    def _default(self, exchange: Exchange) -> str:
        b = exchange.binding
        settings = self._settings.get(b.app.name, NO_PRIORITIES)
        if exchange.template in settings.routes:
            return settings.routes[exchange.template]
        return BULK if exchange.template in b.platform.bulk_routes(b.upstream) else settings.default

    @staticmethod
    def enter(exchange: Exchange) -> None:
        """This task is about to call the platform for `exchange`: its slots are taken in the request's lane."""
        CURRENT_LANE.set(exchange.priority)


@dataclass(eq=False)
class Lane:
    """Who waits for one limiter's slots: interactive requests counted, bulk ones interruptible or standing aside."""

    interactive: int = 0
    bulk: set[asyncio.Task[float]] = field(default_factory=set)   # bulk acquires waiting in the limiter's line
    cut: set[asyncio.Task[float]] = field(default_factory=set)    # ...of which these were cut short
    aside: list[asyncio.Future[None]] = field(default_factory=list)   # bulk requests waiting for quiet
    next_bulk: float = -math.inf   # the next bulk request's paced turn

    def preempt(self) -> int:
        waiting = [task for task in self.bulk if not task.done() and task not in self.cut]
        for task in waiting:
            task.cancel()
            self.cut.add(task)
        return len(waiting)

    def wake(self) -> None:
        for future in self.aside:
            if not future.done():
                future.set_result(None)
        self.aside.clear()


class LanedLimiters(AppLimiters):
    """The app's rate limiters, taken in priority order: what bindings.py's `AppLimiters.acquire` does, per lane."""

    def __init__(self, app: AppConfig, clock: Clock, metrics: Metrics, shared: SharedQuota | None,
                 settings: PrioritySettings, savings: SavingsMetrics, *, guard: Guard, drain: Drain) -> None:
        super().__init__(app, clock, metrics, shared, guard=guard, drain=drain)
        self._clock, self._settings, self._savings, self._name = clock, settings, savings, app.name
        self._lane_guard = guard
        self._lanes: weakref.WeakKeyDictionary[AdaptiveRateLimiter, Lane] = weakref.WeakKeyDictionary()

    async def acquire(self, limiter: AdaptiveRateLimiter, template: str, deadline: float) -> float:
        """The slot in the request's lane; should the lanes themselves fail, the slot as AppLimiters gives it."""
        lane_name = CURRENT_LANE.get()
        try:
            waited = await self._in_lane(lane_name, limiter, template, deadline)
        except (RateLimitExceeded, ShuttingDown):
            raise
        except Exception as exc:
            self._lane_guard.failed("lanes", exc)
            waited = await AppLimiters.acquire(self, limiter, template, deadline)
        self._savings.hot_lane_wait(self._name, lane_name).observe(waited)
        return waited

    def take_free(self, limiter: AdaptiveRateLimiter) -> bool:
        """An interactive request takes a free slot at once (no bulk request is in the limiter's line then, so
        there is nothing to pre-empt); a bulk one always goes through `acquire`, which paces it."""
        lane_name = CURRENT_LANE.get()
        if lane_name == BULK:
            return False
        try:
            lane = self._lanes.get(limiter)
            if lane is not None and lane.bulk:
                return False
        except Exception as exc:
            self._lane_guard.failed("lanes", exc)
            return False
        if not AppLimiters.take_free(self, limiter):
            return False
        self._savings.hot_lane_wait(self._name, lane_name).observe(0.0)
        return True

    def _in_lane(self, lane_name: str, limiter: AdaptiveRateLimiter, template: str,
                 deadline: float) -> Awaitable[float]:
        """Seconds waited: 0.0 when the slot was free at once (the limiter's own answer, not the time it took)."""
        lane = self._lanes.get(limiter)
        if lane is None:
            lane = self._lanes[limiter] = Lane()
        if lane_name != BULK:
            return self._interactive(lane, limiter, template, deadline)
        return self._bulk_lane(lane, limiter, template, deadline)

    async def _bulk_lane(self, lane: Lane, limiter: AdaptiveRateLimiter, template: str, deadline: float) -> float:
        start = self._clock.now()
        await self._pace(lane, limiter, deadline)
        give_up = min(self._clock.now() + self._settings.max_bulk_wait, deadline - MIN_USEFUL)
        await self._bulk(lane, lambda: AppLimiters.acquire(self, limiter, template, deadline), give_up)
        return self._clock.now() - start

    async def _interactive(self, lane: Lane, limiter: AdaptiveRateLimiter, template: str, deadline: float) -> float:
        lane.interactive += 1
        if lane.bulk and lane.preempt():
            self._savings.preemptions.labels(self._name).inc()
        try:
            return await AppLimiters.acquire(self, limiter, template, deadline)
        finally:
            lane.interactive -= 1
            if not lane.interactive and lane.aside:
                lane.wake()

    async def _pace(self, lane: Lane, limiter: AdaptiveRateLimiter, deadline: float) -> None:
        """Bulk turns `1 / (bulk_share × rate)` apart. Pacing is a courtesy, not a limit: a request whose turn would
        come too close to its deadline skips it and asks the limiter, which enforces the quota and the deadline."""
        rate = limiter.current_rate * self._settings.bulk_share
        if not math.isfinite(rate):
            return
        now = self._clock.now()
        turn = max(now, lane.next_bulk)
        if turn > deadline - MIN_USEFUL:
            return
        lane.next_bulk = turn + 1.0 / rate
        if turn > now:
            await self._clock.sleep(turn - now)

    async def _bulk(self, lane: Lane, take: Callable[[], Awaitable[float]], give_up: float) -> float:
        stood_aside = False
        while self._clock.now() < give_up:
            if lane.interactive:
                stood_aside = True
                await self._stand_aside(lane, give_up)
                continue
            cut_short, waited = await self._interruptible(lane, take)
            if not cut_short:
                return waited
            stood_aside = True
        if stood_aside:
            self._savings.aged.labels(self._name).inc()
        return await take()   # the bound is reached: wait in line like anyone, no longer interruptible

    async def _interruptible(self, lane: Lane, take: Callable[[], Awaitable[float]]) -> tuple[bool, float]:
        """(True, 0) when an interactive request cut this wait short; else (False, seconds waited)."""
        task = asyncio.ensure_future(take())
        lane.bulk.add(task)
        try:
            return False, await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task not in lane.cut or (current is not None and current.cancelling()):
                raise   # the request itself was cancelled (its client vanished, shutdown)
            return True, 0.0
        finally:
            lane.bulk.discard(task)
            lane.cut.discard(task)

    async def _stand_aside(self, lane: Lane, give_up: float) -> None:
        quiet: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        lane.aside.append(quiet)
        bound = asyncio.ensure_future(self._clock.sleep(give_up - self._clock.now()))
        try:
            await asyncio.wait((quiet, bound), return_when=asyncio.FIRST_COMPLETED)
        finally:
            bound.cancel()
            if quiet in lane.aside:
                lane.aside.remove(quiet)


__all__ = ["CURRENT_LANE", "PRIORITY_HEADER", "LanedLimiters", "PriorityLanes"]
