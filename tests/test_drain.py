"""SIGTERM's drain, in virtual time: waits end with the last real answer, the drain's end answers what is left,
and the whole stop takes `limits.drain_timeout`, not aiohttp's shutdown timeout twice over."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable

import aiohttp
import pytest

from proxy.clock import Clock, VirtualClock
from proxy.drain import Drain
from tests.conftest import Platforms, Running, SidecarFactory

MESSAGE = {"receive_id": "oc_1", "msg_type": "text", "content": json.dumps({"text": "hi"})}
MESSAGES = "/sales-bot/open-apis/im/v1/messages?receive_id_type=chat_id"
BOUND = 5.0   # real seconds any of these steps may take before the test calls it wedged


@pytest.fixture
def clock() -> Clock:
    return VirtualClock()


async def until(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(BOUND / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never: {what}")


async def held_at_the_platform(start_sidecar: SidecarFactory, fake: Any, app: str,
                               send: Callable[[Running], Awaitable[Any]]) -> tuple[Running, asyncio.Task[Any]]:
    """A sidecar with a 4 s drain, and one request (`send`) that the platform (`fake`) holds longer than this test
    may take."""
    running = await start_sidecar(limits="{deadline: 60s, drain_timeout: 4s}", retry="{per_try_timeout: 30s}")
    await until(lambda: running.sidecar.tokens[app].default.current() is not None, "a token")
    fake.faults.hang_seconds = 3 * BOUND
    fake.faults.script.append("hang")
    request = asyncio.create_task(send(running))
    await until(lambda: running.sidecar.drain._in_flight, "the request in flight")
    return running, request


async def draining(running: Running) -> asyncio.Task[None]:
    """SIGTERM's stop, once the drain is waiting for what is in flight."""
    stop = asyncio.create_task(running.sidecar.stop())
    await until(lambda: running.sidecar.drain._idle is not None, "the drain waiting for in-flight work")
    return stop


async def post(http: aiohttp.ClientSession, running: Running) -> tuple[int, dict[str, str], dict]:  # type: ignore[type-arg]
    async with http.post(running.base + MESSAGES, json=MESSAGE) as r:
        return r.status, dict(r.headers), await r.json()


async def test_a_request_in_back_off_is_answered_with_its_last_real_answer(
        start_sidecar: SidecarFactory, platforms: Platforms, clock: VirtualClock,
        http: aiohttp.ClientSession) -> None:
    running = await start_sidecar(limits="{deadline: 60s, drain_timeout: 15s}")
    await until(lambda: running.sidecar.tokens["sales-bot"].default.current() is not None, "a token")
    platforms.feishu.faults.script.append("throttle")   # 429, "come back in 1 s": the retry waits in back-off
    request = asyncio.create_task(post(http, running))
    await until(lambda: platforms.feishu.throttled == 1 and running.sidecar.drain._waiting, "the back-off")
    stop = asyncio.create_task(running.sidecar.stop())
    status, headers, body = await asyncio.wait_for(request, BOUND)
    assert status == 429 and body["code"] == 99991400 and headers["X-Imsidecar-Attempts"] == "1"
    await asyncio.wait_for(stop, BOUND)
    assert clock.now() < 1.0   # nobody had to wait for the back-off (or anything else) to run out
    assert platforms.feishu.messages == []


async def test_a_request_queued_for_a_rate_limit_slot_is_answered_at_once(
        start_sidecar: SidecarFactory, platforms: Platforms, clock: VirtualClock,
        http: aiohttp.ClientSession) -> None:
    running = await start_sidecar(limits="{deadline: 60s}", ratelimit="{per_minute: 1}")
    await until(lambda: running.sidecar.tokens["sales-bot"].default.current() is not None, "a token")
    assert (await post(http, running))[0] == 200
    queued = asyncio.create_task(post(http, running))   # the next slot is a minute away
    await until(lambda: running.sidecar.drain._waiting, "the queue")
    stop = asyncio.create_task(running.sidecar.stop())
    status, headers, body = await asyncio.wait_for(queued, BOUND)
    assert status == 503 and headers["X-Imsidecar-Error"] == "ShuttingDown" and headers["Retry-After"] == "1"
    assert body["code"] == 9990515 and headers["X-Imsidecar-Attempts"] == "0"
    await asyncio.wait_for(stop, BOUND)
    assert len(platforms.feishu.messages) == 1


