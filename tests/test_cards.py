"""Latest-wins card updates in virtual time: merged within the interval, answered with the replacing update's answer,
in order per card, append and partial updates never skipped, a final frame never replaced, nothing lost after it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from proxy.clock import VirtualClock, settle
from proxy.errors import DeadlineExceeded
from proxy.saving.cards import CardMerger
from tests.saving_support import guard, DING_APP, FakeCall, app_config, binding, body, exchange, json_answer, savings_metrics

MESSAGE = "/open-apis/im/v1/messages/om_dc13264520392913"
CONTENT = "/open-apis/cardkit/v1/cards/7355439197428236291/elements/{}/content"


class Platform:
    """Takes 50 ms per update and answers with the update it applied, so a test can see which one was sent."""

    def __init__(self, clock: VirtualClock, latency: float = 0.05) -> None:
        self.clock, self.latency = clock, latency
        self.sent: list[tuple[float, str, Any]] = []   # (when, path, body)
        self.fail: Exception | None = None
        self.call = FakeCall(answer=self.answer, delay=lambda: clock.sleep(latency))

    def answer(self, e, b):  # type: ignore[no-untyped-def]
        if self.fail is not None:
            raise self.fail
        update = json.loads(b.data)
        self.sent.append((self.clock.now() - self.latency, e.path, update))
        return json_answer({"code": 0, "msg": "success", "data": {"applied": update}})


def merger(app):  # type: ignore[no-untyped-def]
    metrics, registry = savings_metrics()
    return CardMerger({app.name: app.cards}, VirtualClock(), metrics, guard(registry)), registry


async def update(stage, app, platform, path: str, payload: dict, method: str = "PATCH", upstream=None):  # type: ignore[no-untyped-def]
    e = exchange(binding(app, upstream), method, path, token_kind="tenant")
    task = asyncio.ensure_future(stage.through(e, body(payload), platform.call))
    await settle()
    return e, task


def applied(answer) -> Any:  # type: ignore[no-untyped-def]
    return json.loads(answer.body)["data"]["applied"]


async def test_updates_closer_than_the_interval_are_merged_into_the_newest() -> None:
    app = app_config(sections="cards: {interval: 500ms}")
    stage, registry = merger(app)
    clock = stage._clock
    platform = Platform(clock)
    first = await update(stage, app, platform, MESSAGE, {"content": "1"})
    later = [await update(stage, app, platform, MESSAGE, {"content": str(n)}) for n in range(2, 6)]
    await clock.advance(1.0)
    answers = [await task for _, task in [first, *later]]
    assert [b["content"] for _, _, b in platform.sent] == ["1", "5"]
    assert [applied(a)["content"] for a in answers] == ["1", "5", "5", "5", "5"]
    assert [e.marks.get("X-Imsidecar-Coalesced") for e, _ in [first, *later]] == [None, "superseded", "superseded",
                                                                                  "superseded", None]
    assert [when for when, _, _ in platform.sent] == [0.0, 0.5]   # at most one update of the card per interval
    assert registry.get_sample_value("imsidecar_coalesced_requests_total", {
        "app": "bot", "route": "/open-apis/im/v1/messages/:message_id", "kind": "card"}) == 3
    assert len(stage) == 0   # the card's line is gone once quiet for an interval


async def test_order_is_kept_per_card_and_only_the_tail_is_replaced() -> None:
    app = app_config()
    stage, _ = merger(app)
    platform = Platform(stage._clock)
    sends = [await update(stage, app, platform, CONTENT.format(element), {"content": text, "sequence": n}, "PUT")
             for n, (element, text) in enumerate([("a", "A1"), ("b", "B1"), ("a", "A2"), ("a", "A3"), ("b", "B2")], 1)]
    await stage._clock.advance(5)
    await asyncio.gather(*(task for _, task in sends))
    # A1 goes at once; B1 waits; A2 follows B1 (so it is not merged into A1 out of order); A3 replaces A2.
    assert [b["content"] for _, _, b in platform.sent] == ["A1", "B1", "A3", "B2"]
    sequences = [b["sequence"] for _, _, b in platform.sent]
    assert sequences == sorted(sequences)   # cardkit's rule: every operation on a card has a greater sequence


async def test_appends_and_partial_updates_are_never_skipped() -> None:
    app = app_config(DING_APP)
    stage, _ = merger(app)
    platform = Platform(stage._clock)
    frames = [{"outTrackId": "card-1", "guid": f"g{n}", "key": "content", "content": f"part{n} ", "isFull": False}
              for n in range(4)]
    frames.append({"outTrackId": "card-1", "cardData": {"cardParamMap": {"a": "1"}},
                   "cardUpdateOptions": {"updateCardDataByKey": True}})
    frames.append({"outTrackId": "card-1", "cardData": {"cardParamMap": {"b": "2"}},
                   "cardUpdateOptions": {"updateCardDataByKey": True}})
    sends = []
    for frame in frames:
        path = "/v1.0/card/streaming" if "key" in frame else "/v1.0/card/instances"
        sends.append(await update(stage, app, platform, path, frame, "PUT", "api"))
    await stage._clock.advance(10)
    await asyncio.gather(*(task for _, task in sends))
    assert [b for _, _, b in platform.sent] == frames


async def test_the_final_frame_is_never_replaced_and_what_follows_it_is_sent() -> None:
    app = app_config(DING_APP)
    stage, _ = merger(app)
    platform = Platform(stage._clock)

    def frame(text: str, **flags: bool) -> dict:
        return {"outTrackId": "card-9", "guid": text, "key": "content", "content": text, "isFull": True, **flags}

    sends = [await update(stage, app, platform, "/v1.0/card/streaming", f, "PUT", "api")
             for f in (frame("a"), frame("ab"), frame("abc", isFinalize=True), frame("abc (edited)"))]
    await stage._clock.advance(5)
    answers = [await task for _, task in sends]
    # "ab" is replaced by the final frame; the final frame is not replaced by the edit that came after it.
    assert [b["content"] for _, _, b in platform.sent] == ["a", "abc", "abc (edited)"]
    assert [applied(a)["content"] for a in answers] == ["a", "abc", "abc", "abc (edited)"]


async def test_cards_do_not_wait_for_each_other() -> None:
    app = app_config()
    stage, _ = merger(app)
    platform = Platform(stage._clock)
    sends = [await update(stage, app, platform, f"/open-apis/im/v1/messages/om_00000{n}00000", {"content": "x"})
             for n in range(5)]
    await stage._clock.advance(0.06)
    assert all(task.done() for _, task in sends) and len(platform.sent) == 5


async def test_a_failed_update_fails_every_request_it_answers() -> None:
    app = app_config()
    stage, _ = merger(app)
    platform = Platform(stage._clock)
    first = await update(stage, app, platform, MESSAGE, {"content": "1"})
    await stage._clock.advance(0.06)   # the first one is answered
    platform.fail = DeadlineExceeded("no answer")
    merged = [await update(stage, app, platform, MESSAGE, {"content": str(n)}) for n in (2, 3)]
    await stage._clock.advance(2)
    assert applied(await first[1])["content"] == "1"
    for _, task in merged:
        with pytest.raises(DeadlineExceeded):
            await task


async def test_a_client_that_vanishes_leaves_its_update_in_line() -> None:
    app = app_config()
    stage, _ = merger(app)
    platform = Platform(stage._clock)
    first = await update(stage, app, platform, MESSAGE, {"content": "1"})
    second = await update(stage, app, platform, MESSAGE, {"content": "2"})
    second[1].cancel()   # the newest update's client hung up: the card must still end up showing it
    await stage._clock.advance(2)
    await first[1]
    assert [b["content"] for _, _, b in platform.sent] == ["1", "2"]


async def test_other_requests_pass_straight_through() -> None:
    app = app_config(sections="cards: {enabled: false}")
    stage, _ = merger(app)
    platform = Platform(stage._clock)
    sends = [await update(stage, app, platform, MESSAGE, {"content": str(n)}) for n in range(3)]
    await stage._clock.advance(0.06)
    assert len(platform.sent) == 3 and all(task.done() for _, task in sends)


# A random run: updates of two cards (full-replace keys, appends, finals) at random moments. Whatever is merged, each
# card ends as if every update had been applied in order, every request is answered, a card's sends keep their order
# and interval, and a card's last update is always sent.
UPDATE = st.tuples(st.sampled_from(["c1", "c2"]), st.sampled_from(["x", "y", "append", "final"]),
                   st.floats(min_value=0, max_value=0.4))


@settings(max_examples=60, deadline=None)
@given(st.lists(UPDATE, min_size=1, max_size=25))
def test_any_run_of_updates_ends_in_the_state_sending_them_all_would(run: list[tuple[str, str, float]]) -> None:
    async def play() -> None:
        app = app_config(DING_APP, "cards: {interval: 300ms}")
        stage, _ = merger(app)
        platform = Platform(stage._clock, latency=0.02)
        sends, expected = [], {"c1": {}, "c2": {}}
        for n, (card, kind, pause) in enumerate(run):
            key = "y" if kind == "y" else "x"
            frame = {"outTrackId": card, "guid": f"g{n}", "key": key, "content": f"{n};", "isFull": kind != "append",
                     "isFinalize": kind == "final"}
            shown = expected[card]
            shown[key] = frame["content"] if frame["isFull"] else shown.get(key, "") + frame["content"]
            sends.append(await update(stage, app, platform, "/v1.0/card/streaming", frame, "PUT", "api"))
            await stage._clock.advance(pause)
        await stage._clock.advance(60)
        assert all(task.done() and task.result().status == 200 for _, task in sends)
        for card in ("c1", "c2"):
            frames = [(when, b) for when, _, b in platform.sent if b["outTrackId"] == card]
            state: dict[str, str] = {}
            for _, b in frames:
                state[b["key"]] = b["content"] if b["isFull"] else state.get(b["key"], "") + b["content"]
            assert state == expected[card]
            guids = [int(b["guid"][1:]) for _, b in frames]
            assert guids == sorted(guids)
            assert all(b - a >= 0.3 - 1e-9 for (a, _), (b, _) in zip(frames, frames[1:]))
            last = max((n for n, (c, _, _) in enumerate(run) if c == card), default=None)
            assert last is None or guids[-1] == last

    asyncio.run(play())
