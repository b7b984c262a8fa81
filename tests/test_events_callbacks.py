import asyncio
import json
import random

import pytest
from aiohttp import web

from proxy.events.callbacks import DingTalkCallback, FeishuCallback
from proxy.events.cards import CardRelay
from proxy.events.queue import EventStoreUnavailable
from proxy.events.settings import CardSettings, DingTalkEvents, FeishuEvents, Secret
from proxy.fakes.events import DingTalkPusher, FeishuPusher, wait_for
from tests.events_support import (  # noqa: F401 (fixtures, used by name)
    clock, fake_app, make_lane, memory_store, metrics, registry, session, started)

AES = "Nzk5ZjFiODIxMzkyNGMyNWIyMmFiZWZkNjIzNjIxYTg"


@pytest.fixture
async def sidecar(aiohttp_client, make_lane, metrics, clock, fake_app, session):
    """The sidecar's callback endpoints, mounted the way the app assembly will, in front of a fake application."""
    cards = CardRelay("fs", CardSettings(fake_app.url, deadline=2.5, late_toast="try again"), session, metrics,
                      clock)
    feishu = FeishuCallback("fs", FeishuEvents(app_id="cli_1", verification_token=Secret("vt"),
                                               encrypt_key=Secret("ek")), make_lane("fs"), metrics, clock, cards)
    ding = DingTalkCallback("dt", DingTalkEvents(app_key="dingapp", token=Secret("tok"), aes_key=Secret(AES)),
                            make_lane("dt", queue_size=2), metrics, clock, random.Random(1))
    web_app = web.Application()
    web_app.router.add_post("/events/fs", feishu.handle)
    web_app.router.add_post("/events/dt", ding.handle)
    return await aiohttp_client(web_app)


@pytest.fixture
def feishu_push(clock):
    return FeishuPusher(app_id="cli_1", verification_token="vt", encrypt_key="ek", now=clock.wall)


@pytest.fixture
def ding_push(clock):
    return DingTalkPusher(token="tok", aes_key=AES, owner="dingapp", now=clock.wall)


def rejected(registry, app, reason):
    return registry.get_sample_value("imsidecar_events_rejected_total", {"app": app, "reason": reason}) or 0.0


async def test_feishu_url_verification_is_answered_with_the_challenge(sidecar, feishu_push, fake_app):
    body, headers = feishu_push.request(feishu_push.challenge("abc"), signed=False)
    response = await sidecar.post("/events/fs", data=body, headers=headers)
    assert response.status == 200 and await response.json() == {"challenge": "abc"}
    assert fake_app.received == []


async def test_feishu_event_is_acked_and_reaches_the_app_decrypted(sidecar, feishu_push, fake_app):
    body, headers = feishu_push.request(feishu_push.envelope({"text": "hi"}, event_id="e-1"))
    response = await sidecar.post("/events/fs", data=body, headers=headers)
    assert response.status == 200 and await response.json() == {"msg": "success"}
    await wait_for(lambda: fake_app.received)
    assert fake_app.received[0]["event"] == {"text": "hi"}
    assert fake_app.received[0]["header"]["event_id"] == "e-1"


async def test_feishu_retry_of_the_same_event_is_delivered_once(sidecar, feishu_push, fake_app, registry):
    plaintext = feishu_push.envelope({"text": "hi"}, event_id="e-same")
    for _ in range(3):   # Feishu re-pushes with a fresh signature when it thinks we missed it
        body, headers = feishu_push.request(plaintext)
        assert (await sidecar.post("/events/fs", data=body, headers=headers)).status == 200
    await wait_for(lambda: fake_app.received)
    await asyncio.sleep(0.005)
    assert len(fake_app.received) == 1


