import asyncio
import random

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from proxy.clock import VirtualClock
from proxy.events.delivery import Admission, Delivery, Event
from proxy.events.metrics import EventMetrics
from proxy.events.settings import DeliverySettings
from proxy.fakes.events import FakeApplication, event_json, wait_for


@pytest.fixture
def clock():
    return VirtualClock()


@pytest.fixture
def registry():
    return CollectorRegistry()


@pytest.fixture
async def fake_app(aiohttp_server):
    fake = FakeApplication()
    server = await aiohttp_server(fake.app())
    fake.url = str(server.make_url("/events"))
    return fake


@pytest.fixture
async def make_delivery(fake_app, clock, registry):
    lanes = []
    session = aiohttp.ClientSession()

    def make(**overrides):
        settings = DeliverySettings(url=fake_app.url, **overrides)
        lane = Delivery("app1", settings, session, EventMetrics(registry), clock, random.Random(7))
        lane.start()
        lanes.append(lane)
        return lane

    yield make
    for lane in lanes:
        await lane.close()
    await session.close()


async def advance_until(clock, condition, step=0.5, rounds=100):
    for _ in range(rounds):
        if condition():
            return
        await clock.advance(step)
        await asyncio.sleep(0.001)
    raise AssertionError("not reached in virtual time")


def sample(registry, name, **labels):
    return registry.get_sample_value(name, {"app": "app1", **labels}) or 0.0


async def test_events_arrive_in_order_with_their_json(make_delivery, fake_app, registry):
    lane = make_delivery()
    tickets = [lane.submit(Event(f"e{i}", event_json(n=i))) for i in range(5)]
    assert all(t.admission is Admission.QUEUED for t in tickets)
    assert await asyncio.gather(*(t.delivered for t in tickets)) == [True] * 5
    assert [e["n"] for e in fake_app.received] == [0, 1, 2, 3, 4]
    assert fake_app.seen_headers[0]["X-Imsidecar-Event-Id"] == "e0"
    assert sample(registry, "imsidecar_events_delivered_total") == 5


async def test_a_failing_application_is_retried_after_backoff_in_virtual_time(make_delivery, fake_app, clock, registry):
    fake_app.fail_next = 2
    lane = make_delivery(backoff_base=1.0, backoff_cap=4.0)
    first, second = lane.submit(Event("a", event_json(n=1))), lane.submit(Event("b", event_json(n=2)))
    await wait_for(lambda: clock.sleepers == 1)
    assert fake_app.fail_next == 1 and fake_app.received == [] and not first.delivered.done()
    await advance_until(clock, lambda: second.delivered.done())
    assert await first.delivered and await second.delivered
    assert [e["n"] for e in fake_app.received] == [1, 2]   # the retried head did not let the next one overtake it
    assert sample(registry, "imsidecar_events_delivery_retries_total") == 2


async def test_a_redelivered_event_reaches_the_app_once(make_delivery, fake_app, registry):
    lane = make_delivery()
    first = lane.submit(Event("same", event_json(n=1)))
    while_waiting = lane.submit(Event("same", event_json(n=1)))
    assert while_waiting.admission is Admission.DUPLICATE
    assert await first.delivered and await while_waiting.delivered
    later = lane.submit(Event("same", event_json(n=1)))
    assert later.admission is Admission.DUPLICATE and await later.delivered
    assert len(fake_app.received) == 1
    assert sample(registry, "imsidecar_events_duplicates_dropped_total") == 2


async def test_dedupe_forgets_after_its_ttl(make_delivery, fake_app, clock):
    lane = make_delivery(dedupe_ttl=60)
    assert await lane.submit(Event("k", event_json(n=1))).delivered
    await clock.advance(61)
    assert lane.submit(Event("k", event_json(n=1))).admission is Admission.QUEUED


async def test_a_full_queue_refuses_so_the_platform_redelivers(make_delivery, fake_app, registry, clock):
    fake_app.fail_next = 100          # the head is stuck in back-off, the queue fills behind it
    lane = make_delivery(queue_size=2, backoff_base=5)
    lane.submit(Event("head", event_json(n=0)))
    await wait_for(lambda: fake_app.fail_next == 99)
    assert lane.submit(Event("q1", event_json(n=1))).accepted
    assert lane.submit(Event("q2", event_json(n=2))).accepted
    refused = lane.submit(Event("q3", event_json(n=3)))
    assert refused.admission is Admission.FULL and not refused.accepted
    assert sample(registry, "imsidecar_events_rejected_total", reason="queue_full") == 1


async def test_an_event_the_app_refuses_is_dropped_and_may_come_again(make_delivery, fake_app, registry):
    fake_app.fail_next, fake_app.status_when_failing = 1, 400
    lane = make_delivery()
    assert await lane.submit(Event("x", event_json(n=1))).delivered is False
    assert sample(registry, "imsidecar_events_dropped_total", reason="app_rejected") == 1
    # Not remembered as delivered: a long connection's redelivery is tried again.
    assert await lane.submit(Event("x", event_json(n=1))).delivered is True


async def test_gives_up_after_max_attempts(make_delivery, fake_app, registry, clock):
    fake_app.fail_next = 100
    lane = make_delivery(max_attempts=3, backoff_base=1, backoff_cap=1)
    ticket = lane.submit(Event("x", event_json(n=1)))
    for _ in range(3):
        await wait_for(lambda: clock.sleepers == 1 or ticket.delivered.done())
        await clock.advance(1)
    assert await ticket.delivered is False
    assert fake_app.fail_next == 97
    assert sample(registry, "imsidecar_events_dropped_total", reason="attempts_exhausted") == 1
