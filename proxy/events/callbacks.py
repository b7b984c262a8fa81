"""aiohttp handlers for the platforms' HTTP event callbacks: verify, decrypt, answer the platform, hand on the event.

Owns the Feishu and DingTalk callback protocols (challenge, check_url, token, signature, clock skew, app check,
encrypted reply, Feishu card callbacks answered inline); it does not store or deliver events (Delivery does), nor
own the web application they are mounted on. The platform gets its 200 only once the event is stored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import string
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy.clock import Clock
from proxy.events.crypto import (
    CryptoError,
    DingTalkCipher,
    Undecryptable,
    check_dingtalk_signature,
    check_feishu_signature,
    dingtalk_signature,
    feishu_decrypt,
)
from proxy.events.cards import CardAnswer, CardRelay
from proxy.events.delivery import Delivery, Event
from proxy.events.metrics import EventMetrics
from proxy.events.queue import EventStoreUnavailable
from proxy.events.settings import DingTalkEvents, FeishuEvents

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Rejection:
    status: int
    code: int        # imsidecar's own code, in the 19901xx range so it cannot be mistaken for a platform code
    message: str


# The fixed reasons a push is refused for; each becomes a metric label and a platform-shaped error body.
REJECTIONS: dict[str, Rejection] = {
    "bad_request": Rejection(400, 1990101, "callback body is not the JSON this endpoint expects"),
    "undecryptable": Rejection(400, 1990102, "callback could not be decrypted with the configured key"),
    "bad_signature": Rejection(401, 1990103, "callback signature does not match the configured key"),
    "stale_timestamp": Rejection(401, 1990104, "callback timestamp is outside the allowed clock skew"),
    "bad_token": Rejection(401, 1990105, "verification token does not match"),
    "unknown_app": Rejection(403, 1990106, "callback is for an app this endpoint does not serve"),
    "queue_full": Rejection(503, 1990107, "event queue is full; redeliver later"),
    "store_unavailable": Rejection(503, 1990108, "event store unavailable; redeliver later"),
}
COUNTED_BY_THE_LANE = ("queue_full", "store_unavailable")


class CallbackRejected(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _json_object(raw: bytes, reason: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CallbackRejected(reason) from exc
    if not isinstance(value, dict):
        raise CallbackRejected(reason)
    return value


def _feishu_type(event: dict[str, Any]) -> str:
    header = event.get("header")
    if isinstance(header, dict):
        return str(header.get("event_type") or "")                 # v2 schema
    inner = event.get("event")
    return str(inner.get("type") or "") if isinstance(inner, dict) else ""   # v1 schema


def _fallback_key(plaintext: bytes) -> str:
    # A redelivered push carries the same plaintext; hashing it gives dedupe a key when the platform names none.
    return "sha256:" + hashlib.sha256(plaintext).hexdigest()


class _Callback:
    """What both platforms share: count, reject in the platform's shape, submit to the delivery lane."""

    channel = "http"

    def __init__(self, name: str, delivery: Delivery, metrics: EventMetrics, clock: Clock) -> None:
        self.name, self._delivery, self._metrics, self._clock = name, delivery, metrics, clock

    async def handle(self, request: web.Request) -> web.Response:
        self._metrics.received.labels(self.name, self.channel).inc()
        try:
            return await self._handle(request)
        except CallbackRejected as rejected:
            if rejected.reason not in COUNTED_BY_THE_LANE:
                self._metrics.reject(self.name, rejected.reason)
            log.info("events: refused a %s callback for app %s: %s", self.platform, self.name, rejected.reason)
            response = self._error(REJECTIONS[rejected.reason])
            response.headers["X-Imsidecar-Error"] = "".join(p.title() for p in rejected.reason.split("_"))
            return response

    async def _submit(self, key: str, plaintext: bytes, event_type: object) -> None:
        """Store the event; unless it is stored the platform gets no ack and pushes it again later."""
        headers = (("X-Imsidecar-Event-Type", str(event_type)),) if event_type else ()
        try:
            admission = await self._delivery.submit(Event(key, plaintext, headers, self._clock.wall()))
        except EventStoreUnavailable as exc:
            raise CallbackRejected("store_unavailable") from exc
        if not admission.stored:
            raise CallbackRejected("queue_full")

    platform = ""

    async def _handle(self, request: web.Request) -> web.Response:
        raise NotImplementedError

    def _error(self, rejection: Rejection) -> web.Response:
        raise NotImplementedError