@pytest.mark.parametrize("tamper, reason, status", [
    (lambda p: p.request(p.envelope({}), sign_with="other key"), "bad_signature", 401),
    (lambda p: p.request(p.envelope({})), "stale_timestamp", 401),
    (lambda p: p.request(p.envelope({}), signed=False), "bad_signature", 401),
    (lambda p: (b"not json", {}), "bad_request", 400),
    (lambda p: _unsigned_garbage_encrypt(p), "undecryptable", 400),
    (lambda p: p.request(json.dumps({"schema": "2.0", "header": {"token": "nope", "event_id": "x"}}).encode()),
     "bad_token", 401),
    (lambda p: p.request(json.dumps({"schema": "2.0", "header": {"token": "vt", "app_id": "cli_other"}}).encode()),
     "unknown_app", 403),
])
async def test_feishu_bad_input_is_refused_in_feishu_shape_and_counted(sidecar, feishu_push, clock, fake_app,
                                                                      registry, tamper, reason, status):
    body, headers = tamper(feishu_push)
    if reason == "stale_timestamp":
        await clock.advance(301)
    response = await sidecar.post("/events/fs", data=body, headers=headers)
    assert response.status == status
    payload = await response.json()
    assert set(payload) == {"code", "msg"} and payload["code"] >= 1990101
    assert response.headers["X-Imsidecar-Error"] == "".join(p.title() for p in reason.split("_"))
    assert "ek" not in payload["msg"]
    assert rejected(registry, "fs", reason) == 1
    assert fake_app.received == []


def _unsigned_garbage_encrypt(pusher):
    from proxy.events.crypto import feishu_signature

    body = json.dumps({"encrypt": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}).encode()
    ts = str(int(pusher.now()))
    return body, {"X-Lark-Request-Timestamp": ts, "X-Lark-Request-Nonce": "n",
                  "X-Lark-Signature": feishu_signature(ts, "n", "ek", body)}


async def test_dingtalk_check_url_gets_the_encrypted_success_without_delivery(sidecar, ding_push, fake_app):
    body, query = ding_push.request(json.dumps({"EventType": "check_url"}).encode())
    response = await sidecar.post("/events/dt", data=body, params=query)
    assert response.status == 200
    assert ding_push.read_reply(await response.json()) == "success"
    assert fake_app.received == []


async def test_dingtalk_event_is_acked_encrypted_and_delivered_with_its_type(sidecar, ding_push, fake_app):
    body, query = ding_push.request(json.dumps({"EventType": "user_add_org", "UserId": ["u1"]}).encode())
    response = await sidecar.post("/events/dt", data=body, params=query)
    assert ding_push.read_reply(await response.json()) == "success"
    await wait_for(lambda: fake_app.received)
    assert fake_app.received == [{"EventType": "user_add_org", "UserId": ["u1"]}]
    assert fake_app.seen_headers[0]["X-Imsidecar-Event-Type"] == "user_add_org"


@pytest.mark.parametrize("kwargs, reason, status", [
    ({"token": "wrong"}, "bad_signature", 401),
    ({"owner": "ding-someone-else"}, "unknown_app", 403),
])
async def test_dingtalk_bad_input_is_refused_in_dingtalk_shape(sidecar, ding_push, registry, kwargs, reason, status):
    body, query = ding_push.request(b'{"EventType": "x"}', **kwargs)
    response = await sidecar.post("/events/dt", data=body, params=query)
    assert response.status == status
    assert set(await response.json()) == {"errcode", "errmsg"}
    assert rejected(registry, "dt", reason) == 1


async def test_dingtalk_undecryptable_and_malformed_bodies_are_refused(sidecar, ding_push, registry):
    from proxy.events.crypto import dingtalk_signature

    garbage = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
    query = {"msg_signature": dingtalk_signature("tok", "1", "n", garbage), "timestamp": "1", "nonce": "n"}
    assert (await sidecar.post("/events/dt", json={"encrypt": garbage}, params=query)).status == 400
    assert (await sidecar.post("/events/dt", data=b"[1]", params=query)).status == 400
    assert rejected(registry, "dt", "undecryptable") == 1 and rejected(registry, "dt", "bad_request") == 1


