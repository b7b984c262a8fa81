"""Single flight for reads: identical concurrent reads share one call; anything that differs does not."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given, settings, strategies as st

from proxy.errors import DeadlineExceeded
from proxy.saving.coalesce import Coalescer
from proxy.saving.reads import ReadRoutes, read_key
from tests.saving_support import guard, DING_APP, FakeCall, app_config, binding, body, exchange, savings_metrics

USER = "/open-apis/contact/v3/users/ou_7d8a6e6df7621556"


def coalescer(*apps):  # type: ignore[no-untyped-def]
    metrics, registry = savings_metrics()
    stage = Coalescer({a.name: a.coalesce for a in apps}, ReadRoutes({a.name: a.cache for a in apps}), metrics,
                      guard(registry))
    return stage, registry


def gated() -> tuple[FakeCall, asyncio.Event]:
    """A platform call that waits until the test opens the gate, so every request overlaps."""
    gate = asyncio.Event()
    return FakeCall(delay=gate.wait), gate


async def test_identical_concurrent_gets_make_one_call_whose_answer_all_get() -> None:
    app = app_config()
    stage, registry = coalescer(app)
    call, gate = gated()
    readers = [exchange(binding(app), "GET", USER, "user_id_type=open_id") for _ in range(20)]
    tasks = [asyncio.ensure_future(stage.through(e, body(), call)) for e in readers]
    await asyncio.sleep(0)
    gate.set()
    answers = await asyncio.gather(*tasks)
    assert call.calls == 1
    assert len({id(a) for a in answers}) == 1 and json.loads(answers[0].body)["code"] == 0
    assert [e.marks.get("X-Imsidecar-Coalesced") for e in readers] == [None] + ["read"] * 19
    assert registry.get_sample_value("imsidecar_coalesced_requests_total",
                                     {"app": "bot", "route": readers[0].route, "kind": "read"}) == 19
    assert len(stage) == 0   # the flight is over: the next read asks again
    await stage.through(exchange(binding(app), "GET", USER, "user_id_type=open_id"), body(), call)
    assert call.calls == 2


@pytest.mark.parametrize("other", [
    dict(query="user_id_type=union_id"),                               # another query
    dict(path="/open-apis/contact/v3/users/ou_8e9b7f7ea8732667"),     # another path
    dict(headers={"Authorization": "Bearer u-another-user"}, token_kind=None),   # a user's own token
    dict(headers={"Accept-Encoding": "gzip"}),                        # an answer in another encoding
    dict(method="POST"),                                              # a write, never shared
])
async def test_reads_that_differ_in_anything_that_matters_are_not_shared(other: dict) -> None:
    app = app_config()
    stage, _ = coalescer(app)
    call, gate = gated()
    first = exchange(binding(app), "GET", USER, "user_id_type=open_id")
    second = exchange(binding(app), other.get("method", "GET"), other.get("path", USER),
                      other.get("query", "user_id_type=open_id"), other.get("headers"), other.get("token_kind", "tenant"))
    tasks = [asyncio.ensure_future(stage.through(e, body(), call)) for e in (first, second)]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*tasks)
    assert call.calls == 2


async def test_two_users_tokens_never_share_and_the_key_holds_no_token() -> None:
    app = app_config()
    alice = exchange(binding(app), "GET", USER, headers={"Authorization": "Bearer u-alice-secret"}, token_kind=None)
    bob = exchange(binding(app), "GET", USER, headers={"Authorization": "Bearer u-bob-secret"}, token_kind=None)
    keys = read_key(alice, body()), read_key(bob, body())
    assert None not in keys and keys[0] != keys[1]
    assert all("secret" not in key for key in keys if key)
    unknown = exchange(binding(app), "GET", USER, token_kind=None)   # no identity can be told: nothing shared
    assert read_key(unknown, body()) is None


async def test_a_leader_that_vanishes_leaves_the_answer_to_the_others() -> None:
    app = app_config()
    stage, _ = coalescer(app)
    call, gate = gated()
    leader = asyncio.ensure_future(stage.through(exchange(binding(app), "GET", USER), body(), call))
    await asyncio.sleep(0)
    follower = asyncio.ensure_future(stage.through(exchange(binding(app), "GET", USER), body(), call))
    await asyncio.sleep(0)
    leader.cancel()   # its client hung up
    gate.set()
    answer = await follower
    assert json.loads(answer.body)["code"] == 0 and call.calls == 1
    with pytest.raises(asyncio.CancelledError):
        await leader


async def test_a_failure_is_shared_like_an_answer() -> None:
    app = app_config()
    stage, _ = coalescer(app)

    def fail(e, b):  # type: ignore[no-untyped-def]
        raise DeadlineExceeded("no answer")

    gate = asyncio.Event()
    call = FakeCall(answer=fail, delay=gate.wait)
    tasks = [asyncio.ensure_future(stage.through(exchange(binding(app), "GET", USER), body(), call)) for _ in range(3)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert call.calls == 1 and all(isinstance(r, DeadlineExceeded) for r in results)


async def test_an_interactive_read_never_waits_on_a_bulk_flight_but_bulk_may_join_an_interactive_one() -> None:
    app = app_config()
    stage, _ = coalescer(app)
    call, gate = gated()

    def read(lane: str):  # type: ignore[no-untyped-def]
        e = exchange(binding(app), "GET", USER)
        e.priority = lane
        return e

    readers = [read("bulk"), read("interactive"), read("bulk"), read("interactive")]
    tasks = []
    for e in readers:
        tasks.append(asyncio.ensure_future(stage.through(e, body(), call)))
        await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*tasks)
    # The sync's read leads; the reply's read does not wait behind it and leads its own flight, which the later
    # bulk and interactive reads join.
    assert call.calls == 2
    assert [e.marks.get("X-Imsidecar-Coalesced") for e in readers] == [None, None, "read", "read"]


async def test_no_cache_starts_a_flight_of_its_own() -> None:
    app = app_config()
    stage, _ = coalescer(app)
    call, gate = gated()
    plain = exchange(binding(app), "GET", USER)
    fresh = exchange(binding(app), "GET", USER, headers={"Cache-Control": "no-cache"})
    tasks = [asyncio.ensure_future(stage.through(e, body(), call)) for e in (plain, fresh)]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*tasks)
    assert call.calls == 2


async def test_dingtalk_post_reads_are_shared_only_where_the_cache_is_on() -> None:
    off, on = app_config(DING_APP), app_config(DING_APP, "cache: {}")
    for app, expected in ((off, 2), (on, 1)):
        stage, _ = coalescer(app)
        call, gate = gated()
        reads = [exchange(binding(app, "oapi"), "POST", "/topapi/v2/user/get", token_kind="app") for _ in range(2)]
        tasks = [asyncio.ensure_future(stage.through(e, body({"userid": "manager001"}), call)) for e in reads]
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(*tasks)
        assert call.calls == expected


async def test_disabled_coalescing_calls_for_every_read() -> None:
    app = app_config(sections="coalesce: {enabled: false}")
    stage, _ = coalescer(app)
    call, gate = gated()
    tasks = [asyncio.ensure_future(stage.through(exchange(binding(app), "GET", USER), body(), call)) for _ in range(3)]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*tasks)
    assert call.calls == 3


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["ou_1234561", "ou_1234562", "ou_1234563"]),
                          st.sampled_from(["tenant", "user-a", "user-b"])), min_size=1, max_size=30))
def test_concurrent_reads_make_one_call_per_distinct_read(reads: list[tuple[str, str]]) -> None:
    async def run() -> None:
        app = app_config()
        stage, _ = coalescer(app)
        call, gate = gated()

        def make(user: str, who: str):  # type: ignore[no-untyped-def]
            if who == "tenant":
                return exchange(binding(app), "GET", f"/open-apis/contact/v3/users/{user}")
            return exchange(binding(app), "GET", f"/open-apis/contact/v3/users/{user}",
                            headers={"Authorization": f"Bearer u-{who}"}, token_kind=None)

        tasks = [asyncio.ensure_future(stage.through(make(*r), body(), call)) for r in reads]
        await asyncio.sleep(0)
        gate.set()
        answers = await asyncio.gather(*tasks)
        assert call.calls == len(set(reads)) and all(a.status == 200 for a in answers)

    asyncio.run(run())
