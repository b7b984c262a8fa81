"""Latest-wins card updates: one card's updates go out one at a time, in order, at most one per interval; an update
still waiting when a newer one replacing the same state arrives is not sent, and its request gets the newer one's
answer (`X-Imsidecar-Coalesced: superseded`).

Owns the line of updates per card and when each is sent; which requests are card updates, and which of them
replace state (and so may be skipped) rather than append to it, is each platform's table (`card_update`). A card's
final frame is never skipped, and updates after it are sent like any other.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable, Mapping

from proxy.clock import Clock
from proxy.errors import SidecarError
from proxy.guard import Guard
from proxy.metrics import SavingsMetrics
from proxy.platforms.base import CardUpdate
from proxy.saving.coalesce import COALESCED_HEADER, Call
from proxy.saving.settings import CardSettings
from proxy.upstream import Answer

if TYPE_CHECKING:
    from proxy.intake import RequestBody
    from proxy.pipeline import Exchange


class UnsharedAnswer(SidecarError):
    """The update that replaced this one was answered with a body still streaming, which only one client can read."""


@dataclass(eq=False)
class Pending:
    """An update waiting for its turn, and every request it answers (its own, then those it replaced)."""

    exchange: Exchange
    body: RequestBody
    update: CardUpdate
    answers: list[asyncio.Future[Answer]] = field(default_factory=list)
    replaced: list[Exchange] = field(default_factory=list)   # the requests it answers beside its own

    def replaces(self, older: Pending) -> bool:
        key = older.update.merge_key
        return key is not None and key == self.update.merge_key and not older.update.final


class CardLine:
    """The updates of one card, sent by one worker task: in order, `interval` apart, the newest of a run."""

    def __init__(self, interval: float, clock: Clock, call: Call, on_idle: Callable[[CardLine], None],
                 on_replaced: Callable[[Pending], None]) -> None:
        self.interval, self.clock, self.call = interval, clock, call
        self.on_idle, self.on_replaced = on_idle, on_replaced
        self.queue: deque[Pending] = deque()
        self.last_sent = -math.inf
        self.worker: asyncio.Task[None] | None = None

    def submit(self, pending: Pending) -> None:
        if self.queue and pending.replaces(self.queue[-1]):
            replaced = self.queue.pop()
            pending.answers.extend(replaced.answers)
            pending.replaced.extend([replaced.exchange, *replaced.replaced])
            self.on_replaced(replaced)
        self.queue.append(pending)
        if self.worker is None or self.worker.done():
            self.worker = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            while True:
                wait = self.last_sent + self.interval - self.clock.now()
                if wait > 0:
                    await self.clock.sleep(wait)   # pacing; and after the last send, room for a late newcomer
                    continue
                if not self.queue:
                    return
                pending = self.queue.popleft()
                self.last_sent = self.clock.now()
                await self._send(pending)
        finally:
            self.on_idle(self)

    async def _send(self, pending: Pending) -> None:
        try:
            answer = await self.call(pending.exchange, pending.body)
        except Exception as exc:
            settle(pending.answers, lambda future: future.set_exception(exc))
            return
        except BaseException:
            settle(pending.answers, lambda future: future.cancel())   # the worker itself is cancelled (shutdown)
            raise
        for exchange in pending.replaced:
            exchange.verdict = pending.exchange.verdict   # counted as what they got: the newer update's answer
        own, *replaced = pending.answers
        settle([own], lambda future: future.set_result(answer))
        settle(replaced, lambda future: future.set_result(answer) if answer.stream is None else future.set_exception(
            UnsharedAnswer("the newer update that replaced this one got an answer that cannot be shared")))


def settle(futures: list[asyncio.Future[Answer]], outcome: Callable[[asyncio.Future[Answer]], object]) -> None:
    for future in futures:
        if not future.done():
            outcome(future)


class CardMerger:
    def __init__(self, settings: Mapping[str, CardSettings], clock: Clock, metrics: SavingsMetrics,
                 guard: Guard) -> None:
        self._settings, self._clock, self._metrics, self._guard = settings, clock, metrics, guard
        self._lines: dict[tuple[str, str], CardLine] = {}

    def through(self, exchange: Exchange, body: RequestBody, call: Call) -> Awaitable[Answer]:
        """Anything but a card update goes straight on: the next stage's own awaitable, nothing of ours around it."""
        b = exchange.binding
        settings = self._settings.get(b.app.name)
        try:
            update = self._update(exchange, body) if settings is not None and settings.enabled else None
        except Exception as exc:   # fail open: sent as it came
            self._guard.failed("cards", exc)
            update = None
        if update is None or settings is None:
            return call(exchange, body)
        return self._in_line(exchange, body, update, settings, call)

    async def _in_line(self, exchange: Exchange, body: RequestBody, update: CardUpdate, settings: CardSettings,
                       call: Call) -> Answer:
        answer: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        line = self._line(exchange.binding.app.name, update.card, settings.interval, call)
        line.submit(Pending(exchange, body, update, [answer]))
        return await asyncio.shield(answer)   # a client that vanishes leaves its update (and the others') in line

    @staticmethod
    def _update(exchange: Exchange, body: RequestBody) -> CardUpdate | None:
        if not body.replayable:
            return None
        b = exchange.binding
        return b.platform.card_update(b.upstream, exchange.method, exchange.path, body.data)

    def _line(self, app: str, card: str, interval: float, call: Call) -> CardLine:
        line = self._lines.get((app, card))
        if line is None:
            line = self._lines[(app, card)] = CardLine(interval, self._clock, call,
                                                       lambda done: self._idle(app, card, done), self._replaced)
        return line

    def _idle(self, app: str, card: str, line: CardLine) -> None:
        if self._lines.get((app, card)) is line:
            del self._lines[(app, card)]

    def _replaced(self, pending: Pending) -> None:
        pending.exchange.marks[COALESCED_HEADER] = "superseded"
        b = pending.exchange.binding
        self._metrics.coalesced.labels(b.app.name, pending.exchange.route, "card").inc()   # guarded: never raises

    def __len__(self) -> int:
        return len(self._lines)


__all__ = ["CardLine", "CardMerger", "Pending", "UnsharedAnswer"]
