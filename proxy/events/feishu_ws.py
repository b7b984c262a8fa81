"""Feishu/Lark long-connection client: fetch the endpoint, speak pbbp2 frames, store events, answer each one.

Owns /callback/ws/endpoint, ping/pong, split-message reassembly, response frames, the server-sent reconnect
settings and card callbacks answered inline; it does not deliver events (Delivery does).

An event frame is answered code 200 once the event is stored, 500 when it could not be (Feishu pushes it again).
A card callback (an event frame whose header.event_type is in `card_types`, card.action.trigger by default) is
answered with the application's answer in `data`, base64-encoded JSON, as lark-oapi's ws client does with its
handler's result. Frames of type "card" (the old card protocol) are left unanswered, as lark-oapi leaves them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qs, urlparse

import aiohttp

from proxy.clock import Clock
from proxy.events.cards import CardAnswer, CardRelay
from proxy.events.delivery import Delivery, Event
from proxy.events.lease import LeaseKeeper
from proxy.events.metrics import EventMetrics
from proxy.events.pbbp2 import METHOD_CONTROL, METHOD_DATA, Frame, FrameError, decode_frame, encode_frame
from proxy.events.settings import FeishuEvents, StreamSettings
from proxy.events.stream_client import Liveness, StreamClient
from proxy.platforms.feishu import WRONG_DOMAIN

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
    """One app's long connection, with lark-oapi's reconnect rules as the server sets them."""

    task_prefix = "events-feishu-ws"

    def __init__(self, name: str, settings: FeishuEvents, stream: StreamSettings, delivery: Delivery,
                 session: aiohttp.ClientSession, metrics: EventMetrics, clock: Clock,
                 rng: random.Random | None = None, *, keeper: LeaseKeeper | None = None,
                 cards: CardRelay | None = None) -> None:
        super().__init__(name, stream, delivery, session, metrics, clock, rng, keeper=keeper, cards=cards)
        self._settings = settings
        self.config = ClientConfig()
        self._reassembly = Reassembly(stream.reassembly_ttl, clock)
        self.gave_up = False

    async def run(self) -> None:
        """Connect; after a drop wait a random part of ReconnectNonce, then retry every ReconnectInterval,
        ReconnectCount times (or forever when it is negative), as the server configured. A connection given up
        because another replica took the lease is not a drop: it waits for the lease and connects at once."""
        outcome = await self._attempt()
        while outcome != "gave_up":
            self._metrics.connected.labels(self.name).set(0)
            if outcome == "lease":
                outcome = await self._attempt()
                continue
            await self._clock.sleep(self._rng.random() * self.config.reconnect_nonce)
            outcome = await self._reconnect()

    async def _reconnect(self) -> str:
        tries = 0
        while True:
            self._metrics.reconnects.labels(self.name).inc()
            outcome = await self._attempt()
            if outcome != "failed":
                return outcome
            tries += 1
            if 0 <= self.config.reconnect_count <= tries:
                self.gave_up = True
                log.error("events: feishu long connection %s gave up after %d tries", self.name, tries)
                return "gave_up"
            await self._clock.sleep(self.config.reconnect_interval)

    async def _attempt(self) -> str:
        """Wait for the lease, open and serve one connection: "failed", or why an established one ended."""
        await self._wait_owned()
        try:
            url, service_id = await self._bounded(self._endpoint())
            return await self._serve(url, service_id)
        except LongConnectionError as exc:   # our own message: the cause, never the URL or the secret
            log.warning("events: feishu long connection %s failed: %s", self.name, exc)
            return "failed"
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError) as exc:
            # The type only: aiohttp's messages carry the URL.
            log.warning("events: feishu long connection %s failed: %s", self.name, type(exc).__name__)
            return "failed"

    def _wrong_brand(self) -> str:
        on_lark = "larksuite" in self._settings.domain
        other = "feishu" if on_lark else "lark"
        return (f"endpoint answered code {WRONG_DOMAIN} (Incorrect domain name): app {self._settings.app_id} is not "
                f"an app of {self._settings.domain}; if it was created on {other.title()}, set platform: {other}")

    async def _endpoint(self) -> tuple[str, int]:
        body = {"AppID": self._settings.app_id, "AppSecret": self._settings.app_secret.reveal()}
        async with self._session.post(self._settings.domain + ENDPOINT_PATH, json=body,
                                      headers={"locale": "zh"}) as response:
            if response.status != 200:
                raise LongConnectionError(f"endpoint answered HTTP {response.status}")
            answer = await response.json()
        if str(answer.get("code")) == WRONG_DOMAIN:   # an app of the other brand (Feishu / Lark)
            raise LongConnectionError(self._wrong_brand())
        if answer.get("code") != 0:
            raise LongConnectionError(f"endpoint answered code {answer.get('code')}")
        data = answer.get("data") or {}
        self.config = ClientConfig.from_server(data.get("ClientConfig"), self.config)
        url = data["URL"]
        service_id = int(parse_qs(urlparse(url).query).get("service_id", ["0"])[0])
        return url, service_id

    async def _serve(self, url: str, service_id: int) -> str:
        ws = await self._bounded(self._session.ws_connect(url))
        liveness = Liveness(self._clock)
        reader = asyncio.create_task(self._read(ws, liveness))
        pinger = asyncio.create_task(self._ping_loop(ws, service_id))
        try:
            self._metrics.connected.labels(self.name).set(1)
            # lark-oapi pings every PingInterval; a server silent for two of them is gone.
            return await self._hold(reader, liveness, lambda: 2 * self.config.ping_interval)
        finally:
            for task in (reader, pinger):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await ws.close()

    async def _read(self, ws: aiohttp.ClientWebSocketResponse, liveness: Liveness) -> str:
        async for message in ws:
            if message.type is not aiohttp.WSMsgType.BINARY:
                break
            liveness.touch()
            self._on_frame(ws, message.data)
        return "closed"

    async def _ping_loop(self, ws: aiohttp.ClientWebSocketResponse, service_id: int) -> None:
        while not ws.closed:
            ping = Frame(service=service_id, method=METHOD_CONTROL, headers=(("type", "ping"),))
            await _send(ws, encode_frame(ping))
            await self._clock.sleep(self.config.ping_interval)

    def _on_frame(self, ws: aiohttp.ClientWebSocketResponse, data: bytes) -> None:
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
            return   # "card": the old card protocol, which lark-oapi's ws client does not answer either
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
        event_type = _event_type(payload)
        headers = (("X-Imsidecar-Event-Type", event_type),) if event_type else ()
        if self._cards is not None and event_type in self._settings.card_types:
            self._spawn(self._answer_card(ws, frame, payload, headers))
        else:
            event = Event(_event_key(payload, message_id), payload, headers, self._clock.wall())
            self._spawn(self._store_and_answer(ws, frame, event))

    async def _store_and_answer(self, ws: aiohttp.ClientWebSocketResponse, frame: Frame, event: Event) -> None:
        started = self._clock.now()
        stored = await self._store(event)
        await _send(ws, _response(frame, started, self._clock.now(), 200 if stored else 500, None))

    async def _answer_card(self, ws: aiohttp.ClientWebSocketResponse, frame: Frame, payload: bytes,
                           headers: tuple[tuple[str, str], ...]) -> None:
        assert self._cards is not None
        started = self._clock.now()
        answer = await self._cards.ask(payload, headers)
        await _send(ws, _response(frame, started, self._clock.now(), 200, self._card_body(answer)))

    def _card_body(self, answer: CardAnswer) -> bytes:
        if answer.answered:
            return answer.body
        toast = {"toast": {"type": "error", "content": self._cards.settings.late_toast if self._cards else ""}}
        return json.dumps(toast).encode()


def _response(frame: Frame, started: float, ended: float, code: int, data: bytes | None) -> bytes:
    """The frame sent back: the same frame with biz_rt added and a JSON Response payload (data base64-encoded)."""
    body = {"code": code, "headers": None, "data": base64.b64encode(data).decode() if data is not None else None}
    answer = frame.with_header("biz_rt", str(int((ended - started) * 1000)))
    return encode_frame(replace(answer, payload=json.dumps(body).encode()))


def _event_type(payload: bytes) -> str:
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        header = json.loads(payload).get("header") or {}
        return str(header.get("event_type") or "")
    return ""


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