class FeishuCallback(_Callback):
    """Feishu/Lark event subscription endpoint (request URL). Answers within the 3 s limit by acking on enqueue."""

    platform = "feishu"

    def __init__(self, name: str, settings: FeishuEvents, delivery: Delivery, metrics: EventMetrics,
                 clock: Clock, cards: CardRelay | None = None) -> None:
        super().__init__(name, delivery, metrics, clock)
        self._settings, self._cards = settings, cards

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        signed = self._check_signature(request, raw)
        plaintext = self._plaintext(raw)
        event = _json_object(plaintext, "undecryptable" if self._settings.encrypt_key else "bad_request")
        self._check_token(event)
        if event.get("type") == "url_verification":
            # Feishu sends the challenge before any event; answering it proves we hold the keys.
            return web.json_response({"challenge": event.get("challenge", "")})
        if self._settings.encrypt_key and not signed:
            raise CallbackRejected("bad_signature")   # only the URL check may come without X-Lark-Signature
        self._check_app(event)
        event_type = _feishu_type(event)
        if self._cards is not None and event_type in self._settings.card_types:
            return self._card_reply(await self._cards.ask(plaintext, (("X-Imsidecar-Event-Type", event_type),)))
        await self._submit(self._event_key(event, plaintext), plaintext, event_type)
        return web.json_response({"msg": "success"})

    def _card_reply(self, answer: CardAnswer) -> web.Response:
        """The application's answer as is (lark-oapi's dispatcher returns the handler's JSON), or a toast telling
        the user to try again, still inside Feishu's 3 s (a missing answer shows them error 200340)."""
        if answer.answered:
            return web.Response(body=answer.body, content_type="application/json")
        toast = {"toast": {"type": "error", "content": self._cards.settings.late_toast if self._cards else ""}}
        kind = "CardAnswerLate" if answer.outcome == "late" else "CardAnswerFailed"
        return web.json_response(toast, headers={"X-Imsidecar-Error": kind})

    def _check_signature(self, request: web.Request, raw: bytes) -> bool:
        """Verify X-Lark-Signature when an encrypt key is set and the headers are present; True if verified."""
        key = self._settings.encrypt_key.reveal()
        signature = request.headers.get("X-Lark-Signature")
        if not key or signature is None:
            return False
        timestamp = request.headers.get("X-Lark-Request-Timestamp", "")
        nonce = request.headers.get("X-Lark-Request-Nonce", "")
        try:
            check_feishu_signature(timestamp, nonce, key, raw, signature)
        except CryptoError as exc:
            raise CallbackRejected("bad_signature") from exc
        self._check_fresh(timestamp)
        return True

    def _check_fresh(self, timestamp: str) -> None:
        # A valid signature on an old timestamp is a replay: refuse outside the configured skew.
        try:
            skew = abs(self._clock.wall() - float(timestamp))
        except ValueError as exc:
            raise CallbackRejected("stale_timestamp") from exc
        if skew > self._settings.max_clock_skew:
            raise CallbackRejected("stale_timestamp")

    def _plaintext(self, raw: bytes) -> bytes:
        body = _json_object(raw, "bad_request")
        key = self._settings.encrypt_key.reveal()
        if "encrypt" not in body:
            if key:
                raise CallbackRejected("bad_request")   # with an encrypt key set, Feishu encrypts every push
            return raw
        if not key or not isinstance(body["encrypt"], str):
            raise CallbackRejected("undecryptable")
        try:
            return feishu_decrypt(key, body["encrypt"])
        except Undecryptable as exc:
            raise CallbackRejected("undecryptable") from exc

    def _check_token(self, event: dict[str, Any]) -> None:
        expected = self._settings.verification_token.reveal()
        header = event.get("header")
        token = header.get("token") if isinstance(header, dict) else event.get("token")   # v2 schema, else v1
        if expected and token != expected:
            raise CallbackRejected("bad_token")

    def _check_app(self, event: dict[str, Any]) -> None:
        header = event.get("header")
        app_id = header.get("app_id") if isinstance(header, dict) else (event.get("event") or {}).get("app_id")
        if app_id is not None and app_id != self._settings.app_id:
            raise CallbackRejected("unknown_app")

    @staticmethod
    def _event_key(event: dict[str, Any], plaintext: bytes) -> str:
        header = event.get("header")
        key = header.get("event_id") if isinstance(header, dict) else event.get("uuid")   # v2 event_id, v1 uuid
        return str(key) if key else _fallback_key(plaintext)

    def _error(self, rejection: Rejection) -> web.Response:
        return web.json_response({"code": rejection.code, "msg": rejection.message}, status=rejection.status)


