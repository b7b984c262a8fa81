"""Card callbacks with an inline answer: relay one to the application and bring its answer back within the deadline.

Owns the POST to the application, the deadline (on the injected clock), judging the answer, and saying in logs and
metrics when the application was too slow or failed; it does not know how a platform wants the answer wrapped
(the callback endpoint and the stream clients do). Card callbacks are not queued: an answer is only useful now.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

import aiohttp

from proxy.clock import Clock, finished_within
from proxy.events.metrics import EventMetrics
from proxy.events.queue import Headers
from proxy.events.settings import CardSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CardAnswer:
    outcome: str          # answered | late | failed
    body: bytes           # the application's JSON answer when answered (b"{}" for an empty 2xx), else b""
    detail: str = ""      # why it failed, for the log line (a status or an error type, never the body)

    @property
    def answered(self) -> bool:
        return self.outcome == "answered"


class CardRelay:
    def __init__(self, app: str, settings: CardSettings, session: aiohttp.ClientSession, metrics: EventMetrics,
                 clock: Clock) -> None:
        self.app, self.settings, self._session, self._metrics, self._clock = app, settings, session, metrics, clock

    async def ask(self, body: bytes, headers: Headers) -> CardAnswer:
        """The application's answer to one card callback, or why there is none, always within the deadline."""
        started = self._clock.now()
        answer = await self._within_deadline(body, headers)
        elapsed = self._clock.now() - started
        self._metrics.cards.labels(self.app, answer.outcome).inc()
        self._metrics.card_seconds.labels(self.app).observe(elapsed)
        if answer.outcome == "late":
            log.warning("events: app %s: the application did not answer a card callback within %.1fs; the platform "
                        "got the fallback answer", self.app, self.settings.deadline)
        elif not answer.answered:
            log.warning("events: app %s: a card callback failed at the application (%s); the platform got the "
                        "fallback answer", self.app, answer.detail)
        return answer

    async def _within_deadline(self, body: bytes, headers: Headers) -> CardAnswer:
        post = asyncio.ensure_future(self._post(body, headers))
        if not await finished_within(self._clock, post, self.settings.deadline):
            return CardAnswer("late", b"", "deadline")
        return post.result()

    async def _post(self, body: bytes, headers: Headers) -> CardAnswer:
        sent = {"Content-Type": "application/json", "X-Imsidecar-Event-App": self.app, **dict(headers),
                "X-Imsidecar-Event-Kind": "card", "X-Imsidecar-Deadline-Ms": str(int(self.settings.deadline * 1000))}
        # A real-time bound as well, so a hung application never holds a connection past the deadline.
        timeout = aiohttp.ClientTimeout(total=self.settings.deadline)
        try:
            async with self._session.post(self.settings.url, data=body, headers=sent, timeout=timeout) as response:
                return _judge(response.status, await response.read())
        except asyncio.TimeoutError:
            return CardAnswer("late", b"", "deadline")
        except aiohttp.ClientError as exc:
            return CardAnswer("failed", b"", type(exc).__name__)


def _judge(status: int, raw: bytes) -> CardAnswer:
    if not 200 <= status < 300:
        return CardAnswer("failed", b"", f"HTTP {status}")
    if not raw.strip():
        return CardAnswer("answered", b"{}")
    try:
        value = json.loads(raw)
    except ValueError:
        return CardAnswer("failed", b"", "the answer is not JSON")
    if not isinstance(value, dict):
        return CardAnswer("failed", b"", "the answer is not a JSON object")
    return CardAnswer("answered", raw)