async def test_a_request_still_at_the_platform_is_answered_before_the_drain_ends(
        start_sidecar: SidecarFactory, platforms: Platforms, clock: VirtualClock,
        http: aiohttp.ClientSession) -> None:
    running, request = await held_at_the_platform(start_sidecar, platforms.feishu, "sales-bot",
                                                  lambda running: post(http, running))
    stop = await draining(running)
    await clock.advance(3.0)
    assert not request.done()   # still inside the drain: it may yet finish
    await clock.advance(1.0)    # the drain's 4 s, of which the last share answers and closes
    status, headers, body = await asyncio.wait_for(request, BOUND)
    # The message was at the platform: it may have been applied, and the answer says so in every part. A 503 with
    # `not-applied` (as before) told the client, and its SDK's retry, to send it again.
    assert status == 502 and headers["X-Imsidecar-Error"] == "OutcomeUnknown" and "Retry-After" not in headers
    assert headers["X-Imsidecar-Outcome"] == "unknown" and "may have been applied" in body["msg"]
    await asyncio.wait_for(stop, BOUND)
    outcome = running.metric("imsidecar_requests_total", app="sales-bot", upstream="open",
                             route="/open-apis/im/v1/messages", method="POST", status_class="5xx",
                             outcome="sidecar_error")
    assert outcome == 1
    assert running.metric("imsidecar_sidecar_errors_total", app="sales-bot", upstream="open",
                          error="OutcomeUnknown") == 1


async def test_a_request_that_finishes_within_the_drain_gets_its_answer(
        start_sidecar: SidecarFactory, platforms: Platforms, clock: VirtualClock,
        http: aiohttp.ClientSession) -> None:
    running = await start_sidecar(limits="{deadline: 60s, drain_timeout: 4s}")
    await until(lambda: running.sidecar.tokens["sales-bot"].default.current() is not None, "a token")
    platforms.feishu.faults.hang_seconds = 0.2
    platforms.feishu.faults.script.append("hang")
    request = asyncio.create_task(post(http, running))
    await until(lambda: running.sidecar.drain._in_flight, "the request in flight")
    stop = asyncio.create_task(running.sidecar.stop())
    status, _, body = await asyncio.wait_for(request, BOUND)
    assert status == 200 and body["code"] == 0
    await asyncio.wait_for(stop, BOUND)
    assert clock.now() == 0.0   # it did not take the drain's time: in-flight work ending ends the drain


ASYNCSEND = "/dingtalk/topapi/message/corpconversation/asyncsend_v2"   # no key of its own at DingTalk: ours is kept
NOTICE = {"agent_id": 1, "userid_list": "manager001", "msg": {"msgtype": "text", "text": {"content": "hi"}}}


def keyed(http: aiohttp.ClientSession, running: Running, key: str) -> Any:
    return http.post(running.base + ASYNCSEND, json=NOTICE, headers={"Idempotency-Key": f'"{key}"'})


async def test_a_keyed_request_whose_client_left_is_waited_for_and_cut_at_the_drains_end(
        start_sidecar: SidecarFactory, platforms: Platforms, clock: VirtualClock,
        http: aiohttp.ClientSession) -> None:
    running, request = await held_at_the_platform(start_sidecar, platforms.dingtalk, "ops-ding",
                                                  lambda running: keyed(http, running, "left-at-shutdown"))
    request.cancel()   # the client leaves; the sidecar goes on with the request
    await asyncio.gather(request, return_exceptions=True)
    await until(lambda: running.metric("imsidecar_sidecar_errors_total", app="ops-ding", upstream="oapi",
                                       error="ClientGone") == 1, "the client's leaving counted")
    assert len(running.sidecar.drain._in_flight) == 1   # what the client left is the drain's to wait for
    stop = await draining(running)
    await clock.advance(3.0)
    assert not stop.done()
    await clock.advance(1.0)   # the drain's end cuts it: its key keeps the unknown outcome
    await asyncio.wait_for(stop, BOUND)
    stored = [entry.stored for entry in running.sidecar.pipeline.once.backend._entries.values()]
    assert [(s.status, s.outcome, s.error) for s in stored if s is not None] == [(502, "unknown", "OutcomeUnknown")]



