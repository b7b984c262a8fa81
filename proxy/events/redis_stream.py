"""The event store on Redis: one Stream per app read through a consumer group, dedupe keys, a dead-letter stream,
and the leases that make one replica deliver each app (and hold its long connection).

Owns every Redis command of the events subsystem and its Lua scripts; the connection settings and client come from
the shared store (proxy/store_redis.py `connect`), whose token and quota keys this module never touches.

Keys, under the store's `key_prefix` (`{app}` is a Redis Cluster hash tag, so one app's keys share a slot):
    events:{app}:q                 the queue (a Stream; group `deliver`; an entry is deleted once settled)
    events:{app}:seen:<key>        dedupe, one key per event with its TTL
    events:{app}:dead              dead letters (a Stream, trimmed to `dead_letter_max`)
    events:{app}:lease:<role>:<n>  lease slot n of a role (deliver, connection), value = owner, with a TTL
    events:{app}:standby:<role>    replicas ready to take the role over (a sorted set, scored by expiry)

A crash mid-delivery leaves the entry pending in the group; the next owner claims it (XAUTOCLAIM) before reading
new ones, so it is delivered again, first.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from redis.exceptions import ResponseError

from proxy.clock import Clock
from proxy.events.lease import Lease
from proxy.events.queue import Admission, Arrivals, DeadLetter, Event, EventStoreUnavailable, Queued
from proxy.store import StoreSettings
from proxy.store_redis import REDIS_ERRORS, RELEASE_LOCK, connect

log = logging.getLogger(__name__)

T = TypeVar("T")
GROUP = "deliver"

# KEYS: seen key, queue. ARGV: ttl ms, limit, key, body, enc, headers, received_at.
ADMIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 'duplicate' end
if redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[2]) then return 'full' end
redis.call('XADD', KEYS[2], '*', 'key', ARGV[3], 'body', ARGV[4], 'enc', ARGV[5], 'headers', ARGV[6],
           'received_at', ARGV[7])
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
return 'queued'
"""

# Our own oldest pending entry, else one a gone owner left pending, else the next new one. KEYS: queue.
# ARGV: group, consumer.
HEAD = """
local own = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', KEYS[1], '0')
if own and #own[1][2] > 0 then return own[1][2][1] end
local claimed = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, '0-0', 'COUNT', 1)
if #claimed[2] > 0 then return claimed[2][1] end
local new = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', KEYS[1], '>')
if new and #new[1][2] > 0 then return new[1][2][1] end
return false
"""

# KEYS: queue. ARGV: group, id. Removes the entry once, whoever asks.
SETTLE = """
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return acked
"""

# KEYS: queue, dead. ARGV: group, id, dead max, then the dead letter's fields as name, value pairs.
BURY = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[2])
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], '*', unpack(fields))
return 1
"""

# KEYS: dead, queue. ARGV: dead letter id, received_at. Back to the tail of the queue, as if just received.
REPLAY = """
local entry = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #entry == 0 then return 0 end
local f, m = entry[1][2], {}
for i = 1, #f, 2 do m[f[i]] = f[i + 1] end
redis.call('XADD', KEYS[2], '*', 'key', m['key'], 'body', m['body'], 'enc', m['enc'], 'headers', m['headers'],
           'received_at', ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[1])
return 1
"""

# KEYS: the slots. ARGV: owner, ttl ms. The first free slot's number, or 0.
ACQUIRE = """
for i, key in ipairs(KEYS) do
    if redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) then return i end
end
return 0
"""

RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: standby set. ARGV: now ms, owner. Replicas other than us standing by.
OTHERS = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local n = redis.call('ZCARD', KEYS[1])
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then n = n - 1 end
return n
"""


