"""The attempt loop: send, classify, decide whether sending again is safe, useful and affordable, then wait.

Owns the retry decision, back-off (the `backoff` package's generators, parameters read at call time), the one
deadline and the budget check. Throttled answers are paced (the limiter, the platform's reset headers) and never
use up the attempts the measured loss needs; parameters are read at each attempt, after any wait. Sending is the
pipeline's, classification the platform's, the honest final answer proxy/history.py's.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Awaitable, Callable, Iterator

import backoff

from proxy.budget import RetryBudget
from proxy.clock import Clock
from proxy.config import RetrySettings
from proxy.drain import Drain
from proxy.errors import (AttemptFailed, BadRequest, CircuitOpen, DeadlineExceeded, LocallyRateLimited,
                          QueuedPastDeadline, ShuttingDown, SidecarError, TokenUnavailableError)
from proxy.history import READS, History, Tried
from proxy.idempotency import KeyProblem, apply_key
from proxy.metrics import Metrics
from proxy.network import AdaptiveSettings, RetryParams
from proxy.ratelimit import AdaptiveRateLimiter, RateLimitExceeded
from proxy.outcome import Outcome, Signal, Verdict
from proxy.upstream import Answer, LeftInFlight, LeftUnsent, answer_of

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


QUIET_EVERY = 2.0   # seconds: how stale a quiet upstream's parameters may get (fewer than ENOUGH_NEW samples since)
ENOUGH_NEW = 8      # samples since the last evaluation that make one worth its cost again after `every`


def refreshed(source: ParamsSource, clock: Clock, every: float = 0.25,
              changes: Callable[[], int] = lambda: 0, samples: Callable[[], int] = lambda: ENOUGH_NEW) -> ParamsSource:
    """`source` evaluated at most every `every` seconds (the monitor's quantiles are not free, requests are many),
    and again whenever `changes()` moves: a failure must raise the attempts of the very next decision. While fewer
    than ENOUGH_NEW samples came in (`samples()` counts them), at most every QUIET_EVERY seconds: its window holds
    nearly the same latencies, and at 1,000 apps, each called twice a second, every request re-read it (6-7% of the
    sidecar's samples)."""
    value, read_at, changed, sampled = source(), clock.now(), changes(), samples()

    def params() -> RetryParams:
        nonlocal value, read_at, changed, sampled
        now, seen = clock.now(), changes()
        age = now - read_at
        if seen != changed or age >= QUIET_EVERY or (age >= every and samples() - sampled >= ENOUGH_NEW):
            value, read_at, changed, sampled = source(), now, seen, samples()
        return value

    return params


@dataclass(slots=True)
class Attempt:
    """What varies between attempts of one request (and what stays: the idempotency key)."""

    number: int
    timeout: float
    timeouts: int = 0            # attempts of this request that timed out so far (each grows the next cut-off)
    retrying: str | None = None  # the reason of the retry about to be sent (counted once it is)
    query: str | None = None     # set when an idempotency key goes into the query
    body: bytes | None = None    # set when an idempotency key goes into the body
    token: str | None = None
    token_kind: str | None = None
    waits: Iterator[float] | None = None   # the request's back-off, made at its first retry (most have none)


@dataclass(frozen=True, slots=True)
class Decision:
    retry: bool
    why: str            # "retry" or the reason it is withheld: final, attempts, unsafe, body_too_large, ...
    wait: float = 0.0


FINAL = Decision(False, "final")   # the common answer: not a retryable outcome

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
        b.policy.budget.record_request()
        attempt = self.prepare(exchange, body)
        history = History(write=exchange.method not in READS)
        limiter = b.limiters.get(exchange.template, exchange.route) if b.limiters.enabled else None
        replayed = False
        while True:
            if not await self.admit(exchange, limiter, history):
                return self.settle(exchange, history)
            self.count_retry(exchange, attempt)   # a retry is counted once it is sent
            # Read after the limiter's wait: the state may have changed while this request queued.
            attempt.timeout = self.per_try_timeout(exchange, b.policy.params(), attempt.timeouts)
            tried = await self.attempt(exchange, body, attempt, send, history)
            if tried is None:
                return self.settle(exchange, history)
            history.add(tried)
            if limiter is not None:
                self.feed(limiter, tried.verdict)
            if self.token_refused(exchange, tried, attempt):
                if body.replayable and not replayed:
                    replayed = True
                    self.replay_token(exchange, tried.answer)
                    continue
            decision = self.decide(exchange, body, tried.verdict, history, attempt)
            if not decision.retry:
                self.withheld(exchange, tried.verdict, decision)
                return self.settle(exchange, history)
            self.retrying(exchange, tried, attempt, history)
            if not await self.wait(exchange, decision.wait):
                return self.settle(exchange, history)   # draining: the last real answer now

    # Steps ------------------------------------------------------------------------------------------------------

    def prepare(self, exchange: Exchange, body: RequestBody) -> Attempt:
        """Fix the idempotency key once per client request: every attempt carries the same one."""
        b = exchange.binding
        attempt = Attempt(1, 0.0)
        if exchange.method != "POST" or not body.replayable:
            return attempt
        spot = b.platform.idempotency_spot(b.upstream, exchange.template)
        try:
            keyed = apply_key(spot, exchange.query, body.data, add=b.policy.settings.idempotency_keys,
                              client=exchange.client_key)
        except KeyProblem as exc:
            raise BadRequest(str(exc)) from exc
        exchange.has_idempotency_key = keyed.has_key
        exchange.idempotency_key = keyed.key or exchange.client_key
        if keyed.added:
            attempt.query, attempt.body = keyed.query, keyed.body
            counter = self.metrics.idempotency_keys if exchange.client_key is None else self.metrics.idempotency_mapped
            counter.labels(b.app.name, exchange.route).inc()
        return attempt

    async def attempt(self, exchange: Exchange, body: RequestBody, attempt: Attempt, send: Send,
                      history: History) -> Tried | None:
        """One attempt sent and classified. None: no attempt went out after earlier ones did (no token could be
        had for the retry, or the deadline came while it queued for a connection), and the request ends with what
        the earlier attempts said."""
        b = exchange.binding
        started = self.clock.now()
        exchange.attempts += 1
        try:
            answer = await send(exchange, body, attempt)
        except AttemptFailed as exc:
            tried = Tried(None, exc.verdict, exc)
        except (TokenUnavailableError, QueuedPastDeadline):
            b.breaker.release_probe()   # it never reached the upstream: give the slot back
            exchange.attempts -= 1
            if history.last is None:
                raise
            return None
        except SidecarError as exc:   # the client's doing while it was sent (its body, its own shorter deadline)
            b.breaker.release_probe()
            self.cut_by_client(exchange, history, exc)
            raise
        except LeftUnsent:   # its client left (or the drain cut it) before it was sent: not an attempt after all
            b.breaker.release_probe()
            exchange.attempts -= 1
            raise
        except LeftInFlight as left:   # its client left (or the drain cut it) once it was out: its answer counts
            b.breaker.release_probe()
            left.attempt.add_done_callback(partial(self.heard_after_leaving, exchange, started + left.queued))
            raise
        except BaseException:
            b.breaker.release_probe()   # it never reached the upstream (cancelled): give the slot back
            raise
        else:
            verdict = answer.classified(b.platform, b.upstream)
            exchange.verdict = verdict   # the answer the client gets if this is the last, for how it is counted
            tried = Tried(answer, verdict)
            started += answer.queued   # sent once a pooled connection was free: the wait was the sidecar's
        self.recorded(exchange, tried.verdict, max(0.0, self.clock.now() - started))
        return tried

    def recorded(self, exchange: Exchange, verdict: Verdict, took: float) -> None:
        """An attempt's result, in the metrics and for the stages that learn from the network."""
        b = exchange.binding
        self.metrics.hot_attempt_duration(b.app.name, b.upstream).observe(took)
        self.metrics.hot_attempts(b.app.name, b.upstream, exchange.route, verdict.outcome.value, verdict.reason).inc()
        b.observe(verdict, took)

    def heard_after_leaving(self, exchange: Exchange, sent: float, attempt: asyncio.Task[Answer]) -> None:
        """The answer of an attempt its request stopped waiting for, counted as any attempt's: the platform had the
        call. A failure then is not counted: the sidecar closing its pools at shutdown ends such attempts too."""
        answer = answer_of(attempt)
        if answer is not None:
            b = exchange.binding
            self.recorded(exchange, answer.classified(b.platform, b.upstream), max(0.0, self.clock.now() - sent))

    def token_refused(self, exchange: Exchange, tried: Tried, attempt: Attempt) -> bool:
        """99991663 / 40001 and friends: the platform refused the token without acting. It is dropped whatever the
        body (a large upload must not keep failing on it); whether to replay is the caller's."""
        if tried.verdict.outcome is not Outcome.TOKEN_INVALID or not attempt.token:
            return False
        b = exchange.binding
        b.tokens.source(attempt.token_kind or b.app.token_kind).invalidate(attempt.token)
        return True

    def replay_token(self, exchange: Exchange, answer: Answer | None) -> None:
        self.metrics.token_replays.labels(exchange.binding.app.name).inc()
        exchange.retry_reasons.append("token_invalid")
        if answer is not None:
            answer.release()

    def decide(self, exchange: Exchange, body: RequestBody, verdict: Verdict, history: History,
               attempt: Attempt) -> Decision:
        if verdict.outcome not in RETRIED_OUTCOMES:
            return FINAL
        policy = exchange.binding.policy
        params = policy.params()   # read now, after the attempt: not what held when the request arrived
        throttled = verdict.outcome is Outcome.THROTTLED
        # Throttles never use up the attempts the loss needs: they have as many again of their own (a cap, so a
        # client without a limiter does not retry a quota it overruns until its deadline). 1 attempt means no retry.
        spent = history.throttled if throttled else history.counted
        if params.max_attempts <= 1 or spent >= params.max_attempts:
            return Decision(False, "attempts")
        if not body.replayable:
            return Decision(False, "body_too_large")
        if verdict.processed and not self.idempotent(exchange):
            return Decision(False, "unsafe")   # it may have been applied: a retry could apply it twice
        if verdict.retry_after is not None and verdict.retry_after > policy.settings.max_retry_after:
            return Decision(False, "retry_after_too_long")
        wait = self.wait_for(verdict, params, policy, attempt)
        remaining = exchange.deadline - self.clock.now()
        if wait + min(MIN_USEFUL_ATTEMPT, params.per_try_timeout) > remaining:
            return Decision(False, "deadline")
        # A throttled retry is paced by the limiter and the platform's own wait: the budget guards against loss storms.
        if not throttled and not policy.budget.try_spend(params.budget_ratio):
            return Decision(False, "budget")
        return Decision(True, "retry", wait)

    @staticmethod
    def wait_for(verdict: Verdict, params: RetryParams, policy: RetryPolicy, attempt: Attempt) -> float:
        """Back-off, raised to what the platform asked for; after a timeout, the timeout itself was the wait."""
        if verdict.outcome is Outcome.THROTTLED and verdict.retry_after is not None:
            return verdict.retry_after * (1 + 0.2 * policy.rng())   # jitter within [i, 1.2i]
        if attempt.waits is None:
            attempt.waits = policy.waits()
        wait = next(attempt.waits)
        if verdict.signal is Signal.TIMEOUT:
            # The attempt already waited its whole per-try timeout: that was the back-off. Retry promptly (the
            # next try gets a longer timeout), or a platform that just slowed down costs a timeout plus a wait.
            wait = min(wait, params.backoff_base)
        if verdict.retry_after is not None:
            wait = max(wait, verdict.retry_after * (1 + 0.2 * policy.rng()))
        return wait

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

    def cut_by_client(self, exchange: Exchange, history: History, exc: SidecarError) -> None:
        """An attempt the client ended (its own deadline passed, its body broke): what may have happened, for the
        X-Imsidecar-Outcome of the error that follows. A write cut off by the deadline may have been applied
        (unless it was cut off before it was sent)."""
        if history.write and isinstance(exc, DeadlineExceeded) and not exc.unsent:
            history.maybe_applied.append("timeout")
        if history.last is not None or history.maybe_applied:
            self.record_outcome(exchange, history)
            exchange.retry_safe = False

    def retrying(self, exchange: Exchange, tried: Tried, attempt: Attempt, history: History) -> None:
        verdict = tried.verdict
        if tried.answer is not None and tried.answer is not history.last_answer:
            tried.answer.release()   # a streamed answer that will not be the final one
        attempt.timeouts += verdict.signal is Signal.TIMEOUT
        attempt.number += 1
        attempt.retrying = verdict.reason
        exchange.retry_reasons.append(verdict.reason)

    def count_retry(self, exchange: Exchange, attempt: Attempt) -> None:
        if attempt.retrying is not None:
            b = exchange.binding
            self.metrics.capped_retries(b.app.name, b.upstream, attempt.retrying).inc()
            attempt.retrying = None

    async def wait(self, exchange: Exchange, seconds: float) -> bool:
        """The one place the loop waits between attempts (back-off and the platform's own waits). False: the
        sidecar is draining, and the request ends now with what its attempts said."""
        return await self.drain.sleep(self.clock, seconds)

    def settle(self, exchange: Exchange, history: History) -> Answer:
        """The honest final answer of a request that was sent at least once, with what the client may assume
        about it recorded on the exchange (the X-Imsidecar-Outcome header)."""
        self.record_outcome(exchange, history)
        exchange.retry_safe = history.retry_safe
        return history.final(self.clock.now(), exchange.deadline)

    def record_outcome(self, exchange: Exchange, history: History) -> None:
        exchange.outcome = history.applied().value
        b = exchange.binding
        self.metrics.hot_outcomes(b.app.name, b.upstream, exchange.outcome).inc()

    async def admit(self, exchange: Exchange, limiter: AdaptiveRateLimiter | None, history: History) -> bool:
        """The breaker, then the sidecar's own rate limit. True: send the attempt; False: stop with what the
        earlier attempts said (before the first attempt, a refusal is raised instead)."""
        b = exchange.binding
        # The breaker first: a request it refuses must not use up a slot of the platform's quota.
        if not b.breaker.allow():
            self.circuit_open(exchange, history)
            return False
        if limiter is None:
            return True
        try:
            await self.pace(exchange, limiter)
        except (LocallyRateLimited, ShuttingDown):   # ShuttingDown: the drain ended the wait for a slot
            b.breaker.release_probe()
            if history.last is None:
                raise
            return False
        return True

    async def pace(self, exchange: Exchange, limiter: AdaptiveRateLimiter) -> None:
        """Wait for the sidecar's own rate limit inside the deadline; fail fast with 429 when it would overrun."""
        b = exchange.binding
        if b.limiters.take_free(limiter):   # a slot free now and nobody queued: no wait to set up (6 coroutines)
            return
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

    def circuit_open(self, exchange: Exchange, history: History) -> None:
        """The breaker refuses: the request ends with what the earlier tries said if there were any, else 503."""
        if history.last is not None:
            self.metrics.not_retried.labels(exchange.binding.app.name, exchange.binding.upstream, "circuit_open").inc()
            return
        wait = exchange.binding.breaker.retry_after()
        raise CircuitOpen(f"the {exchange.binding.upstream} upstream is failing; calls are paused for "
                          f"{wait:.1f}s while it recovers", retry_after=wait)

    def per_try_timeout(self, exchange: Exchange, params: RetryParams, timeouts: int = 0) -> float:
        """The per-try timeout, doubled for each attempt of this request that timed out (up to 4x): when the
        platform has just slowed down, the retry waits long enough for the slow answer instead of cutting it off
        again. Never past the request's deadline."""
        grown = params.per_try_timeout * (2 ** min(timeouts, 2))
        return max(0.001, min(grown, exchange.deadline - self.clock.now()))

