"""The `store:` section and the state replicas share: one token per app and kind, one quota per app and route.

Owns the settings, the interfaces the core calls and the in-process implementation (one pod, nothing to run);
the Redis implementation lives in proxy/store_redis.py and is imported only when configured.

Errors:
    SharedQuotaExceeded   the shared slot would come after the request's deadline; carries retry_after
    ValuesUnavailable     the shared values cannot be read or written now (Redis away): the caller keeps its own
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable, Protocol
from urllib.parse import SplitResult, urlsplit

from prometheus_client import CollectorRegistry

from proxy.clock import Clock
from proxy.configtree import Node
from proxy.exactly_once_config import OnceSettings
from proxy.secret import Secret

if TYPE_CHECKING:
    from proxy.exactly_once import OnceBackend

BACKENDS = ("memory", "redis")
REDIS_SCHEMES = ("redis", "rediss")
REDIS_ONLY_KEYS = ("url", "password", "password_file", "tls", "key_prefix", "replicas", "fallback_share",
                   "timeout", "connect_timeout", "lock_ttl", "probe_interval", "probe_max")


# ----------------------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """TLS towards Redis (a `rediss://` URL): whose certificates to trust, and whether to check them at all."""

    ca_file: str | None = None
    verify: bool = True


@dataclass(frozen=True, slots=True)
class StoreSettings:
    backend: str = "memory"                # memory | redis
    url: str = ""                          # never carries a password: it is moved to `password` when parsed
    password: Secret | None = None
    tls: TlsSettings | None = None         # set exactly when the URL is rediss://
    key_prefix: str = "imsidecar:"
    replicas: int | None = None
    fallback_share: float = 0.5            # of each quota, per replica, while Redis is unreachable
    timeout: float = 0.5                   # one Redis command; Redis answers in well under a millisecond in-cluster
    connect_timeout: float = 1.0
    lock_ttl: float = 10.0                 # a crashed token fetcher blocks the others at most this long
    probe_interval: float = 1.0            # first health probe after Redis fails, doubling up to probe_max
    probe_max: float = 30.0

    @property
    def shared(self) -> bool:
        return self.backend == "redis"

    @property
    def display_url(self) -> str:
        """The URL for log lines: the password was never in it, and says so when there is one."""
        return masked_url(self.url, self.password is not None)


def masked_url(url: str, has_password: bool = False) -> str:
    """`url` with any password replaced by ****: a URL may reach a message, its password never does."""
    parts = urlsplit(url)
    if parts.password is None and not has_password:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if _valid_port(parts) and parts.port else ""
    return SplitResult(parts.scheme, f"{user}:****@{host}{port}", parts.path, parts.query, parts.fragment).geturl()


def parse_store(node: Node) -> StoreSettings | None:
    """The `store:` section; None when it has problems (each reported on `node` by its path)."""
    backend = node.choice("backend", BACKENDS, "memory")
    if backend != "redis":
        for key in REDIS_ONLY_KEYS:
            if node.has(key):
                node.get(key)
                node.problem("only with backend: redis", key)
        node.finish()
        return StoreSettings() if backend == "memory" else None
    return _parse_redis(node)


def _parse_redis(node: Node) -> StoreSettings | None:
    problems_before = len(node.problems)
    if importlib.util.find_spec("redis") is None:
        node.problem("needs the redis package: pip install 'imsidecar[redis]'", "backend")
    url, url_password = _redis_url(node)
    password = _password(node, url_password)
    tls = _tls(node, url)
    prefix = node.text("key_prefix", "imsidecar:") or "imsidecar:"
    if node.has("key_prefix") and not node.value["key_prefix"]:
        node.problem("must not be empty: other programs may share this Redis", "key_prefix")
    replicas = _replicas(node)
    d = StoreSettings()
    settings = StoreSettings(
        backend="redis", url=url, password=password, tls=tls, key_prefix=prefix, replicas=replicas,
        fallback_share=_fallback_share(node, replicas),
        timeout=node.positive_seconds("timeout", d.timeout),
        connect_timeout=node.positive_seconds("connect_timeout", d.connect_timeout),
        lock_ttl=node.positive_seconds("lock_ttl", d.lock_ttl),
        probe_interval=node.positive_seconds("probe_interval", d.probe_interval),
        probe_max=node.positive_seconds("probe_max", d.probe_max),
    )
    if settings.probe_max < settings.probe_interval:
        node.problem("must not be shorter than probe_interval", "probe_max")
    node.finish()
    return settings if len(node.problems) == problems_before else None


def _redis_url(node: Node) -> tuple[str, Secret | None]:
    """The URL without its password, and the password if the URL carried one (so no repr can show it)."""
    raw = node.text("url", required=True) or ""
    if not raw:
        return "", None
    parts = urlsplit(raw)
    shown = masked_url(raw)
    if parts.scheme not in REDIS_SCHEMES or not parts.hostname or not _valid_port(parts):
        node.problem(f"{shown!r} is not a redis:// or rediss:// URL with a host (and a port 1-65535)", "url")
        return "", None
    if parts.path not in ("", "/") and not parts.path.lstrip("/").isdigit():
        node.problem(f"{shown!r}: the path must be a database number, like /0", "url")
    if parts.password is None:
        return raw, None
    user = parts.username or ""
    netloc = parts.netloc.rpartition("@")[2]
    clean = SplitResult(parts.scheme, f"{user}@{netloc}" if user else netloc, parts.path, parts.query, parts.fragment)
    return clean.geturl(), Secret(parts.password) if parts.password else None


def _valid_port(parts: SplitResult) -> bool:
    try:
        return parts.port is None or 0 < parts.port
    except ValueError:
        return False


def _password(node: Node, from_url: Secret | None) -> Secret | None:
    given = node.has("password") or node.has("password_file")
    if given and from_url is not None:
        node.read.update(("password", "password_file"))
        node.problem("the url already carries a password; give it in one place only (password_file is best)",
                     "password")
        return from_url
    return node.secret("password") if given else from_url


def _tls(node: Node, url: str) -> TlsSettings | None:
    tls_url = urlsplit(url).scheme == "rediss"
    if not node.has("tls"):
        return TlsSettings() if tls_url else None
    section = node.child("tls")
    ca_file = section.text("ca_file")
    verify = section.flag("verify", True)
    section.finish()
    if ca_file is not None and not Path(ca_file).is_file():
        section.problem(f"cannot read {ca_file}", "ca_file")
    if url and not tls_url:
        node.problem("tls options need a rediss:// url", "tls")
    if ca_file is not None and not verify:
        section.problem("a ca_file is pointless with verify: false", "verify")
    return TlsSettings(ca_file, verify)


def _replicas(node: Node) -> int | None:
    if not node.has("replicas"):
        return None
    value = node.number("replicas", 1, minimum=1)
    if value != int(value):
        node.problem(f"expected a whole number of replicas, got {value!r}", "replicas")
    return int(value)


def _fallback_share(node: Node, replicas: int | None) -> float:
    """Without Redis each replica may use this share of a quota: 1/replicas when known, else half."""
    default = 1.0 / replicas if replicas else 0.5
    share = node.number("fallback_share", default)
    if not 0 < share <= 1:
        node.problem(f"expected a share in (0, 1], got {share!r}", "fallback_share")
        return default
    return share


# ----------------------------------------------------------------------------------------------------------------
# What the core calls


class SharedQuotaExceeded(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"shared rate limit: next slot in {retry_after:.3f}s, after the request's deadline")
        self.retry_after = retry_after


class Grant(Protocol):
    """What a token fetch returns (proxy.platforms.base.TokenGrant), already sanitised by the caller."""

    @property
    def value(self) -> str: ...
    @property
    def expires_in(self) -> float: ...


Fetch = Callable[[], Awaitable[Grant]]


@dataclass(frozen=True, slots=True)
class SharedGrant:
    value: str = field(repr=False)
    expires_at: float   # wall time (unix seconds): replicas do not share a monotonic clock


class SharedTokens(Protocol):
    async def get_or_fetch(self, app: str, kind: str, fetch: Fetch, min_valid: float) -> SharedGrant:
        """A token valid for at least `min_valid` more seconds (capped at half its lifetime, when the
        platform grants short ones), fetched by at most one replica at a time."""

    async def invalidate(self, app: str, kind: str, value: str) -> None:
        """The platform refused `value`: drop it everywhere, unless a newer token has already replaced it."""


class SharedQuota(Protocol):
    async def acquire(self, key: str, rate: float, burst: int, deadline: float) -> float:
        """Wait for a send slot of `key` shared by all replicas; return the seconds waited.

        `rate` is the caller's rate for this call (its limiter's current rate, lowered after throttling);
        `deadline` is a `clock.now()` time; raises SharedQuotaExceeded when the slot would come after it."""


class ValuesUnavailable(Exception):
    pass


class SharedValues(Protocol):
    """Small values every replica sees: cached platform answers and the monthly call counts (proxy/saving/).
    Keys are the caller's (the store adds its prefix); every method raises ValuesUnavailable while unreachable."""

    async def get(self, key: str) -> str | None: ...
    async def put(self, key: str, value: str, ttl: float) -> None: ...
    async def add(self, key: str, amount: int, ttl: float) -> int:
        """Add to a counter (created at 0), keep it `ttl` seconds, and return its new value."""


