"""The sidecar's own exactly-once store: a request carrying `Idempotency-Key` is executed at most once per key.

Owns claiming a key, what a duplicate gets (draft-ietf-httpapi-idempotency-key-
header: the stored answer, 409 while the first is in flight, 422 for another request under the same key), which
answers are kept (not those that say the platform did not act: resending is safe), hearing a keyed request out
when its client leaves (its answer is what the client's repeat gets), putting what a timed-out write's late answer
says in place of the unknown outcome kept for it (`learn_late`), and the in-memory backend (bounded, TTL).
The Redis backend, shared by replicas, is proxy/exactly_once_redis.py; where the platform has a key of its own,
putting the client's key there is proxy/idempotency.py's.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable, Protocol

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.clock import Clock, finished_within
from proxy.drain import Drain
from proxy.errors import BadRequest, IdempotencyKeyInFlight, IdempotencyKeyReused, OutcomeUnknown, SidecarError
from proxy.exactly_once_config import OnceSettings
from proxy.history import Applied, History, Tried
from proxy.idempotency import HEADER, KeyProblem, client_key
from proxy.metrics import Metrics
from proxy.upstream import CLASSIFY_LIMIT, HOP_BY_HOP, Answer, answer_of

__all__ = ["ExactlyOnce", "MemoryOnce", "OnceBackend", "OnceSettings", "Stored"]

if TYPE_CHECKING:
    from proxy.intake import RequestBody
    from proxy.pipeline import Exchange

METHODS = frozenset({"POST", "PATCH"})   # the draft's non-idempotent methods
LEASE_MARGIN = 5.0   # a key in flight is held this long past its request's deadline (a crashed holder frees it)


@dataclass(frozen=True, slots=True)
class Stored:
    """A final answer as the client got it, to give again to a repeat of the same key."""

    fingerprint: str
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes | None          # None: it streamed to the first caller and was not kept
    outcome: str                # X-Imsidecar-Outcome
    error: str | None = None    # X-Imsidecar-Error, when the answer was the sidecar's own
    key: str | None = None      # X-Imsidecar-Idempotency-Key

    @property
    def size(self) -> int:
        return len(self.body or b"") + sum(len(k) + len(v) for k, v in self.headers)

    def answer(self) -> Answer:
        return Answer(self.status, CIMultiDictProxy(CIMultiDict(self.headers)), self.body or b"")


RUNNING = "running"
MISMATCH = "mismatch"
UNKNOWN = Applied.UNKNOWN.value
Claimed = Stored | str | None   # None: this caller executes; Stored: replay it; RUNNING or MISMATCH


class OnceBackend(Protocol):
    async def claim(self, scope: str, fingerprint: str, owner: str, lease: float) -> Claimed: ...
    async def finish(self, scope: str, owner: str, stored: Stored) -> None: ...
    async def release(self, scope: str, owner: str) -> None: ...
    async def wait(self, scope: str, seconds: float) -> None:
        """Return when the key's holder has finished or released it, or after `seconds`."""
    async def amend(self, scope: str, owner: str, stored: Stored | None) -> bool:
        """Put `stored` in place of the unknown outcome `owner` stored under the key (None: drop it, so that the
        key runs again), keeping its TTL. False, changing nothing, when the key holds anything else."""


