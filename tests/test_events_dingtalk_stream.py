"""DingTalk Stream against a fake gateway that behaves as dingtalk-stream-sdk-python meets it: events acked once
stored, carrying their type; bot messages acked at once and still delivered; card callbacks answered inline;
a hung gateway or a hung connections/open left behind quickly; SYSTEM disconnect handled new-before-old."""

import asyncio
import json
import random
import time

import pytest

from proxy.events.cards import CardRelay
from proxy.events.dingtalk_stream import DingTalkStream
from proxy.events.settings import DINGTALK_CARD_TOPIC, CardSettings, DingTalkEvents, Secret, StreamSettings
from proxy.fakes.events import FakeDingTalkGateway, wait_for
from tests.events_support import advance_until, serve
from tests.events_support import (  # noqa: F401 (fixtures, used by name)
    clock, fake_app, make_lane, memory_store, metrics, registry, session, started)

BOT_TOPIC = "/v1.0/im/bot/messages/get"


@pytest.fixture
async def gateway(aiohttp_server):
    fake = FakeDingTalkGateway("dingapp", "s3cret")
    fake.api = await serve(aiohttp_server, fake.app())
    return fake


@pytest.fixture
def make_stream(gateway, make_lane, session, metrics, clock, started, fake_app):
    def make(secret="s3cret", **stream_settings):
        lane = make_lane("dt", random.Random(1), backoff_base=1)
        settings = DingTalkEvents(app_key="dingapp", app_secret=Secret(secret), api=gateway.api)
        cards = CardRelay("dt", CardSettings(fake_app.url, deadline=2.5), session, metrics, clock)
        return started(DingTalkStream("dt", settings, StreamSettings(**stream_settings), lane, session, metrics,
                                      clock, random.Random(2), cards=cards))
    return make


@pytest.fixture
async def stream(make_stream, gateway):
    client = make_stream()
    await wait_for(lambda: gateway.live is not None)
    return client


def metric(registry, name, **labels):
    return registry.get_sample_value(name, {"app": "dt", **labels}) or 0.0


async def reconnect(gateway, clock, opened_before):
    await advance_until(clock, lambda: gateway.opened > opened_before and gateway.live is not None,
                        what="did not reconnect")


async def test_ping_is_echoed_and_the_connection_reported_up(stream, gateway, registry):
    await gateway.ping('{"opaque":"abc"}')
    await wait_for(lambda: gateway.acks)
    assert gateway.acks[0]["code"] == 200 and gateway.acks[0]["data"] == '{"opaque":"abc"}'
    assert gateway.acks[0]["headers"]["messageId"] == "ping-1"
    assert metric(registry, "imsidecar_events_connection_up") == 1


async def test_the_subscription_names_events_bot_messages_and_card_callbacks(stream, gateway):
    assert gateway.subscriptions[0] == [{"type": "EVENT", "topic": "*"}, {"type": "CALLBACK", "topic": BOT_TOPIC},
                                        {"type": "CALLBACK", "topic": DINGTALK_CARD_TOPIC}]


async def test_an_event_is_acked_once_stored_and_reaches_the_app_when_it_is_back(stream, gateway, fake_app, clock):
    fake_app.down = True
    message_id = await gateway.push({"title": "new"})
    await wait_for(lambda: gateway.ack_for(message_id))
    assert json.loads(gateway.ack_for(message_id)["data"]) == {"status": "SUCCESS"} and gateway.unacked == {}
    assert fake_app.received == []
    fake_app.down = False
    await advance_until(clock, lambda: fake_app.received)
    assert fake_app.received[0]["data"] == {"title": "new"}


async def test_stream_events_carry_their_type(stream, gateway, fake_app):
    """The issue's third failure: only frame.data was posted, so user_add_org and user_leave_org looked alike."""
    await gateway.push({"userId": ["u1"]}, event_type="user_add_org", event_id="evt-a")
    await gateway.push({"userId": ["u1"]}, event_type="user_leave_org", event_id="evt-b")
    await gateway.push({"msgId": "m-1", "text": {"content": "hi"}}, kind="CALLBACK", topic=BOT_TOPIC)
    await wait_for(lambda: len(fake_app.received) == 3)
    types = [h["X-Imsidecar-Event-Type"] for h in fake_app.seen_headers[:2]]
    assert types == ["user_add_org", "user_leave_org"]
    first, _, bot = fake_app.received
    assert first["type"] == "EVENT" and first["data"] == {"userId": ["u1"]}
    assert first["headers"]["eventType"] == "user_add_org" and first["headers"]["eventCorpId"] == "ding-corp-1"
    assert fake_app.seen_headers[0]["X-Imsidecar-Event-Corp-Id"] == "ding-corp-1"
    assert fake_app.seen_headers[0]["X-Imsidecar-Event-Born-Time"] == "1700000000000"
    assert fake_app.seen_headers[0]["X-Imsidecar-Event-Id"] == "evt-a"
    assert bot["type"] == "CALLBACK" and bot["headers"]["topic"] == BOT_TOPIC
    assert fake_app.seen_headers[2]["X-Imsidecar-Event-Kind"] == "CALLBACK"
    assert fake_app.seen_headers[2]["X-Imsidecar-Event-Topic"] == BOT_TOPIC


