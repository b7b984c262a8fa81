"""Keys the client can see and send, and the sidecar's own exactly-once store, through the sidecar.

Every keyed answer carries the key that was used; `Idempotency-Key` is put where each platform route takes its key;
where a route has none, the sidecar executes a key at most once (memory, or Redis shared by replicas) and answers
repeats as draft-ietf-httpapi-idempotency-key-header says: the stored answer, 409 while in flight, 422 on misuse.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import pytest

from proxy.clock import AutoClock, Clock
from proxy.fakes.events import wait_for
from proxy.idempotency import platform_key
from proxy.platforms.dingtalk import IDEMPOTENCY as DINGTALK_KEYS
from proxy.platforms.feishu import IDEMPOTENCY as FEISHU_KEYS
from tests.conftest import Platforms, Running, SidecarFactory
from tests.redis_support import RedisServer, running_redis

MESSAGE = {"receive_id": "oc_1", "msg_type": "text", "content": json.dumps({"text": "hi"})}
BATCH = {"records": [{"fields": {"n": i}} for i in range(3)]}
BITABLE = "/sales-bot/open-apis/bitable/v1/apps/bascnAbCdEfGh/tables/tblAbCdEf12/records/batch_create"
ASYNCSEND = "/dingtalk/topapi/message/corpconversation/asyncsend_v2"   # no key of its own at DingTalk
NOTICE = {"agent_id": 1, "userid_list": "manager001", "msg": {"msgtype": "text", "text": {"content": "hi"}}}
# A concrete path for each Feishu route template that takes a key.
FEISHU_PATHS = {
    "/open-apis/im/v1/messages": "/open-apis/im/v1/messages",
    "/open-apis/im/v1/messages/:message_id/reply": "/open-apis/im/v1/messages/om_0123456789abcdef/reply",
    "/open-apis/im/v1/messages/:message_id/forward": "/open-apis/im/v1/messages/om_0123456789abcdef/forward",
    "/open-apis/im/v1/chats": "/open-apis/im/v1/chats",
    "/open-apis/bitable/v1/apps/:app_token/tables/:table_id/records":
        "/open-apis/bitable/v1/apps/bascnAbCdEfGh/tables/tblAbCdEf12/records",
    "/open-apis/bitable/v1/apps/:app_token/tables/:table_id/records/batch_create": BITABLE.removeprefix("/sales-bot"),
    "/open-apis/calendar/v4/calendars/:calendar_id/events":
        "/open-apis/calendar/v4/calendars/feishu.cn_0123456789abcdef@group.calendar.feishu.cn/events",
    "/open-apis/contact/v3/users": "/open-apis/contact/v3/users",
    "/open-apis/docx/v1/documents/:document_id/blocks/:block_id/children":
        "/open-apis/docx/v1/documents/doxcn0123456789abcdef/blocks/doxcn0123456789abcdef/children",
}


async def post(http: aiohttp.ClientSession, url: str, payload: object,
               headers: dict[str, str] | None = None) -> tuple[int, dict, dict[str, str]]:
    async with http.post(url, json=payload, headers=headers or {}) as r:
        text = await r.text()
        return r.status, json.loads(text) if text.startswith("{") else {}, dict(r.headers)


def key(value: str) -> dict[str, str]:
    return {"Idempotency-Key": f'"{value}"'}


# The key is on the answer, and the client's key goes where the platform takes it --------------------------------


async def test_every_keyed_answer_carries_the_key_that_was_used(sidecar: Running, platforms: Platforms,
                                                                http: aiohttp.ClientSession) -> None:
    platforms.feishu.faults.script.append("reset_after")
    status, _, headers = await post(http, sidecar.base + BITABLE, BATCH)
    used = {r.path_qs.split("client_token=")[1] for r in platforms.feishu.requests if "batch_create" in r.path_qs}
    assert status == 200 and used == {headers["X-Imsidecar-Idempotency-Key"]}
    _, _, headers = await post(http, f"{sidecar.base}{BITABLE}?client_token=mine-1", BATCH)
    assert headers["X-Imsidecar-Idempotency-Key"] == "mine-1"          # the client's own, echoed
    async with http.get(f"{sidecar.base}/sales-bot/open-apis/im/v1/messages/om_1") as r:
        assert "X-Imsidecar-Idempotency-Key" not in r.headers         # nothing keyed, nothing said


@pytest.mark.parametrize("template", sorted(FEISHU_KEYS))
async def test_idempotency_key_is_put_where_each_feishu_route_takes_its_key(
        template: str, sidecar: Running, platforms: Platforms, http: aiohttp.ClientSession) -> None:
    spot = FEISHU_KEYS[template]
    await post(http, f"{sidecar.base}/sales-bot{FEISHU_PATHS[template]}", MESSAGE, key("order-42"))
    seen = platforms.feishu.requests[-1]
    assert "Idempotency-Key" not in seen.headers                       # the platform does not know the header
    if spot.where == "query":
        assert f"{spot.name}={platform_key('order-42')}" in seen.path_qs
    else:
        assert platform_key("order-42") in platforms.feishu.message_uuids


async def test_idempotency_key_goes_into_dingtalks_client_token(sidecar: Running, platforms: Platforms,
                                                                http: aiohttp.ClientSession) -> None:
    (shape, spot), = DINGTALK_KEYS
    url = f"{sidecar.api_base}/v1.0/notable/bases/r1mXmzWxQeBpnVlWSnOrO4vB/sheets/Sheet1/records"
    assert shape.match(url.split(sidecar.api_base)[1])
    records = {"records": [{"fields": {"n": 1}}]}
    status, _, headers = await post(http, url, records, key("order-43"))
    assert status == 200 and headers["X-Imsidecar-Idempotency-Key"] == "order-43"
    assert f"clientToken={platform_key('order-43')}" in platforms.dingtalk.requests[-1].path_qs
    # Applied, then reset: the retry carries the same clientToken, which DingTalk refuses with 409 as already used.
    # That answer says the write was done (by the first attempt): the outcome is applied, not a failure to resend.
    platforms.dingtalk.faults.script.append("reset_after")
    status, body, headers = await post(http, url, records)
    assert status == 409 and body["code"] == "invalidRequest.duplicateClientToken"
    assert headers["X-Imsidecar-Outcome"] == "applied" and headers["X-Imsidecar-Attempts"] == "2"
    assert sum(len(v) for v in platforms.dingtalk.notable.values()) == 2


async def test_a_rerun_with_the_returned_key_is_exactly_once_at_the_platform(
        start_sidecar: SidecarFactory, platforms: Platforms, http: aiohttp.ClientSession) -> None:
    running = await start_sidecar(retry="{max_attempts: 3, backoff_base: 1ms}")
    platforms.feishu.faults.script.extend(["unavailable", "error_after", "unavailable"])   # the first run fails
    status, _, headers = await post(http, f"{running.base}/sales-bot/open-apis/im/v1/messages", MESSAGE)
    assert status == 502 and headers["X-Imsidecar-Outcome"] == "unknown"
    returned = headers["X-Imsidecar-Idempotency-Key"]
    status, _, headers = await post(http, f"{running.base}/sales-bot/open-apis/im/v1/messages", MESSAGE,
                                    key(returned))
    assert status == 200 and headers["X-Imsidecar-Outcome"] == "applied"
    assert len(platforms.feishu.messages) == 1


async def test_an_empty_key_is_replaced_and_never_sent_beside_the_new_one(
        sidecar: Running, platforms: Platforms, http: aiohttp.ClientSession) -> None:
    for _ in range(4):
        platforms.feishu.faults.script.extend(["reset_after", None])
        status, _, _ = await post(http, f"{sidecar.base}{BITABLE}?client_token=", BATCH)
        assert status == 200
    assert len(platforms.feishu.records["tblAbCdEf12"]) == 4 * 3       # each batch once, though each was retried
    sent = [r.path_qs for r in platforms.feishu.requests if "batch_create" in r.path_qs]
    assert len(sent) == 8 and all(q.count("client_token=") == 1 and "client_token=&" not in q for q in sent)
    platforms.feishu.faults.script.extend(["error_after", None])
    await post(http, f"{sidecar.base}/sales-bot/open-apis/im/v1/messages", {**MESSAGE, "uuid": ""})
    assert len(platforms.feishu.messages) == 1


async def test_a_header_key_that_disagrees_with_the_requests_own_is_refused_in_the_platform_shape(
        sidecar: Running, platforms: Platforms, http: aiohttp.ClientSession) -> None:
    status, body, headers = await post(http, f"{sidecar.base}{BITABLE}?client_token=other", BATCH, key("mine"))
    assert status == 400 and body["code"] == 9990400 and headers["X-Imsidecar-Error"] == "BadRequest"
    status, body, _ = await post(http, sidecar.base + ASYNCSEND, NOTICE, {"Idempotency-Key": '"unterminated'})
    assert status == 400 and body["errcode"] == 9990400
    assert not [r for r in platforms.feishu.requests if "batch_create" in r.path_qs] and platforms.dingtalk.sent == []
    assert sidecar.metric("imsidecar_circuit_transitions_total", app="sales-bot", upstream="open", state="open") == 0


# The sidecar's own store, where the platform has no key ---------------------------------------------------------


async def test_a_repeat_gets_the_stored_answer_and_is_not_executed_again(
        sidecar: Running, platforms: Platforms, http: aiohttp.ClientSession) -> None:
    status, first, headers = await post(http, sidecar.base + ASYNCSEND, NOTICE, key("notice-1"))
    assert status == 200 and "X-Imsidecar-Replayed" not in headers
    status, again, headers = await post(http, sidecar.base + ASYNCSEND, NOTICE, key("notice-1"))
    assert status == 200 and again == first and headers["X-Imsidecar-Replayed"] == "true"
    assert headers["X-Imsidecar-Idempotency-Key"] == "notice-1" and headers["X-Imsidecar-Attempts"] == "0"
    assert len(platforms.dingtalk.sent) == 1
    assert sidecar.metric("imsidecar_idempotency_store_requests_total", app="ops-ding", result="executed") == 1
    assert sidecar.metric("imsidecar_idempotency_store_requests_total", app="ops-ding", result="heard_out") == 0
    assert sidecar.metric("imsidecar_idempotency_store_requests_total", app="ops-ding", result="replayed") == 1
    assert sidecar.metric("imsidecar_idempotency_store_entries") == 1


async def test_the_same_key_with_another_request_is_422(sidecar: Running, platforms: Platforms,
                                                        http: aiohttp.ClientSession) -> None:
    await post(http, sidecar.base + ASYNCSEND, NOTICE, key("notice-2"))
    status, body, headers = await post(http, sidecar.base + ASYNCSEND, {**NOTICE, "agent_id": 2}, key("notice-2"))
    assert status == 422 and body["errcode"] == 9990422 and headers["X-Imsidecar-Error"] == "IdempotencyKeyReused"
    assert len(platforms.dingtalk.sent) == 1
    assert sidecar.metric("imsidecar_idempotency_store_requests_total", app="ops-ding", result="mismatch") == 1


async def test_a_stored_unknown_outcome_is_given_again_and_never_re_executed(
        sidecar: Running, platforms: Platforms, http: aiohttp.ClientSession) -> None:
    platforms.dingtalk.faults.script.append("reset_after")   # applied, then the connection broke: no retry, no key
    status, body, headers = await post(http, sidecar.base + ASYNCSEND, NOTICE, key("notice-3"))
    assert status == 502 and headers["X-Imsidecar-Outcome"] == "unknown"
    status, again, headers = await post(http, sidecar.base + ASYNCSEND, NOTICE, key("notice-3"))
    assert (status, again) == (502, body) and headers["X-Imsidecar-Outcome"] == "unknown"
    assert headers["X-Imsidecar-Replayed"] == "true" and headers["X-Imsidecar-Error"] == "ConnectionReset"
    assert len(platforms.dingtalk.sent) == 1


async def test_an_answer_that_says_nothing_was_done_is_not_kept(sidecar: Running, platforms: Platforms,
                                                                http: aiohttp.ClientSession) -> None:
    platforms.dingtalk.faults.script.extend(["busy"] * 3)   # errcode -1 three times: refused before acting
    status, body, headers = await post(http, sidecar.base + ASYNCSEND, NOTICE, {**key("notice-4"),
                                                                                 "X-Imsidecar-Timeout": "200ms"})
    assert body["errcode"] == -1 and headers["X-Imsidecar-Outcome"] == "not-applied"
    status, body, headers = await post(http, sidecar.base + ASYNCSEND, NOTICE, key("notice-4"))
    assert body["errcode"] == 0 and "X-Imsidecar-Replayed" not in headers   # executed this time
    assert len(platforms.dingtalk.sent) == 1


async def test_a_client_that_leaves_mid_write_gets_the_real_answer_when_it_repeats_the_key(
        sidecar: Running, platforms: Platforms, http: aiohttp.ClientSession) -> None:
    platforms.dingtalk.faults.script.append("hang")   # 0.5 s at the platform, then the notice is sent
    first = asyncio.create_task(post(http, sidecar.base + ASYNCSEND, NOTICE, key("notice-left")))
    await asyncio.sleep(0.1)
    first.cancel()   # the client gives up and disconnects while the platform is still at work
    await asyncio.gather(first, return_exceptions=True)
    status, body, headers = await post(http, sidecar.base + ASYNCSEND, NOTICE, key("notice-left"))
    # not "cut off after it was sent; it may have been applied": the sidecar heard the first request out
    assert (status, body["errcode"]) == (200, 0) and headers["X-Imsidecar-Outcome"] == "applied"
    assert headers["X-Imsidecar-Replayed"] == "true" and "X-Imsidecar-Error" not in headers
    assert len(platforms.dingtalk.sent) == 1
    assert sidecar.metric("imsidecar_sidecar_errors_total", app="ops-ding", upstream="oapi", error="ClientGone") == 1
    assert sidecar.metric("imsidecar_request_outcomes_total", app="ops-ding", upstream="oapi", outcome="applied") == 1
    assert [sidecar.metric("imsidecar_idempotency_store_requests_total", app="ops-ding", result=result)
            for result in ("executed", "heard_out", "replayed")] == [1, 1, 1]


async def test_a_client_that_leaves_before_a_refusal_can_resend_under_its_key(
        sidecar: Running, platforms: Platforms, http: aiohttp.ClientSession) -> None:
    platforms.dingtalk.faults.latency = 0.1   # every call takes a while (shorter than the last retry's room)...
    platforms.dingtalk.faults.rates = {"busy": 1.0}   # ...and is refused before acting, until the first one is over
    first = asyncio.create_task(post(http, sidecar.base + ASYNCSEND, NOTICE,
                                     {**key("notice-refused"), "X-Imsidecar-Timeout": "1s"}))
    await asyncio.sleep(0.05)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    await asyncio.sleep(1.2)   # the first request's deadline: what it ended with said the platform did nothing
    platforms.dingtalk.faults.rates = {}
    status, body, headers = await post(http, sidecar.base + ASYNCSEND, NOTICE, key("notice-refused"))
    assert (status, body["errcode"]) == (200, 0) and "X-Imsidecar-Replayed" not in headers   # executed anew
    assert len(platforms.dingtalk.sent) == 1


class TestConcurrentDuplicates:
    async def test_a_duplicate_in_flight_waits_for_the_first_answer(
            self, sidecar: Running, platforms: Platforms, http: aiohttp.ClientSession) -> None:
        platforms.dingtalk.faults.script.append("hang")   # the first one takes 0.5 s at the platform
        first = asyncio.create_task(post(http, sidecar.base + ASYNCSEND, NOTICE, key("notice-5")))
        await asyncio.sleep(0.1)
        second = await post(http, sidecar.base + ASYNCSEND, NOTICE, key("notice-5"))
        assert second[0] == 200 and second[1] == (await first)[1] and second[2]["X-Imsidecar-Replayed"] == "true"
        assert len(platforms.dingtalk.sent) == 1

    async def test_a_duplicate_that_cannot_wait_long_enough_gets_409(
            self, sidecar: Running, platforms: Platforms, http: aiohttp.ClientSession) -> None:
        platforms.dingtalk.faults.script.append("hang")
        first = asyncio.create_task(post(http, sidecar.base + ASYNCSEND, NOTICE, key("notice-6")))
        await asyncio.sleep(0.1)
        status, body, headers = await post(http, sidecar.base + ASYNCSEND, NOTICE,
                                           {**key("notice-6"), "X-Imsidecar-Timeout": "100ms"})
        assert status == 409 and body["errcode"] == 9990409 and headers["Retry-After"] == "1"
        assert (await first)[0] == 200 and len(platforms.dingtalk.sent) == 1
        assert sidecar.metric("imsidecar_idempotency_store_requests_total", app="ops-ding", result="conflict") == 1


class TestInVirtualTime:
    @pytest.fixture
    def clock(self) -> Clock:
        return AutoClock()

    async def test_keys_expire_after_the_ttl(self, start_sidecar: SidecarFactory, platforms: Platforms,
                                             clock: AutoClock, http: aiohttp.ClientSession) -> None:
        running = await start_sidecar(extra="idempotency: {ttl: 1h}")
        await post(http, running.base + ASYNCSEND, NOTICE, key("notice-7"))
        await clock.advance(3599)
        await post(http, running.base + ASYNCSEND, NOTICE, key("notice-7"))
        assert len(platforms.dingtalk.sent) == 1
        await clock.advance(2)
        await post(http, running.base + ASYNCSEND, NOTICE, key("notice-7"))
        assert len(platforms.dingtalk.sent) == 2

    async def test_memory_is_bounded_oldest_answers_first(self, start_sidecar: SidecarFactory,
                                                          platforms: Platforms, http: aiohttp.ClientSession) -> None:
        running = await start_sidecar(extra="idempotency: {max_entries: 5}")
        for n in range(8):
            await post(http, running.base + ASYNCSEND, NOTICE, key(f"bounded-{n}"))
        assert running.metric("imsidecar_idempotency_store_entries") == 5
        await post(http, running.base + ASYNCSEND, NOTICE, key("bounded-7"))   # kept: replayed
        assert len(platforms.dingtalk.sent) == 8
        await post(http, running.base + ASYNCSEND, NOTICE, key("bounded-0"))   # evicted: executed again
        assert len(platforms.dingtalk.sent) == 9


# Replicas on one Redis agree ----------------------------------------------------------------------------------


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with running_redis(tmp_path) as server:
        yield server


async def test_replicas_on_redis_execute_a_key_once(start_sidecar: SidecarFactory, platforms: Platforms,
                                                    redis_server: RedisServer, http: aiohttp.ClientSession) -> None:
    store = f"\nstore: {{backend: redis, url: '{redis_server.url}'}}\n"
    one, two = await start_sidecar(extra=store), await start_sidecar(extra=store)
    status, first, _ = await post(http, one.base + ASYNCSEND, NOTICE, key("shared-1"))
    status, again, headers = await post(http, two.base + ASYNCSEND, NOTICE, key("shared-1"))
    assert again == first and headers["X-Imsidecar-Replayed"] == "true"
    status, body, _ = await post(http, two.base + ASYNCSEND, {**NOTICE, "agent_id": 9}, key("shared-1"))
    assert status == 422
    platforms.dingtalk.faults.script.append("hang")
    slow = asyncio.create_task(post(http, one.base + ASYNCSEND, NOTICE, key("shared-2")))
    await asyncio.sleep(0.1)
    status, _, _ = await post(http, two.base + ASYNCSEND, NOTICE, {**key("shared-2"), "X-Imsidecar-Timeout": "100ms"})
    assert status == 409
    status, _, headers = await post(http, two.base + ASYNCSEND, NOTICE, key("shared-2"))   # waits for replica one
    assert status == 200 and headers["X-Imsidecar-Replayed"] == "true" and (await slow)[0] == 200
    assert len(platforms.dingtalk.sent) == 2
    client = await redis_server.client()
    assert len(await client.keys("imsidecar:once:*")) == 2
    await client.aclose()


async def test_a_client_that_leaves_one_replica_gets_the_real_answer_from_another(
        start_sidecar: SidecarFactory, platforms: Platforms, redis_server: RedisServer,
        http: aiohttp.ClientSession) -> None:
    store = f"\nstore: {{backend: redis, url: '{redis_server.url}'}}\n"
    one, two = await start_sidecar(extra=store), await start_sidecar(extra=store)
    platforms.dingtalk.faults.script.append("hang")   # 0.5 s at the platform, then sent
    left = asyncio.create_task(post(http, one.base + ASYNCSEND, NOTICE, key("shared-left")))
    await asyncio.sleep(0.1)
    left.cancel()   # gone from replica one while the platform works
    await asyncio.gather(left, return_exceptions=True)
    status, body, headers = await post(http, two.base + ASYNCSEND, NOTICE, key("shared-left"))   # waits for one
    assert (status, body["errcode"]) == (200, 0) and headers["X-Imsidecar-Replayed"] == "true"
    assert headers["X-Imsidecar-Outcome"] == "applied" and len(platforms.dingtalk.sent) == 1


async def test_a_keyed_write_whose_deadline_passed_in_the_pools_queue_runs_when_its_key_comes_again(
        start_sidecar: SidecarFactory, platforms: Platforms, http: aiohttp.ClientSession,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One connection to DingTalk, held 0.4 s by another call: a keyed notice's deadline passes while it waits
    for it. It was never sent, so the key keeps nothing (a stored 504 would answer every repeat without trying):
    the repeat under the same key is executed, once."""
    from proxy import upstream
    monkeypatch.setattr(upstream, "ORIGIN_CONNECTIONS", 1)
    running = await start_sidecar()
    platforms.dingtalk.faults.latency = 0.4
    # the token warm (its fetch would take the one connection), then the other call out, holding it
    await wait_for(lambda: running.sidecar.tokens["ops-ding"].default.current() is not None, 5000)
    other = asyncio.create_task(post(http, running.base + ASYNCSEND, NOTICE))
    await wait_for(lambda: any("asyncsend" in seen.path_qs for seen in platforms.dingtalk.requests), 5000)
    status, body, headers = await post(http, running.base + ASYNCSEND, NOTICE,
                                       {**key("notice-queued"), "X-Imsidecar-Timeout": "150ms"})
    assert (status, headers["X-Imsidecar-Error"], headers["X-Imsidecar-Outcome"]) == (504, "QueuedPastDeadline",
                                                                                   "not-applied")
    assert (await other)[0] == 200
    platforms.dingtalk.faults.latency = 0.0
    status, body, headers = await post(http, running.base + ASYNCSEND, NOTICE, key("notice-queued"))
    assert (status, body["errcode"]) == (200, 0) and "X-Imsidecar-Replayed" not in headers   # executed anew
    assert len(platforms.dingtalk.sent) == 2   # the other call and this one: the queued one never went out


