"""The exactly-once store on Redis: every replica sees the same keys, so a repeat is caught wherever it lands.

Owns the key records in Redis (in flight with an owner and a lease, or done with the stored answer and the TTL),
their Lua scripts, and falling back to this replica's memory while Redis is unreachable. What is stored, and what a
repeat gets, is proxy/exactly_once.py's; the client and its health are proxy/store_redis.py's.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import redis.asyncio as aioredis

from proxy.clock import Clock
from proxy.exactly_once import MISMATCH, RUNNING, Claimed, MemoryOnce, OnceSettings, Stored
from proxy.store import StoreSettings
from proxy.store_redis import Health, StoreDown, StoreMetrics, ms

POLL = 0.05   # how often a waiting duplicate looks again (Redis has no cheap cross-replica notification here)

# Take the key if nobody holds it; otherwise say who does (the record), changing nothing.
CLAIM = """
local held = redis.call('GET', KEYS[1])
if held then
    return held
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""

# Store the answer, unless another replica claimed the key after our lease ran out (its execution is the live one).
FINISH = """
local held = redis.call('GET', KEYS[1])
if held then
    local record = cjson.decode(held)
    if record['state'] ~= 'running' or record['owner'] ~= ARGV[1] then
        return 0
    end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""

# Put an answer in place of the unknown outcome this owner stored (or drop it: ARGV[2] empty), keeping its TTL.
AMEND = """
local held = redis.call('GET', KEYS[1])
if not held then
    return 0
end
local record = cjson.decode(held)
if record['state'] ~= 'done' or record['owner'] ~= ARGV[1] or record['outcome'] ~= 'unknown' then
    return 0
end
if ARGV[2] == '' then
    return redis.call('DEL', KEYS[1])
end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
return 1
"""

RELEASE = """
local held = redis.call('GET', KEYS[1])
if held then
    local record = cjson.decode(held)
    if record['state'] == 'running' and record['owner'] == ARGV[1] then
        return redis.call('DEL', KEYS[1])
    end
end
return 0
"""


class RedisOnce:
    """Keys shared by all replicas; this replica's MemoryOnce (`local`) while Redis does not answer."""

    def __init__(self, client: aioredis.Redis, health: Health, clock: Clock, store: StoreSettings,
                 settings: OnceSettings, metrics: StoreMetrics) -> None:
        self._health, self._clock, self._prefix = health, clock, store.key_prefix
        self._settings, self._metrics = settings, metrics
        self._claim = client.register_script(CLAIM)
        self._finish = client.register_script(FINISH)
        self._release = client.register_script(RELEASE)
        self._amend = client.register_script(AMEND)
        self.local = MemoryOnce(clock, settings)
        self._claimed_locally: set[str] = set()

    async def claim(self, scope: str, fingerprint: str, owner: str, lease: float) -> Claimed:
        if self._health.up:
            record = json.dumps({"state": RUNNING, "fp": fingerprint, "owner": owner})
            try:
                held = await self._health.call(self._claim(keys=[self._key(scope)], args=[record, ms(lease)]))
                return None if held is None else _read(held, fingerprint)
            except StoreDown:
                pass
        self._fallback()
        self._claimed_locally.add(owner)
        return await self.local.claim(scope, fingerprint, owner, lease)

    async def finish(self, scope: str, owner: str, stored: Stored) -> None:
        if owner in self._claimed_locally:
            self._claimed_locally.discard(owner)
            await self.local.finish(scope, owner, stored)
            return
        try:
            await self._health.call(self._finish(keys=[self._key(scope)],
                                                 args=[owner, json.dumps(_record(stored, owner)),
                                                       ms(self._settings.ttl)]))
        except StoreDown:
            self._fallback()
            await self.local.finish(scope, owner, stored)

    async def release(self, scope: str, owner: str) -> None:
        if owner in self._claimed_locally:
            self._claimed_locally.discard(owner)
            await self.local.release(scope, owner)
            return
        try:
            await self._health.call(self._release(keys=[self._key(scope)], args=[owner]))
        except StoreDown:
            self._fallback()   # the lease lets the key go by itself

    async def amend(self, scope: str, owner: str, stored: Stored | None) -> bool:
        if await self.local.amend(scope, owner, stored):   # stored here while Redis did not answer
            return True
        record = "" if stored is None else json.dumps(_record(stored, owner))
        try:
            return bool(await self._health.call(self._amend(keys=[self._key(scope)], args=[owner, record])))
        except StoreDown:
            self._fallback()
            return False   # the unknown outcome stands

    async def wait(self, scope: str, seconds: float) -> None:
        if self._health.up:
            await self._clock.sleep(min(seconds, POLL))   # then the caller claims again and sees where it stands
        else:
            await self.local.wait(scope, seconds)

    def _key(self, scope: str) -> str:
        return f"{self._prefix}once:{scope}"

    def _fallback(self) -> None:
        self._metrics.fallbacks.labels("idempotency").inc()


def _record(stored: Stored, owner: str) -> dict[str, Any]:
    """The owner stays on the record: only the execution that stored an unknown outcome may amend it."""
    body = None if stored.body is None else base64.b64encode(stored.body).decode()
    return {"state": "done", "fp": stored.fingerprint, "status": stored.status, "headers": list(stored.headers),
            "body": body, "outcome": stored.outcome, "error": stored.error, "key": stored.key, "owner": owner}


def _read(raw: str, fingerprint: str) -> Claimed:
    try:
        record = json.loads(raw)
        if record["fp"] != fingerprint:
            return MISMATCH
        if record["state"] == RUNNING:
            return RUNNING
        body = None if record["body"] is None else base64.b64decode(record["body"])
        headers = tuple((str(k), str(v)) for k, v in record["headers"])
        return Stored(record["fp"], int(record["status"]), headers, body, str(record["outcome"]), record["error"],
                      record["key"])
    except (ValueError, KeyError, TypeError):
        return RUNNING   # not a record this version wrote: leave it alone until it expires
