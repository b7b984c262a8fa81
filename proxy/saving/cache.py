"""The read cache: answers of read-mostly routes served again for their TTL, and in place of a failed or throttled
call for a bounded time after it (stale-if-error, marked `X-Imsidecar-Cache: stale`).

Owns which routes are cached (the platform's curated list and the app's config), what is kept (successful answers
only, read whole and not too large), `Cache-Control: no-cache` and stale-if-error. Entries are keyed by token
identity (proxy/saving/reads.py), so no answer crosses from one identity to another; where they live is
cache_store.py's. Off for an app without a `cache:` section.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Awaitable, Mapping, TypeGuard

from proxy.clock import Clock
from proxy.errors import SidecarError
from proxy.guard import Guard
from proxy.metrics import SavingsMetrics
from proxy.outcome import Outcome, Verdict
from proxy.saving.cache_store import Entries, Entry, MemoryEntries, SharedEntries
from proxy.saving.coalesce import Call, no_cache
from proxy.saving.reads import ReadRoutes, read_key
from proxy.saving.settings import CachedRoute, CacheSettings
from proxy.store import SharedValues
from proxy.upstream import Answer

if TYPE_CHECKING:
    from proxy.intake import RequestBody
    from proxy.pipeline import Exchange

CACHE_HEADER = "X-Imsidecar-Cache"
ROUTE_MEMO = 4096
STAND_IN_FOR = frozenset({Outcome.RETRYABLE, Outcome.THROTTLED})   # the platform failed or throttled


class ReadCache:
    def __init__(self, settings: Mapping[str, CacheSettings], reads: ReadRoutes, values: SharedValues | None,
                 clock: Clock, metrics: SavingsMetrics, guard: Guard) -> None:
        self._settings, self._reads, self._clock, self._metrics, self._guard = settings, reads, clock, metrics, guard
        self._entries: dict[str, Entries] = {}
        self._routes: dict[tuple[str, str, str, str], CachedRoute | None] = {}
        for app, app_settings in settings.items():
            if app_settings.enabled:
                self._entries[app] = self._open(app, app_settings, values)

    def _open(self, app: str, settings: CacheSettings, values: SharedValues | None) -> Entries:
        local = MemoryEntries(settings.max_entries, settings.max_bytes, self._clock.wall)
        entries: Entries = local if values is None else SharedEntries(values, local)
        self._metrics.cache_entries.labels(app).set_function(lambda: entries.count)
        self._metrics.cache_bytes.labels(app).set_function(lambda: entries.bytes)
        return entries

    def through(self, exchange: Exchange, body: RequestBody, call: Call) -> Awaitable[Answer]:
        """A request for no cached route goes straight on: the next stage's own awaitable, nothing of ours around it."""
        try:
            route = self.route(exchange)
        except Exception as exc:   # fail open, as below
            self._guard.failed("cache", exc)
            route = None
        return call(exchange, body) if route is None else self.read(exchange, body, call)

    async def read(self, exchange: Exchange, body: RequestBody, call: Call) -> Answer:
        try:
            found = await self._look_up(exchange, body)
        except Exception as exc:   # fail open: the read goes to the platform as if nothing were cached
            self._guard.failed("cache", exc)
            return await call(exchange, body)
        if found is None:
            return await call(exchange, body)
        key, route, entry = found
        if entry is not None and not no_cache(exchange) and entry.age(self._clock.wall()) < entry.ttl:
            return self._serve(exchange, entry, "hit")
        result = "bypass" if no_cache(exchange) else "miss"
        return await self._fetch(exchange, body, call, key, route, None if result == "bypass" else entry, result)

    async def _look_up(self, exchange: Exchange, body: RequestBody) -> tuple[str, CachedRoute, Entry | None] | None:
        """The read's key, route and held entry; None when this request is not for the cache."""
        route = self.route(exchange)
        key = read_key(exchange, body) if route is not None else None
        if route is None or key is None:
            return None
        held = None if no_cache(exchange) else await self._entries[exchange.binding.app.name].get(key)
        return key, route, held

    async def _fetch(self, exchange: Exchange, body: RequestBody, call: Call, key: str, route: CachedRoute,
                     entry: Entry | None, result: str) -> Answer:
        """Ask the platform; keep a success; let a usable older answer stand in when the platform fails."""
        try:
            answer = await call(exchange, body)
        except SidecarError as exc:
            # Unreachable, deadline, circuit open, rate-limited: the platform's trouble, not the request's.
            if (exc.status >= 500 or exc.status == 429) and self._usable(entry, exchange):
                return self._serve(exchange, entry, "stale")
            self._count(exchange, result)
            raise
        try:
            return await self._after(exchange, key, route, entry, result, answer)
        except Exception as exc:   # fail open: the platform's answer as it came
            self._guard.failed("cache", exc)
            return answer

    async def _after(self, exchange: Exchange, key: str, route: CachedRoute, entry: Entry | None, result: str,
                     answer: Answer) -> Answer:
        verdict = self._verdict(exchange, answer)
        if verdict.outcome is Outcome.SUCCESS:
            await self._keep(exchange, key, route, answer)
        elif (verdict.outcome in STAND_IN_FOR or self._exhausted(exchange, answer)) and self._usable(entry, exchange):
            answer.release()
            return self._serve(exchange, entry, "stale")
        self._count(exchange, result)
        return answer

    async def _keep(self, exchange: Exchange, key: str, route: CachedRoute, answer: Answer) -> None:
        settings = self._settings[exchange.binding.app.name]
        if answer.status != 200 or answer.body is None or len(answer.body) > settings.max_entry_bytes:
            return
        entry = Entry.of(answer, self._clock.wall(), route.ttl)
        await self._entries[exchange.binding.app.name].put(key, entry, route.ttl + settings.stale_if_error)

    def _usable(self, entry: Entry | None, exchange: Exchange) -> TypeGuard[Entry]:
        """Within the stale-if-error bound past its TTL."""
        if entry is None:
            return False
        bound = self._settings[exchange.binding.app.name].stale_if_error
        return entry.age(self._clock.wall()) < entry.ttl + bound

    def _serve(self, exchange: Exchange, entry: Entry, result: str) -> Answer:
        exchange.marks["Age"] = str(int(entry.age(self._clock.wall())))
        self._count(exchange, result)
        return entry.answer()

    def _count(self, exchange: Exchange, result: str) -> None:
        exchange.marks[CACHE_HEADER] = result
        self._metrics.hot_cache_lookups(exchange.binding.app.name, exchange.route, result).inc()

    @staticmethod
    def _verdict(exchange: Exchange, answer: Answer) -> Verdict:
        b = exchange.binding
        return answer.classified(b.platform, b.upstream)

    @staticmethod
    def _exhausted(exchange: Exchange, answer: Answer) -> bool:
        return exchange.binding.platform.quota_exhausted(answer.status, answer.plain_body())

    # Which routes ---------------------------------------------------------------------------------------------

    def route(self, exchange: Exchange) -> CachedRoute | None:
        """The cached route this request reads, or None (not cached, not a read, or the app's cache is off)."""
        b = exchange.binding
        memo = (b.app.name, b.upstream, exchange.method, exchange.template)
        if memo not in self._routes:
            if len(self._routes) >= ROUTE_MEMO:
                self._routes.clear()   # bounded: templates of odd paths only cost the lookup again
            self._routes[memo] = self._resolve(exchange) if self._reads.is_read(exchange) else None
        return self._routes[memo]

    def _resolve(self, exchange: Exchange) -> CachedRoute | None:
        b = exchange.binding
        settings = self._settings.get(b.app.name)
        if settings is None or not settings.enabled:
            return None
        route = settings.routes.get(exchange.template)
        if route is None and settings.defaults:
            ttl = b.platform.cached_reads(b.upstream).get(exchange.template)
            route = CachedRoute(ttl) if ttl is not None else None
        return route if route is not None and route.ttl > 0 else None


__all__ = ["CACHE_HEADER", "ReadCache"]
