"""The Feishu long connection against a fake gateway speaking lark-oapi's own pbbp2 classes: events answered 200 once
stored, card callbacks answered with the application's answer, a silent server and a hung endpoint left quickly."""

import asyncio
import random
import time

import pytest

from proxy.events.cards import CardRelay
from proxy.events.feishu_ws import FeishuLongConnection, Reassembly
from proxy.events.settings import CardSettings, FeishuEvents, Secret, StreamSettings
from proxy.fakes.events import FakeFeishuGateway, wait_for
from tests.events_support import advance_until, serve
from tests.events_support import (  # noqa: F401 (fixtures, used by name)
    clock, fake_app, make_lane, memory_store, metrics, registry, session, started)


@pytest.fixture
async def gateway(aiohttp_server):
    fake = FakeFeishuGateway("cli_1", "sec")
    fake.domain = await serve(aiohttp_server, fake.app())
    return fake


@pytest.fixture
def make_client(gateway, make_lane, session, metrics, clock, started, fake_app):
    def make(secret="sec", **stream_settings):
        lane = make_lane("fs", random.Random(1), backoff_base=1)
        cards = CardRelay("fs", CardSettings(fake_app.url, deadline=2.5, late_toast="try again"), session, metrics,
                          clock)
        settings = FeishuEvents(app_id="cli_1", app_secret=Secret(secret), domain=gateway.domain)
        return started(FeishuLongConnection("fs", settings, StreamSettings(**stream_settings), lane, session,
                                            metrics, clock, random.Random(2), cards=cards))

    return make


def envelope(n, event_id=None, event_type="im.message.receive_v1"):
    return {"schema": "2.0", "header": {"event_id": event_id or f"e{n}", "event_type": event_type},
            "event": {"n": n}}


async def test_pings_at_the_server_interval_and_takes_new_settings_from_pong(make_client, gateway, clock):
    gateway.pong_config = {"PingInterval": 3, "ReconnectCount": 2, "ReconnectInterval": 7, "ReconnectNonce": 0}
    client = make_client()
    await wait_for(lambda: gateway.pings == 1)
    await wait_for(lambda: client.config.ping_interval == 3)
    await clock.advance(10)            # the sleep already under way was 10 s (from the endpoint's ClientConfig)
    await wait_for(lambda: gateway.pings == 2)
    await clock.advance(3)
    await wait_for(lambda: gateway.pings == 3)
    assert client.config.reconnect_interval == 7


async def test_a_split_event_is_reassembled_stored_answered_200_and_delivered(make_client, gateway, fake_app):
    make_client()
    await wait_for(lambda: gateway.live is not None)
    message_id = await gateway.push(envelope(1) | {"padding": "x" * 500}, parts=3)
    await wait_for(lambda: gateway.responses and fake_app.received)
    assert fake_app.received[0]["event"] == {"n": 1} and len(fake_app.received[0]["padding"]) == 500
    assert fake_app.seen_headers[0]["X-Imsidecar-Event-Type"] == "im.message.receive_v1"
    answered_id, answer, headers = gateway.responses[0]
    assert answered_id == message_id and answer["code"] == 200 and "biz_rt" in headers


async def test_an_event_is_answered_200_once_stored_even_while_the_app_is_down(make_client, gateway, fake_app, clock):
    fake_app.down = True
    make_client()
    await wait_for(lambda: gateway.live is not None)
    await gateway.push(envelope(1))
    await wait_for(lambda: gateway.responses)
    assert gateway.responses[0][1]["code"] == 200 and not gateway.unanswered
    fake_app.down = False
    await advance_until(clock, lambda: fake_app.received)
    assert fake_app.received[0]["event"] == {"n": 1}


async def test_events_arrive_once_and_in_order_across_a_dropped_connection(make_client, gateway, fake_app, clock,
                                                                          registry):
    make_client()
    await wait_for(lambda: gateway.live is not None)
    for n in range(5):
        await gateway.push(envelope(n))
    await wait_for(lambda: len(gateway.responses) == 5)
    again = [await gateway.push(envelope(n)) for n in (3, 4)]   # Feishu pushing 3 and 4 again, same event_id
    await wait_for(lambda: len(gateway.responses) == 7)
    await gateway.drop()
    await advance_until(clock, lambda: len(gateway.connections) == 2)
    await wait_for(lambda: len(fake_app.received) == 5)
    assert [e["event"]["n"] for e in fake_app.received] == [0, 1, 2, 3, 4]
    assert [gateway.responses[i][0] for i in (5, 6)] == again and gateway.responses[6][1]["code"] == 200
    assert registry.get_sample_value("imsidecar_events_duplicates_dropped_total", {"app": "fs"}) == 2
    assert registry.get_sample_value("imsidecar_events_reconnects_total", {"app": "fs"}) == 1