@dataclass(slots=True)
class _Entry:
    fingerprint: str
    owner: str
    expires_at: float
    stored: Stored | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class MemoryOnce:
    """One process's keys: in flight (held by their owner, up to a lease) or done (kept for the TTL), within bounds."""

    def __init__(self, clock: Clock, settings: OnceSettings = OnceSettings()) -> None:
        self._clock, self._settings = clock, settings
        self._entries: OrderedDict[str, _Entry] = OrderedDict()   # in flight first, then done ones as they finished
        self.bytes = 0

    @property
    def entries(self) -> int:
        return len(self._entries)

    async def claim(self, scope: str, fingerprint: str, owner: str, lease: float) -> Claimed:
        entry = self._live(scope)
        if entry is None:
            self._entries[scope] = _Entry(fingerprint, owner, self._clock.now() + lease)
            self._entries.move_to_end(scope, last=False)   # in flight: never the oldest to evict
            return None
        if entry.fingerprint != fingerprint:
            return MISMATCH
        return entry.stored if entry.stored is not None else RUNNING

    async def finish(self, scope: str, owner: str, stored: Stored) -> None:
        entry = self._entries.get(scope)
        if entry is None or entry.owner != owner or entry.stored is not None:
            entry = _Entry(stored.fingerprint, owner, 0.0)   # our lease ran out: the answer is still the real one
            self._entries[scope] = entry
        entry.stored, entry.expires_at = stored, self._clock.now() + self._settings.ttl
        self._entries.move_to_end(scope)
        self.bytes += stored.size
        entry.done.set()
        self._evict()

    async def release(self, scope: str, owner: str) -> None:
        entry = self._entries.get(scope)
        if entry is not None and entry.owner == owner and entry.stored is None:
            del self._entries[scope]
            entry.done.set()

    async def wait(self, scope: str, seconds: float) -> None:
        entry = self._entries.get(scope)
        if entry is None or entry.done.is_set():
            return
        await finished_within(self._clock, entry.done.wait(), seconds)

    async def amend(self, scope: str, owner: str, stored: Stored | None) -> bool:
        entry = self._live(scope)
        if entry is None or entry.owner != owner or entry.stored is None or entry.stored.outcome != UNKNOWN:
            return False
        if stored is None:
            self._drop(scope)
            return True
        self.bytes += stored.size - entry.stored.size
        entry.stored = stored
        self._evict()
        return True

    def _live(self, scope: str) -> _Entry | None:
        entry = self._entries.get(scope)
        if entry is not None and entry.expires_at <= self._clock.now():
            self._drop(scope)
            return None
        return entry

    def _evict(self) -> None:
        """Expired keys, then the oldest answers, until both bounds hold; stops at the first answer worth keeping."""
        s, now = self._settings, self._clock.now()
        for scope, entry in list(self._entries.items()):
            over = len(self._entries) > s.max_entries or self.bytes > s.max_bytes
            if entry.expires_at <= now or (entry.stored is not None and over):
                self._drop(scope)
            elif entry.stored is not None:
                return   # answers are in the order they finished (and expire): the rest are younger still

    def _drop(self, scope: str) -> None:
        entry = self._entries.pop(scope)
        if entry.stored is not None:
            self.bytes -= entry.stored.size
        entry.done.set()


Stage = Callable[["Exchange", "RequestBody"], Awaitable[Answer]]
Render = Callable[["Exchange", SidecarError], web.Response]


def _unrendered(exchange: Exchange, exc: SidecarError) -> web.Response:
    return web.Response(status=exc.status, text=str(exc))


