"""Feishu/Lark long-connection client: fetch the endpoint, speak pbbp2 frames, relay events, answer each one.

Owns /callback/ws/endpoint, ping/pong, split-message reassembly, response frames and the server-sent reconnect
settings; it does not deliver events (Delivery does) and ignores card callbacks (they need the app's answer inline).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qs, urlparse

import aiohttp

from proxy.clock import Clock
from proxy.events.delivery import Delivery, Event
from proxy.events.metrics import EventMetrics
from proxy.events.pbbp2 import METHOD_CONTROL, METHOD_DATA, Frame, FrameError, decode_frame, encode_frame
from proxy.events.settings import FeishuEvents, StreamSettings
from proxy.events.stream_client import StreamClient

log = logging.getLogger(__name__)

ENDPOINT_PATH = "/callback/ws/endpoint"


class LongConnectionError(Exception):
    """The endpoint refused us or the connection broke; reconnect per the server's settings."""


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Reconnect and ping settings the server sends with the endpoint and in pong frames (seconds)."""

    reconnect_count: int = -1      # -1: forever
    reconnect_interval: float = 120.0
    reconnect_nonce: float = 30.0  # the first reconnect waits a random part of this, so clients spread out
    ping_interval: float = 120.0

    @classmethod
    def from_server(cls, data: dict[str, Any] | None, current: ClientConfig) -> ClientConfig:
        data = data or {}
        return cls(int(data.get("ReconnectCount", current.reconnect_count)),
                   float(data.get("ReconnectInterval", current.reconnect_interval)),
                   float(data.get("ReconnectNonce", current.reconnect_nonce)),
                   float(data.get("PingInterval", current.ping_interval)))


class Reassembly:
    """Joins data frames split by the server (headers message_id, sum, seq); partial ones expire after `ttl`."""

    def __init__(self, ttl: float, clock: Clock) -> None:
        self._ttl, self._clock = ttl, clock
        self._parts: dict[str, tuple[float, list[bytes | None]]] = {}

    def add(self, message_id: str, total: int, seq: int, payload: bytes) -> bytes | None:
        now = self._clock.now()
        self._parts = {k: v for k, v in self._parts.items() if v[0] > now}
        if total <= 1:
            return payload
        if not 0 <= seq < total:
            raise FrameError("split message seq out of range")
        _, parts = self._parts.get(message_id, (0.0, [None] * total))
        parts[seq] = payload
        if any(part is None for part in parts):
            self._parts[message_id] = (now + self._ttl, parts)
            return None
        self._parts.pop(message_id, None)
        return b"".join(part or b"" for part in parts)


class FeishuLongConnection(StreamClient):
    """One app's long connection. An event is answered code 200 once the application accepted it, 500 otherwise
    (Feishu then pushes it again); Feishu allows 3 s, and a late answer only costs a redelivery dedupe drops."""

    task_prefix = "events-feishu-ws"

    def __init__(self, name: str, settings: FeishuEvents, stream: StreamSettings, delivery: Delivery,
                 session: aiohttp.ClientSession, metrics: EventMetrics, clock: Clock,
                 rng: random.Random | None = None) -> None:
        super().__init__(name, stream, delivery, session, metrics, clock, rng)
        self._settings = settings
        self.config = ClientConfig()
        self._reassembly = Reassembly(stream.reassembly_ttl, clock)
        self.gave_up = False

    async def run(self) -> None:
        """Connect; after a drop wait a random part of ReconnectNonce, then retry every ReconnectInterval,
        ReconnectCount times (or forever when it is negative), as the server configured."""
        await self._attempt()
        while True:
            self._metrics.connected.labels(self.name).set(0)
            await self._clock.sleep(self._rng.random() * self.config.reconnect_nonce)
            tries = 0
            while not await self._reconnect():
                tries += 1
                if 0 <= self.config.reconnect_count <= tries:
                    self.gave_up = True
                    log.error("events: feishu long connection %s gave up after %d tries", self.name, tries)
                    return
                await self._clock.sleep(self.config.reconnect_interval)

    async def _reconnect(self) -> bool:
        self._metrics.reconnects.labels(self.name).inc()
        return await self._attempt()

    async def _attempt(self) -> bool:
        """Open and serve one connection; True if it was established (and has now ended)."""
        try:
            url, service_id = await self._endpoint()
            await self._serve(url, service_id)
            return True
        except (LongConnectionError, aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError) as exc:
            log.warning("events: feishu long connection %s failed: %s", self.name, type(exc).__name__)
            return False

    async def _endpoint(self) -> tuple[str, int]:
        body = {"AppID": self._settings.app_id, "AppSecret": self._settings.app_secret.reveal()}
        async with self._session.post(self._settings.domain + ENDPOINT_PATH, json=body,
                                      headers={"locale": "zh"}) as response:
            if response.status != 200:
                raise LongConnectionError(f"endpoint answered HTTP {response.status}")
            answer = await response.json()
        if answer.get("code") != 0:
            raise LongConnectionError(f"endpoint answered code {answer.get('code')}")
        data = answer.get("data") or {}
        self.config = ClientConfig.from_server(data.get("ClientConfig"), self.config)
        url = data["URL"]
        service_id = int(parse_qs(urlparse(url).query).get("service_id", ["0"])[0])
        return url, service_id

    async def _serve(self, url: str, service_id: int) -> None:
        async with self._session.ws_connect(url) as ws:
            self._metrics.connected.labels(self.name).set(1)
            pinger = asyncio.create_task(self._ping_loop(ws, service_id))
            try:
                async for message in ws:
                    if message.type is not aiohttp.WSMsgType.BINARY:
                        break
                    await self._on_frame(ws, message.data)
            finally:
                pinger.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pinger

    async def _ping_loop(self, ws: aiohttp.ClientWebSocketResponse, service_id: int) -> None:
        while not ws.closed:
            ping = Frame(service=service_id, method=METHOD_CONTROL, headers=(("type", "ping"),))
            await _send(ws, encode_frame(ping))
            await self._clock.sleep(self.config.ping_interval)

    async def _on_frame(self, ws: aiohttp.ClientWebSocketResponse, data: bytes) -> None:
        try:
            frame = decode_frame(data)
        except FrameError:
            log.warning("events: feishu long connection %s sent an unreadable frame; ignored", self.name)
            return
        if frame.method == METHOD_CONTROL:
            self._on_control(frame)
        elif frame.method == METHOD_DATA:
            self._on_data(ws, frame)

    def _on_control(self, frame: Frame) -> None:
        # A pong may carry new ClientConfig; the server can retune reconnects and pings at any time.
        if frame.header("type") == "pong" and frame.payload:
            with contextlib.suppress(ValueError, TypeError):
                self.config = ClientConfig.from_server(json.loads(frame.payload), self.config)

    def _on_data(self, ws: aiohttp.ClientWebSocketResponse, frame: Frame) -> None:
        if frame.header("type") != "event":
            return   # card callbacks need the application's answer inline; not relayed (yet)
        message_id = frame.header("message_id")
        try:
            payload = self._reassembly.add(message_id, int(frame.header("sum", "1")), int(frame.header("seq", "0")),
                                           frame.payload)
        except (ValueError, FrameError):
            log.warning("events: feishu long connection %s sent bad split headers; ignored", self.name)
            return
        if payload is None:
            return
        self._metrics.received.labels(self.name, "stream").inc()
        ticket = self._delivery.submit(Event(_event_key(payload, message_id), payload))
        self._spawn(self._answer_when_delivered(ws, frame, ticket.delivered))

    async def _answer_when_delivered(self, ws: aiohttp.ClientWebSocketResponse, frame: Frame,
                                     delivered: asyncio.Future[bool]) -> None:
        started = self._clock.now()
        ok = await asyncio.shield(delivered)
        elapsed_ms = int((self._clock.now() - started) * 1000)
        response = {"code": 200 if ok else 500, "headers": None, "data": None}
        answer = frame.with_header("biz_rt", str(elapsed_ms))
        await _send(ws, encode_frame(replace(answer, payload=json.dumps(response).encode())))


def _event_key(payload: bytes, message_id: str) -> str:
    # The v2 event_id is what Feishu keeps across redeliveries; the frame's message_id is the fallback.
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        event_id = json.loads(payload).get("header", {}).get("event_id")
        if event_id:
            return str(event_id)
    return message_id


async def _send(ws: aiohttp.ClientWebSocketResponse, data: bytes) -> None:
    if ws.closed:
        return   # the server re-pushes what went unanswered on that connection
    with contextlib.suppress(ConnectionResetError, aiohttp.ClientError):
        await ws.send_bytes(data)
