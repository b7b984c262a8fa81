"""DingTalk Stream mode client: dial out to the gateway, keep the connection alive, relay events, ACK after delivery.

Owns connections/open, the websocket frame protocol (SYSTEM ping/disconnect, EVENT, CALLBACK) and reconnecting;
it does not deliver events (Delivery does) nor fetch access tokens.
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
from proxy.events.delivery import Delivery, Event
from proxy.events.jitter import Backoff
from proxy.events.metrics import EventMetrics
from proxy.events.settings import DingTalkEvents, StreamSettings
from proxy.events.stream_client import StreamClient

log = logging.getLogger(__name__)

OPEN_PATH = "/v1.0/gateway/connections/open"
UA = "imsidecar/0.1"


class StreamError(Exception):
    """The gateway refused or broke the connection; the client backs off and reconnects."""


def ack_frame(message_id: str, data: str, code: int = 200, message: str = "OK") -> str:
    """The ACK the gateway expects for any frame: the frame's messageId, a code, and a data string."""
    return json.dumps({"code": code, "headers": {"messageId": message_id, "contentType": "application/json"},
                       "message": message, "data": data})


class DingTalkStream(StreamClient):
    """One app's Stream connection. Events are ACKed only once the application accepted them; an event the
    application could not take is answered {"status": "LATER"} so the gateway redelivers it later."""

    task_prefix = "events-dingtalk-stream"

    def __init__(self, name: str, settings: DingTalkEvents, stream: StreamSettings, delivery: Delivery,
                 session: aiohttp.ClientSession, metrics: EventMetrics, clock: Clock,
                 rng: random.Random | None = None) -> None:
        super().__init__(name, stream, delivery, session, metrics, clock, rng)
        self._settings = settings
        self._backoff = Backoff(stream.reconnect_base, stream.reconnect_cap)

    async def run(self) -> None:
        """Connect, serve, and on any drop reconnect after a jittered back-off (1 s → 60 s, as the SDKs do)."""
        failures = 0
        while True:
            try:
                served = await self._connect_and_serve()
            except StreamError as exc:
                log.warning("events: dingtalk stream %s failed: %s", self.name, exc)
                served = False
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                # The type only: aiohttp's messages carry the URL, and the URL carries the one-time ticket.
                log.warning("events: dingtalk stream %s failed: %s", self.name, type(exc).__name__)
                served = False
            self._metrics.connected.labels(self.name).set(0)
            self._metrics.reconnects.labels(self.name).inc()
            failures = 0 if served else failures + 1
            await self._clock.sleep(self._backoff.delay(max(failures, 1), self._rng))

    async def _open(self) -> str:
        """POST connections/open → the websocket URL with its one-time ticket (valid ~90 s)."""
        subscriptions = [{"type": "CALLBACK", "topic": t} for t in self._settings.topics]
        if self._settings.events:
            subscriptions.insert(0, {"type": "EVENT", "topic": "*"})
        body = {"clientId": self._settings.app_key, "clientSecret": self._settings.app_secret.reveal(),
                "subscriptions": subscriptions, "ua": UA}
        async with self._session.post(self._settings.api + OPEN_PATH, json=body) as response:
            if response.status != 200:
                raise StreamError(f"connections/open answered HTTP {response.status}")
            answer = await response.json()
        if not answer.get("endpoint") or not answer.get("ticket"):
            raise StreamError("connections/open answered without endpoint or ticket")
        return f"{answer['endpoint']}?ticket={quote_plus(answer['ticket'])}"

    async def _connect_and_serve(self) -> bool:
        """Serve one connection until it ends; True if it was established (so the back-off starts over)."""
        url = await self._open()
        async with self._session.ws_connect(url, heartbeat=self._stream.heartbeat) as ws:
            self._metrics.connected.labels(self.name).set(1)
            log.info("events: dingtalk stream %s connected", self.name)
            async for message in ws:
                if message.type is not aiohttp.WSMsgType.TEXT:
                    break
                if await self._on_frame(ws, message.data) == "disconnect":
                    break
        return True

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
            await ws.send_str(ack_frame(headers.get("messageId", ""), frame.get("data") or ""))
        elif topic == "disconnect":
            # The gateway closes ~10 s after this; reconnect now. Unacked events are redelivered on the new
            # connection and dedupe keeps them from reaching the application twice.
            return "disconnect"
        return ""

    def _relay(self, ws: aiohttp.ClientWebSocketResponse, kind: str, headers: dict[str, Any], data: str) -> None:
        self._metrics.received.labels(self.name, "stream").inc()
        message_id = str(headers.get("messageId", ""))
        # eventId survives a LATER redelivery; messageId identifies a single push. Prefer the stabler one.
        key = str(headers.get("eventId") or message_id)
        ticket = self._delivery.submit(Event(key, data.encode()))
        self._spawn(self._ack_when_delivered(ws, kind, message_id, ticket.delivered))

    async def _ack_when_delivered(self, ws: aiohttp.ClientWebSocketResponse, kind: str, message_id: str,
                                  delivered: asyncio.Future[bool]) -> None:
        ok = await asyncio.shield(delivered)
        if kind == "EVENT":
            await _send(ws, ack_frame(message_id, json.dumps({"status": "SUCCESS" if ok else "LATER"})))
        elif ok:
            await _send(ws, ack_frame(message_id, json.dumps({"response": None})))
        # A CALLBACK the application refused stays unacked: the gateway will push it again.


async def _send(ws: aiohttp.ClientWebSocketResponse, text: str) -> None:
    # If that connection is gone, the gateway redelivers the unacked message on the next one.
    if ws.closed:
        return
    with contextlib.suppress(ConnectionResetError, aiohttp.ClientError):
        await ws.send_str(text)
