"""Per-robot send-rate limits, kept by queueing each send until a slot is free, within the request's deadline.

Owns the platforms' robot quotas, the penalty box and Feishu's quiet marks; it does not send, retry or classify.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from proxy.clock import Clock
from proxy.robots.errors import RateLimited
from proxy.robots.settings import Platform


@dataclass(frozen=True, slots=True)
class Window:
    limit: int      # at most this many sends...
    period: float   # ...in any rolling window of this many seconds


@dataclass(frozen=True, slots=True)
class RatePolicy:
    windows: tuple[Window, ...]
    # The platform counts arrivals and we count departures; a slower earlier request could land inside the
    # window of a later one, so every window is kept this much longer than the platform's.
    margin: float = 0.0
    quiet_marks: bool = False
    penalty: float = 0.0  # how long the platform blocks a robot that went too fast


# DingTalk: 20 messages per minute per robot; one more and the robot is throttled for 10 minutes
# (410100 / 130101). Never exceeding it is worth a second of margin.
DINGTALK = RatePolicy((Window(20, 60.0),), margin=1.0, penalty=600.0)
# Feishu custom bot: 100 per minute and 5 per second; the docs ask senders to avoid the :00 and :30 marks,
# when everyone's scheduled jobs fire at once and the bot is throttled (9499 "too many request").
FEISHU = RatePolicy((Window(100, 60.0), Window(5, 1.0)), margin=0.05, quiet_marks=True, penalty=1.0)
POLICIES: dict[Platform, RatePolicy] = {"dingtalk": DINGTALK, "feishu": FEISHU}

MARK_PERIOD = 1800.0  # wall-clock :00 and :30
QUIET_BEFORE = 1.0    # a send this close before a mark...
QUIET_AFTER = 5.0     # ...or this long after it is moved past the quiet zone,
QUIET_SPREAD = 5.0    # plus a random share of this, so replicas don't all land on mark + 5 s together


class RobotLimiter:
    """Reserves send times in arrival order; a reservation that would end past the deadline fails at once."""

    def __init__(self, policy: RatePolicy, clock: Clock, rand: Callable[[], float] = random.random) -> None:
        self._policy, self._clock, self._rand = policy, clock, rand
        self._sent: deque[float] = deque()  # reserved send times (clock.now() seconds), ascending
        self._blocked_until = 0.0

    async def acquire(self, deadline: float) -> float:
        """Wait for a send slot; return the seconds waited. Raises RateLimited if the slot lies past `deadline`."""
        now = self._clock.now()
        self._forget_before(now)
        at = self._earliest(now)
        if at > deadline:
            raise RateLimited(f"robot rate limit: next send slot in {at - now:.1f}s, after the deadline",
                              retry_after=at - now)
        at = self._clear_of_marks(now, at, deadline)
        self._sent.append(at)
        try:
            await self._clock.sleep(at - now)
        except asyncio.CancelledError:
            self._sent.remove(at)  # a later reservation only gets more room, never less
            raise
        return at - now

    def penalize(self, seconds: float | None = None) -> None:
        """The platform said "too fast": hold every send for its penalty (or `seconds`, if it said)."""
        hold = self._policy.penalty if seconds is None else seconds
        self._blocked_until = max(self._blocked_until, self._clock.now() + hold)

    def _earliest(self, now: float) -> float:
        at = max(now, self._blocked_until, self._sent[-1] if self._sent else now)
        for window in self._policy.windows:
            if len(self._sent) >= window.limit:
                # The limit-th most recent send must have left the window before this one goes.
                at = max(at, self._sent[-window.limit] + window.period + self._policy.margin)
        return at

    def _clear_of_marks(self, now: float, at: float, deadline: float) -> float:
        """Move a send out of the seconds around :00/:30 if the deadline allows; a late alert beats none."""
        if not self._policy.quiet_marks:
            return at
        phase = (self._clock.wall() + (at - now)) % MARK_PERIOD
        if QUIET_AFTER <= phase < MARK_PERIOD - QUIET_BEFORE:
            return at
        to_mark = MARK_PERIOD - phase if phase >= QUIET_AFTER else -phase  # the coming mark, or the one just passed
        moved = at + to_mark + QUIET_AFTER + self._rand() * QUIET_SPREAD
        return moved if moved <= deadline else at

    def _forget_before(self, now: float) -> None:
        horizon = max(w.period for w in self._policy.windows) + self._policy.margin
        while self._sent and self._sent[0] <= now - horizon:
            self._sent.popleft()


class Limiters:
    """One limiter per robot target, made on first use."""

    def __init__(self, clock: Clock, rand: Callable[[], float] = random.random) -> None:
        self._clock, self._rand = clock, rand
        self._by_name: dict[str, RobotLimiter] = {}

    def get(self, name: str, platform: Platform) -> RobotLimiter:
        if name not in self._by_name:
            self._by_name[name] = RobotLimiter(POLICIES[platform], self._clock, self._rand)
        return self._by_name[name]
