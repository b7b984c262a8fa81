"""A binding is everything one (app, upstream) pair needs at run time, assembled once from config.

Owns the per-app token sources and rate limiters and the per-upstream stages (monitor, breaker, retry policy),
each advisory stage behind its fail-open guard (proxy/guard.py); the pipeline and the retry engine only read bindings.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from proxy.breaker import BreakerState, CircuitBreaker
from proxy.clock import Clock
from proxy.config import AppConfig, TokenSettings
from proxy.drain import Drain
from proxy.errors import NETWORK_ERRORS, client_facing_kinds
from proxy.guard import Guard, GuardedBreaker, GuardedBudget, GuardedLimiter, GuardedMonitor
from proxy.metrics import Metrics
from proxy.network import NetworkMonitor, NetworkState
from proxy.outcome import Verdict
from proxy.platforms import platform_for
from proxy.platforms.base import Platform, TokenFetchError, TokenGrant
from proxy.ratelimit import DEFAULT_QUOTAS, AdaptiveRateLimiter, RateLimiterSet, RateLimitExceeded
from proxy.retry import RetryPolicy, adaptive_settings, fixed_params, refreshed
from proxy.routing import RouteLabels, RouteShapes
from proxy.store import LocalTokens, SharedQuota, SharedQuotaExceeded, SharedTokens, UnsharedQuota
from proxy.tokens import EXPIRY_SKEW, TokenSource, sanitise_lifetime
from proxy.upstream import UpstreamClient


class AppTokens:
    """The token sources of one app, one per kind, created on first use and refreshed in the background.

    Every fetch goes through `shared` (proxy/store.py): with Redis, one replica fetches and the others read
    what it published; without, it is a pass-through to the platform.
    """

    def __init__(self, app: AppConfig, platform: Platform, client: UpstreamClient, clock: Clock,
                 settings: TokenSettings, metrics: Metrics, shared: SharedTokens | None = None) -> None:
        self.app, self.platform, self.client = app, platform, client
        self.clock, self.settings, self.metrics = clock, settings, metrics
        self.shared: SharedTokens = shared if shared is not None else LocalTokens(clock)
        self._sources: dict[str, TokenSource] = {}
        self._refused: dict[str, str] = {}   # kind -> the token the platform last refused, for the store to drop
        metrics.prepare_app(app.name)

    def source(self, kind: str) -> TokenSource:
        source = self._sources.get(kind)
        if source is None:
            source = self._sources[kind] = self._create(kind)
        return source

    def _create(self, kind: str) -> TokenSource:
        refreshes = self.metrics.token_refreshes
        self.metrics.prepare_token(self.app.name, kind)
        source = TokenSource(lambda: self.fetch_shared(kind), self.clock, self.settings,
                             observe=lambda result: refreshes.labels(self.app.name, kind, result).inc(),
                             on_invalid=lambda value: self._refused.__setitem__(kind, value), app=self.app.name)
        self.metrics.token_expiry.read(source.seconds_to_expiry, self.app.name, kind)
        source.start()
        return source

    async def fetch_shared(self, kind: str) -> TokenGrant:
        """A token through the store. A refused token is dropped there first, in this same single flight, so
        the read cannot bring it back and many refusals across replicas cost one platform call."""
        refused = self._refused.pop(kind, None)
        if refused is not None:
            await self.shared.invalidate(self.app.name, kind, refused)
        grant = await self.shared.get_or_fetch(self.app.name, kind, lambda: self.fetch_sanitised(kind),
                                               self.fresh_enough)
        return TokenGrant(grant.value, grant.expires_at - self.clock.wall())

    @property
    def fresh_enough(self) -> float:
        """A shared token with less left than this is what the background refresh is replacing: do not reuse it."""
        return self.settings.refresh_margin + self.settings.refresh_jitter + EXPIRY_SKEW

    async def fetch_sanitised(self, kind: str) -> TokenGrant:
        grant = await self.fetch(kind)
        return TokenGrant(grant.value, sanitise_lifetime(grant.expires_in))

    async def fetch(self, kind: str) -> TokenGrant:
        call = self.platform.token_call(kind)
        try:
            async with asyncio.timeout(self.settings.fetch_timeout):
                async with self.client.session.request(call.method, self.client.url(call.path), json=call.json) as r:
                    body = await r.read()
        except NETWORK_ERRORS as exc:
            raise TokenFetchError(f"token endpoint unreachable ({type(exc).__name__})", permanent=False) from exc
        return self.platform.parse_token(kind, r.status, body)

    @property
    def default(self) -> TokenSource:
        return self.source(self.app.token_kind)

    @property
    def started_default(self) -> TokenSource | None:
        """The default source if it exists yet: creating one starts its first fetch, which a probe must not do."""
        return self._sources.get(self.app.token_kind)

    async def stop(self) -> None:
        await asyncio.gather(*(s.stop() for s in self._sources.values()))


@dataclass(eq=False)
class UpstreamStages:
    """What one (app, upstream) learns and decides from the network: the monitor, the breaker, the retry policy.

    The monitor, the breaker and the budget only advise: each is guarded so that an exception inside it costs the
    request its advice (counted and logged by `guard`), never its forwarding.
    """

    monitor: GuardedMonitor
    breaker: GuardedBreaker
    policy: RetryPolicy

    @classmethod
    def build(cls, app: AppConfig, upstream: str, clock: Clock, metrics: Metrics, guard: Guard) -> UpstreamStages:
        monitor = GuardedMonitor(NetworkMonitor(clock, adaptive_settings(app.retry)), guard, fixed_params(app.retry))
        transitions = metrics.circuit_transitions
        breaker = CircuitBreaker(clock, app.breaker, on_transition=lambda old, new: transitions.labels(
            app.name, upstream, new.value).inc())
        source = (refreshed(monitor.retry_params, clock, changes=monitor.changes, samples=monitor.samples)
                  if app.retry.adaptive else None)
        policy = RetryPolicy(app.retry, clock, source)
        policy.budget = GuardedBudget(policy.budget, guard)
        stages = cls(monitor, GuardedBreaker(breaker, guard), policy)
        stages.export(metrics, app.name, upstream)
        metrics.prepare_upstream(app.name, upstream, platform_for(app).retry_reasons(upstream), client_facing_kinds())
        return stages

    def export(self, metrics: Metrics, app: str, upstream: str) -> None:
        """Gauges read at scrape time, so the request path pays nothing for them."""
        metrics.circuit_state.read(lambda: CIRCUIT_VALUES[self.breaker.state], app, upstream)
        metrics.network_state.read_each((app, upstream), STATE_NAMES, self.state_named)
        metrics.read_adaptive(self.adaptive_value, app, upstream)

    def state_named(self, name: str) -> float:
        return float(self.monitor.state.value == name)

    def adaptive_value(self, gauge: str) -> float:
        """The value of `imsidecar_adaptive_<gauge>`: a field of the monitor's snapshot."""
        value = getattr(self.monitor.snapshot(), ADAPTIVE_GAUGES[gauge])
        return float(value) if value is not None else 0.0


