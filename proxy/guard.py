"""Fail-open guards around the stages that only advise forwarding: network monitor, breaker, limiters, budget, metrics.

Owns catching an unexpected exception inside one of them, logging it once with its cause, counting it, and the
neutral answer the request goes on with; it does not fix the stage (its own module does) nor guard the sending.
"""

from __future__ import annotations

import logging
import math
import traceback
from typing import Any

from prometheus_client import Counter

from proxy.breaker import BreakerState, CircuitBreaker
from proxy.budget import RetryBudget
from proxy.metrics import Children, Metrics
from proxy.network import NetworkMonitor, NetworkSnapshot, NetworkState, RetryParams
from proxy.outcome import Verdict
from proxy.ratelimit import AdaptiveRateLimiter, RateLimitExceeded

log = logging.getLogger("imsidecar.guard")

MAX_REPORTED = 256   # distinct (stage, exception, place) log lines; the counter goes on counting past it
# The sidecar's own code has no advice to skip: the request it was handling got a 500 in the platform's shape.
CONSEQUENCES = {"pipeline": "the request was answered 500", "handler": "the request was answered 500"}


class Guard:
    """Where a failed stage is reported: one ERROR line per distinct cause, and `imsidecar_stage_failures_total`."""

    def __init__(self, counter: Counter) -> None:
        self._counter = counter
        self._reported: set[tuple[str, str, str]] = set()

    def failed(self, stage: str, exc: BaseException) -> None:
        try:
            self._counter.labels(stage).inc()
        except Exception:   # the metrics are guarded by this very object: nothing left to tell
            pass
        place = origin(exc)
        key = (stage, type(exc).__name__, place)
        if key in self._reported or len(self._reported) >= MAX_REPORTED:
            return
        self._reported.add(key)
        consequence = CONSEQUENCES.get(stage, "it is bypassed and requests are still forwarded")
        log.error("%s failed; %s: %s: %s (at %s)", stage, consequence, type(exc).__name__, exc, place)


