"""DingTalk Stream mode client: dial out to the gateway, keep the connection alive, store what it pushes, ACK.

Owns connections/open, the websocket frame protocol (SYSTEM ping/disconnect, EVENT, CALLBACK), what the
application receives for a frame, card callbacks answered inline, and reconnecting; it does not deliver events
(Delivery does) nor fetch access tokens.

What the application receives for an EVENT or CALLBACK frame (the same for both, documented in docs/events.md):
    body     {"type": "EVENT" | "CALLBACK", "headers": {the frame's headers}, "data": <frame.data, parsed>}
    headers  X-Imsidecar-Event-Kind, -Type (eventType), -Topic, -Corp-Id, -Born-Time, -Message-Id, ...
so `user_add_org` and `user_leave_org`, or a bot message and an event, are told apart without parsing `data`.

When is the gateway acknowledged?
- EVENT: {"status": "SUCCESS"} once the event is stored; {"status": "LATER"} when it could not be (the gateway
  pushes it again later).
- CALLBACK (bot messages): at once. DingTalk's stream protocol documents robot messages as never pushed again,
  so withholding the ACK gains nothing; the message is stored and delivered like an event, and if the store is
  away it is retried in the background (`imsidecar_events_dropped_total{reason="unstored"}` if that never works).
- CALLBACK on a card topic: answered with the application's answer, {"response": ...}, within the card deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from typing import Any
from urllib.parse import quote_plus

import aiohttp

from proxy.clock import Clock
from proxy.events.cards import CardRelay
from proxy.events.delivery import Delivery
from proxy.events.jitter import Backoff
from proxy.events.lease import LeaseKeeper
from proxy.events.metrics import EventMetrics
from proxy.events.queue import Event
from proxy.events.settings import DingTalkEvents, StreamSettings
from proxy.events.stream_client import Liveness, StreamClient

log = logging.getLogger(__name__)

OPEN_PATH = "/v1.0/gateway/connections/open"
UA = "imsidecar/0.1"
# Frame headers (dingtalk-stream's frames.Headers) → what the application gets them as.
HEADER_NAMES = {"eventType": "Type", "topic": "Topic", "eventCorpId": "Corp-Id", "eventBornTime": "Born-Time",
                "eventUnifiedAppId": "Unified-App-Id", "messageId": "Message-Id", "time": "Time",
                "appId": "Platform-App-Id"}
UNSTORED_RETRIES = 8   # background attempts to store a bot message already ACKed (the gateway never repeats it)


class StreamError(Exception):
    """The gateway refused or broke the connection; the client backs off and reconnects."""


def ack_frame(message_id: str, data: str, code: int = 200, message: str = "OK") -> str:
    """The ACK the gateway expects for any frame: the frame's messageId, a code, and a data string."""
    return json.dumps({"code": code, "headers": {"messageId": message_id, "contentType": "application/json"},
                       "message": message, "data": data})


def event_for(kind: str, headers: dict[str, Any], data: str, received_at: float) -> Event:
    """What the application receives for one frame: the envelope and the X-Imsidecar-Event-* headers."""
    try:
        parsed: Any = json.loads(data) if data else None
    except ValueError:
        parsed = data
    plain = {str(k): str(v) for k, v in headers.items() if isinstance(v, (str, int, float))}
    body = json.dumps({"type": kind, "headers": plain, "data": parsed}, ensure_ascii=False).encode()
    sent = [("X-Imsidecar-Event-Kind", kind)] + [
        (f"X-Imsidecar-Event-{HEADER_NAMES[k]}", _header_value(v)) for k, v in plain.items() if k in HEADER_NAMES]
    return Event(_key(headers, parsed), body, tuple(sent), received_at)


def _key(headers: dict[str, Any], data: Any) -> str:
    # eventId survives a LATER redelivery; a bot message's msgId names the message; messageId names one push.
    msg_id = data.get("msgId") if isinstance(data, dict) else None
    return str(headers.get("eventId") or msg_id or headers.get("messageId", ""))


def _header_value(value: str) -> str:
    return value.replace("\r", " ").replace("\n", " ")[:512]