# A timed-out write's late answer replaces the unknown outcome kept for it -------------------------------------

LATE = "{backoff_base: 1ms, backoff_cap: 5ms, per_try_timeout: 100ms}"   # the platform answers after 0.3 s


def amended(running: Running) -> float:
    return running.metric("imsidecar_idempotency_store_requests_total", app="ops-ding", result="amended")


async def test_a_keyed_write_that_timed_out_is_replayed_as_applied_once_its_late_answer_came(
        start_sidecar: SidecarFactory, platforms: Platforms, http: aiohttp.ClientSession) -> None:
    """The platform applies the notice but answers after the per-try timeout: not retried (it may have acted),
    and its client is told "unknown". The attempt is heard out; its late answer says applied, and that is what
    the repeat under the key gets. Before, the repeat got the stored "unknown" for the whole TTL: the client could
    neither learn what happened nor safely send it again."""
    running = await start_sidecar(retry=LATE)
    platforms.dingtalk.faults.latency = 0.3
    status, body, headers = await post(http, running.base + ASYNCSEND, NOTICE, key("notice-late"))
    assert (status, headers["X-Imsidecar-Error"], headers["X-Imsidecar-Outcome"]) == (504, "AttemptTimeout",
                                                                                   "unknown")
    await wait_for(lambda: amended(running) == 1, 5000)
    status, body, headers = await post(http, running.base + ASYNCSEND, NOTICE, key("notice-late"))
    assert (status, body["errcode"]) == (200, 0) and "task_id" in body   # the platform's own answer to the first
    assert (headers["X-Imsidecar-Outcome"], headers["X-Imsidecar-Replayed"]) == ("applied", "true")
    assert "X-Imsidecar-Error" not in headers and len(platforms.dingtalk.sent) == 1