class DingTalkCallback(_Callback):
    """DingTalk HTTP event subscription endpoint: verify, decrypt, check the owner key, reply encrypted "success"."""

    platform = "dingtalk"

    def __init__(self, name: str, settings: DingTalkEvents, delivery: Delivery, metrics: EventMetrics,
                 clock: Clock, rng: random.Random | None = None) -> None:
        super().__init__(name, delivery, metrics, clock)
        self._settings = settings
        self._cipher = DingTalkCipher(settings.aes_key.reveal())
        self._rng = rng or random.SystemRandom()

    async def _handle(self, request: web.Request) -> web.Response:
        body = _json_object(await request.read(), "bad_request")
        encrypted = body.get("encrypt")
        if not isinstance(encrypted, str):
            raise CallbackRejected("bad_request")
        self._check_signature(request, encrypted)
        plaintext = self._decrypt(encrypted)
        event = _json_object(plaintext, "undecryptable")
        if event.get("EventType") != "check_url":
            # check_url is answered at once, without delivery: DingTalk allows it 1.5 s.
            await self._submit(_fallback_key(plaintext), plaintext, event.get("EventType"))
        return web.json_response(self.encrypted_reply("success"))

    def _check_signature(self, request: web.Request, encrypted: str) -> None:
        query = request.query
        signature = query.get("msg_signature") or query.get("signature") or ""
        timestamp = query.get("timestamp") or query.get("timeStamp") or ""
        try:
            check_dingtalk_signature(self._settings.token.reveal(), timestamp, query.get("nonce", ""), encrypted,
                                     signature)
        except CryptoError as exc:
            raise CallbackRejected("bad_signature") from exc

    def _decrypt(self, encrypted: str) -> bytes:
        try:
            message, owner = self._cipher.decrypt(encrypted)
        except Undecryptable as exc:
            raise CallbackRejected("undecryptable") from exc
        if owner != self._settings.expected_owner:
            raise CallbackRejected("unknown_app")   # encrypted for another appKey/corpId/suiteKey
        return message

    def encrypted_reply(self, text: str) -> dict[str, str]:
        """The {msg_signature, timeStamp, nonce, encrypt} body DingTalk expects as acknowledgement."""
        timestamp = str(int(self._clock.wall() * 1000))
        nonce = "".join(self._rng.choice(string.ascii_letters + string.digits) for _ in range(16))
        encrypt = self._cipher.encrypt(text.encode(), self._settings.expected_owner, self._rng.randbytes(16))
        signature = dingtalk_signature(self._settings.token.reveal(), timestamp, nonce, encrypt)
        return {"msg_signature": signature, "timeStamp": timestamp, "nonce": nonce, "encrypt": encrypt}

    def _error(self, rejection: Rejection) -> web.Response:
        return web.json_response({"errcode": rejection.code, "errmsg": rejection.message}, status=rejection.status)
