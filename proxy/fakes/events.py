"""Fake event sources and a fake application: an HTTP pusher that encrypts and signs like Feishu and DingTalk,
websocket gateways that ping, redeliver, split and drop, and an app that records what reached it.

Owns test doubles only; production code never imports it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web


@dataclass
class FakeApplication:
    """The intranet application: records every event body it accepts. `fail_next` makes it answer 503 (or
    `status_when_failing`) that many times; `down` answers 503 until cleared; `gate`, while set to an unset
    asyncio.Event, holds every request until it is set (a slow application, or one killed mid-delivery).
    Card callbacks (X-Imsidecar-Event-Kind: card) get `card_answer`, after `card_gate` if one is set."""

    received: list[dict] = field(default_factory=list)
    fail_next: int = 0
    status_when_failing: int = 503
    down: bool = False
    gate: asyncio.Event | None = None
    started: list[dict] = field(default_factory=list)       # every request body, whatever it was answered
    seen_headers: list[dict[str, str]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    card_answer: dict = field(default_factory=lambda: {"toast": {"type": "success", "content": "done"}})
    card_gate: asyncio.Event | None = None
    cards: list[dict] = field(default_factory=list)

    def app(self) -> web.Application:
        application = web.Application()
        application.router.add_post("/events", self._handle)
        return application

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.started.append(body)
        if request.headers.get("X-Imsidecar-Event-Kind") == "card":
            return await self._card(body)
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            return web.json_response({"error": "starting"}, status=503)
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.json_response({"error": "busy"}, status=self.status_when_failing)
        self.received.append(body)
        self.seen_headers.append(dict(request.headers))
        self.arrived.set()
        return web.json_response({"ok": True})

    async def _card(self, body: dict) -> web.Response:
        self.cards.append(body)
        if self.card_gate is not None:
            await self.card_gate.wait()
        return web.json_response(self.card_answer)


async def wait_for(condition: Callable[[], bool], rounds: int = 500) -> None:
    """Yield to real I/O until `condition` holds; each round is at most a millisecond, never seconds."""
    for _ in range(rounds):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"condition not reached: {condition.__code__.co_firstlineno}")


def event_json(**fields: object) -> bytes:
    return json.dumps(fields).encode()


# ---- HTTP pushers: what Feishu and DingTalk send to a callback URL ------------------------------------------


@dataclass
class FeishuPusher:
    """Pushes events like Feishu: v2 schema, encrypted with the encrypt key, signed with X-Lark-* headers."""

    app_id: str
    verification_token: str
    encrypt_key: str
    now: Callable[[], float]
    counter: int = 0

    def envelope(self, event: dict, event_id: str | None = None, event_type: str = "im.message.receive_v1") -> bytes:
        self.counter += 1
        header = {"event_id": event_id or f"ev-{self.counter}", "event_type": event_type, "token":
                  self.verification_token, "app_id": self.app_id, "create_time": "1", "tenant_key": "t"}
        return json.dumps({"schema": "2.0", "header": header, "event": event}).encode()

    def challenge(self, challenge: str = "ch-1") -> bytes:
        return json.dumps({"challenge": challenge, "token": self.verification_token,
                           "type": "url_verification"}).encode()

    def request(self, plaintext: bytes, *, timestamp: float | None = None, sign_with: str | None = None,
                signed: bool = True) -> tuple[bytes, dict[str, str]]:
        from proxy.events.crypto import feishu_encrypt, feishu_signature

        body = json.dumps({"encrypt": feishu_encrypt(self.encrypt_key, plaintext, iv=os.urandom(16))}).encode()
        ts, nonce = str(int(self.now() if timestamp is None else timestamp)), f"n{self.counter}"
        if not signed:
            return body, {"Content-Type": "application/json"}
        signature = feishu_signature(ts, nonce, sign_with or self.encrypt_key, body)
        return body, {"Content-Type": "application/json", "X-Lark-Request-Timestamp": ts,
                      "X-Lark-Request-Nonce": nonce, "X-Lark-Signature": signature}


@dataclass
class DingTalkPusher:
    """Pushes events like DingTalk's HTTP subscription: AES with the EncodingAESKey, sha1 signature in the query."""

    token: str
    aes_key: str
    owner: str
    now: Callable[[], float]

    def request(self, plaintext: bytes, *, owner: str | None = None, token: str | None = None
                ) -> tuple[bytes, dict[str, str]]:
        from proxy.events.crypto import DingTalkCipher, dingtalk_signature

        encrypt = DingTalkCipher(self.aes_key).encrypt(plaintext, owner or self.owner, os.urandom(16))
        ts, nonce = str(int(self.now() * 1000)), "nonce123"
        query = {"msg_signature": dingtalk_signature(token or self.token, ts, nonce, encrypt), "timestamp": ts,
                 "nonce": nonce}
        return json.dumps({"encrypt": encrypt}).encode(), query

    def read_reply(self, reply: dict[str, str]) -> str:
        """What DingTalk does with our answer: check its signature and decrypt it (expects "success")."""
        from proxy.events.crypto import DingTalkCipher, check_dingtalk_signature

        check_dingtalk_signature(self.token, reply["timeStamp"], reply["nonce"], reply["encrypt"],
                                 reply["msg_signature"])
        message, owner = DingTalkCipher(self.aes_key).decrypt(reply["encrypt"])
        assert owner == self.owner
        return message.decode()