def origin(exc: BaseException) -> str:
    """`network.py:205 in _censored_latency`: where the exception was raised, without locals or arguments."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "unknown"
    last = frames[-1]
    return f"{last.filename.rsplit('/', 1)[-1]}:{last.lineno} in {last.name}"


class GuardedMonitor:
    """The network monitor, or its last good answer when it fails (the configured parameters before any)."""

    def __init__(self, monitor: NetworkMonitor, guard: Guard, fallback: RetryParams) -> None:
        self.inner, self._guard = monitor, guard
        self._params, self._state = fallback, NetworkState.HEALTHY

    def record(self, verdict: Verdict, latency: float) -> None:
        try:
            self.inner.record(verdict, latency)
        except Exception as exc:
            self._guard.failed("monitor", exc)

    def record_late(self, latency: float) -> None:
        try:
            self.inner.record_late(latency)
        except Exception as exc:
            self._guard.failed("monitor", exc)

    def changes(self) -> int:
        try:
            return self.inner.changes()
        except Exception as exc:
            self._guard.failed("monitor", exc)
            return -1   # differs from any count the monitor gave: cached parameters are read again

    def samples(self) -> int:
        try:
            return self.inner.samples()
        except Exception as exc:
            self._guard.failed("monitor", exc)
            return 0

    @property
    def state(self) -> NetworkState:
        try:
            self._state = self.inner.state
        except Exception as exc:
            self._guard.failed("monitor", exc)
        return self._state

    def retry_params(self) -> RetryParams:
        try:
            self._params = self.inner.retry_params()
        except Exception as exc:
            self._guard.failed("monitor", exc)
        return self._params

    def snapshot(self) -> NetworkSnapshot:
        try:
            return self.inner.snapshot()
        except Exception as exc:
            self._guard.failed("monitor", exc)
        p = self._params
        return NetworkSnapshot(self._state, None, None, None, None, p.per_try_timeout, p.backoff_base,
                               p.backoff_cap, p.max_attempts, 0.0, 0.0, 0)


class GuardedBreaker:
    """The circuit breaker, failing closed-circuit (requests admitted) when it raises."""

    def __init__(self, breaker: CircuitBreaker, guard: Guard) -> None:
        self.inner, self._guard = breaker, guard

    @property
    def state(self) -> BreakerState:
        try:
            return self.inner.state
        except Exception as exc:
            self._guard.failed("breaker", exc)
            return BreakerState.CLOSED

    def allow(self) -> bool:
        try:
            return self.inner.allow()
        except Exception as exc:
            self._guard.failed("breaker", exc)
            return True

    def release_probe(self) -> None:
        try:
            self.inner.release_probe()
        except Exception as exc:
            self._guard.failed("breaker", exc)

    def record(self, verdict: Verdict) -> None:
        try:
            self.inner.record(verdict)
        except Exception as exc:
            self._guard.failed("breaker", exc)

    def record_late(self) -> None:
        try:
            self.inner.record_late()
        except Exception as exc:
            self._guard.failed("breaker", exc)

    def retry_after(self) -> float:
        try:
            return self.inner.retry_after()
        except Exception as exc:
            self._guard.failed("breaker", exc)
            return 1.0


class GuardedLimiter(AdaptiveRateLimiter):
    """A route's rate limiter; a failure grants the slot at once (the platform's own limit still protects it).

    A subclass only so it stands wherever a limiter is expected: every public member is forwarded to `inner`.
    """

    def __init__(self, limiter: AdaptiveRateLimiter, guard: Guard) -> None:   # no super(): `inner` holds the state
        self.inner, self._guard = limiter, guard

    @property
    def current_rate(self) -> float:
        try:
            return self.inner.current_rate
        except Exception as exc:
            self._guard.failed("limiter", exc)
            return math.inf

    @property
    def waiting(self) -> int:
        return self.inner.waiting

    async def acquire(self, deadline: float) -> float:
        try:
            return await self.inner.acquire(deadline)
        except RateLimitExceeded:
            raise
        except Exception as exc:
            self._guard.failed("limiter", exc)
            return 0.0

    def take_free(self) -> bool:
        try:
            return self.inner.take_free()
        except Exception as exc:   # as acquire: a failure grants the slot
            self._guard.failed("limiter", exc)
            return True

    def on_throttle(self, retry_after: float | None = None) -> None:
        try:
            self.inner.on_throttle(retry_after)
        except Exception as exc:
            self._guard.failed("limiter", exc)

    def on_success(self) -> None:
        try:
            self.inner.on_success()
        except Exception as exc:
            self._guard.failed("limiter", exc)


class GuardedBudget(RetryBudget):
    """The retry budget; a failure refuses the retry (the first answer goes back, as when the budget is spent).

    A subclass only so it stands where the retry policy keeps its budget: both methods are forwarded to `inner`.
    """

    def __init__(self, budget: RetryBudget, guard: Guard) -> None:   # no super(): `inner` holds the state
        self.inner, self._guard = budget, guard
        self.ratio, self.floor = budget.ratio, budget.floor

    def record_request(self) -> None:
        try:
            self.inner.record_request()
        except Exception as exc:
            self._guard.failed("budget", exc)

    def try_spend(self, ratio: float | None = None) -> bool:
        try:
            return self.inner.try_spend(ratio)
        except Exception as exc:
            self._guard.failed("budget", exc)
            return False


# Metrics ----------------------------------------------------------------------------------------------------------

# The metrics a request's path updates (Pipeline, RetryEngine, AppTokens); the others are set up once, at start.
HOT_CHILDREN = ("hot_requests", "hot_request_duration", "hot_in_flight", "hot_attempts", "hot_attempt_duration",
                "capped_retries", "hot_outcomes")
REQUEST_FAMILIES = ("idempotency_keys", "token_replays", "retry_budget_exhausted", "deadline_exceeded",
                    "not_retried", "ratelimit_rejections", "ratelimit_wait", "local_answers", "token_refreshes",
                    "sidecar_errors")


class GuardedChild:
    """One labelled metric child whose updates cannot raise into the request."""

    __slots__ = ("_child", "_guard")

    def __init__(self, child: Any, guard: Guard) -> None:
        self._child, self._guard = child, guard

    def inc(self, amount: float = 1) -> None:
        try:
            self._child.inc(amount)
        except Exception as exc:
            self._guard.failed("metrics", exc)

    def dec(self, amount: float = 1) -> None:
        try:
            self._child.dec(amount)
        except Exception as exc:
            self._guard.failed("metrics", exc)

    def observe(self, amount: float) -> None:
        try:
            self._child.observe(amount)
        except Exception as exc:
            self._guard.failed("metrics", exc)


class _Nothing:
    """What a metric lookup that failed returns: updates go nowhere."""

    def inc(self, amount: float = 1) -> None:
        pass

    dec = observe = inc


NOTHING = _Nothing()


class GuardedLookup(Children):
    """`metrics.hot_requests(...)`, guarded: a lookup that fails counts and gives NOTHING; each child is wrapped
    once, when it is first looked up, so the common lookup stays one dict read."""

    def __init__(self, children: Children, guard: Guard) -> None:
        self.__dict__.update(children.__dict__)   # the same children and bounds, from now on wrapped
        self._children = {values: GuardedChild(child, guard) for values, child in children._children.items()}
        self._guard = guard

    def _miss(self, values: tuple[str, ...]) -> GuardedChild | _Nothing:
        try:
            return super()._miss(values)   # type: ignore[no-any-return]
        except Exception as exc:
            self._guard.failed("metrics", exc)
            return NOTHING

    def _child(self, values: tuple[str, ...]) -> GuardedChild:
        return GuardedChild(super()._child(values), self._guard)


class GuardedFamilyLookup:
    """`metrics.not_retried.labels(...)`, guarded; children wrapped once each."""

    def __init__(self, lookup: Any, guard: Guard) -> None:
        self._lookup, self._guard = lookup, guard
        self._wrapped: dict[int, GuardedChild] = {}   # keyed by the child's identity: as bounded as the children

    def __call__(self, *values: str) -> GuardedChild | _Nothing:
        try:
            child = self._lookup(*values)
        except Exception as exc:
            self._guard.failed("metrics", exc)
            return NOTHING
        wrapped = self._wrapped.get(id(child))
        if wrapped is None or wrapped._child is not child:
            wrapped = self._wrapped[id(child)] = GuardedChild(child, self._guard)
        return wrapped


class GuardedFamily:
    """A metric family whose `labels()` is guarded; everything else (names, registry) is the family's own."""

    def __init__(self, family: Any, guard: Guard) -> None:
        self.inner = family
        self.labels = GuardedFamilyLookup(family.labels, guard)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def guard_metrics(metrics: Metrics, guard: Guard) -> None:
    """Put the request path's metrics behind `guard`: a failing update is counted and logged, never raised."""
    for name in HOT_CHILDREN:
        setattr(metrics, name, GuardedLookup(getattr(metrics, name), guard))
    for name in REQUEST_FAMILIES:
        setattr(metrics, name, GuardedFamily(getattr(metrics, name), guard))


__all__ = ["Guard", "GuardedBreaker", "GuardedBudget", "GuardedLimiter", "GuardedMonitor", "guard_metrics"]
