"""The shared store on Redis: one token fetch per app and kind cluster-wide, and quotas enforced across replicas.

Owns the Redis client, its Lua scripts, and falling back to local state while Redis is unreachable (and rejoining);
what a token or a quota is stays with proxy/tokens.py and the rate limiter.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterator, TypeVar

import backoff
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.clock import Clock
from proxy.exactly_once_config import OnceSettings
from proxy.store import (
    Fetch,
    LocalQuota,
    SharedGrant,
    SharedQuota,
    SharedQuotaExceeded,
    SharedTokens,
    SharedValues,
    StoreSettings,
    ValuesUnavailable,
)

if TYPE_CHECKING:
    from proxy.exactly_once import OnceBackend

log = logging.getLogger("imsidecar.store")

T = TypeVar("T")

# Connection refused, timeouts, authentication, a replica that became read-only in a failover: all mean
# "no shared state now", never "fail the request".
REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)
OPS = ("tokens", "invalidate", "quota", "values", "idempotency")

# Release the fetch lock only if we still hold it: a holder slower than the lock's expiry must not delete the
# lock another replica has taken since.
RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

# Drop the shared token only if it is the one the platform refused: a late report about an old token must not
# throw away the new one (and cause a second refresh).
DROP_TOKEN = """
local held = redis.call('GET', KEYS[1])
if held and cjson.decode(held)['value'] == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

# GCRA as a reservation (proxy.store.gcra, in integer microseconds so no float drift crowds two slots together).
# KEYS[1]: the quota's theoretical arrival time. ARGV: now, interval, burst (a count), max_wait.
# Returns {1, wait} with the slot reserved, or {0, wait} with nothing changed when the wait is too long.
GCRA = """
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local max_wait = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]) or ARGV[1])
if tat < now then tat = now end
local wait = tat - (burst - 1) * interval - now
if wait < 0 then wait = 0 end
if wait > max_wait then
    return {0, wait}
end
local next_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%d', next_tat), 'PX', math.ceil((next_tat - now) / 1000) + 1)
return {1, wait}
"""

# Back from an outage: the part of the shared schedule this replica still holds in local reservations (ARGV[2], in
# microseconds) is added to the quota's theoretical arrival time, unconditionally and once.
CARRY = """
local now = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or ARGV[1])
if tat < now then tat = now end
tat = tat + tonumber(ARGV[2])
redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
return 1
"""


# A counter that expires: the quota meter's monthly count (ARGV: amount, time to keep it in ms).
ADD = """
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return value
"""


class StoreDown(Exception):
    """Redis did not answer; the caller falls back to local state."""


class StoreMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.up = Gauge("imsidecar_store_up", "1 while the shared store (Redis) answers; 0 while on local fallback.",
                        registry=registry)
        self.fallbacks = Counter(
            "imsidecar_store_fallbacks", "Store operations served from local state because Redis was unreachable.",
            ("op",), registry=registry)
        for op in OPS:
            self.fallbacks.labels(op)


def connect(settings: StoreSettings) -> aioredis.Redis:
    options: dict[str, Any] = {
        "password": settings.password.reveal() if settings.password else None,
        "socket_timeout": settings.timeout,
        "socket_connect_timeout": settings.connect_timeout,
        "retry": Retry(NoBackoff(), 0),   # fall back at once; the health probe is our retry
        "decode_responses": True,
        "client_name": "imsidecar",
    }
    if settings.tls is not None:
        options.update(ssl_ca_certs=settings.tls.ca_file, ssl_cert_reqs="required" if settings.tls.verify else "none",
                       ssl_check_hostname=settings.tls.verify)
    return aioredis.Redis.from_url(settings.url, **options)


def probe_waits(settings: StoreSettings) -> Iterator[float]:
    for value in backoff.expo(base=2, factor=settings.probe_interval, max_value=settings.probe_max):
        if value is not None:
            yield value


def poll_waits() -> Iterator[float]:
    """How often a replica looks for the token another replica is fetching: soon at first, then gently."""
    for value in backoff.expo(base=1.5, factor=0.01, max_value=0.25):
        if value is not None:
            yield value


