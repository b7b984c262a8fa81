"""A binding is everything one (app, upstream) pair needs at run time, assembled once from config.

Owns the per-app token sources and the per-upstream client; the pipeline only reads bindings.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


from proxy.clock import Clock
from proxy.config import AppConfig, TokenSettings
from proxy.errors import NETWORK_ERRORS
from proxy.metrics import Metrics
from proxy.platforms.base import Platform, TokenFetchError, TokenGrant
from proxy.routing import RouteLabels
from proxy.tokens import TokenSource
from proxy.upstream import UpstreamClient


class AppTokens:
    """The token sources of one app, one per kind, created on first use and refreshed in the background."""

    def __init__(self, app: AppConfig, platform: Platform, client: UpstreamClient, clock: Clock,
                 settings: TokenSettings, metrics: Metrics) -> None:
        self.app, self.platform, self.client = app, platform, client
        self.clock, self.settings, self.metrics = clock, settings, metrics
        self._sources: dict[str, TokenSource] = {}

    def source(self, kind: str) -> TokenSource:
        source = self._sources.get(kind)
        if source is None:
            source = self._sources[kind] = self._create(kind)
        return source

    def _create(self, kind: str) -> TokenSource:
        refreshes = self.metrics.token_refreshes
        source = TokenSource(lambda: self.fetch(kind), self.clock, self.settings,
                             observe=lambda result: refreshes.labels(self.app.name, kind, result).inc())
        self.metrics.token_expiry.labels(self.app.name, kind).set_function(source.seconds_to_expiry)
        source.start()
        return source

    async def fetch(self, kind: str) -> TokenGrant:
        call = self.platform.token_call(kind)
        try:
            async with asyncio.timeout(self.settings.fetch_timeout):
                async with self.client.session.request(call.method, self.client.base_url + call.path, json=call.json) as r:
                    body = await r.read()
        except NETWORK_ERRORS as exc:
            raise TokenFetchError(f"token endpoint unreachable ({type(exc).__name__})", permanent=False) from exc
        return self.platform.parse_token(kind, r.status, body)

    @property
    def default(self) -> TokenSource:
        return self.source(self.app.token_kind)

    async def stop(self) -> None:
        await asyncio.gather(*(s.stop() for s in self._sources.values()))


@dataclass(eq=False)
class Binding:
    app: AppConfig
    platform: Platform
    upstream: str
    client: UpstreamClient
    tokens: AppTokens
    routes: RouteLabels


__all__ = ["AppTokens", "Binding"]