async def test_a_read_still_at_the_platform_when_the_drain_ends_may_simply_be_sent_again(
        start_sidecar: SidecarFactory, platforms: Platforms, clock: VirtualClock,
        http: aiohttp.ClientSession) -> None:
    async def read(running: Running) -> tuple[int, dict[str, str]]:
        async with http.get(running.base + "/sales-bot/open-apis/im/v1/messages/om_1") as r:
            return r.status, dict(r.headers)

    running, request = await held_at_the_platform(start_sidecar, platforms.feishu, "sales-bot", read)
    stop = await draining(running)
    await clock.advance(4.0)
    status, headers = await asyncio.wait_for(request, BOUND)
    assert (status, headers["X-Imsidecar-Error"], headers["X-Imsidecar-Outcome"]) == (503, "ShuttingDown",
                                                                                   "not-applied")
    assert headers["Retry-After"] == "1"
    await asyncio.wait_for(stop, BOUND)

async def test_a_keyed_request_cut_at_the_drains_end_is_answered_and_keeps_the_unknown_outcome(
        start_sidecar: SidecarFactory, platforms: Platforms, clock: VirtualClock,
        http: aiohttp.ClientSession) -> None:
    running, request = await held_at_the_platform(start_sidecar, platforms.dingtalk, "ops-ding",
                                                  lambda running: keyed(http, running, "cut-at-shutdown"))
    stop = await draining(running)
    await clock.advance(4.0)
    answer = await asyncio.wait_for(request, BOUND)
    assert answer.status == 502 and answer.headers["X-Imsidecar-Error"] == "OutcomeUnknown"   # as its repeat will be
    assert answer.headers["X-Imsidecar-Outcome"] == "unknown"
    await asyncio.wait_for(stop, BOUND)
    stored = [entry.stored for entry in running.sidecar.pipeline.once.backend._entries.values()]
    assert [(s.outcome, s.error) for s in stored if s is not None] == [("unknown", "OutcomeUnknown")]


async def test_a_write_still_queued_for_a_connection_when_the_drain_ends_says_it_was_not_sent(
        start_sidecar: SidecarFactory, platforms: Platforms, clock: VirtualClock, http: aiohttp.ClientSession,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One connection to Feishu, held at the platform by a first message; a second waits for it in the sidecar's
    own queue when the drain ends. The first may have been applied (502, unknown); the second was never sent: 503
    ShuttingDown, `not-applied`, so its client may simply send it again (it was 502 unknown: an attempt had begun).
    Its repeat is safe: it never reaches the platform afterwards."""
    from proxy import upstream
    monkeypatch.setattr(upstream, "ORIGIN_CONNECTIONS", 1)
    running, first = await held_at_the_platform(start_sidecar, platforms.feishu, "sales-bot",
                                                lambda running: post(http, running))
    second = asyncio.create_task(post(http, running))
    await until(lambda: len(running.sidecar.drain._in_flight) == 2 and running.sidecar.pools.watchdog._paused,
                "the second message queued for the connection")
    stop = await draining(running)
    await clock.advance(4.0)
    status, headers, _ = await asyncio.wait_for(first, BOUND)
    assert (status, headers["X-Imsidecar-Outcome"]) == (502, "unknown")
    status, headers, body = await asyncio.wait_for(second, BOUND)
    assert (status, headers["X-Imsidecar-Error"], headers["X-Imsidecar-Outcome"]) == (503, "ShuttingDown",
                                                                                   "not-applied")
    assert (headers["Retry-After"], headers["X-Imsidecar-Attempts"]) == ("1", "0")
    await asyncio.wait_for(stop, BOUND)
    await asyncio.sleep(0.05)   # the connection is free (the sidecar closed it): nothing queued goes out
    assert [call[0] for call in platforms.feishu.calls].count("/open-apis/im/v1/messages") == 1   # the first


async def test_work_adopted_after_the_drains_end_is_cut_at_once() -> None:
    drain, clock = Drain(), VirtualClock()
    drain.begin()
    assert await drain.settle(clock, 1.0) == 0   # nothing in flight: the drain's end comes at once
    work = asyncio.ensure_future(asyncio.sleep(3600))
    drain.adopt(work)   # a client left after the end (its request had slipped in): it does not outlive the stop
    await asyncio.wait_for(asyncio.gather(work, return_exceptions=True), BOUND)
    assert work.cancelled() and not drain._in_flight