async def test_dingtalk_is_not_acked_when_the_queue_is_full(sidecar, ding_push, fake_app, registry):
    fake_app.down = True   # the first event sits in back-off; the queue (size 2, the head included) fills behind it
    statuses = []
    for n in range(3):
        body, query = ding_push.request(json.dumps({"EventType": "e", "n": n}).encode())
        response = await sidecar.post("/events/dt", data=body, params=query)
        statuses.append(response.status)
        if n == 0:
            await wait_for(lambda: fake_app.started)
    assert statuses == [200, 200, 503]
    assert rejected(registry, "dt", "queue_full") == 1


async def test_an_event_the_store_cannot_take_is_not_acknowledged(sidecar, feishu_push, memory_store, fake_app,
                                                                  registry, monkeypatch):
    async def store_away(*args, **kwargs):
        raise EventStoreUnavailable("Redis at redis://r:6379/0: ConnectionError")
    monkeypatch.setattr(memory_store, "admit", store_away)
    body, headers = feishu_push.request(feishu_push.envelope({"text": "hi"}, event_id="e-1"))
    response = await sidecar.post("/events/fs", data=body, headers=headers)
    assert response.status == 503 and response.headers["X-Imsidecar-Error"] == "StoreUnavailable"
    assert (await response.json())["code"] == 1990108   # Feishu keeps the event and pushes it again
    assert rejected(registry, "fs", "store_unavailable") == 1


# ---- Feishu card callbacks: the application's answer, inline, within the deadline --------------------------


def card_action(pusher, action="approve"):
    return pusher.envelope({"operator": {"open_id": "ou_1"}, "action": {"value": {"do": action}}},
                           event_type="card.action.trigger")


async def test_a_card_callback_gets_the_applications_answer_inline(sidecar, feishu_push, fake_app, registry):
    fake_app.card_answer = {"toast": {"type": "success", "content": "approved"}, "card": {"type": "raw", "data": {}}}
    body, headers = feishu_push.request(card_action(feishu_push))
    response = await sidecar.post("/events/fs", data=body, headers=headers)
    assert response.status == 200 and await response.json() == fake_app.card_answer
    assert fake_app.cards[0]["event"]["action"] == {"value": {"do": "approve"}}
    assert fake_app.received == []   # answered, not queued
    assert registry.get_sample_value("imsidecar_events_card_answers_total", {"app": "fs", "outcome": "answered"}) == 1


async def test_a_slow_application_gets_the_user_a_toast_before_feishus_3_s(sidecar, feishu_push, fake_app, clock,
                                                                           registry):
    fake_app.card_gate = asyncio.Event()          # the application never answers in time
    body, headers = feishu_push.request(card_action(feishu_push))
    posted = asyncio.create_task(sidecar.post("/events/fs", data=body, headers=headers))
    await wait_for(lambda: fake_app.cards)
    await clock.advance(2.4)
    assert not posted.done()
    await clock.advance(0.2)                      # the 2.5 s deadline passes, well inside Feishu's 3 s
    response = await posted
    assert response.status == 200 and response.headers["X-Imsidecar-Error"] == "CardAnswerLate"
    assert await response.json() == {"toast": {"type": "error", "content": "try again"}}
    assert registry.get_sample_value("imsidecar_events_card_answers_total", {"app": "fs", "outcome": "late"}) == 1
    fake_app.card_gate.set()


async def test_a_failing_card_answer_is_said_plainly(sidecar, feishu_push, fake_app, registry, caplog):
    fake_app.card_answer = ["not", "an", "object"]
    body, headers = feishu_push.request(card_action(feishu_push))
    response = await sidecar.post("/events/fs", data=body, headers=headers)
    assert response.headers["X-Imsidecar-Error"] == "CardAnswerFailed"
    assert registry.get_sample_value("imsidecar_events_card_answers_total", {"app": "fs", "outcome": "failed"}) == 1
    assert "not a JSON object" in caplog.text and "vt" not in caplog.text
