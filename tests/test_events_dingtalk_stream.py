import asyncio
import json
import random

import pytest

from proxy.events.dingtalk_stream import DingTalkStream
from proxy.events.settings import DingTalkEvents, Secret, StreamSettings
from proxy.fakes.events import FakeDingTalkGateway, wait_for
from tests.events_support import advance_until, serve
from tests.events_support import (  # noqa: F401 (fixtures, used by name)
    clock, fake_app, make_lane, metrics, registry, session, started)


@pytest.fixture
async def gateway(aiohttp_server):
    fake = FakeDingTalkGateway("dingapp", "s3cret")
    fake.api = await serve(aiohttp_server, fake.app())
    return fake


@pytest.fixture
async def stream(gateway, make_lane, session, metrics, clock, started):
    lane = make_lane("dt", random.Random(1), backoff_base=1)
    settings = DingTalkEvents(app_key="dingapp", app_secret=Secret("s3cret"), api=gateway.api)
    client = started(DingTalkStream("dt", settings, StreamSettings(), lane, session, metrics, clock,
                                    random.Random(2)))
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


async def test_event_is_acked_only_after_the_application_accepted_it(stream, gateway, fake_app, clock):
    fake_app.fail_next = 1
    await gateway.push({"title": "new"})
    await wait_for(lambda: fake_app.fail_next == 0)
    assert gateway.acks == [] and len(gateway.unacked) == 1       # application failed once: no ACK yet
    await advance_until(clock, lambda: gateway.acks, rounds=21)
    assert json.loads(gateway.acks[0]["data"]) == {"status": "SUCCESS"}
    assert fake_app.received == [{"title": "new"}] and gateway.unacked == {}


async def test_every_event_arrives_once_and_in_order_across_a_dropped_connection(stream, gateway, fake_app, clock,
                                                                                 registry):
    for n in range(3):
        await gateway.push({"n": n})
    await wait_for(lambda: len(fake_app.received) == 3 and not gateway.unacked)
    fake_app.fail_next = 1_000                  # the app stalls: the next events stay unacked …
    for n in range(3, 6):
        await gateway.push({"n": n})
    await wait_for(lambda: fake_app.fail_next < 1_000)
    opened = gateway.opened
    await gateway.drop()                        # … when the connection breaks
    await wait_for(lambda: metric(registry, "imsidecar_events_connection_up") == 0)
    fake_app.fail_next = 0
    await reconnect(gateway, clock, opened)     # the gateway redelivers 3, 4, 5 on the new connection
    await advance_until(clock, lambda: not gateway.unacked, rounds=101)
    assert [e["n"] for e in fake_app.received] == [0, 1, 2, 3, 4, 5]
    assert gateway.unacked == {}
    assert metric(registry, "imsidecar_events_duplicates_dropped_total") == 3
    assert metric(registry, "imsidecar_events_reconnects_total") == 1


async def test_system_disconnect_moves_to_a_new_connection(stream, gateway, fake_app, clock):
    opened = gateway.opened
    await gateway.disconnect()
    await reconnect(gateway, clock, opened)
    await gateway.push({"after": True})
    await wait_for(lambda: fake_app.received == [{"after": True}])


async def test_a_callback_refused_by_the_application_stays_unacked(stream, gateway, fake_app):
    fake_app.fail_next, fake_app.status_when_failing = 1, 400
    await gateway.push({"text": "hi"}, kind="CALLBACK", topic="/v1.0/im/bot/messages/get")
    await wait_for(lambda: fake_app.fail_next == 0)
    await asyncio.sleep(0.005)
    assert gateway.acks == [] and len(gateway.unacked) == 1


async def test_wrong_credentials_back_off_and_retry_without_crashing(gateway, make_lane, session, metrics, clock,
                                                                    registry):
    lane = make_lane("dt", start=False)
    settings = DingTalkEvents(app_key="dingapp", app_secret=Secret("wrong"), api=gateway.api)
    client = DingTalkStream("dt", settings, StreamSettings(reconnect_base=1, reconnect_cap=8), lane, session,
                            metrics, clock, random.Random(3))
    client.start()
    try:
        for _ in range(30):
            await clock.advance(1)
            await asyncio.sleep(0.001)
        assert metric(registry, "imsidecar_events_reconnects_total") >= 3
        assert gateway.live is None and client._task is not None and not client._task.done()
    finally:
        await client.close()