# ---- DingTalk Stream gateway --------------------------------------------------------------------------------


class FakeDingTalkGateway:
    """connections/open plus the websocket gateway, as dingtalk-stream-sdk-python meets it: keeps every EVENT
    until it is ACKed with SUCCESS and redelivers the unacked ones on each new connection; CALLBACK pushes (bot
    messages, card callbacks) are fire-and-forget, never pushed again, as DingTalk's stream protocol documents.
    Pings, sends SYSTEM disconnect, can drop connections, hang (stop answering while TCP stays open) and hold
    connections/open unanswered."""

    def __init__(self, client_id: str, client_secret: str) -> None:
        self.client_id, self.client_secret = client_id, client_secret
        self.unacked: dict[str, dict] = {}          # messageId → EVENT frame, in push order
        self.pushed: dict[str, dict] = {}
        self.acks: list[dict] = []
        self.opened = 0
        self.subscriptions: list[list[dict]] = []
        self.connections: list[web.WebSocketResponse] = []
        self.live_when_connected: list[int] = []    # open connections at each new connection (itself included)
        self.hung = False
        self.open_hangs = False
        self._tickets: set[str] = set()
        self._counter = 0

    def app(self) -> web.Application:
        application = web.Application()
        application.router.add_post("/v1.0/gateway/connections/open", self._open)
        application.router.add_get("/connect", self._connect)
        return application

    @property
    def live(self) -> web.WebSocketResponse | None:
        open_ones = [ws for ws in self.connections if not ws.closed]
        return open_ones[-1] if open_ones else None

    async def _open(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.open_hangs:
            await asyncio.Event().wait()              # a gateway that accepts the request and never answers
        if (body.get("clientId"), body.get("clientSecret")) != (self.client_id, self.client_secret):
            return web.json_response({"code": "invalidClientIdOrSecret", "message": "bad credentials"}, status=400)
        self.subscriptions.append(body.get("subscriptions") or [])
        self._counter += 1
        ticket = f"ticket/{self._counter}+x"          # characters that need quoting, like real tickets may
        self._tickets.add(ticket)
        self.opened += 1
        return web.json_response({"endpoint": str(request.url.with_path("/connect").with_query(None))
                                  .replace("http", "ws", 1), "ticket": ticket})

    async def _connect(self, request: web.Request) -> web.StreamResponse:
        ticket = request.query.get("ticket", "")
        if ticket not in self._tickets:
            return web.json_response({"code": "invalidTicket"}, status=401)
        self._tickets.discard(ticket)                 # one use only
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        self.connections.append(ws)
        self.live_when_connected.append(sum(1 for c in self.connections if not c.closed))
        for frame in list(self.unacked.values()):     # redeliver what the last connection left unacked
            await ws.send_str(json.dumps(frame))
        async for message in ws:
            if message.type == WSMsgType.PING and not self.hung:
                await ws.pong(message.data)
            elif message.type == WSMsgType.TEXT:
                self._on_ack(json.loads(message.data))
        return ws

    def _on_ack(self, ack: dict) -> None:
        self.acks.append(ack)
        message_id = ack.get("headers", {}).get("messageId")
        if ack.get("code") == 200 and json.loads(ack.get("data") or "{}").get("status") != "LATER":
            self.unacked.pop(message_id, None)

    def lose_ack(self, message_id: str) -> None:
        """As if our ACK for that EVENT never arrived: the gateway pushes it again on the next connection."""
        self.unacked[message_id] = self.pushed[message_id]

    def ack_for(self, message_id: str) -> dict | None:
        return next((a for a in self.acks if a.get("headers", {}).get("messageId") == message_id), None)

    async def push(self, data: dict, *, kind: str = "EVENT", topic: str = "*", event_id: str | None = None,
                   event_type: str = "chat_update_title", corp_id: str = "ding-corp-1") -> str:
        self._counter += 1
        message_id = f"msg-{self._counter}"
        headers = {"messageId": message_id, "topic": topic, "contentType": "application/json",
                   "time": "1700000000000", "appId": "app-1"}
        if kind == "EVENT":   # the event fields dingtalk-stream's frames.Headers reads
            headers.update(eventId=event_id or f"evt-{self._counter}", eventType=event_type, eventCorpId=corp_id,
                           eventBornTime="1700000000000", eventUnifiedAppId="unified-1")
        frame = {"specVersion": "1.0", "type": kind, "headers": headers, "data": json.dumps(data)}
        self.pushed[message_id] = frame
        if kind == "EVENT":
            self.unacked[message_id] = frame
        if self.live is not None:
            await self.live.send_str(json.dumps(frame))
        return message_id

    async def ping(self, opaque: str = '{"opaque":"p1"}') -> None:
        frame = {"specVersion": "1.0", "type": "SYSTEM", "data": opaque,
                 "headers": {"messageId": "ping-1", "topic": "ping", "contentType": "application/json"}}
        assert self.live is not None
        await self.live.send_str(json.dumps(frame))

    async def disconnect(self) -> None:
        frame = {"specVersion": "1.0", "type": "SYSTEM", "data": "",
                 "headers": {"messageId": "bye", "topic": "disconnect", "contentType": "application/json"}}
        assert self.live is not None
        await self.live.send_str(json.dumps(frame))

    async def drop(self) -> None:
        """Cut the connection without a goodbye, as a network failure would."""
        if self.live is not None:
            await self.live.close(code=1006)


# ---- Feishu long-connection gateway -------------------------------------------------------------------------


class FakeFeishuGateway:
    """/callback/ws/endpoint plus the pbbp2 websocket, encoded with lark-oapi's own generated classes so our codec
    is checked against an independent one. Answers pings with pongs carrying ClientConfig, splits big events,
    re-pushes events not answered with code 200 on the next connection, and can drop the connection, hang
    (answer no pings while TCP stays open) or hold /callback/ws/endpoint unanswered."""

    def __init__(self, app_id: str, app_secret: str, client_config: dict | None = None) -> None:
        self.app_id, self.app_secret = app_id, app_secret
        self.client_config = client_config or {"ReconnectCount": -1, "ReconnectInterval": 5,
                                               "ReconnectNonce": 1, "PingInterval": 10}
        self.pong_config: dict | None = None
        self.unanswered: dict[str, list[bytes]] = {}   # message_id → encoded frames, in push order
        self.responses: list[tuple[str, dict, dict[str, str]]] = []
        self.pings = 0
        self.endpoint_calls = 0
        self.connections: list[web.WebSocketResponse] = []
        self.hung = False
        self.endpoint_hangs = False
        self.wrong_domain = False   # an app of the other brand: the endpoint answers 1000040351
        self._counter = 0

    def app(self) -> web.Application:
        application = web.Application()
        application.router.add_post("/callback/ws/endpoint", self._endpoint)
        application.router.add_get("/ws", self._connect)
        return application

    @property
    def live(self) -> web.WebSocketResponse | None:
        open_ones = [ws for ws in self.connections if not ws.closed]
        return open_ones[-1] if open_ones else None

    async def _endpoint(self, request: web.Request) -> web.Response:
        self.endpoint_calls += 1
        body = await request.json()
        if self.endpoint_hangs:
            await asyncio.Event().wait()
        if self.wrong_domain:
            return web.json_response({"code": 1000040351, "msg": "Incorrect domain name", "data": {}})
        if (body.get("AppID"), body.get("AppSecret")) != (self.app_id, self.app_secret):
            return web.json_response({"code": 403, "msg": "forbidden"})
        url = request.url.with_path("/ws").with_query({"device_id": "d1", "service_id": "33"})
        return web.json_response({"code": 0, "msg": "ok", "data": {
            "URL": str(url).replace("http", "ws", 1), "ClientConfig": self.client_config}})

    async def _connect(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.connections.append(ws)
        for frames in list(self.unanswered.values()):
            for data in frames:
                await ws.send_bytes(data)
        async for message in ws:
            await self._on_frame(ws, message.data)
        return ws

    async def _on_frame(self, ws: web.WebSocketResponse, data: bytes) -> None:
        from lark_oapi.ws.pb.pbbp2_pb2 import Frame

        frame = Frame()
        frame.ParseFromString(data)
        headers = {h.key: h.value for h in frame.headers}
        if frame.method == 0 and headers.get("type") == "ping":
            self.pings += 1
            if self.hung:
                return
            pong = Frame(SeqID=0, LogID=0, service=frame.service, method=0)
            header = pong.headers.add()
            header.key, header.value = "type", "pong"
            if self.pong_config:
                pong.payload = json.dumps(self.pong_config).encode()
            await ws.send_bytes(pong.SerializeToString())
        elif frame.method == 1:
            answer = json.loads(frame.payload)
            self.responses.append((headers["message_id"], answer, headers))
            if answer.get("code") == 200:
                self.unanswered.pop(headers["message_id"], None)

    async def push(self, event: dict, *, parts: int = 1, event_type: str = "event") -> str:
        from lark_oapi.ws.pb.pbbp2_pb2 import Frame

        self._counter += 1
        message_id = f"fm-{self._counter}"
        payload = json.dumps(event).encode()
        size = -(-len(payload) // parts)
        frames = []
        for seq in range(parts):
            frame = Frame(SeqID=self._counter, LogID=1, service=33, method=1,
                          payload=payload[seq * size:(seq + 1) * size])
            for key, value in (("type", event_type), ("message_id", message_id), ("sum", str(parts)),
                               ("seq", str(seq)), ("trace_id", "tr")):
                header = frame.headers.add()
                header.key, header.value = key, value
            frames.append(frame.SerializeToString())
        self.unanswered[message_id] = frames
        if self.live is not None:
            for data in frames:
                await self.live.send_bytes(data)
        return message_id

    def answer_data(self, message_id: str) -> dict | None:
        """The JSON a response frame carried in `data` (base64, as lark-oapi's ws client encodes its result)."""
        for answered_id, answer, _ in self.responses:
            if answered_id == message_id and answer.get("data"):
                return json.loads(base64.b64decode(answer["data"]))
        return None

    async def drop(self) -> None:
        if self.live is not None:
            await self.live.close()
