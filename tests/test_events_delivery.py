import asyncio
import random

import pytest

from proxy.events.delivery import Admission, Event
from proxy.fakes.events import event_json, wait_for
from tests.events_support import advance_until
from tests.events_support import (  # noqa: F401 (fixtures, used by name)
    clock, fake_app, make_lane, metrics, registry, session, started)


@pytest.fixture
def make_delivery(make_lane):
    return lambda **overrides: make_lane("app1", random.Random(7), **overrides)


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
    await advance_until(clock, lambda: second.delivered.done(), step=0.5, rounds=100)
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
