"""The attempt loop: send, classify, decide whether sending again is safe, useful and affordable, then wait.

Owns the retry decision, back-off (the `backoff` package's generators, parameters read at call time), the one
deadline and the budget check; sending is the pipeline's, classification the platform's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable, Iterator

import backoff
from multidict import CIMultiDict

from proxy.budget import RetryBudget
from proxy.clock import Clock
from proxy.config import RetrySettings
from proxy.drain import Drain
from proxy.errors import AttemptFailed, AttemptTimeout, CircuitOpen, DeadlineExceeded, LocallyRateLimited, ShuttingDown
from proxy.idempotency import apply_key
from proxy.metrics import Metrics
from proxy.network import AdaptiveSettings, RetryParams
from proxy.ratelimit import AdaptiveRateLimiter, RateLimitExceeded
from proxy.outcome import Outcome, Signal, Verdict
from proxy.upstream import Answer

if TYPE_CHECKING:
    from proxy.pipeline import Exchange, RequestBody

SAFE_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
RETRIED_OUTCOMES = frozenset({Outcome.RETRYABLE, Outcome.THROTTLED})
MIN_USEFUL_ATTEMPT = 0.25   # a retry needs at least this long (or the per-try timeout, if shorter) before the deadline


ParamsSource = Callable[[], RetryParams]


def fixed_params(s: RetrySettings) -> RetryParams:
    return RetryParams(s.per_try_timeout, s.backoff_base, s.backoff_cap, s.max_attempts)


def adaptive_settings(s: RetrySettings) -> AdaptiveSettings:
    """The monitor's settings, with the parameters config set pinned and the others left to adapt."""
    return AdaptiveSettings(**{key: getattr(s, key) for key in sorted(s.pinned)})


def refreshed(source: ParamsSource, clock: Clock, every: float = 0.25) -> ParamsSource:
    """`source` evaluated at most every `every` seconds: the monitor's quantiles are not free, requests are many."""
    cached: list[RetryParams | float] = [source(), clock.now()]

    def params() -> RetryParams:
        now = clock.now()
        if now - cached[1] >= every:  # type: ignore[operator]
            cached[0], cached[1] = source(), now
        return cached[0]  # type: ignore[return-value]

    return params


@dataclass(slots=True)
class Attempt:
    """What varies between attempts of one request (and what stays: the idempotency key)."""

    number: int
    timeout: float
    extra_headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    query: str | None = None     # set when an idempotency key goes into the query
    body: bytes | None = None    # set when an idempotency key goes into the body
    token: str | None = None
    token_kind: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    retry: bool
    why: str            # "retry" or the reason it is withheld: final, attempts, unsafe, body_too_large, ...
    wait: float = 0.0


Send = Callable[["Exchange", "RequestBody", Attempt], Awaitable[Answer]]


class RetryPolicy:
    """Per (app, upstream): where the parameters come from, and the budget retries are charged to."""

    def __init__(self, settings: RetrySettings, clock: Clock, params: ParamsSource | None = None,
                 rng: Callable[[], float] = random.random) -> None:
        self.settings = settings
        fixed = fixed_params(settings)
        self.params: ParamsSource = params or (lambda: fixed)
        self.budget = RetryBudget(clock, ratio=settings.budget_ratio, min_per_second=settings.budget_min_per_second,
                                  window=settings.budget_window)
        self.rng = rng

    def waits(self) -> Iterator[float]:
        """Exponential back-off with full jitter; base and cap are read at each step, so adaptation applies at once."""
        if self.settings.backoff == "fixed":
            while True:
                yield self.params().backoff_base
        steps = backoff.expo(base=2, factor=1)
        next(steps)   # the generator's priming value
        for multiplier in steps:
            params = self.params()
            yield self.rng() * min(params.backoff_cap, params.backoff_base * multiplier)