class ExactlyOnce:
    """The pipeline stage: requests with Idempotency-Key (POST, PATCH) run through the store; others pass by."""

    def __init__(self, backend: OnceBackend, clock: Clock, metrics: Metrics, drain: Drain | None = None) -> None:
        self.backend, self.clock, self.metrics = backend, clock, metrics
        self.drain = drain or Drain()   # the sidecar's: it waits for (and at its end cuts) what a gone client left
        self.render: Render = _unrendered   # the pipeline's error answer, to store a sidecar error as it was sent
        self._learning: set[asyncio.Task[None]] = set()   # late answers being put in place of unknown outcomes
        local = getattr(backend, "local", backend)   # the Redis backend's fallback holds the memory figures
        if isinstance(local, MemoryOnce):
            metrics.once_entries.set_function(lambda: local.entries)
            metrics.once_bytes.set_function(lambda: local.bytes)

    def through(self, exchange: Exchange, body: RequestBody, call: Stage) -> Awaitable[Answer]:
        """A request without a key goes straight on: the next stage's own awaitable, no coroutine of ours around it."""
        key = self.read_key(exchange)
        if key is None or exchange.method not in METHODS or not body.replayable:
            return call(exchange, body)   # a body too large to buffer cannot be compared with a repeat
        return self.keyed(exchange, body, key, call)

    async def keyed(self, exchange: Exchange, body: RequestBody, key: str, call: Stage) -> Answer:
        scope = f"{exchange.binding.app.name}:{hashlib.sha256(key.encode()).hexdigest()}"
        fingerprint = _fingerprint(exchange, body)
        owner = secrets.token_hex(8)
        stored = await self.claim(exchange, scope, fingerprint, owner)
        if stored is not None:
            return self.replay(exchange, stored)
        self.count(exchange, "executed")
        execution = asyncio.ensure_future(self.execute(exchange, body, scope, owner, fingerprint, call))
        return await self.heard_out(exchange, execution)

    async def heard_out(self, exchange: Exchange, execution: asyncio.Task[Answer]) -> Answer:
        """A keyed request goes on to its end when its client leaves (within its deadline, as if the client were
        there): its answer is stored under the key, and the client's repeat gets what the platform did instead of
        an unknown outcome. A request the drain cuts short stops, and keeps the unknown outcome, as before."""
        try:
            return await asyncio.shield(execution)
        except asyncio.CancelledError:
            handler = asyncio.current_task()
            if handler is not None and self.drain.cutting(handler):
                execution.cancel()
                await asyncio.wait([execution])   # its unknown outcome is stored before the answer says so
            else:   # the client left: the drain waits for the rest, and cuts it at its end
                self.drain.adopt(execution)
                self.count(exchange, "heard_out")
            execution.add_done_callback(_unrelayed)
            raise

    @staticmethod
    def read_key(exchange: Exchange) -> str | None:
        """The client's Idempotency-Key, taken off what is forwarded (the platform does not know the header)."""
        try:
            key = client_key(exchange.headers)
        except KeyProblem as exc:
            raise BadRequest(str(exc)) from exc
        exchange.headers.popall(HEADER, None)
        exchange.client_key = exchange.idempotency_key = key
        return key

    async def claim(self, exchange: Exchange, scope: str, fingerprint: str, owner: str) -> Stored | None:
        """None once this request holds the key; a stored answer to give instead; 409/422 as the draft says."""
        while True:
            lease = exchange.deadline - self.clock.now() + LEASE_MARGIN
            claimed = await self.backend.claim(scope, fingerprint, owner, lease)
            if claimed is None or isinstance(claimed, Stored):
                return claimed
            if claimed == MISMATCH:
                self.count(exchange, "mismatch")
                raise IdempotencyKeyReused(f"this {HEADER} was used for another request; use a new key")
            remaining = exchange.deadline - self.clock.now()
            if remaining <= 0:
                self.count(exchange, "conflict")
                raise IdempotencyKeyInFlight(f"a request with this {HEADER} is still being executed; retry later")
            await self.backend.wait(scope, remaining)   # a concurrent duplicate waits for the first one's answer

    async def execute(self, exchange: Exchange, body: RequestBody, scope: str, owner: str, fingerprint: str,
                      call: Stage) -> Answer:
        try:
            answer = await call(exchange, body)
        except SidecarError as exc:
            await self.keep(exchange, scope, owner, lambda: _from_response(self.render(exchange, exc), fingerprint,
                                                                           exchange, type(exc).__name__))
            self.learn_late(exchange, scope, owner, fingerprint)
            raise
        except BaseException:
            await self.abandoned(exchange, scope, owner, fingerprint)
            raise
        await self.keep(exchange, scope, owner, lambda: _from_answer(answer, fingerprint, exchange.outcome,
                                                                     exchange.idempotency_key))
        return answer

    async def keep(self, exchange: Exchange, scope: str, owner: str, make: Callable[[], Stored]) -> None:
        """Store the final answer, unless it says the platform did not act (resending is safe) or the platform's
        own key on this route makes re-executing an unknown outcome safe at the platform."""
        unknown_but_keyed = exchange.outcome == "unknown" and exchange.has_idempotency_key
        if exchange.retry_safe or unknown_but_keyed:
            await self.backend.release(scope, owner)
            return
        await self.backend.finish(scope, owner, make())

    def learn_late(self, exchange: Exchange, scope: str, owner: str, fingerprint: str) -> None:
        """A write kept as `unknown` because an attempt timed out: that attempt is heard out (proxy/upstream.py,
        up to LATE_LIMIT), and when its answer comes, what it says replaces the unknown outcome, so that the
        client's repeat under the key gets what the platform did instead of "unknown" for the whole TTL."""
        late = exchange.heard_out
        if late is None or exchange.outcome != UNKNOWN or exchange.has_idempotency_key:
            return   # nothing to hear (or, with the platform's own key, nothing was kept: the repeat runs again)

        def answered(attempt: asyncio.Task[Answer]) -> None:
            learning = asyncio.ensure_future(self.amend(exchange, scope, owner, fingerprint, attempt))
            self._learning.add(learning)
            learning.add_done_callback(self._learning.discard)

        late.add_done_callback(answered)

    async def amend(self, exchange: Exchange, scope: str, owner: str, fingerprint: str,
                    attempt: asyncio.Task[Answer]) -> None:
        """What the late answer says, as a single attempt would have: applied (the answer is kept), refused by the
        platform (kept, not-applied) or not acted on (the key is dropped: its repeat runs). Only "applied" is
        told when earlier attempts went out too: another one may have acted whatever this one says."""
        answer = answer_of(attempt)
        if answer is None or answer.stream is not None:
            return   # no answer after all, or one too long to keep: the unknown outcome stands
        b = exchange.binding
        history = History(write=True)
        history.add(Tried(answer, answer.classified(b.platform, b.upstream)))
        applied = history.applied()
        if applied is Applied.UNKNOWN or (applied is Applied.NOT_APPLIED and exchange.attempts > 1):
            return
        stored = None if history.retry_safe else _from_answer(answer, fingerprint, applied.value,
                                                               exchange.idempotency_key)
        if await self.backend.amend(scope, owner, stored):
            self.count(exchange, "amended")

    async def abandoned(self, exchange: Exchange, scope: str, owner: str, fingerprint: str) -> None:
        """The client went away or the sidecar is stopping mid-request. Once an attempt went out it may have acted:
        the key keeps an unknown outcome (unless the platform's own key makes re-executing safe)."""
        if exchange.attempts == 0:
            await self.backend.release(scope, owner)
            return
        exchange.outcome, exchange.retry_safe = "unknown", False
        error = OutcomeUnknown("the first request with this key was cut off after it was sent; it may have been "
                               "applied")
        await self.keep(exchange, scope, owner, lambda: _from_response(self.render(exchange, error), fingerprint,
                                                                       exchange, type(error).__name__))

    def replay(self, exchange: Exchange, stored: Stored) -> Answer:
        self.count(exchange, "replayed")
        exchange.replayed = stored
        exchange.outcome = stored.outcome
        exchange.idempotency_key = stored.key or exchange.client_key
        return stored.answer()

    def count(self, exchange: Exchange, result: str) -> None:
        self.metrics.once_requests.labels(exchange.binding.app.name, result).inc()