class Health:
    """Up or down, with one log line per transition; while down, a probe with back-off watches for the return."""

    def __init__(self, ping: Callable[[], Awaitable[Any]], reset: Callable[[], Awaitable[Any]], clock: Clock,
                 settings: StoreSettings, metrics: StoreMetrics) -> None:
        self._ping, self._reset, self._clock = ping, reset, clock
        self._settings, self._metrics = settings, metrics
        self.up = True
        self._probe: asyncio.Task[None] | None = None
        metrics.up.set(1)

    def describe(self, exc: BaseException) -> str:
        """The error for a log line: its type and text, with the password scrubbed should a library echo it."""
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        password = self._settings.password.reveal() if self._settings.password else ""
        return text.replace(password, "****") if password else text

    def failed(self, exc: BaseException) -> None:
        if not self.up:
            return
        self.up = False
        self._metrics.up.set(0)
        log.warning("store: Redis at %s unreachable (%s); each replica uses its own tokens and %.0f%% of each quota "
                    "until it answers again", self._settings.display_url, self.describe(exc),
                    100 * self._settings.fallback_share)
        self._probe = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        for wait in probe_waits(self._settings):
            await self._clock.sleep(wait)
            try:
                # Pooled connections to the Redis that went away would each fail once more: start afresh.
                await self._reset()
                await self._ping()
            except REDIS_ERRORS:
                continue
            self.up = True
            self._metrics.up.set(1)
            log.info("store: Redis at %s is back; tokens and quotas are shared again", self._settings.display_url)
            return

    async def call(self, operation: Awaitable[T]) -> T:
        """One Redis command; its failure marks the store down and becomes StoreDown."""
        try:
            return await operation
        except REDIS_ERRORS as exc:
            self.failed(exc)
            raise StoreDown(self.describe(exc)) from exc

    async def stop(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)


@dataclass(frozen=True, slots=True)
class TokenKeys:
    token: str
    lock: str

    @classmethod
    def of(cls, prefix: str, app: str, kind: str) -> TokenKeys:
        return cls(f"{prefix}token:{app}:{kind}", f"{prefix}lock:{app}:{kind}")


def ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


