import random

import pytest

from proxy.events.feishu_ws import FeishuLongConnection, Reassembly
from proxy.events.settings import FeishuEvents, Secret, StreamSettings
from proxy.fakes.events import FakeFeishuGateway, wait_for
from tests.events_support import advance_until, serve
from tests.events_support import (  # noqa: F401 (fixtures, used by name)
    clock, fake_app, make_lane, metrics, registry, session, started)


@pytest.fixture
async def gateway(aiohttp_server):
    fake = FakeFeishuGateway("cli_1", "sec")
    fake.domain = await serve(aiohttp_server, fake.app())
    return fake


@pytest.fixture
def make_client(gateway, make_lane, session, metrics, clock, started):
    def make(secret="sec"):
        lane = make_lane("fs", random.Random(1), backoff_base=1)
        return started(FeishuLongConnection("fs", FeishuEvents(app_id="cli_1", app_secret=Secret(secret),
                                                               domain=gateway.domain),
                                            StreamSettings(), lane, session, metrics, clock, random.Random(2)))

    return make


def envelope(n, event_id=None):
    return {"schema": "2.0", "header": {"event_id": event_id or f"e{n}", "event_type": "im.message.receive_v1"},
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


async def test_a_split_event_is_reassembled_delivered_and_answered_200(make_client, gateway, fake_app):
    make_client()
    await wait_for(lambda: gateway.live is not None)
    message_id = await gateway.push(envelope(1) | {"padding": "x" * 500}, parts=3)
    await wait_for(lambda: gateway.responses)
    assert fake_app.received[0]["event"] == {"n": 1} and len(fake_app.received[0]["padding"]) == 500
    answered_id, answer, headers = gateway.responses[0]
    assert answered_id == message_id and answer["code"] == 200 and "biz_rt" in headers


async def test_events_arrive_once_and_in_order_across_a_dropped_connection(make_client, gateway, fake_app, clock,
                                                                          registry):
    make_client()
    await wait_for(lambda: gateway.live is not None)
    for n in range(2):
        await gateway.push(envelope(n))
    await wait_for(lambda: len(gateway.responses) == 2)
    fake_app.fail_next = 1_000
    for n in range(2, 5):
        await gateway.push(envelope(n))
    await wait_for(lambda: fake_app.fail_next < 1_000)
    await gateway.drop()
    fake_app.fail_next = 0
    await advance_until(clock, lambda: len(gateway.connections) == 2 and not gateway.unanswered)
    assert [e["event"]["n"] for e in fake_app.received] == [0, 1, 2, 3, 4]
    assert registry.get_sample_value("imsidecar_events_reconnects_total", {"app": "fs"}) == 1


async def test_honours_reconnect_count_and_gives_up(make_client, gateway, clock):
    gateway.client_config = {"ReconnectCount": 2, "ReconnectInterval": 5, "ReconnectNonce": 0, "PingInterval": 60}
    client = make_client()
    await wait_for(lambda: gateway.live is not None)
    gateway.app_secret = "rotated"       # every reconnect is now refused
    await gateway.drop()
    await advance_until(clock, lambda: client.gave_up)
    assert gateway.endpoint_calls == 3   # the first connection, then exactly ReconnectCount tries


async def test_partial_split_messages_expire(clock):
    joined = Reassembly(ttl=5, clock=clock)
    assert joined.add("m", 2, 0, b"ab") is None
    await clock.advance(6)
    assert joined.add("m", 2, 1, b"cd") is None      # the first half expired; this is a new partial
    assert joined.add("m", 2, 0, b"ab") == b"abcd"