class RetryEngine:
    def __init__(self, clock: Clock, metrics: Metrics, drain: Drain | None = None) -> None:
        self.clock, self.metrics = clock, metrics
        self.drain = drain or Drain()   # on SIGTERM, a request waiting in back-off is answered at once

    async def run(self, exchange: Exchange, body: RequestBody, send: Send) -> Answer:
        b = exchange.binding
        policy = b.policy
        policy.budget.record_request()
        attempt = self.prepare(exchange, body)
        waits = policy.waits()
        replayed = False
        last_answer: Answer | None = None
        verdict: Verdict | None = None
        timeouts = 0
        limiter = b.limiters.get(exchange.template, exchange.route) if b.limiters.enabled else None
        while True:
            params = policy.params()
            stop = await self.admit(exchange, limiter, last_answer)
            if stop is not None:
                return stop
            if verdict is not None and verdict.outcome in RETRIED_OUTCOMES:   # a retry, counted once it is sent
                self.metrics.capped_retries(b.app.name, b.upstream, verdict.reason).inc()
            attempt.timeout = self.per_try_timeout(exchange, params, timeouts)
            exchange.attempts += 1
            answer, verdict, failure = await self.attempt(exchange, body, attempt, send)
            if limiter is not None:
                self.feed(limiter, verdict)
            if answer is not None and answer.stream is None:
                last_answer = answer
            if self.should_replay_token(verdict, attempt, body, replayed):
                replayed = True
                self.replay_token(exchange, attempt, answer)
                continue
            decision = self.decide(exchange, body, attempt, verdict, params, waits)
            if not decision.retry:
                self.withheld(exchange, verdict, decision)
                return self.final(exchange, answer, failure, last_answer)
            if answer is not None and answer is not last_answer:
                answer.release()
            timeouts += verdict.signal is Signal.TIMEOUT
            exchange.retry_reasons.append(verdict.reason)
            attempt.number += 1
            if not await self.drain.sleep(self.clock, decision.wait):
                return self.final(exchange, None, failure, last_answer)   # draining: the last real answer now

    # Steps ------------------------------------------------------------------------------------------------------

    def prepare(self, exchange: Exchange, body: RequestBody) -> Attempt:
        """Fix the idempotency key once per client request: every attempt carries the same one."""
        b = exchange.binding
        attempt = Attempt(1, 0.0)
        if exchange.method != "POST" or not body.replayable:
            return attempt
        spot = b.platform.idempotency_spot(b.upstream, exchange.template)
        keyed = apply_key(spot, exchange.query, body.data, add=b.policy.settings.idempotency_keys)
        exchange.has_idempotency_key = keyed.has_key
        if keyed.added:
            attempt.query, attempt.body = keyed.query, keyed.body
            self.metrics.idempotency_keys.labels(b.app.name, exchange.route).inc()
        return attempt

    async def attempt(self, exchange: Exchange, body: RequestBody, attempt: Attempt,
                      send: Send) -> tuple[Answer | None, Verdict, AttemptFailed | None]:
        b = exchange.binding
        started = self.clock.now()
        answer: Answer | None = None
        failure: AttemptFailed | None = None
        try:
            answer = await send(exchange, body, attempt)
        except AttemptFailed as exc:
            verdict, failure = exc.verdict, exc
        except BaseException:
            b.breaker.release_probe()   # it never reached the upstream (no token, cancelled): give the slot back
            raise
        else:
            verdict = b.platform.classify(b.upstream, answer.status, answer.headers, answer.plain_body())
            exchange.verdict = verdict   # the answer the client gets if this is the last, for how it is counted
        self.metrics.hot_attempt_duration(b.app.name, b.upstream).observe(self.clock.now() - started)
        self.metrics.hot_attempts(b.app.name, b.upstream, exchange.route, verdict.outcome.value, verdict.reason).inc()
        b.observe(verdict, self.clock.now() - started)
        return answer, verdict, failure

    @staticmethod
    def should_replay_token(verdict: Verdict, attempt: Attempt, body: RequestBody, replayed: bool) -> bool:
        # 99991663 / 40001 and friends: the platform refused the token without acting; refresh and replay once.
        return verdict.outcome is Outcome.TOKEN_INVALID and bool(attempt.token) and not replayed and body.replayable

    def replay_token(self, exchange: Exchange, attempt: Attempt, answer: Answer | None) -> None:
        b = exchange.binding
        b.tokens.source(attempt.token_kind or b.app.token_kind).invalidate(attempt.token or "")
        self.metrics.token_replays.labels(b.app.name).inc()
        exchange.retry_reasons.append("token_invalid")
        if answer is not None:
            answer.release()

    def decide(self, exchange: Exchange, body: RequestBody, attempt: Attempt, verdict: Verdict,
               params: RetryParams, waits: Iterator[float]) -> Decision:
        policy = exchange.binding.policy
        if verdict.outcome not in RETRIED_OUTCOMES:
            return Decision(False, "final")
        if attempt.number >= params.max_attempts:
            return Decision(False, "attempts")
        if not body.replayable:
            return Decision(False, "body_too_large")
        if verdict.processed and not self.idempotent(exchange):
            return Decision(False, "unsafe")   # it may have been applied: a retry could apply it twice
        wait = next(waits)
        if verdict.signal is Signal.TIMEOUT:
            # The attempt already waited its whole per-try timeout: that was the back-off. Retry promptly (the
            # next try gets a longer timeout), or a platform that just slowed down costs a timeout plus a wait.
            wait = min(wait, params.backoff_base)
        if verdict.retry_after is not None:
            if verdict.retry_after > policy.settings.max_retry_after:
                return Decision(False, "retry_after_too_long")
            wait = max(wait, verdict.retry_after * (1 + 0.2 * policy.rng()))   # jitter within [i, 1.2i]
        remaining = exchange.deadline - self.clock.now()
        if wait + min(MIN_USEFUL_ATTEMPT, params.per_try_timeout) > remaining:
            return Decision(False, "deadline")
        if not policy.budget.try_spend(params.budget_ratio):
            return Decision(False, "budget")
        return Decision(True, "retry", wait)

    def idempotent(self, exchange: Exchange) -> bool:
        settings = exchange.binding.policy.settings
        return (exchange.method in SAFE_METHODS or exchange.has_idempotency_key
                or exchange.template in settings.idempotent_routes)

    def withheld(self, exchange: Exchange, verdict: Verdict, decision: Decision) -> None:
        b = exchange.binding
        if decision.why == "budget":
            self.metrics.retry_budget_exhausted.labels(b.app.name, b.upstream).inc()
        if decision.why == "deadline":
            self.metrics.deadline_exceeded.labels(b.app.name, b.upstream).inc()
        if verdict.outcome in RETRIED_OUTCOMES and decision.why != "final":
            self.metrics.not_retried.labels(b.app.name, b.upstream, decision.why).inc()

    def final(self, exchange: Exchange, answer: Answer | None, failure: AttemptFailed | None,
              last_answer: Answer | None) -> Answer:
        """The platform's own last answer when there is one; otherwise the sidecar's error for the last failure."""
        if answer is not None:
            return answer
        if last_answer is not None:
            return last_answer
        assert failure is not None
        if isinstance(failure, AttemptTimeout) and self.clock.now() >= exchange.deadline - 0.001:
            raise DeadlineExceeded("the request's deadline passed with no answer from the platform") from failure
        raise failure

    async def admit(self, exchange: Exchange, limiter: AdaptiveRateLimiter | None,
                    last_answer: Answer | None) -> Answer | None:
        """The breaker, then the sidecar's own rate limit. None: send the attempt; an answer: stop with it."""
        b = exchange.binding
        # The breaker first: a request it refuses must not use up a slot of the platform's quota.
        if not b.breaker.allow():
            return self.circuit_open(exchange, last_answer)
        if limiter is None:
            return None
        try:
            await self.pace(exchange, limiter)
        except (LocallyRateLimited, ShuttingDown):   # ShuttingDown: the drain ended the wait for a slot
            b.breaker.release_probe()
            if last_answer is None:
                raise
            return last_answer
        return None

    async def pace(self, exchange: Exchange, limiter: AdaptiveRateLimiter) -> None:
        """Wait for the sidecar's own rate limit inside the deadline; fail fast with 429 when it would overrun."""
        b = exchange.binding
        try:
            waited = await b.limiters.acquire(limiter, exchange.template, exchange.deadline)
        except RateLimitExceeded as exc:
            self.metrics.ratelimit_rejections.labels(b.app.name, exchange.route).inc()
            raise LocallyRateLimited(f"app {b.app.name}: the sidecar's rate limit for this API has no slot before "
                                     f"the request's deadline", exc.retry_after) from exc
        if waited > 0:
            self.metrics.ratelimit_wait.labels(b.app.name, exchange.route).observe(waited)

    @staticmethod
    def feed(limiter: AdaptiveRateLimiter, verdict: Verdict) -> None:
        """The limiter lowers its rate when the platform throttles and recovers on answers."""
        if verdict.outcome is Outcome.THROTTLED:
            limiter.on_throttle(verdict.retry_after)
        elif verdict.signal is Signal.OK:
            limiter.on_success()

    def circuit_open(self, exchange: Exchange, last_answer: Answer | None) -> Answer:
        """The breaker refuses: the platform's last answer if a try already got one, else 503 at once."""
        if last_answer is not None:
            self.metrics.not_retried.labels(exchange.binding.app.name, exchange.binding.upstream, "circuit_open").inc()
            return last_answer
        wait = exchange.binding.breaker.retry_after()
        raise CircuitOpen(f"the {exchange.binding.upstream} upstream is failing; calls are paused for "
                          f"{wait:.1f}s while it recovers", retry_after=wait)

    def per_try_timeout(self, exchange: Exchange, params: RetryParams, timeouts: int = 0) -> float:
        """The per-try timeout, doubled for each attempt of this request that timed out (up to 4x): when the
        platform has just slowed down, the retry waits long enough for the slow answer instead of cutting it off
        again. Never past the request's deadline."""
        grown = params.per_try_timeout * (2 ** min(timeouts, 2))
        return max(0.001, min(grown, exchange.deadline - self.clock.now()))