class DingTalkStream(StreamClient):
    """One app's Stream connection."""

    task_prefix = "events-dingtalk-stream"

    def __init__(self, name: str, settings: DingTalkEvents, stream: StreamSettings, delivery: Delivery,
                 session: aiohttp.ClientSession, metrics: EventMetrics, clock: Clock,
                 rng: random.Random | None = None, *, keeper: LeaseKeeper | None = None,
                 cards: CardRelay | None = None) -> None:
        super().__init__(name, stream, delivery, session, metrics, clock, rng, keeper=keeper, cards=cards)
        self._settings = settings
        self._backoff = Backoff(stream.reconnect_base, stream.reconnect_cap)
        self._retiring: list[tuple[aiohttp.ClientWebSocketResponse, asyncio.Task[str]]] = []

    async def run(self) -> None:
        """Connect, serve, and on a drop reconnect after a jittered back-off (1 s → 60 s, as the SDKs do); on a
        SYSTEM disconnect, connect anew at once and close the old connection only once the new one is up."""
        failures = 0
        while True:
            await self._wait_owned()
            outcome = await self._connect_once()
            if outcome == "disconnect":
                continue
            self._metrics.connected.labels(self.name).set(0)
            if outcome == "lease":
                continue
            self._metrics.reconnects.labels(self.name).inc()
            failures = failures + 1 if outcome == "failed" else 0
            await self._clock.sleep(self._backoff.delay(max(failures, 1), self._rng))

    async def _connect_once(self) -> str:
        try:
            return await self._connect_and_serve()
        except StreamError as exc:
            log.warning("events: dingtalk stream %s failed: %s", self.name, exc)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            # The type only: aiohttp's messages carry the URL, and the URL carries the one-time ticket.
            log.warning("events: dingtalk stream %s failed: %s", self.name, type(exc).__name__)
        return "failed"

    async def _open(self) -> str:
        """POST connections/open → the websocket URL with its one-time ticket (valid ~90 s)."""
        subscriptions = [{"type": "CALLBACK", "topic": t} for t in (*self._settings.topics, *self._card_topics())]
        if self._settings.events:
            subscriptions.insert(0, {"type": "EVENT", "topic": "*"})
        body = {"clientId": self._settings.app_key, "clientSecret": self._settings.app_secret.reveal(),
                "subscriptions": subscriptions, "ua": UA}
        async with self._session.post(self._settings.api + OPEN_PATH, json=body,
                                      timeout=aiohttp.ClientTimeout(total=self._stream.endpoint_timeout)) as response:
            if response.status != 200:
                raise StreamError(f"connections/open answered HTTP {response.status}")
            answer = await response.json()
        if not answer.get("endpoint") or not answer.get("ticket"):
            raise StreamError("connections/open answered without endpoint or ticket")
        return f"{answer['endpoint']}?ticket={quote_plus(answer['ticket'])}"

    def _card_topics(self) -> tuple[str, ...]:
        return self._settings.card_topics if self._cards is not None else ()

    async def _connect_and_serve(self) -> str:
        """Serve one connection; "disconnect" leaves it open (retiring) for the next one to replace."""
        url = await self._open()
        # Pings are ours, on the injected clock, and the watchdog hears pongs: so autoping is off.
        ws = await self._bounded(self._session.ws_connect(url, autoping=False))
        outcome = "failed"
        try:
            self._metrics.connected.labels(self.name).set(1)
            log.info("events: dingtalk stream %s connected", self.name)
            await self._retire_old()
            outcome = await self._serve(ws)
        finally:
            if outcome != "disconnect":
                await ws.close()
        return outcome

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse) -> str:
        liveness, disconnect = Liveness(self._clock), asyncio.Event()
        reader = asyncio.create_task(self._read(ws, liveness, disconnect))
        pinger = asyncio.create_task(self._ping(ws))
        try:
            outcome = await self._hold(reader, liveness, lambda: 2 * self._stream.heartbeat,
                                       (disconnect.wait(), "disconnect"))
        finally:
            pinger.cancel()
        if outcome == "disconnect":
            self._retiring.append((ws, reader))
            self._children.add(reader)
        else:
            reader.cancel()
        return outcome

    async def close(self) -> None:
        for ws, _ in self._retiring:
            await ws.close()
        self._retiring = []
        await super().close()

    async def _retire_old(self) -> None:
        """The new connection is up: close the ones the gateway asked us to leave (it redelivers their unacked)."""
        retiring, self._retiring = self._retiring, []
        for ws, reader in retiring:
            await ws.close()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _ping(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        with contextlib.suppress(ConnectionResetError, aiohttp.ClientError):
            while not ws.closed:
                await self._clock.sleep(self._stream.heartbeat)
                await ws.ping()

    async def _read(self, ws: aiohttp.ClientWebSocketResponse, liveness: Liveness, disconnect: asyncio.Event) -> str:
        async for message in ws:
            liveness.touch()
            if message.type is aiohttp.WSMsgType.PING:
                await ws.pong(message.data)
            elif message.type is aiohttp.WSMsgType.TEXT:
                if await self._on_frame(ws, message.data) == "disconnect":
                    disconnect.set()   # keep reading: frames still arriving here are acked here
            elif message.type is not aiohttp.WSMsgType.PONG:
                break
        return "closed"

    async def _on_frame(self, ws: aiohttp.ClientWebSocketResponse, text: str) -> str:
        try:
            frame = json.loads(text)
            headers: dict[str, Any] = frame.get("headers") or {}
            kind, topic = frame.get("type"), headers.get("topic")
        except (ValueError, AttributeError):
            log.warning("events: dingtalk stream %s sent a frame that is not JSON; ignored", self.name)
            return ""
        if kind == "SYSTEM":
            return await self._on_system(ws, topic, headers, frame)
        if kind in ("EVENT", "CALLBACK"):
            self._relay(ws, kind, headers, frame.get("data") or "")
        return ""

    async def _on_system(self, ws: aiohttp.ClientWebSocketResponse, topic: str | None,
                         headers: dict[str, Any], frame: dict[str, Any]) -> str:
        if topic == "ping":
            # The gateway checks liveness by ping; the answer echoes its opaque data.
            await _send(ws, ack_frame(headers.get("messageId", ""), frame.get("data") or ""))
        elif topic == "disconnect":
            # The gateway closes this connection ~10 s after saying so: open the next one now.
            return "disconnect"
        return ""

    def _relay(self, ws: aiohttp.ClientWebSocketResponse, kind: str, headers: dict[str, Any], data: str) -> None:
        self._metrics.received.labels(self.name, "stream").inc()
        message_id = str(headers.get("messageId", ""))
        event = event_for(kind, headers, data, self._clock.wall())
        if kind == "CALLBACK" and headers.get("topic") in self._card_topics():
            self._spawn(self._answer_card(ws, message_id, event))
        elif kind == "CALLBACK":
            self._spawn(self._ack_then_store(ws, message_id, event))
        else:
            self._spawn(self._store_then_ack(ws, message_id, event))

    async def _store_then_ack(self, ws: aiohttp.ClientWebSocketResponse, message_id: str, event: Event) -> None:
        status = "SUCCESS" if await self._store(event) else "LATER"
        await _send(ws, ack_frame(message_id, json.dumps({"status": status})))

    async def _ack_then_store(self, ws: aiohttp.ClientWebSocketResponse, message_id: str, event: Event) -> None:
        stored = await self._store(event)
        await _send(ws, ack_frame(message_id, json.dumps({"response": None})))
        try:
            for attempt in range(1, UNSTORED_RETRIES + 1):
                if stored:
                    return
                await self._clock.sleep(self._backoff.delay(attempt, self._rng))
                stored = await self._store(event)
        finally:
            if not stored:   # out of retries, or the sidecar is stopping
                self._metrics.dropped.labels(self.name, "unstored").inc()
                log.error("events: dingtalk stream %s: a bot message could not be stored and DingTalk will not "
                          "send it again; lost", self.name)

    async def _answer_card(self, ws: aiohttp.ClientWebSocketResponse, message_id: str, event: Event) -> None:
        assert self._cards is not None
        answer = await self._cards.ask(event.body, event.headers)
        if answer.answered:
            # dingtalk-stream's CallbackHandler: data = {"response": <the handler's answer>}
            await _send(ws, ack_frame(message_id, json.dumps({"response": json.loads(answer.body)})))
        else:
            await _send(ws, ack_frame(message_id, json.dumps({"response": None}), 500,
                                      "the application did not answer in time" if answer.outcome == "late"
                                      else "the application failed to answer"))


async def _send(ws: aiohttp.ClientWebSocketResponse, text: str) -> None:
    # If that connection is gone, the gateway redelivers the unacked message on the next one.
    if ws.closed:
        return
    with contextlib.suppress(ConnectionResetError, aiohttp.ClientError):
        await ws.send_str(text)
