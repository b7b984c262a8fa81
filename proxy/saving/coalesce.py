"""Single flight for reads: identical concurrent reads (same app, token identity, path and query) become one
platform call whose answer all of them get.

Owns the flights in progress and who shares them; what makes two reads identical is proxy/saving/reads.py's.
A flight runs in a task of its own, so the client that started it may vanish without failing the others. An
interactive read never waits on a bulk one's flight (which stands aside for interactive traffic): it starts its own.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable, Mapping

from proxy.guard import Guard
from proxy.metrics import SavingsMetrics
from proxy.saving.reads import ReadRoutes, read_key
from proxy.saving.settings import BULK, CoalesceSettings
from proxy.upstream import Answer

if TYPE_CHECKING:
    from proxy.intake import RequestBody
    from proxy.pipeline import Exchange

Call = Callable[["Exchange", "RequestBody"], Awaitable[Answer]]
COALESCED_HEADER = "X-Imsidecar-Coalesced"


@dataclass(eq=False)
class Flight:
    task: asyncio.Task[Answer]
    leader: Exchange
    orphaned: bool = False   # the client that started it is gone; a streamed body of its answer has no reader

    def release_unread(self) -> None:
        """Hand a streamed answer's connection back when its reader is gone (followers never read a stream)."""
        if self.orphaned and self.task.done() and not self.task.cancelled() and self.task.exception() is None:
            self.task.result().release()


class Coalescer:
    def __init__(self, settings: Mapping[str, CoalesceSettings], reads: ReadRoutes, metrics: SavingsMetrics,
                 guard: Guard) -> None:
        self._settings, self._reads, self._metrics, self._guard = settings, reads, metrics, guard
        self._flights: dict[str, Flight] = {}

    def through(self, exchange: Exchange, body: RequestBody, call: Call) -> Awaitable[Answer]:
        """A request that cannot share goes straight on: the next stage's own awaitable, nothing of ours around it."""
        try:
            key = self._key(exchange, body)
        except Exception as exc:   # fail open: a call of its own
            self._guard.failed("coalesce", exc)
            key = None
        return call(exchange, body) if key is None else self._share(key, exchange, body, call)

    async def _share(self, key: str, exchange: Exchange, body: RequestBody, call: Call) -> Answer:
        flight = self._flights.get(key)
        if flight is None or no_cache(exchange) or (flight.leader.priority == BULK and exchange.priority != BULK):
            return await self._lead(key, exchange, body, call)
        return await self._follow(flight, exchange, body, call)

    def _key(self, exchange: Exchange, body: RequestBody) -> str | None:
        settings = self._settings.get(exchange.binding.app.name)
        if settings is None or not settings.enabled or not self._reads.is_read(exchange):
            return None
        return read_key(exchange, body)

    async def _lead(self, key: str, exchange: Exchange, body: RequestBody, call: Call) -> Answer:
        flight = self._flights[key] = Flight(asyncio.ensure_future(call(exchange, body)), exchange)
        flight.task.add_done_callback(lambda _: self._land(key, flight))
        try:
            return await asyncio.shield(flight.task)
        except asyncio.CancelledError:
            flight.orphaned = True
            flight.release_unread()
            raise

    async def _follow(self, flight: Flight, exchange: Exchange, body: RequestBody, call: Call) -> Answer:
        answer = await asyncio.shield(flight.task)
        if answer.stream is not None:
            return await call(exchange, body)   # a body still streaming has one reader: ask for another
        b = exchange.binding
        exchange.marks[COALESCED_HEADER] = "read"
        exchange.verdict = flight.leader.verdict   # counted as what it got: the leader's answer
        self._metrics.coalesced.labels(b.app.name, exchange.route, "read").inc()
        return answer

    def _land(self, key: str, flight: Flight) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        flight.release_unread()

    def __len__(self) -> int:
        return len(self._flights)


def no_cache(exchange: Exchange) -> bool:
    """`Cache-Control: no-cache` (or no-store): the client wants an answer the platform gives after it asked."""
    control = exchange.headers.get("Cache-Control", "").lower()
    return "no-cache" in control or "no-store" in control


__all__ = ["COALESCED_HEADER", "Call", "Coalescer", "no_cache"]
