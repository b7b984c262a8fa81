"""Delivering one message to one robot target: queue for the rate limit, sign at send time, read, retry in time.

Owns the send loop and its back-off within the caller's deadline, and what a caller that gives up cancels (a send
not yet gone out, and its rate-limit slot; one already on the wire is let finish); it does not render or answer HTTP.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp

from proxy.clock import Clock
from proxy.outcome import Outcome, Signal, Verdict
from proxy.robots.errors import RateLimited, Refused, RobotError, Unavailable
from proxy.robots.limiter import Limiters, RobotLimiter
from proxy.robots.metrics import RobotMetrics
from proxy.robots.platforms import PLATFORMS, Message, Reading, check_size
from proxy.robots.settings import RobotTarget


@dataclass(frozen=True, slots=True)
class Receipt:
    attempts: int
    waited: float  # seconds spent queueing for the rate limit


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    per_try_timeout: float = 10.0
    backoff_base: float = 0.5
    backoff_cap: float = 8.0
    max_attempts: int = 5


class Delivery:
    def __init__(self, session: aiohttp.ClientSession, clock: Clock, limiters: Limiters, metrics: RobotMetrics,
                 policy: DeliveryPolicy = DeliveryPolicy(), rand: Callable[[], float] = random.random) -> None:
        self._session, self._clock, self._limiters = session, clock, limiters
        self._metrics, self._policy, self._rand = metrics, policy, rand
        self._on_the_wire: set[asyncio.Task[Reading]] = set()   # sends whose caller left after they went out

    async def send(self, target: RobotTarget, message: Message, deadline: float, resend: bool = False) -> Receipt:
        """Deliver or raise a RobotError; every outcome is counted once under the target's name (as a re-send when
        the caller recognised a notification that failed before).

        Cancelled (the caller disconnected: Alertmanager timed out and will retry), a send still queued or in
        back-off is dropped and its rate-limit slot given back, so the retry is the only one sent.
        """
        started = self._clock.now()
        try:
            receipt = await self._send(target, message, deadline)
        except RobotError as exc:
            self._metrics.finished(target.name, result_of(exc), self._clock.now() - started, resend)
            raise
        except asyncio.CancelledError:
            self._metrics.finished(target.name, "abandoned", self._clock.now() - started, resend)
            raise
        self._metrics.finished(target.name, "delivered", self._clock.now() - started, resend)
        return receipt

    async def _send(self, target: RobotTarget, message: Message, deadline: float) -> Receipt:
        platform = PLATFORMS[target.platform]
        check_size(platform, platform.prepare(target, message, self._clock.wall())[1])
        limiter = self._limiters.get(target.name, target.platform)
        waited, retry_of = 0.0, None
        for attempt in range(1, self._policy.max_attempts + 1):
            waited += await self._queue(target, limiter, deadline)
            reading = await self._on_wire(self._attempt(target, message, deadline, retry_of))
            verdict = reading.verdict
            if verdict.outcome is Outcome.SUCCESS:
                return Receipt(attempt, waited)
            if verdict.outcome is Outcome.PERMANENT:
                raise Refused(f"{target.platform} robot {target.name!r}: {reading.cause}",
                              platform_code=reading.code or 990400, status=reading.status)
            retry_of = verdict.reason
            if verdict.outcome is Outcome.THROTTLED:
                # Hold the whole robot, not just this request: DingTalk's 10-minute penalty covers every sender.
                limiter.penalize(verdict.retry_after or max(1.0, self._backoff(attempt)))
                continue
            if attempt < self._policy.max_attempts:   # no wait after the last try: the answer is due now
                await self._back_off(target, reading, attempt, deadline)
        raise Unavailable(f"{target.platform} robot {target.name!r}: {reading.cause} (gave up after "
                          f"{self._policy.max_attempts} tries)", retry_after=self._policy.backoff_cap)

    async def _on_wire(self, attempt: Coroutine[Any, Any, Reading]) -> Reading:
        """A send that has gone out is not cut off when its caller leaves: half a request helps nobody, and the
        platform's answer (a throttle, say) still has to reach the limiter."""
        task = asyncio.ensure_future(attempt)
        self._on_the_wire.add(task)
        task.add_done_callback(self._on_the_wire.discard)
        return await asyncio.shield(task)

    async def _queue(self, target: RobotTarget, limiter: RobotLimiter, deadline: float) -> float:
        try:
            waited: float = await limiter.acquire(deadline)
        except RateLimited as exc:
            self._metrics.rejected(target.name)
            raise RateLimited(f"{target.platform} robot {target.name!r}: {exc.message}",
                              retry_after=exc.retry_after or 0.0) from exc
        self._metrics.waited(target.name, waited)
        return waited

    async def _attempt(self, target: RobotTarget, message: Message, deadline: float, retry_of: str | None) -> Reading:
        remaining = deadline - self._clock.now()
        if remaining <= 0:
            raise Unavailable(f"{target.platform} robot {target.name!r}: deadline reached", retry_after=1.0)
        if retry_of is not None:   # a retry is counted when it is sent, not when it is decided (410100 never is)
            self._metrics.retried(target.name, retry_of)
        platform = PLATFORMS[target.platform]
        url, body = platform.prepare(target, message, self._clock.wall())  # signed now: the sign ages (±1 h)
        timeout = aiohttp.ClientTimeout(total=min(self._policy.per_try_timeout, remaining))
        try:
            async with self._session.post(url, data=body, timeout=timeout,
                                          headers={"Content-Type": "application/json; charset=utf-8"}) as response:
                return platform.read(response.status, parse_json(await response.read()))
        except TimeoutError:
            return network_failure(Signal.TIMEOUT, "timeout", "the robot did not answer in time")
        except aiohttp.ClientConnectorError:
            return network_failure(Signal.CONNECT_FAILURE, "connect_error", "cannot connect to the robot endpoint")
        except aiohttp.ClientError:
            return network_failure(Signal.RESET, "connection_reset", "the connection broke mid-request")

    async def _back_off(self, target: RobotTarget, reading: Reading, attempt: int, deadline: float) -> None:
        delay = self._backoff(attempt)
        if self._clock.now() + delay >= deadline:
            raise Unavailable(f"{target.platform} robot {target.name!r}: {reading.cause}", retry_after=delay)
        await self._clock.sleep(delay)

    def _backoff(self, attempt: int) -> float:
        """Full jitter (AWS style), never below a tenth of the base so retries are not back to back."""
        ceiling = min(self._policy.backoff_cap, self._policy.backoff_base * 2.0 ** (attempt - 1))
        return max(self._policy.backoff_base / 10, self._rand() * ceiling)


def network_failure(signal: Signal, reason: str, cause: str) -> Reading:
    # A POST that timed out may have been delivered; a duplicate alert beats a lost one.
    return Reading(Verdict(Outcome.RETRYABLE, reason, signal, processed=signal is Signal.CONNECT_FAILURE), cause=cause)


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def result_of(error: RobotError) -> str:
    if isinstance(error, RateLimited):
        return "rate_limited"
    if isinstance(error, Unavailable):
        return "unavailable"
    if isinstance(error, Refused):
        return "refused"
    return "bad_message"
