"""Fake event sources and a fake application: an HTTP pusher that encrypts and signs like Feishu and DingTalk,
websocket gateways that ping, redeliver, split and drop, and an app that records what reached it.

Owns test doubles only; production code never imports it.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class FakeApplication:
    """The intranet application: records every event body it accepts; `fail_next` makes it answer 503 first."""

    received: list[dict] = field(default_factory=list)
    fail_next: int = 0
    status_when_failing: int = 503
    seen_headers: list[dict[str, str]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        application = web.Application()
        application.router.add_post("/events", self._handle)
        return application

    async def _handle(self, request: web.Request) -> web.Response:
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.json_response({"error": "busy"}, status=self.status_when_failing)
        self.received.append(await request.json())
        self.seen_headers.append(dict(request.headers))
        self.arrived.set()
        return web.json_response({"ok": True})


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
