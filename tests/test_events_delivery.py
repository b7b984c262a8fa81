"""The delivery lane over the event store: in order, deduplicated at admission, retried until `max_age`, then
dead-lettered (never dropped), and a POST under way finishes before the lane stops."""

import asyncio
import random

import pytest

from proxy.events.queue import Admission, Event
from proxy.fakes.events import event_json, wait_for
from tests.events_support import advance_until
from tests.events_support import (  # noqa: F401 (fixtures, used by name)
    any_store, clock, fake_app, make_lane, memory_store, metrics, registry, session, started)


@pytest.fixture
def make_delivery(make_lane):
    return lambda **overrides: make_lane("app1", random.Random(7), **overrides)


def sample(registry, name, **labels):
    return registry.get_sample_value(name, {"app": "app1", **labels}) or 0.0


def event(key, clock, **fields):
    return Event(key, event_json(**fields), (("X-Imsidecar-Event-Type", "im.message.receive_v1"),), clock.wall())


async def test_events_arrive_in_order_with_their_json_and_headers(make_delivery, fake_app, registry, clock):
    lane = make_delivery()
    admissions = [await lane.submit(event(f"e{i}", clock, n=i)) for i in range(5)]
    assert admissions == [Admission.QUEUED] * 5
    await wait_for(lambda: len(fake_app.received) == 5)
    assert [e["n"] for e in fake_app.received] == [0, 1, 2, 3, 4]
    headers = fake_app.seen_headers[0]
    assert headers["X-Imsidecar-Event-Id"] == "e0" and headers["X-Imsidecar-Event-Type"] == "im.message.receive_v1"
    await wait_for(lambda: sample(registry, "imsidecar_events_delivered_total") == 5)
    assert sample(registry, "imsidecar_events_delivery_delay_seconds_count") == 5


async def test_a_failing_application_is_retried_after_backoff_and_the_next_event_waits(make_delivery, fake_app, clock,
                                                                                      registry):
    fake_app.fail_next = 2
    lane = make_delivery(backoff_base=1.0, backoff_cap=4.0)
    await lane.submit(event("a", clock, n=1))
    await lane.submit(event("b", clock, n=2))
    await wait_for(lambda: fake_app.fail_next == 1)
    assert fake_app.received == []
    await advance_until(clock, lambda: len(fake_app.received) == 2, step=0.5, rounds=100)
    assert [e["n"] for e in fake_app.received] == [1, 2]   # the retried head did not let the next one overtake it
    assert sample(registry, "imsidecar_events_delivery_retries_total") == 2
    assert fake_app.seen_headers[0]["X-Imsidecar-Event-Attempt"] == "3"


async def test_a_pushed_again_event_is_stored_once_and_reaches_the_app_once(make_delivery, fake_app, registry, clock):
    lane = make_delivery()
    assert await lane.submit(event("same", clock, n=1)) is Admission.QUEUED
    assert await lane.submit(event("same", clock, n=1)) is Admission.DUPLICATE   # while waiting
    await wait_for(lambda: fake_app.received)
    assert await lane.submit(event("same", clock, n=1)) is Admission.DUPLICATE   # after delivery
    await asyncio.sleep(0.01)
    assert len(fake_app.received) == 1
    assert sample(registry, "imsidecar_events_duplicates_dropped_total") == 2


async def test_dedupe_remembers_past_feishus_last_push_again_then_forgets(make_delivery, fake_app, clock):
    lane = make_delivery(start=False)   # the default TTL, 12 h: Feishu's re-pushes end about 7 h after the first
    await lane.submit(event("k", clock, n=1))
    await clock.advance(15 + 300 + 3600 + 6 * 3600)
    assert await lane.submit(event("k", clock, n=1)) is Admission.DUPLICATE
    await clock.advance(12 * 3600)
    assert await lane.submit(event("k", clock, n=1)) is Admission.QUEUED


async def test_a_full_queue_refuses_so_the_platform_pushes_again(make_delivery, fake_app, registry, clock):
    fake_app.down = True
    lane = make_delivery(queue_size=2, backoff_base=5)
    assert await lane.submit(event("head", clock, n=0)) is Admission.QUEUED
    assert await lane.submit(event("q1", clock, n=1)) is Admission.QUEUED
    refused = await lane.submit(event("q2", clock, n=2))
    assert refused is Admission.FULL and not refused.stored
    assert sample(registry, "imsidecar_events_rejected_total", reason="queue_full") == 1
    assert await lane.submit(event("q2", clock, n=2)) is Admission.FULL   # refused ones are not remembered as seen