async def test_a_keyed_write_whose_late_answer_says_it_was_not_done_runs_when_its_key_comes_again(
        start_sidecar: SidecarFactory, platforms: Platforms, http: aiohttp.ClientSession) -> None:
    """The late answer is DingTalk's "busy" (errcode -1, refused before acting): the unknown outcome is dropped,
    and the repeat is executed, once."""
    running = await start_sidecar(retry=LATE)
    platforms.dingtalk.faults.latency = 0.3
    platforms.dingtalk.faults.script.append("busy")
    status, _, headers = await post(http, running.base + ASYNCSEND, NOTICE, key("notice-busy"))
    assert (status, headers["X-Imsidecar-Outcome"]) == (504, "unknown")
    await wait_for(lambda: amended(running) == 1, 5000)
    platforms.dingtalk.faults.latency = 0.0
    status, body, headers = await post(http, running.base + ASYNCSEND, NOTICE, key("notice-busy"))
    assert (status, body["errcode"], headers["X-Imsidecar-Outcome"]) == (200, 0, "applied")
    assert "X-Imsidecar-Replayed" not in headers and len(platforms.dingtalk.sent) == 1


async def test_on_redis_another_replica_replays_the_late_answer_of_a_write_cut_off_by_its_clients_deadline(
        start_sidecar: SidecarFactory, platforms: Platforms, redis_server: RedisServer,
        http: aiohttp.ClientSession) -> None:
    """The client's own deadline (100 ms) cuts the write off at the platform: 504 DeadlineExceeded, unknown. The
    late answer amends the record on Redis (its TTL kept), so the repeat on the other replica gets "applied"."""
    store = f"\nstore: {{backend: redis, url: '{redis_server.url}'}}\n"
    one, two = await start_sidecar(extra=store), await start_sidecar(extra=store)
    platforms.dingtalk.faults.latency = 0.3
    status, _, headers = await post(http, one.base + ASYNCSEND, NOTICE, {**key("notice-cut"),
                                                                         "X-Imsidecar-Timeout": "100ms"})
    assert (status, headers["X-Imsidecar-Error"], headers["X-Imsidecar-Outcome"]) == (504, "DeadlineExceeded",
                                                                                   "unknown")
    await wait_for(lambda: amended(one) == 1, 5000)
    status, body, headers = await post(http, two.base + ASYNCSEND, NOTICE, key("notice-cut"))
    assert (status, body["errcode"], headers["X-Imsidecar-Outcome"]) == (200, 0, "applied")
    assert headers["X-Imsidecar-Replayed"] == "true" and len(platforms.dingtalk.sent) == 1
    client = await redis_server.client()
    try:
        [name] = [k async for k in client.scan_iter(match="*once:*")]
        assert 0 < await client.pttl(name) <= 24 * 3600 * 1000   # the TTL the unknown outcome was stored with
    finally:
        await client.aclose()