def owner_name() -> str:
    """This process among the replicas: the pod name (hostname), the pid and a random tail."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def _encode(body: bytes) -> tuple[str, str]:
    try:
        return body.decode("utf-8"), ""
    except UnicodeDecodeError:
        return base64.b64encode(body).decode(), "b64"


def _event(fields: dict[str, str]) -> Event:
    body = base64.b64decode(fields["body"]) if fields.get("enc") == "b64" else fields["body"].encode()
    headers = tuple((str(k), str(v)) for k, v in json.loads(fields.get("headers") or "[]"))
    return Event(fields["key"], body, headers, float(fields.get("received_at") or 0.0))


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


class RedisEventStore:
    def __init__(self, settings: StoreSettings, clock: Clock, dead_letter_max: int, poll_interval: float = 0.2,
                 lease_ttl: float = 10.0, owner: str | None = None) -> None:
        self.settings, self._clock, self._dead_max, self._poll = settings, clock, dead_letter_max, poll_interval
        self.lease_ttl = lease_ttl
        self.owner = owner or owner_name()
        self._redis = connect(settings)
        self._scripts = {name: self._redis.register_script(text) for name, text in
                         (("admit", ADMIT), ("head", HEAD), ("settle", SETTLE), ("bury", BURY),
                          ("replay", REPLAY))}
        self._groups: set[str] = set()
        self._arrivals = Arrivals()

    def key(self, app: str, *parts: str) -> str:
        return ":".join((f"{self.settings.key_prefix}events:{{{app}}}", *parts))

    async def call(self, operation: Awaitable[T]) -> T:
        """One command; Redis being away (or read-only in a failover) becomes EventStoreUnavailable, while a missing
        or existing consumer group is left for the caller to handle."""
        try:
            return await operation
        except ResponseError as exc:
            if "NOGROUP" in str(exc) or "BUSYGROUP" in str(exc):
                raise
            raise EventStoreUnavailable(f"Redis at {self.settings.display_url} refused: {exc}") from exc
        except REDIS_ERRORS as exc:
            raise EventStoreUnavailable(f"Redis at {self.settings.display_url}: {type(exc).__name__}") from exc

    async def start(self) -> None:
        """Say whether Redis answers; never refuse to start because it does not (admissions fail until it does)."""
        try:
            await self.call(self._redis.ping())
            log.info("events: queue, dedupe and dead letters in Redis at %s", self.settings.display_url)
        except EventStoreUnavailable as exc:
            log.warning("events: %s; events are refused (not acknowledged) until it answers", exc)

    async def close(self) -> None:
        for app in list(self._groups):
            try:
                await self._forget_consumer(app)
            except EventStoreUnavailable:
                pass   # pending entries stay claimable by the next owner either way
        await self._redis.aclose()

    async def _forget_consumer(self, app: str) -> None:
        # A consumer with nothing pending can go; one with a pending entry stays so the next owner claims it.
        pending = await self.call(self._redis.xpending_range(self.key(app, "q"), GROUP, "-", "+", 1,
                                                             consumername=self.owner))
        if not pending:
            await self.call(self._redis.xgroup_delconsumer(self.key(app, "q"), GROUP, self.owner))

    async def _group(self, app: str) -> None:
        if app in self._groups:
            return
        try:
            await self.call(self._redis.xgroup_create(self.key(app, "q"), GROUP, id="0", mkstream=True))
        except ResponseError:   # BUSYGROUP: it exists already
            pass
        self._groups.add(app)

    # The queue ---------------------------------------------------------------------------------------------------

    async def admit(self, app: str, event: Event, dedupe_ttl: float, limit: int) -> Admission:
        await self._group(app)
        body, enc = _encode(event.body)
        args: list[str | int] = [max(1, int(dedupe_ttl * 1000)), limit, event.key, body, enc,
                                 json.dumps(event.headers), repr(event.received_at)]
        answer = await self.call(self._scripts["admit"](keys=[self.key(app, "seen", event.key),
                                                              self.key(app, "q")], args=args))
        admission = Admission(answer)
        if admission is Admission.QUEUED:
            self._arrivals.notify(app)
        return admission

    async def head(self, app: str) -> Queued | None:
        await self._group(app)
        try:
            entry = await self.call(self._scripts["head"](keys=[self.key(app, "q")], args=[GROUP, self.owner]))
        except ResponseError:   # NOGROUP: the stream was deleted under us; make it again on the next call
            self._groups.discard(app)
            return None
        if not entry:
            return None
        entry_id, flat = entry[0], entry[1]
        if not flat:   # deleted while pending (settled elsewhere): drop it from our pending list and look again
            await self.call(self._redis.xack(self.key(app, "q"), GROUP, entry_id))
            return None
        return Queued(str(entry_id), _event(_pairs(flat)))

    async def settle(self, app: str, item: Queued) -> None:
        await self.call(self._scripts["settle"](keys=[self.key(app, "q")], args=[GROUP, item.id]))

    async def bury(self, app: str, item: Queued, reason: str, attempts: int) -> None:
        body, enc = _encode(item.event.body)
        fields = ["key", item.event.key, "body", body, "enc", enc, "headers", json.dumps(item.event.headers),
                  "received_at", repr(item.event.received_at), "died_at", repr(self._clock.wall()),
                  "reason", reason, "attempts", str(attempts)]
        await self.call(self._scripts["bury"](keys=[self.key(app, "q"), self.key(app, "dead")],
                                              args=[GROUP, item.id, self._dead_max, *fields]))

    async def depth(self, app: str) -> int:
        return int(await self.call(self._redis.xlen(self.key(app, "q"))))

    async def wait(self, app: str, seconds: float) -> None:
        # Events other replicas admit are found by polling, at most `poll_interval` apart.
        await self._arrivals.wait(app, min(seconds, self._poll), self._clock)

    # Dead letters ------------------------------------------------------------------------------------------------

    async def dead_letters(self, app: str, limit: int) -> list[DeadLetter]:
        entries: list[tuple[str, dict[str, str]]] = await self.call(
            self._redis.xrange(self.key(app, "dead"), "-", "+", count=limit))  # type: ignore[arg-type]
        return [self._dead_letter(app, str(entry_id), fields) for entry_id, fields in entries]

    @staticmethod
    def _dead_letter(app: str, entry_id: str, fields: dict[str, str]) -> DeadLetter:
        return DeadLetter(entry_id, app, _event(fields), fields.get("reason", ""), float(fields.get("died_at", 0)),
                          int(fields.get("attempts", 0)))

    async def replay(self, app: str, ids: Sequence[str] | None) -> int:
        await self._group(app)
        chosen = list(ids) if ids is not None else [e.id for e in await self.dead_letters(app, self._dead_max)]
        count = 0
        for dead_id in chosen:
            count += int(await self.call(self._scripts["replay"](
                keys=[self.key(app, "dead"), self.key(app, "q")], args=[dead_id, repr(self._clock.wall())])))
        if count:
            self._arrivals.notify(app)
        return count

    def lease(self, app: str, role: str, slots: int) -> Lease:
        keys = [self.key(app, "lease", role, str(n)) for n in range(slots)]
        return RedisLease(self, keys, self.key(app, "standby", role))


class RedisLease:
    """One of `keys` (the slots) held by this replica's owner name, with the store's lease TTL."""

    def __init__(self, store: RedisEventStore, keys: list[str], standby: str) -> None:
        self._store, self._keys, self._standby = store, keys, standby
        self._redis = store._redis
        self._ttl_ms = max(1, int(store.lease_ttl * 1000))
        self._acquire = self._redis.register_script(ACQUIRE)
        self._renew = self._redis.register_script(RENEW)
        self._release = self._redis.register_script(RELEASE_LOCK)   # only the owner deletes it
        self._others = self._redis.register_script(OTHERS)
        self._held: str | None = None

    async def acquire(self) -> bool:
        slot = int(await self._store.call(self._acquire(keys=self._keys, args=[self._store.owner, self._ttl_ms])))
        self._held = self._keys[slot - 1] if slot else None
        return self._held is not None

    async def renew(self) -> bool:
        if self._held is None:
            return False
        renewed = await self._store.call(self._renew(keys=[self._held], args=[self._store.owner, self._ttl_ms]))
        if not int(renewed):
            self._held = None
        return self._held is not None

    async def release(self) -> None:
        if self._held is not None:
            await self._store.call(self._release(keys=[self._held], args=[self._store.owner]))
            self._held = None

    async def announce(self, willing: bool) -> None:
        owner = self._store.owner
        if willing:
            expiry = int(self._store._clock.wall() * 1000) + self._ttl_ms
            await self._store.call(self._redis.zadd(self._standby, {owner: expiry}))
        else:
            await self._store.call(self._redis.zrem(self._standby, owner))

    async def others_waiting(self) -> bool:
        now = int(self._store._clock.wall() * 1000)
        return int(await self._store.call(self._others(keys=[self._standby], args=[now, self._store.owner]))) > 0