class Store(Protocol):
    tokens: SharedTokens
    quota: SharedQuota
    once: OnceBackend   # the sidecar's own exactly-once keys (proxy/exactly_once.py)
    values: SharedValues | None   # None: nothing is shared (one replica)

    async def start(self) -> None: ...
    async def close(self) -> None: ...


# ----------------------------------------------------------------------------------------------------------------
# One pod: nothing shared, nothing changes


class LocalTokens:
    """Every fetch goes to the platform; the caller's TokenSource is the only cache, single flight as ever."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    async def get_or_fetch(self, app: str, kind: str, fetch: Fetch, min_valid: float) -> SharedGrant:
        grant = await fetch()
        return SharedGrant(grant.value, self._clock.wall() + grant.expires_in)

    async def invalidate(self, app: str, kind: str, value: str) -> None:
        return None


class UnsharedQuota:
    """No shared quota: the pod's own rate limiter is the whole story."""

    async def acquire(self, key: str, rate: float, burst: int, deadline: float) -> float:
        return 0.0


def gcra(tat: float | None, now: float, interval: float, burst: int) -> tuple[float, float]:
    """GCRA as a reservation: (wait until this request's slot, the theoretical arrival time after it).

    Slots are `interval` apart, with `burst` of them allowed at once; so any span of W seconds holds at most
    burst − 1 + W / interval of them, and with burst 1 a quota of N per second is never exceeded in any second.
    """
    tat = now if tat is None else max(tat, now)
    wait = max(0.0, tat - (burst - 1) * interval - now)
    return wait, tat + interval