async def test_only_the_owners_unknown_outcome_is_amended_and_the_bytes_follow() -> None:
    from proxy.clock import VirtualClock
    from proxy.exactly_once import MemoryOnce, Stored

    def stored(outcome: str, body: bytes) -> Stored:
        return Stored("fp", 200, (("Content-Type", "application/json"),), body, outcome)

    once = MemoryOnce(VirtualClock())
    for scope, outcome in (("unknown", "unknown"), ("applied", "applied")):
        assert await once.claim(scope, "fp", "owner", 10.0) is None
        await once.finish(scope, "owner", stored(outcome, b"x" * 100))
    assert not await once.amend("unknown", "another", stored("applied", b"y"))   # not the execution that stored it
    assert not await once.amend("applied", "owner", stored("not-applied", b"y"))   # what is known stays
    assert not await once.amend("missing", "owner", None)
    assert await once.amend("unknown", "owner", stored("applied", b"y" * 10))
    assert (await once.claim("unknown", "fp", "x", 10.0)).outcome == "applied"   # type: ignore[union-attr]
    assert once.bytes == stored("applied", b"x" * 100).size + stored("applied", b"y" * 10).size
    assert not await once.amend("unknown", "owner", None)   # once only: it is known now
    assert await once.claim("applied", "fp", "owner", 10.0) is not None and once.entries == 2
