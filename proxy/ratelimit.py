"""Client-side rate limiting per app and route: platform quotas honoured exactly, lowered while the platform throttles.

Owns quotas, their defaults, the waiting and the rate adaptation; it does not classify answers (platform
modules say what is a throttle) nor answer the client (the pipeline turns RateLimitExceeded into a 429).

Errors:
    RateLimitExceeded   the wait for a slot would overrun the request's deadline; carries retry_after
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from proxy.clock import Clock
from proxy.window import DecayingRate, SlidingWindow

_THROTTLED, _PASSED = 0, 1


class RateLimitExceeded(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"client-side rate limit: next slot in {retry_after:.3f}s, after the request's deadline")
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Quota:
    """At most `per_second` requests in any 1 s and `per_minute` in any 60 s (None = no such limit)."""

    per_second: float | None = None
    per_minute: float | None = None

    def __post_init__(self) -> None:
        for value in (self.per_second, self.per_minute):
            if value is not None and value <= 0:
                raise ValueError("a quota must be positive (omit it for no limit)")

    @property
    def sustained_rate(self) -> float:
        """The highest rate, in requests per second, that both windows allow for ever."""
        rates = [r for r in (self.per_second, _per_second(self.per_minute)) if r is not None]
        return min(rates, default=math.inf)

    def windows(self) -> tuple[tuple[int, float], ...]:
        """(count, period) pairs: `count` requests per `period` seconds; 0.5/s becomes 1 per 2 s."""
        pairs = ((self.per_second, 1.0), (self.per_minute, 60.0))
        return tuple(_as_window(limit, period) for limit, period in pairs if limit is not None)


def _per_second(per_minute: float | None) -> float | None:
    return None if per_minute is None else per_minute / 60.0


def _as_window(limit: float, period: float) -> tuple[int, float]:
    count = max(1, math.floor(limit))
    return count, period * count / limit


# Defaults from the platform docs, keyed by platform name until the platform modules own them.
# DingTalk: 20 QPS per app per API (90018 / Forbidden.AccessDenied.QpsLimitForAppkeyAndApi beyond it).
# Feishu: per API per app per tenant; the common tier is "1000/min & 50/s" (99991400 beyond it).
DEFAULT_QUOTAS: Mapping[str, Quota] = MappingProxyType({
    "dingtalk": Quota(per_second=20),
    "feishu": Quota(per_second=50, per_minute=1000),
})

# Other Feishu tiers named as the docs name them; some messaging APIs sit on the 5/s tier. Routes are
# assigned a tier by config (RateLimiterSet's `routes`), not guessed here.
FEISHU_TIERS: Mapping[str, Quota] = MappingProxyType({
    "1000/min & 50/s": Quota(per_second=50, per_minute=1000),
    "5/s": Quota(per_second=5),
    "3/s": Quota(per_second=3),
})


@dataclass(frozen=True, slots=True)
class LimiterSettings:
    beta: float = 0.7               # botocore adaptive mode: multiplicative decrease on a throttle
    scale: float = 0.4              # botocore's CUBIC C: how fast the rate grows back
    min_rate: float = 0.5           # requests per second; never pace slower than this
    throttle_cooldown: float = 1.0  # one cut per this many seconds: a burst of 429s is one congestion event
    max_retry_after: float = 60.0   # a platform's "wait N s" is honoured up to this (Envoy discards > 300 s)
    measure_tau: float = 2.0        # horizon of the measured sending rate (botocore: EWMA over 0.5 s buckets,
                                    # too jumpy for the per-second bursts a quota allows)
    # A throttle among answers that mostly go through is noise (or another sender's), not our rate: a quota we
    # overrun throttles every request past it, so its throttles come in runs and in a large share. Such an
    # isolated throttle neither cuts the rate nor blocks the route; the throttled request waits its own turn.
    evidence_window: float = 2.0    # seconds of answers a throttle is judged against
    isolated_share: float = 0.25    # fewer throttles than this share of the answers...
    isolated_answers: int = 10      # ...among at least this many answers...
    isolated_run: int = 4           # ...and fewer than this many throttles in a row


class AdaptiveRateLimiter:
    """Hands out send slots that respect a Quota exactly, paced below it after the platform throttles.

    Waiters queue in arrival order and only the head of the queue waits on the clock, so service is FIFO
    and a cancelled waiter holds nothing: the next in line takes the same slot. Adaptation is botocore's
    CUBIC: on a throttle the rate drops to beta × the measured sending rate, then grows back along
    C·(t − K)³ + W_max on successes, never above the quota; back at the quota, pacing switches off and
    the quota's bursts are allowed again.
    """

    def __init__(self, quota: Quota, clock: Clock, settings: LimiterSettings = LimiterSettings()) -> None:
        self._quota = quota
        self._clock = clock
        self._settings = settings
        # grant times still inside each quota window, oldest first
        self._logs = [(deque[float](), count, period) for count, period in quota.windows()]
        self._queue: deque[asyncio.Future[None]] = deque()
        self._blocked_until = -math.inf
        # CUBIC state; `_rate` is None while not adapting
        self._rate: float | None = None
        self._w_max = 0.0
        self._cut_at = -math.inf
        self._next_paced = -math.inf
        self._sent = DecayingRate(settings.measure_tau)
        self._answers = SlidingWindow(2, settings.evidence_window, settings.evidence_window / 8)
        self._throttle_run = 0

    @property
    def current_rate(self) -> float:
        """Requests per second allowed now, for gauges (inf when the quota has no limit and all is well)."""
        return self._quota.sustained_rate if self._rate is None else self._rate

    @property
    def waiting(self) -> int:
        return len(self._queue)

    async def acquire(self, deadline: float) -> float:
        """Wait for a slot and return the seconds waited; raise RateLimitExceeded at once if it would
        come after `deadline` (a `clock.now()` time)."""
        if self.take_free():   # the common case
            return 0.0
        start = self._clock.now()
        expected = self._predict(start, ahead=len(self._queue))
        if expected > start and expected > deadline:
            raise RateLimitExceeded(expected - start)
        turn = asyncio.get_running_loop().create_future()
        self._queue.append(turn)
        try:
            if self._queue[0] is not turn:
                await turn  # the waiter ahead hands over when it leaves
            await self._wait_for_slot(deadline)
            self._grant(self._clock.now())
        finally:
            self._leave(turn)
        return self._clock.now() - start

    def take_free(self) -> bool:
        """The slot at once if nobody is waiting and one is free now (what `acquire` would grant without a wait);
        False, taking nothing, when `acquire` would have to wait or refuse."""
        now = self._clock.now()
        if self._queue or self._earliest_slot(now) > now:
            return False
        self._grant(now)
        return True

    def on_throttle(self, retry_after: float | None = None) -> None:
        """The platform refused for rate; `retry_after` is its own "wait N s", if it said."""
        now = self._clock.now()
        self._answers.add(now, _THROTTLED)
        self._throttle_run += 1
        if self._isolated(now):
            return
        if retry_after is not None and retry_after > 0:
            self._blocked_until = max(self._blocked_until, now + min(retry_after, self._settings.max_retry_after))
        if now - self._cut_at < self._settings.throttle_cooldown:
            return  # answers to requests sent before the last cut say nothing new
        self._cut(now)

    def on_success(self) -> None:
        self._answers.add(self._clock.now(), _PASSED)
        self._throttle_run = 0
        if self._rate is None:
            return
        rate = self._cubic(self._clock.now())
        if rate >= self._ceiling():
            self._rate = None  # recovered: the quota alone governs again
        else:
            self._rate = min(self._quota.sustained_rate, max(self._settings.min_rate, rate))

    # -- the queue ----------------------------------------------------------------------------------

    async def _wait_for_slot(self, deadline: float) -> None:
        while True:  # a throttle during the sleep can move the slot later: look again on waking
            now = self._clock.now()
            slot = self._earliest_slot(now)
            if slot <= now:
                return
            if slot > deadline:
                raise RateLimitExceeded(slot - now)
            await self._clock.sleep(slot - now)

    def _leave(self, turn: asyncio.Future[None]) -> None:
        if self._queue and self._queue[0] is turn:
            self._queue.popleft()
            if self._queue and not self._queue[0].done():
                self._queue[0].set_result(None)
        else:
            self._queue.remove(turn)

    # -- slots --------------------------------------------------------------------------------------

    def _earliest_slot(self, now: float) -> float:
        slot = max(now, self._blocked_until)
        for log, count, period in self._logs:
            while log and log[0] <= now - period:
                log.popleft()  # can no longer share a window with any future grant
            if len(log) >= count:
                slot = max(slot, log[-count] + period)
        if self._rate is not None:
            slot = max(slot, self._next_paced)
        return slot

    def _predict(self, now: float, ahead: int) -> float:
        """The slot the request after `ahead` queued ones would get if nothing changed meanwhile."""
        slot = self._earliest_slot(now)
        planned: list[list[float]] = [[] for _ in self._logs]
        paced = self._next_paced
        for _ in range(ahead + 1):
            slot = max(slot, paced) if self._rate is not None else slot
            for (log, count, period), extra in zip(self._logs, planned):
                index = len(log) + len(extra) - count
                if index >= 0:
                    slot = max(slot, (log[index] if index < len(log) else extra[index - len(log)]) + period)
            for extra in planned:
                extra.append(slot)
            if self._rate is not None:
                paced = slot + 1.0 / self._rate
        return slot

    def _grant(self, now: float) -> None:
        for log, _, _ in self._logs:
            log.append(now)
        if self._rate is not None:
            self._next_paced = max(self._next_paced, now) + 1.0 / self._rate
        self._sent.add(now)

    # -- adaptation ---------------------------------------------------------------------------------

    def _isolated(self, now: float) -> bool:
        """A throttle the answers around it contradict: most requests at this rate are going through."""
        s = self._settings
        throttled, passed = self._answers.totals(now)
        answers = throttled + passed
        return (answers >= s.isolated_answers and throttled < s.isolated_share * answers
                and self._throttle_run < s.isolated_run)

    def _cut(self, now: float) -> None:
        s = self._settings
        measured = self._sent.rate(now)
        base = measured if measured > 0 else self.current_rate
        base = min(base, self.current_rate)
        if not math.isfinite(base):
            base = s.min_rate
        if self._rate is None:
            self._next_paced = now  # pacing starts empty: no burst right after a throttle
        self._w_max = base
        self._cut_at = now
        self._rate = min(self._quota.sustained_rate, max(s.min_rate, base * s.beta))

    def _cubic(self, now: float) -> float:
        s = self._settings
        k = math.cbrt(self._w_max * (1 - s.beta) / s.scale)
        return s.scale * (now - self._cut_at - k) ** 3 + self._w_max

    def _ceiling(self) -> float:
        """Where adapting stops: the quota, or twice the throttled rate when the quota is unlimited."""
        sustained = self._quota.sustained_rate
        return sustained if math.isfinite(sustained) else 2 * self._w_max


@dataclass
class RateLimiterSet:
    """One limiter per (app, route template), created on first use; the least recently used goes first
    when more than `max_size` exist (keys are bounded by config, so this is a guard, not a cache policy)."""

    clock: Clock
    default: Quota
    routes: Mapping[str, Quota] = field(default_factory=dict)  # route template -> quota, e.g. a 5/s tier
    settings: LimiterSettings = field(default_factory=LimiterSettings)
    max_size: int = 1024
    _limiters: OrderedDict[tuple[str, str], AdaptiveRateLimiter] = field(default_factory=OrderedDict, repr=False)

    def get(self, app: str, route: str) -> AdaptiveRateLimiter:
        key = (app, route)
        limiter = self._limiters.get(key)
        if limiter is None:
            limiter = AdaptiveRateLimiter(self.routes.get(route, self.default), self.clock, self.settings)
            self._limiters[key] = limiter
            if len(self._limiters) > self.max_size:
                self._limiters.popitem(last=False)
        self._limiters.move_to_end(key)
        return limiter

    def __len__(self) -> int:
        return len(self._limiters)