class RedisTokens:
    """Read the shared token; when none is fresh enough, one replica fetches under a lock and publishes it."""

    def __init__(self, client: aioredis.Redis, health: Health, clock: Clock, settings: StoreSettings,
                 metrics: StoreMetrics) -> None:
        self._redis, self._health, self._clock = client, health, clock
        self._settings, self._metrics = settings, metrics
        self._release = client.register_script(RELEASE_LOCK)
        self._drop = client.register_script(DROP_TOKEN)

    async def get_or_fetch(self, app: str, kind: str, fetch: Fetch, min_valid: float) -> SharedGrant:
        if self._health.up:
            try:
                return await self._shared(TokenKeys.of(self._settings.key_prefix, app, kind), fetch, min_valid)
            except StoreDown:
                pass
        self._metrics.fallbacks.labels("tokens").inc()
        return await self._fetch(fetch)

    async def invalidate(self, app: str, kind: str, value: str) -> None:
        if self._health.up:
            try:
                await self._health.call(self._drop(keys=[TokenKeys.of(self._settings.key_prefix, app, kind).token],
                                                   args=[value]))
                return
            except StoreDown:
                pass
        self._metrics.fallbacks.labels("invalidate").inc()

    async def _shared(self, keys: TokenKeys, fetch: Fetch, min_valid: float) -> SharedGrant:
        # Past the lock's expiry plus time for one more holder's fetch, something else is wrong: fetch here.
        give_up = self._clock.now() + 1.5 * self._settings.lock_ttl
        polls = poll_waits()
        while True:
            held = await self._read(keys, min_valid)
            if held is not None:
                return held
            owner = secrets.token_hex(16)
            if await self._health.call(self._redis.set(keys.lock, owner, nx=True, px=ms(self._settings.lock_ttl))):
                return await self._fetch_holding_lock(keys, owner, fetch, min_valid)
            if self._clock.now() >= give_up:
                log.warning("store: no token from the replica fetching it after %.1fs; fetching here",
                            1.5 * self._settings.lock_ttl)
                self._metrics.fallbacks.labels("tokens").inc()
                return await self._fetch(fetch)
            await self._clock.sleep(next(polls))

    async def _fetch_holding_lock(self, keys: TokenKeys, owner: str, fetch: Fetch, min_valid: float) -> SharedGrant:
        try:
            held = await self._read(keys, min_valid)   # published between our read and our lock?
            if held is not None:
                return held
            grant = await fetch()
            shared = SharedGrant(grant.value, self._clock.wall() + grant.expires_in)
            await self._publish(keys, shared, grant.expires_in)
            return shared
        finally:
            await self._unlock(keys, owner)

    async def _read(self, keys: TokenKeys, min_valid: float) -> SharedGrant | None:
        raw = await self._health.call(self._redis.get(keys.token))
        if raw is None:
            return None
        try:
            record = json.loads(raw)
            value, expires_at, lifetime = str(record["value"]), float(record["expires_at"]), float(record["lifetime"])
        except (ValueError, KeyError, TypeError):
            return None   # not ours or from an incompatible version: fetch and overwrite
        # Short-lived tokens are refreshed at half-life (proxy/tokens.py), so fresh enough means the same here.
        if expires_at - self._clock.wall() < min(min_valid, lifetime / 2):
            return None
        return SharedGrant(value, expires_at)

    async def _publish(self, keys: TokenKeys, grant: SharedGrant, lifetime: float) -> None:
        record = json.dumps({"value": grant.value, "expires_at": grant.expires_at, "lifetime": lifetime})
        try:
            await self._health.call(self._redis.set(keys.token, record, px=ms(lifetime)))
        except StoreDown:
            pass   # we hold the token; the other replicas will fetch their own until Redis is back

    async def _unlock(self, keys: TokenKeys, owner: str) -> None:
        try:
            await self._health.call(self._release(keys=[keys.lock], args=[owner]))
        except StoreDown:
            pass   # the lock expires by itself after lock_ttl

    async def _fetch(self, fetch: Fetch) -> SharedGrant:
        grant = await fetch()
        return SharedGrant(grant.value, self._clock.wall() + grant.expires_in)


class RedisQuota:
    """GCRA across replicas in one Lua call per request; a local share of the rate while Redis is away."""

    def __init__(self, client: aioredis.Redis, health: Health, clock: Clock, settings: StoreSettings,
                 metrics: StoreMetrics) -> None:
        self._health, self._clock, self._settings, self._metrics = health, clock, settings, metrics
        self._gcra = client.register_script(GCRA)
        self._carry = client.register_script(CARRY)
        self._local = LocalQuota(clock, settings.fallback_share)
        self._rejoining: dict[str, asyncio.Future[None]] = {}
        self._local_until: dict[str, float] = {}   # key -> when this replica's outage-time local slots end

    async def acquire(self, key: str, rate: float, burst: int, deadline: float) -> float:
        if rate <= 0 or burst < 1:
            raise ValueError("a shared quota needs a positive rate and a burst of at least 1")
        if not math.isfinite(rate):
            return 0.0
        if self._health.up:
            try:
                return await self._shared(key, rate, burst, deadline)
            except StoreDown:
                pass
        self._metrics.fallbacks.labels("quota").inc()
        return await self._local.acquire(key, rate, burst, deadline)

    async def _shared(self, key: str, rate: float, burst: int, deadline: float) -> float:
        start, wall = self._clock.now(), self._clock.wall()
        redis_key = f"{self._settings.key_prefix}quota:{key}"
        await self._rejoin(key, redis_key, wall)
        # No shared slot before this replica's own local ones from the outage are all sent: the two never overlap.
        ahead = self._sending_locally(key, start)
        if ahead > deadline - start:
            raise SharedQuotaExceeded(ahead)
        # Wall time, not monotonic: it is the one clock replicas share (NTP keeps nodes within milliseconds).
        args = [round((wall + ahead) * 1e6), math.ceil(1e6 / rate), burst,
                math.floor(max(0.0, deadline - start - ahead) * 1e6)]
        allowed, wait_us = await self._health.call(self._gcra(keys=[redis_key], args=args))
        wait = ahead + int(wait_us) / 1e6
        if not int(allowed):
            raise SharedQuotaExceeded(wait)
        remaining = wall + wait - self._clock.wall()   # the slot is an instant; the round trip already took time
        if remaining > 0:
            await self._clock.sleep(remaining)
        return self._clock.now() - start

    def _sending_locally(self, key: str, now: float) -> float:
        """Seconds until the slots this replica reserved locally during an outage have all been sent."""
        until = self._local_until.get(key)
        if until is None or until <= now:
            self._local_until.pop(key, None)
            return 0.0
        return until - now

    async def _rejoin(self, key: str, redis_key: str, wall: float) -> None:
        """Back from a Redis outage, the slots this replica reserved locally are still being sent: they join the
        shared schedule first (their share of it added to its arrival time), or the cluster would send its local
        shares and the shared quota at once (2x) for up to one deadline."""
        handing_over = self._rejoining.get(key)
        if handing_over is not None:
            await asyncio.shield(handing_over)   # another request of this replica is handing the slots over
            return
        carry, held = self._local.take_backlog(key)
        if carry <= 0 or held is None:
            return
        self._rejoining[key] = done = asyncio.get_running_loop().create_future()
        try:
            await self._health.call(self._carry(keys=[redis_key], args=[round(wall * 1e6), math.ceil(carry * 1e6)]))
            self._local_until[key] = held
        except StoreDown:
            self._local.restore(key, held)
            raise
        finally:
            del self._rejoining[key]
            done.set_result(None)


