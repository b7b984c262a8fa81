"""What makes two platform reads the same: app, upstream, token identity, method, path, query, the headers that
shape an answer, and the body of a POST that only reads.

Owns telling a read from a write and building its key — a digest, so the tokens in the key material never leave
this module (not a cache or Redis key, not a log line); sharing answers is the coalescer's and the cache's.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from proxy.saving.settings import CacheSettings

if TYPE_CHECKING:
    from proxy.intake import RequestBody
    from proxy.pipeline import Exchange

READ_METHODS = frozenset({"GET", "HEAD"})
# Request headers an answer depends on: a gzipped body must not reach a client that did not ask for one.
VARY = ("Accept", "Accept-Encoding", "Accept-Language", "Content-Type")


def token_identity(exchange: Exchange) -> str | None:
    """The sidecar's own token kind (tenant, app), or a digest of the user's own token; None when neither is known,
    and then nothing is shared."""
    if exchange.token_kind is not None:
        return f"app:{exchange.token_kind}"
    b = exchange.binding
    user = b.platform.user_token(b.upstream, exchange.headers)
    return None if user is None else "user:" + hashlib.sha256(user.encode()).hexdigest()


def read_key(exchange: Exchange, body: RequestBody) -> str | None:
    """The key of this read, or None when it must not be shared (no identity, or a body streamed through)."""
    identity = token_identity(exchange)
    if identity is None or not body.replayable:
        return None
    b = exchange.binding
    parts = [b.app.name, b.upstream, identity, exchange.method, exchange.path, exchange.query]
    parts += [exchange.headers.get(name, "") for name in VARY]
    digest = hashlib.sha256("\0".join(parts).encode())
    digest.update(b"\0" + (body.data or b""))
    return digest.hexdigest()


class ReadRoutes:
    """Which requests of each app are reads: GET and HEAD; and, where the app turned its cache on, the POSTs its
    platform (or its cache config) says only read (DingTalk's oapi user and department reads)."""

    def __init__(self, cache: dict[str, CacheSettings]) -> None:
        self._cache = cache
        self._post: dict[tuple[str, str], frozenset[str]] = {}

    def is_read(self, exchange: Exchange) -> bool:
        if exchange.method in READ_METHODS:
            return True
        return exchange.method == "POST" and exchange.template in self.post_reads(exchange)

    def post_reads(self, exchange: Exchange) -> frozenset[str]:
        b = exchange.binding
        known = self._post.get((b.app.name, b.upstream))
        if known is None:
            settings = self._cache.get(b.app.name, CacheSettings())
            configured = {template for template, route in settings.routes.items() if route.post}
            platform = b.platform.post_reads(b.upstream) if settings.defaults else frozenset()
            known = frozenset(platform | configured) if settings.enabled else frozenset()
            self._post[(b.app.name, b.upstream)] = known
        return known


__all__ = ["READ_METHODS", "ReadRoutes", "read_key", "token_identity"]