async def test_honours_reconnect_count_and_gives_up(make_client, gateway, clock):
    gateway.client_config = {"ReconnectCount": 2, "ReconnectInterval": 5, "ReconnectNonce": 0, "PingInterval": 60}
    client = make_client()
    await wait_for(lambda: gateway.live is not None)
    gateway.app_secret = "rotated"       # every reconnect is now refused
    await gateway.drop()
    await advance_until(clock, lambda: client.gave_up)
    assert gateway.endpoint_calls == 3   # the first connection, then exactly ReconnectCount tries


async def test_an_app_of_the_other_brand_is_told_which_platform_to_set(make_client, gateway, clock, caplog):
    gateway.wrong_domain = True          # a Lark app pointed at Feishu's endpoint: 1000040351 "Incorrect domain name"
    make_client(secret="feishu-secret-0123456789")
    await advance_until(clock, lambda: "set platform: lark" in caplog.text, step=1, what="no message naming the fix")
    assert "1000040351" in caplog.text and "feishu-secret-0123456789" not in caplog.text


async def test_a_silent_server_is_left_after_two_ping_intervals(make_client, gateway, clock):
    gateway.client_config = {"ReconnectCount": -1, "ReconnectInterval": 5, "ReconnectNonce": 0, "PingInterval": 10}
    make_client()
    await wait_for(lambda: gateway.live is not None)
    await advance_until(clock, lambda: clock.now() >= 100, step=2)
    assert len(gateway.connections) == 1          # pongs every 10 s kept it
    gateway.hung = True
    await advance_until(clock, lambda: len(gateway.connections) == 2, step=2, what="stayed on a dead connection")
    assert clock.now() - 100 <= 2 * 10 + 10 + 2


async def test_a_hung_endpoint_is_given_up_within_the_endpoint_timeout(make_client, gateway, clock, registry):
    gateway.endpoint_hangs = True
    gateway.client_config = {"ReconnectCount": -1, "ReconnectInterval": 1, "ReconnectNonce": 0, "PingInterval": 10}
    make_client(endpoint_timeout=0.05)
    started_at = time.monotonic()
    await advance_until(clock, lambda: gateway.endpoint_calls >= 3, step=1, rounds=2000,
                        what="/callback/ws/endpoint held reconnection")
    assert time.monotonic() - started_at < 5


async def test_a_card_callback_is_answered_with_the_applications_answer_in_data(make_client, gateway, fake_app,
                                                                                registry):
    fake_app.card_answer = {"toast": {"type": "info", "content": "ok"}}
    make_client()
    await wait_for(lambda: gateway.live is not None)
    message_id = await gateway.push(envelope(1, event_type="card.action.trigger"))
    await wait_for(lambda: gateway.responses)
    assert gateway.responses[0][1]["code"] == 200
    assert gateway.answer_data(message_id) == fake_app.card_answer
    assert fake_app.cards[0]["event"] == {"n": 1} and fake_app.received == []
    assert registry.get_sample_value("imsidecar_events_card_answers_total", {"app": "fs", "outcome": "answered"}) == 1


async def test_a_slow_card_answer_becomes_a_toast_within_the_deadline(make_client, gateway, fake_app, clock):
    fake_app.card_gate = asyncio.Event()
    make_client()
    await wait_for(lambda: gateway.live is not None)
    message_id = await gateway.push(envelope(1, event_type="card.action.trigger"))
    await wait_for(lambda: fake_app.cards)
    await clock.advance(2.6)
    await wait_for(lambda: gateway.responses)
    assert gateway.answer_data(message_id) == {"toast": {"type": "error", "content": "try again"}}
    assert int(gateway.responses[0][2]["biz_rt"]) < 3000
    fake_app.card_gate.set()


async def test_partial_split_messages_expire(clock):
    joined = Reassembly(ttl=5, clock=clock)
    assert joined.add("m", 2, 0, b"ab") is None
    await clock.advance(6)
    assert joined.add("m", 2, 1, b"cd") is None      # the first half expired; this is a new partial
    assert joined.add("m", 2, 0, b"ab") == b"abcd"