async def test_retries_go_on_until_max_age_then_the_event_is_dead_lettered_not_dropped(make_delivery, memory_store,
                                                                                      fake_app, registry, clock):
    fake_app.down = True
    lane = make_delivery(max_age=3600, backoff_base=1, backoff_cap=60)
    await lane.submit(event("old", clock, n=1))
    await advance_until(clock, lambda: clock.now() >= 1800, step=30)
    await lane.submit(event("younger", clock, n=2))
    await advance_until(clock, lambda: sample(registry, "imsidecar_events_dead_lettered_total", reason="expired"),
                        step=30, rounds=200)
    assert 3600 <= clock.now() < 3600 + 60
    attempts = fake_app.started.count({"n": 1})
    assert attempts > 50   # about one POST a minute for an hour, not 8 and done
    dead = await memory_store.dead_letters("app1", 10)
    assert [(d.event.key, d.reason) for d in dead] == [("old", "expired")] and dead[0].attempts == attempts
    fake_app.down = False   # the younger one has half an hour left: it is delivered now
    await advance_until(clock, lambda: fake_app.received, step=30)
    assert fake_app.received == [{"n": 2}]
    assert sample(registry, "imsidecar_events_dropped_total", reason="shutdown") == 0


async def test_an_event_the_app_refuses_is_dead_lettered_and_can_be_replayed(make_delivery, memory_store, fake_app,
                                                                             registry, clock):
    fake_app.fail_next, fake_app.status_when_failing = 1, 400
    lane = make_delivery()
    await lane.submit(event("x", clock, n=1))
    await wait_for(lambda: sample(registry, "imsidecar_events_dead_lettered_total", reason="app_rejected") == 1)
    assert fake_app.received == []
    assert await memory_store.replay("app1", None) == 1
    await wait_for(lambda: fake_app.received == [{"n": 1}])
    assert await memory_store.dead_letters("app1", 10) == []
    assert lane.health.willing()   # a refusal still shows the application is up


async def test_an_application_down_for_60_s_loses_no_acked_event(any_store, make_lane, fake_app, clock, registry):
    """The issue's first failure: with the old 8 attempts, an outage of 15 s lost the head event 68% of the time.
    Now every event the platform was told is stored reaches the application, in order, once — on every backend."""
    lane = make_lane("app1", random.Random(3), store=any_store)   # the default settings: back-off 0.2 s → 30 s
    fake_app.down = True
    for n in range(20):
        assert (await lane.submit(event(f"e{n}", clock, n=n))).stored
        await clock.advance(3)
    await advance_until(clock, lambda: clock.now() >= 60, step=1)
    assert fake_app.received == [] and len(fake_app.started) >= 5
    fake_app.down = False
    await advance_until(clock, lambda: len(fake_app.received) == 20, step=1, rounds=120)
    assert [e["n"] for e in fake_app.received] == list(range(20))
    for _ in range(500):   # the last one is settled just after the application answered it
        if await any_store.depth("app1") == 0:
            break
        await asyncio.sleep(0.002)
    assert await any_store.depth("app1") == 0
    assert sample(registry, "imsidecar_events_dead_lettered_total", reason="expired") == 0


async def test_the_head_age_gauge_and_depth_say_how_far_behind_the_lane_is(make_delivery, fake_app, registry, clock):
    fake_app.down = True
    lane = make_delivery(backoff_base=1, backoff_cap=1)
    await lane.submit(event("a", clock, n=1))
    await lane.submit(event("b", clock, n=2))
    await advance_until(clock, lambda: clock.now() >= 90, step=1)
    assert sample(registry, "imsidecar_events_queue_oldest_seconds") == pytest.approx(90, abs=1)
    assert sample(registry, "imsidecar_events_queue_depth") == 2
    fake_app.down = False
    await advance_until(clock, lambda: len(fake_app.received) == 2)
    await wait_for(lambda: sample(registry, "imsidecar_events_queue_oldest_seconds") == 0)


async def test_closing_lets_a_post_under_way_finish_and_keeps_the_rest_stored(make_lane, memory_store, fake_app,
                                                                             clock, registry):
    fake_app.gate = asyncio.Event()
    lane = make_lane("app1", start=False)
    lane.start()
    for n in range(3):
        await lane.submit(event(f"e{n}", clock, n=n))
    await wait_for(lambda: len(fake_app.started) == 1)
    closing = asyncio.create_task(lane.close())
    await asyncio.sleep(0.01)
    fake_app.gate.set()            # the application answers the POST it was working on
    await closing
    assert fake_app.received == [{"n": 0}]
    assert [q.event.key for q in [await memory_store.head("app1")]] == ["e1"]   # the first was settled, not resent
    assert await memory_store.depth("app1") == 2
