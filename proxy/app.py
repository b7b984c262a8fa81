"""Assembly and lifecycle: config in, listeners up, tokens warming; SIGTERM drains and exits.

Owns what is built once per process and in which order it starts and stops (a start that fails is one
StartupError; a stop takes `limits.drain_timeout` in total); request handling is the pipeline's.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
from functools import partial
from typing import TYPE_CHECKING, Sequence

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.accept import AcceptingSite
from proxy.admin import admin_app
from proxy.bindings import AppTokens, Binding, UpstreamStages
from proxy.clock import Clock, SystemClock
from proxy.config import Address, AppConfig, Config
from proxy.drain import Drain
from proxy.egress import Egress
from proxy.exactly_once import ExactlyOnce
from proxy.guard import Guard, guard_metrics
from proxy.listener import Listener
from proxy.metrics import Metrics
from proxy.pipeline import Pipeline
from proxy.platforms import platform_for
from proxy.readiness import AppHealth, Readiness, ReadinessReport
from proxy.retry import RetryEngine
from proxy.routing import RouteLabels, Router
from proxy.saving.lanes import LanedLimiters
from proxy.saving.stages import SavingStages
from proxy.store import open_store
from proxy.upstream import Pools, UpstreamClient

if TYPE_CHECKING:   # imported when configured: ~40 ms of a start-up that has neither (events pull in cryptography)
    from proxy.events.runtime import EventsRuntime
    from proxy.events.settings import EventsSettings
    from proxy.robots.handlers import RobotService

log = logging.getLogger("imsidecar")

# Start-up token fetches in flight at once. 1,000 apps fetching at one instant opened 1,000 connections to the
# token endpoint, and kept them: the pool hands its connections out in turn, so none ever idled out. /readyz waits
# for every app's first attempt, so at a 40 ms round trip 64 at a time makes 1,000 apps ready in ~0.6 s (16: ~2.5 s).
WARM_UP_AT_ONCE = 64


class StartupError(Exception):
    """The sidecar could not start; the message is one line naming the cause (the CLI exits 2 with it)."""


class Sidecar:
    def __init__(self, config: Config, *, clock: Clock | None = None, registry: CollectorRegistry | None = None,
                 egress: Egress | None = None, upstream_traces: Sequence[aiohttp.TraceConfig] = ()) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.egress = egress or Egress(config.egress, direct=delivery_urls(config))   # every outbound connection
        self.metrics = Metrics(registry)
        self.guard = Guard(self.metrics.stage_failures)
        guard_metrics(self.metrics, self.guard)
        self.drain = Drain()
        # shared tokens, quotas and exactly-once keys
        self.store = open_store(config.store, self.clock, self.metrics.registry, config.idempotency)
        self.saving = SavingStages.build(config.apps, self.store.values, self.clock, self.metrics.registry, self.guard)
        # one keep-alive pool per platform origin, shared by every app (traced in tests that watch where calls go)
        self.pools = Pools(self.egress, connect_timeout=config.limits.connect_timeout, trace_configs=upstream_traces)
        self.tokens: dict[str, AppTokens] = {}
        self.stages: dict[str, dict[str, UpstreamStages]] = {}   # app → upstream → its breaker and monitor
        self.router: Router[Binding] = Router()
        for app in config.apps:
            self._bind(app)
        retry = RetryEngine(self.clock, self.metrics, self.drain)
        self.pipeline = Pipeline(self.router, retry, self.clock, config.limits, self.metrics, self.saving,
                                 guard=self.guard, drain=self.drain,
                                 once=ExactlyOnce(self.store.once, self.clock, self.metrics, self.drain))
        self._runners: list[web.BaseRunner] = []
        self._stopping: asyncio.Future[None] | None = None
        self._session: aiohttp.ClientSession | None = None   # for the application-facing side: events, robots
        self.events: EventsRuntime | None = None
        self.robots: RobotService | None = None
        self._readiness = Readiness(config.readiness)
        self._warmed: set[str] = set()   # apps whose start-up token attempt has finished
        self._warming: asyncio.Task[None] | None = None

    def _bind(self, app_config: AppConfig) -> None:
        platform = platform_for(app_config)
        clients = {
            name: UpstreamClient(up.base_url, connect_timeout=self.config.limits.connect_timeout, pools=self.pools)
            for name, up in app_config.upstreams.items()
        }
        tokens = AppTokens(app_config, platform, clients[platform.token_upstream], self.clock, self.config.tokens,
                           self.metrics, shared=self.store.tokens)
        self.tokens[app_config.name] = tokens
        routes = RouteLabels()
        stages = {name: UpstreamStages.build(app_config, name, self.clock, self.metrics, self.guard) for name in clients}
        self.stages[app_config.name] = stages
        limiters = LanedLimiters(app_config, self.clock, self.metrics, self.store.quota, app_config.priority,
                                 self.saving.metrics, guard=self.guard, drain=self.drain)
        for exposure in app_config.expose:
            up = exposure.upstream
            binding = Binding(app_config, platform, up, clients[up], tokens, routes, stages[up], limiters)
            self.router.add(exposure.listen, exposure.prefix, binding)

    # Lifecycle ----------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Everything up, or a StartupError naming what failed (and whatever had started is stopped again)."""
        try:
            await self._start()
        except Exception as exc:
            await self.stop()
            raise StartupError(describe_start_failure(exc)) from exc
        log.info("imsidecar listening on %s; admin on %s",
                 ", ".join(map(str, self.config.listeners())), self.config.admin_listen)

    async def _start(self) -> None:
        await self.store.start()
        await self.saving.start()
        if self.config.robots is not None:
            from proxy.robots.handlers import RobotService
            self.robots = RobotService.create(self.config.robots, self.session, self.clock, self.metrics.registry)
        self._warming = asyncio.ensure_future(self._warm_all())
        for address in self.config.listeners():
            await self._serve(self._listener(address), address)
        await self._serve(admin_app(self.metrics.registry, self.readiness), self.config.admin_listen)
        if self.config.events is not None:
            await self._start_events(self.config.events)

    def _listener(self, address: Address) -> Listener:
        return Listener(self._handler(address), limits=self.config.limits, address=address, metrics=self.metrics,
                        guard=self.guard, drain=self.drain, access_log=None,
                        error_body=lambda code, message: self.pipeline.listener_error(address, code, message))

    async def _warm_all(self) -> None:
        """Every app's first token, WARM_UP_AT_ONCE fetches at a time (an app asked for meanwhile fetches its own)."""
        waiting = iter(self.tokens.values())

        async def fetcher() -> None:
            for tokens in waiting:
                await self._warm(tokens)

        await asyncio.gather(*(fetcher() for _ in range(min(WARM_UP_AT_ONCE, len(self.tokens)))))

    async def _warm(self, tokens: AppTokens) -> None:
        """One app's first token, so its first requests do not wait; /readyz waits for the attempt."""
        try:
            await tokens.default.get()
        except Exception as exc:  # reported by /readyz and the token metrics; requests will try again
            log.warning("app %s: no token yet: %s", tokens.app.name, exc)
        finally:
            self._warmed.add(tokens.app.name)

    def _handler(self, address: Address):  # type: ignore[no-untyped-def]
        handle = partial(self.pipeline.handle, listen=address)   # no coroutine of its own around the pipeline's
        robots_here = self.config.robots is not None and address == self.config.listen
        if not robots_here:
            return handle
        from proxy.robots.handlers import dispatch as robot_dispatch

        async def handle_with_robots(request: web.BaseRequest) -> web.StreamResponse:
            # /robots/<name> and /alerts/<name> on the main listener; every other path is forwarded.
            assert self.robots is not None
            answered = await robot_dispatch(self.robots, request)
            return answered if answered is not None else await self.pipeline.handle(request, address)

        return handle_with_robots

    async def _serve(self, target: web.Server | web.Application, address: Address) -> None:
        runner: web.BaseRunner
        # aiohttp waits shutdown_timeout twice per connection (for the handler, then for its task): the drain
        # (`stop`) has already let every request finish or answered it, so this is only the closing of sockets.
        closing = self.closing_time / 2
        if isinstance(target, web.Application):
            runner = web.AppRunner(target, handle_signals=False, access_log=None, shutdown_timeout=closing)
        else:
            runner = web.ServerRunner(target, handle_signals=False, shutdown_timeout=closing)
        await runner.setup()
        self._runners.append(runner)
        try:
            await AcceptingSite(runner, address.host, address.port, backlog=self.config.limits.backlog).start()
        except OSError as exc:
            reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
            raise StartupError(f"cannot listen on {address}: {reason}") from exc

    @property
    def closing_time(self) -> float:
        """The share of the drain kept for answering cut-short requests and closing connections."""
        return min(1.0, self.config.limits.drain_timeout / 10)

    async def _start_events(self, settings: EventsSettings) -> None:
        from proxy.events.runtime import EventsRuntime
        self.events = EventsRuntime(settings, self.config.store, self.session, self.metrics.registry, self.clock)
        await self.events.start()   # the store first: a callback is acknowledged only once it is stored
        if settings.listen is not None:
            app = web.Application()
            self.events.mount(app.router)
            await self._serve(app, settings.listen)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = self.egress.session()   # robots, events' endpoints and websockets, event delivery
        return self._session

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, answer the rest, close everything: all within
        `limits.drain_timeout`. Requests waiting in back-off or for a rate-limit slot are answered at once
        (with the platform's last answer when they had one). A second call waits for the first."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        await self._stop_accepting()
        if self.events is not None:
            await self.events.stop_intake()   # long connections close with the listeners; queued events stay stored
        self.drain.begin()
        cut = await self.drain.settle(self.clock, max(0.0, self.config.limits.drain_timeout - 2 * self.closing_time))
        if cut:
            log.warning("imsidecar: %d request(s) still in flight at the end of the drain were answered 503", cut)
            await self.drain.finished(self.closing_time / 2)
        await asyncio.gather(*(runner.cleanup() for runner in self._runners))
        self._runners.clear()
        if self.events is not None:
            await self.events.close()
        if self._session is not None:
            await self._session.close()
        if self._warming is not None:
            self._warming.cancel()
        await asyncio.gather(*(tokens.stop() for tokens in self.tokens.values()))
        await self.pools.close()
        await self.saving.stop()
        await self.store.close()

    async def _stop_accepting(self) -> None:
        """Close the listening sockets and the idle keep-alive connections; busy ones close after their answer."""
        for runner in self._runners:
            for site in list(runner.sites):
                await site.stop()
            if runner.server is not None:
                runner.server.pre_shutdown()

    async def run_until_signal(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        await stop.wait()
        log.info("imsidecar draining (up to %.0fs)", self.config.limits.drain_timeout)
        await self.stop()

    # Readiness ----------------------------------------------------------------------------------------------------

    def readiness(self, verbose: bool = True) -> ReadinessReport:
        """Ready when this sidecar can serve; each app's token and upstreams are reported (when `verbose`), not
        gating."""
        every = verbose or not self._readiness.gate_open   # else the verdict alone: the apps it can still wait for
        apps = {name: self._health(name, tokens, verbose) for name, tokens in self.tokens.items()
                if every or name not in self._warmed}
        return self._readiness.judge(self._listening(), apps, verbose)

    def _listening(self) -> bool:
        bound = {address[1] for runner in self._runners for address in runner.addresses}
        wanted = [*self.config.listeners(), self.config.admin_listen]
        if self.config.events is not None and self.config.events.listen is not None:
            wanted.append(self.config.events.listen)
        return all(address.port in bound for address in wanted)

    def _health(self, name: str, tokens: AppTokens, verbose: bool = True) -> AppHealth:
        source = tokens.started_default   # none yet when the start-up fetches have not reached this app
        if source is not None and source.current():
            token = "ok"
        else:
            token = f"no valid token: {source is not None and source.last_error or 'fetching'}"
        upstreams = {up: {"circuit": stages.breaker.state.value, "network": stages.monitor.state.value}
                     for up, stages in self.stages.get(name, {}).items()} if verbose else {}
        return AppHealth(token, name in self._warmed, source.seconds_to_expiry() if source else 0.0, upstreams)


def delivery_urls(config: Config) -> list[str]:
    """Where events go to the application: never through the egress proxy, whatever `no_proxy` says."""
    return [app.delivery.url for app in config.events.apps] if config.events is not None else []


def describe_start_failure(exc: BaseException) -> str:
    """One line for a failed start: the StartupError's own, or the failure's type and message."""
    if isinstance(exc, StartupError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return f"address already in use ({exc})"
    text = " ".join(str(exc).split()) or "no detail"
    return f"{type(exc).__name__}: {text}"[:300]
