"""The event store's promises on every backend (memory, the SQLite journal, a real Redis): dedupe and store in one
step, the head stays the head until settled or buried, order, dead letters and replay; and on the durable ones,
everything survives the store being closed and opened again (a restart) or abandoned mid-delivery (a crash)."""

from __future__ import annotations

import pytest

from proxy.clock import VirtualClock
from proxy.events.queue import Admission, Event
from proxy.events.redis_stream import RedisEventStore
from tests.events_support import open_store
from tests.events_support import any_store, clock, durable_store  # noqa: F401 (fixtures, used by name)

TTL, LIMIT = 12 * 3600.0, 100


def ev(key: str, clock: VirtualClock, body: bytes = b'{"n": 1}') -> Event:
    return Event(key, body, (("X-Imsidecar-Event-Type", "user_add_org"),), clock.wall())


async def test_admission_dedupes_and_stores_in_one_step(any_store, clock):
    assert await any_store.admit("a", ev("k1", clock), TTL, LIMIT) is Admission.QUEUED
    assert await any_store.admit("a", ev("k1", clock), TTL, LIMIT) is Admission.DUPLICATE
    assert await any_store.admit("b", ev("k1", clock), TTL, LIMIT) is Admission.QUEUED   # keys are per app
    assert await any_store.depth("a") == 1 and await any_store.depth("b") == 1


async def test_the_head_stays_until_settled_and_order_is_kept(any_store, clock):
    for n in range(3):
        await any_store.admit("a", ev(f"k{n}", clock, f'{{"n": {n}}}'.encode()), TTL, LIMIT)
    head = await any_store.head("a")
    assert head is not None and head.event.key == "k0"
    assert head.event.headers == (("X-Imsidecar-Event-Type", "user_add_org"),)
    assert head.event.received_at == clock.wall()
    assert (await any_store.head("a")).id == head.id      # asking again gives the same one
    await any_store.settle("a", head)
    assert [(await any_store.head("a")).event.key] == ["k1"]
    assert await any_store.depth("a") == 2
    assert await any_store.admit("a", ev("k0", clock), TTL, LIMIT) is Admission.DUPLICATE   # delivered, remembered


async def test_a_full_queue_refuses_and_remembers_nothing(any_store, clock):
    for n in range(2):
        await any_store.admit("a", ev(f"k{n}", clock), TTL, 2)
    assert await any_store.admit("a", ev("k2", clock), TTL, 2) is Admission.FULL
    await any_store.settle("a", await any_store.head("a"))
    assert await any_store.admit("a", ev("k2", clock), TTL, 2) is Admission.QUEUED


async def test_dead_letters_are_listed_and_replayed_at_the_tail(any_store, clock):
    for key in ("dead", "live"):
        await any_store.admit("a", ev(key, clock), TTL, LIMIT)
    await any_store.bury("a", await any_store.head("a"), "expired", 7)
    [letter] = await any_store.dead_letters("a", 10)
    assert (letter.event.key, letter.reason, letter.attempts, letter.app) == ("dead", "expired", 7, "a")
    assert letter.event.body == b'{"n": 1}' and letter.died_at == clock.wall()
    await clock.advance(60)
    assert await any_store.replay("a", [letter.id]) == 1
    assert await any_store.dead_letters("a", 10) == []
    keys = []
    while (head := await any_store.head("a")) is not None:
        keys.append((head.event.key, head.event.received_at))
        await any_store.settle("a", head)
    assert keys == [("live", clock.wall() - 60), ("dead", clock.wall())]   # replayed as if just received


async def test_replay_of_unknown_ids_does_nothing(any_store, clock):
    assert await any_store.replay("a", ["1-0", "999"]) == 0
    assert await any_store.replay("a", None) == 0


async def test_burying_twice_or_settling_a_buried_event_changes_nothing(any_store, clock):
    await any_store.admit("a", ev("k", clock), TTL, LIMIT)
    head = await any_store.head("a")
    await any_store.bury("a", head, "app_rejected", 1)
    await any_store.bury("a", head, "app_rejected", 1)
    await any_store.settle("a", head)
    assert len(await any_store.dead_letters("a", 10)) == 1 and await any_store.depth("a") == 0


async def test_a_body_that_is_not_utf8_survives(any_store, clock):
    await any_store.admit("a", ev("k", clock, b'\xff{"n": 1}'), TTL, LIMIT)
    assert (await any_store.head("a")).event.body == b'\xff{"n": 1}'


@pytest.mark.parametrize("kind", ["journal", "redis"])
async def test_what_is_queued_dedupe_and_dead_letters_survive_a_restart(kind, tmp_path):
    clock = VirtualClock()
    async with open_store(kind, clock, tmp_path, **({"owner": "pod-a"} if kind == "redis" else {})) as first:
        for n in range(3):
            await first.admit("a", ev(f"k{n}", clock), TTL, LIMIT)
        await first.bury("a", await first.head("a"), "expired", 3)
        if kind == "redis":
            # the same Redis, a new process: reopen against the server the first store used
            again = RedisEventStore(first.settings, clock, 100, owner="pod-b")
            await again.start()
        else:
            await first.close()
            from proxy.events.journal import Journal
            again = Journal(str(tmp_path / "events.db"), clock, 100)
            await again.start()
        try:
            assert (await again.head("a")).event.key == "k1"
            assert await again.admit("a", ev("k0", clock), TTL, LIMIT) is Admission.DUPLICATE
            assert [d.event.key for d in await again.dead_letters("a", 10)] == ["k0"]
            assert await again.depth("a") == 2
        finally:
            await again.close()
            if kind == "journal":
                await first.start()   # so the fixture's close has something to close


async def test_an_entry_a_crashed_owner_left_pending_is_delivered_first_by_the_next(tmp_path):
    clock = VirtualClock()
    async with open_store("redis", clock, tmp_path, owner="pod-a") as crashed:
        for n in range(3):
            await crashed.admit("a", ev(f"k{n}", clock), TTL, LIMIT)
        taken = await crashed.head("a")          # pod-a was delivering k0 when it was killed: no settle, no close
        successor = RedisEventStore(crashed.settings, clock, 100, owner="pod-b")
        await successor.start()
        try:
            head = await successor.head("a")
            assert head.id == taken.id and head.event.key == "k0"
            await successor.settle("a", head)
            assert (await successor.head("a")).event.key == "k1"
            await crashed.settle("a", taken)      # a late settle from the old owner is harmless
            assert await successor.depth("a") == 2
        finally:
            await successor.close()


async def test_redis_leases_give_each_slot_to_one_owner_and_see_who_stands_by(tmp_path):
    clock = VirtualClock()
    async with open_store("redis", clock, tmp_path, owner="pod-a", lease_ttl=5.0) as a:
        b = RedisEventStore(a.settings, clock, 100, owner="pod-b", lease_ttl=5.0)
        c = RedisEventStore(a.settings, clock, 100, owner="pod-c", lease_ttl=5.0)
        try:
            la, lb, lc = (s.lease("app", "connection", 2) for s in (a, b, c))
            assert await la.acquire() and await lb.acquire() and not await lc.acquire()   # two slots
            assert not await la.others_waiting()
            await lc.announce(True)
            assert await la.others_waiting() and await la.renew()
            await la.release()
            assert not await la.renew()
            assert await lc.acquire()
            await lc.announce(False)
            assert not await lb.others_waiting()
        finally:
            await b.close()
            await c.close()