async def test_a_bot_message_is_acked_at_once_and_still_delivered_after_the_app_was_down(stream, gateway, fake_app,
                                                                                         clock):
    """The issue's fourth failure: the ACK was withheld so the gateway would push again, but DingTalk never
    pushes a robot message again, so a busy application lost it."""
    fake_app.down = True
    message_id = await gateway.push({"msgId": "m-1", "text": {"content": "hi"}}, kind="CALLBACK", topic=BOT_TOPIC)
    await wait_for(lambda: gateway.ack_for(message_id))
    assert gateway.ack_for(message_id)["code"] == 200
    await advance_until(clock, lambda: len(fake_app.started) >= 3)
    fake_app.down = False
    await advance_until(clock, lambda: fake_app.received)
    assert fake_app.received[0]["data"]["msgId"] == "m-1"


async def test_an_event_pushed_again_after_a_lost_ack_reaches_the_app_once(stream, gateway, fake_app, clock,
                                                                           registry):
    pushed = [await gateway.push({"n": n}) for n in range(6)]
    await wait_for(lambda: len(fake_app.received) == 6 and not gateway.unacked)
    for message_id in pushed[3:]:
        gateway.lose_ack(message_id)
    opened = gateway.opened
    await gateway.drop()
    await reconnect(gateway, clock, opened)     # the gateway pushes 3, 4, 5 again on the new connection
    await wait_for(lambda: not gateway.unacked)
    await asyncio.sleep(0.01)
    assert [e["data"]["n"] for e in fake_app.received] == [0, 1, 2, 3, 4, 5]
    assert metric(registry, "imsidecar_events_duplicates_dropped_total") == 3
    assert metric(registry, "imsidecar_events_reconnects_total") == 1


async def test_system_disconnect_opens_the_next_connection_before_closing_this_one(stream, gateway, fake_app, clock):
    first = gateway.live
    await gateway.disconnect()
    await wait_for(lambda: len(gateway.connections) == 2)
    assert gateway.live_when_connected == [1, 2]    # the old one was still open when the new one came up
    await wait_for(lambda: first.closed)
    await gateway.push({"after": True})
    await wait_for(lambda: len(fake_app.received) == 1)
    assert fake_app.received[0]["data"] == {"after": True}


async def test_a_silent_gateway_is_left_after_two_heartbeats(make_stream, gateway, clock, registry):
    make_stream(heartbeat=30)
    await wait_for(lambda: gateway.live is not None)
    await advance_until(clock, lambda: clock.now() >= 200, step=5)
    assert gateway.opened == 1                      # pongs kept it alive
    gateway.hung = True                             # TCP open, nothing answers
    hung_at = clock.now()
    await advance_until(clock, lambda: gateway.opened == 2, step=5, what="stayed on a dead connection")
    assert clock.now() - hung_at <= 2 * 30 + 30 + 5  # silence noticed within two heartbeats of the last pong
    assert metric(registry, "imsidecar_events_reconnects_total") == 1


async def test_a_hung_connections_open_is_given_up_within_the_endpoint_timeout(make_stream, gateway, clock, registry):
    gateway.open_hangs = True
    make_stream(endpoint_timeout=0.05, reconnect_base=1, reconnect_cap=1)
    started_at = time.monotonic()
    await advance_until(clock, lambda: metric(registry, "imsidecar_events_reconnects_total") >= 3, step=1,
                        rounds=2000, what="connections/open held reconnection")
    assert time.monotonic() - started_at < 5        # not 300 s per try, as with the session's default timeout


async def test_a_card_callback_is_answered_with_the_applications_answer(stream, gateway, fake_app):
    fake_app.card_answer = {"cardData": {"cardParamMap": {"status": "approved"}}}
    message_id = await gateway.push({"outTrackId": "t-1", "value": '{"cardPrivateData":{"actionIds":["ok"]}}'},
                                    kind="CALLBACK", topic=DINGTALK_CARD_TOPIC)
    await wait_for(lambda: gateway.ack_for(message_id))
    ack = gateway.ack_for(message_id)
    assert ack["code"] == 200 and json.loads(ack["data"]) == {"response": fake_app.card_answer}
    assert fake_app.cards[0]["data"]["outTrackId"] == "t-1" and fake_app.received == []


async def test_a_card_callback_the_app_is_too_slow_for_is_refused_within_the_deadline(stream, gateway, fake_app,
                                                                                      clock, registry):
    fake_app.card_gate = asyncio.Event()
    message_id = await gateway.push({"outTrackId": "t-1"}, kind="CALLBACK", topic=DINGTALK_CARD_TOPIC)
    await wait_for(lambda: fake_app.cards)
    await clock.advance(2.6)
    await wait_for(lambda: gateway.ack_for(message_id))
    assert gateway.ack_for(message_id)["code"] == 500
    assert metric(registry, "imsidecar_events_card_answers_total", outcome="late") == 1
    fake_app.card_gate.set()


async def test_wrong_credentials_back_off_and_retry_without_crashing(make_stream, gateway, clock, registry):
    client = make_stream(secret="wrong", reconnect_base=1, reconnect_cap=8)
    for _ in range(30):
        await clock.advance(1)
        await asyncio.sleep(0.001)
    assert metric(registry, "imsidecar_events_reconnects_total") >= 3
    assert gateway.live is None and client._task is not None and not client._task.done()