CIRCUIT_VALUES = {BreakerState.CLOSED: 0.0, BreakerState.HALF_OPEN: 1.0, BreakerState.OPEN: 2.0}
STATE_NAMES = tuple(state.value for state in NetworkState)
ADAPTIVE_GAUGES = {
    "per_try_timeout_seconds": "per_try_timeout", "backoff_base_seconds": "backoff_base",
    "backoff_cap_seconds": "backoff_cap", "max_attempts": "max_attempts", "latency_ewma_seconds": "latency_ewma",
    "latency_p99_seconds": "latency_p99", "loss_ratio": "loss_ratio", "throttle_ratio": "throttle_ratio",
}


class AppLimiters:
    """The sidecar's own rate limits of one app: a limiter per route template, its rate exported as a gauge.

    Each limiter is guarded (a failure grants the slot); a wait for a slot ends with ShuttingDown when the drain
    begins, so a queued request is answered before the sidecar exits.
    """

    def __init__(self, app: AppConfig, clock: Clock, metrics: Metrics, shared: SharedQuota | None = None, *,
                 guard: Guard, drain: Drain) -> None:
        default = app.ratelimit.default or DEFAULT_QUOTAS["dingtalk" if app.platform == "dingtalk" else "feishu"]
        self.enabled = app.ratelimit.enabled
        self._set = RateLimiterSet(clock, default, app.ratelimit.routes)
        self._shared = shared or UnsharedQuota()
        self._one_pod = isinstance(self._shared, UnsharedQuota)   # nothing to ask a store after this pod's slot
        self._app, self._metrics = app.name, metrics
        self._guard, self._drain = guard, drain
        self._guarded: dict[int, GuardedLimiter] = {}   # by the limiter's identity: bounded like the set
        self._exported: set[str] = set()

    async def acquire(self, limiter: AdaptiveRateLimiter, template: str, deadline: float) -> float:
        """This pod's slot first, then the cluster's (a no-op without a shared store); seconds waited.

        Each pod passes its own current (possibly lowered) rate, so a throttle seen here slows the cluster's pace.
        """
        with self._drain.interruptible():
            waited = await limiter.acquire(deadline)
            if self._one_pod:
                return waited
            try:
                return waited + await self._shared.acquire(f"{self._app}:{template}", limiter.current_rate, 1, deadline)
            except SharedQuotaExceeded as exc:
                raise RateLimitExceeded(exc.retry_after) from exc

    def take_free(self, limiter: AdaptiveRateLimiter) -> bool:
        """This pod's slot at once, when it is free and this pod's is the only quota: nothing to wait for, nothing
        for the drain to interrupt. False: `acquire` decides (and waits)."""
        return self._one_pod and limiter.take_free()

    def get(self, template: str, route_label: str) -> AdaptiveRateLimiter:
        limiter = self.guarded(self._set.get(self._app, template))
        if route_label not in self._exported:
            self._exported.add(route_label)
            # read at scrape time, and at 0 until the first rejection: no child for either until it is needed
            self._metrics.ratelimit_rate.read(lambda: limiter.current_rate, self._app, route_label)
            self._metrics.ratelimit_rejections.prepare(self._app, route_label)
        return limiter

    def guarded(self, limiter: AdaptiveRateLimiter) -> GuardedLimiter:
        wrapped = self._guarded.get(id(limiter))
        if wrapped is None or wrapped.inner is not limiter:
            if len(self._guarded) > 2 * self._set.max_size:
                self._guarded.clear()   # evicted limiters' wrappers go with them
            wrapped = self._guarded[id(limiter)] = GuardedLimiter(limiter, self._guard)
        return wrapped


@dataclass(eq=False)
class Binding:
    app: AppConfig
    platform: Platform
    upstream: str
    client: UpstreamClient
    tokens: AppTokens
    routes: RouteLabels
    stages: UpstreamStages
    limiters: AppLimiters
    policy: RetryPolicy = field(init=False)      # the stages' own, kept here: read several times per request
    breaker: GuardedBreaker = field(init=False)
    shapes: RouteShapes = field(init=False)      # the upstream's route templates (Platform.routes)

    def __post_init__(self) -> None:
        self.policy, self.breaker = self.stages.policy, self.stages.breaker
        self.shapes = self.platform.routes(self.upstream)

    def observe(self, verdict: Verdict, latency: float) -> None:
        """Every attempt's result, for the stages that learn from the network (monitor, breaker)."""
        self.stages.monitor.record(verdict, latency)
        self.stages.breaker.record(verdict)

    def observe_late(self, latency: float) -> None:
        """A timed-out attempt's answer that arrived after its cut-off, `latency` seconds after it was sent."""
        self.stages.monitor.record_late(latency)
        self.stages.breaker.record_late()


__all__ = ["AppLimiters", "AppTokens", "Binding", "UpstreamStages"]