def _unrelayed(execution: asyncio.Task[Answer]) -> None:
    """The end of a request whose client left: a streamed answer is let go (no one reads it); failures were stored."""
    if not execution.cancelled() and execution.exception() is None:
        execution.result().release()


def _fingerprint(exchange: Exchange, body: RequestBody) -> str:
    """What makes two requests the same request: method, path, query and body, as the client sent them."""
    digest = hashlib.sha256()
    for part in (exchange.method, exchange.path, exchange.query):
        digest.update(part.encode() + b"\0")
    digest.update(body.data or b"")
    return digest.hexdigest()


def _from_answer(answer: Answer, fingerprint: str, outcome: str, key: str | None) -> Stored:
    kept = answer.body if answer.stream is None and len(answer.body or b"") <= CLASSIFY_LIMIT else None
    headers = tuple((k, v) for k, v in answer.headers.items()
                    if k.lower() not in HOP_BY_HOP and not k.lower().startswith("x-imsidecar-"))
    return Stored(fingerprint, answer.status, headers, kept, outcome, None, key)


def _from_response(response: web.Response, fingerprint: str, exchange: Exchange, error: str) -> Stored:
    headers = tuple((k, v) for k, v in response.headers.items() if not k.lower().startswith("x-imsidecar-"))
    body = response.body if isinstance(response.body, bytes) else b""
    return Stored(fingerprint, response.status, headers, body, exchange.outcome, error, exchange.idempotency_key)