class RedisValues:
    """Cached answers and call counts for every replica (proxy/saving/); while Redis is away, each keeps its own."""

    def __init__(self, client: aioredis.Redis, health: Health, settings: StoreSettings, metrics: StoreMetrics) -> None:
        self._redis, self._health, self._prefix, self._metrics = client, health, settings.key_prefix, metrics
        self._add = client.register_script(ADD)

    async def get(self, key: str) -> str | None:
        value = await self._call(lambda: self._redis.get(self._prefix + key))
        return None if value is None else str(value)

    async def put(self, key: str, value: str, ttl: float) -> None:
        await self._call(lambda: self._redis.set(self._prefix + key, value, px=ms(ttl)))

    async def add(self, key: str, amount: int, ttl: float) -> int:
        return int(await self._call(lambda: self._add(keys=[self._prefix + key], args=[amount, ms(ttl)])))

    async def _call(self, command: Callable[[], Awaitable[T]]) -> T:
        """One command, or ValuesUnavailable at once while Redis is known to be away (the health probe watches)."""
        try:
            if not self._health.up:
                raise StoreDown("unreachable")
            return await self._health.call(command())
        except StoreDown as exc:
            self._metrics.fallbacks.labels("values").inc()
            raise ValuesUnavailable(f"the shared store is unreachable ({exc})") from exc


class RedisStore:
    """`backend: redis`: the client, its health, and the shared tokens, quotas and values built on it."""

    def __init__(self, settings: StoreSettings, clock: Clock, registry: CollectorRegistry,
                 once: OnceSettings = OnceSettings()) -> None:
        from proxy.exactly_once_redis import RedisOnce   # it builds on this module's Health

        self.settings = settings
        self._client = connect(settings)
        metrics = StoreMetrics(registry)
        self.health = Health(self._client.ping, self._client.connection_pool.disconnect, clock, settings, metrics)
        self.tokens: SharedTokens = RedisTokens(self._client, self.health, clock, settings, metrics)
        self.quota: SharedQuota = RedisQuota(self._client, self.health, clock, settings, metrics)
        self.once: OnceBackend = RedisOnce(self._client, self.health, clock, settings, once, metrics)
        self.values: SharedValues | None = RedisValues(self._client, self.health, settings, metrics)

    async def start(self) -> None:
        """Say at start-up whether Redis answers; never refuse to start because it does not."""
        try:
            await self.health.call(self._client.ping())
        except StoreDown:
            return
        log.info("store: sharing tokens and quotas through Redis at %s", self.settings.display_url)

    async def close(self) -> None:
        await self.health.stop()
        await self._client.aclose()

    def __repr__(self) -> str:
        return f"RedisStore({self.settings.display_url})"