class LocalQuota:
    """GCRA in this process, at `share` of each rate: what a replica allows itself while Redis is away."""

    def __init__(self, clock: Clock, share: float = 1.0) -> None:
        self._clock, self._share = clock, share
        self._tat: dict[str, float] = {}   # keys are (app, route) pairs, bounded by config

    async def acquire(self, key: str, rate: float, burst: int, deadline: float) -> float:
        if not math.isfinite(rate):
            return 0.0
        now = self._clock.now()
        share_burst = max(1, math.floor(burst * self._share))
        wait, tat = gcra(self._tat.get(key), now, 1.0 / (rate * self._share), share_burst)
        if now + wait > deadline and wait > 0:
            raise SharedQuotaExceeded(wait)
        self._tat[key] = tat
        if wait > 0:
            await self._clock.sleep(wait)
        return wait

    def take_backlog(self, key: str) -> tuple[float, float | None]:
        """Seconds of the full-rate schedule that slots reserved here and not yet due still take up, handed over
        (forgotten here); and what to `restore` should the hand-over fail."""
        tat = self._tat.pop(key, None)
        return (0.0 if tat is None else max(0.0, tat - self._clock.now()) * self._share), tat

    def restore(self, key: str, tat: float | None) -> None:
        if tat is not None:
            self._tat[key] = max(tat, self._tat.get(key, tat))


@dataclass
class MemoryStore:
    """`backend: memory`: the default, for one replica."""

    clock: Clock
    once_settings: OnceSettings = OnceSettings()
    tokens: SharedTokens = field(init=False)
    quota: SharedQuota = field(init=False)
    once: OnceBackend = field(init=False)
    values: SharedValues | None = None

    def __post_init__(self) -> None:
        from proxy.exactly_once import MemoryOnce   # it imports the pipeline's machinery, which imports config

        self.tokens = LocalTokens(self.clock)
        self.quota = UnsharedQuota()
        self.once = MemoryOnce(self.clock, self.once_settings)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def open_store(settings: StoreSettings | None, clock: Clock, registry: CollectorRegistry,
               once: OnceSettings = OnceSettings()) -> Store:
    """The store the settings ask for; Redis (and the `redis` package) only when configured."""
    if settings is None or not settings.shared:
        return MemoryStore(clock, once)
    # The redis package is an optional dependency (pip install 'imsidecar[redis]'); parse_store checked it.
    from proxy.store_redis import RedisStore
    return RedisStore(settings, clock, registry, once)
