"""Retries through the sidecar against the fake platforms: each safety rule, the deadline and the budget."""

from __future__ import annotations

import json

import aiohttp
import pytest
from aiohttp.test_utils import unused_port

from proxy.clock import AutoClock, Clock
from tests.conftest import Platforms, Running, SidecarFactory

MESSAGE = {"receive_id": "oc_1", "msg_type": "text", "content": json.dumps({"text": "hi"})}
BATCH = {"records": [{"fields": {"n": i}} for i in range(3)]}
BITABLE = "/sales-bot/open-apis/bitable/v1/apps/bascnAbCdEfGh/tables/tblAbCdEf12/records/batch_create"


async def post(http: aiohttp.ClientSession, url: str, payload: object, **kw: object) -> tuple[int, dict, aiohttp.typedefs.LooseHeaders]:
    async with http.post(url, json=payload, **kw) as r:  # type: ignore[arg-type]
        return r.status, await r.json(content_type=None), r.headers


# Safe because the sidecar added the platform's idempotency key -------------------------------------------------


@pytest.mark.parametrize("fault", ["error_after", "reset_after"])
async def test_message_post_is_retried_with_the_added_uuid_and_written_once(
        sidecar: Running, platforms: Platforms, http: aiohttp.ClientSession, fault: str) -> None:
    platforms.feishu.faults.script.append(fault)
    status, body, headers = await post(http, f"{sidecar.base}/sales-bot/open-apis/im/v1/messages", MESSAGE)
    assert status == 200 and body["code"] == 0
    assert headers["X-Imsidecar-Attempts"] == "2"
    assert len(platforms.feishu.messages) == 1   # the retry carried the same uuid, so Feishu deduplicated it
    assert len(platforms.feishu.message_uuids) == 1
    assert sidecar.metric("imsidecar_idempotency_keys_added_total", app="sales-bot",
                          route="/open-apis/im/v1/messages") == 1


async def test_bitable_batch_is_retried_with_one_client_token(sidecar: Running, platforms: Platforms,
                                                             http: aiohttp.ClientSession) -> None:
    platforms.feishu.faults.script.extend(["reset_after", "error_after"])
    status, body, headers = await post(http, sidecar.base + BITABLE, BATCH)
    assert status == 200 and body["code"] == 0 and headers["X-Imsidecar-Attempts"] == "3"
    assert len(platforms.feishu.records["tblAbCdEf12"]) == 3
    tokens = {r.path_qs.split("client_token=")[1] for r in platforms.feishu.requests if "batch_create" in r.path_qs}
    assert len(tokens) == 1


async def test_the_clients_own_key_is_kept(sidecar: Running, platforms: Platforms, http: aiohttp.ClientSession) -> None:
    platforms.feishu.faults.script.append("error_after")
    await post(http, f"{sidecar.base}{BITABLE}?client_token=mine-123", BATCH)
    assert all("client_token=mine-123" in r.path_qs for r in platforms.feishu.requests if "batch_create" in r.path_qs)


async def test_without_keys_a_post_that_may_have_applied_is_not_retried(start_sidecar: SidecarFactory,
                                                                        platforms: Platforms,
                                                                        http: aiohttp.ClientSession) -> None:
    running = await start_sidecar(retry="{backoff_base: 1ms, idempotency_keys: false}")
    platforms.feishu.faults.script.append("error_after")
    status, body, headers = await post(http, f"{running.base}/sales-bot/open-apis/im/v1/messages", MESSAGE)
    assert status == 500 and body["code"] == 1500   # the platform's own answer
    assert headers["X-Imsidecar-Attempts"] == "1" and len(platforms.feishu.messages) == 1
    assert running.metric("imsidecar_retries_withheld_total", app="sales-bot", upstream="open", why="unsafe") == 1


# Safe because the platform did not act ---------------------------------------------------------------------------


async def test_refused_post_without_key_is_retried(sidecar: Running, platforms: Platforms,
                                                   http: aiohttp.ClientSession) -> None:
    platforms.dingtalk.faults.script.append("busy")   # errcode -1 in an HTTP 200: the platform did not act
    status, body, headers = await post(http, f"{sidecar.base}/dingtalk/topapi/message/corpconversation/asyncsend_v2",
                                       {"agent_id": 1, "msg": {"msgtype": "text"}})
    assert body["errcode"] == 0 and headers["X-Imsidecar-Retry-Reasons"] == "code_-1"
    assert len(platforms.dingtalk.sent) == 1


async def test_503_is_retried_for_post_but_500_is_not(sidecar: Running, platforms: Platforms,
                                                      http: aiohttp.ClientSession) -> None:
    url = f"{sidecar.api_base}/v1.0/robot/oToMessages/batchSend"
    platforms.dingtalk.faults.script.append("unavailable")
    status, body, headers = await post(http, url, {"msgKey": "sampleText"})
    assert status == 200 and headers["X-Imsidecar-Retry-Reasons"] == "http_503"
    platforms.dingtalk.faults.script.append("error_after")
    status, body, headers = await post(http, url, {"msgKey": "sampleText"})
    assert status == 500 and body == {"code": "systemError", "message": "系统错误", "requestid": "FAKE-REQUEST-ID"}
    assert len(platforms.dingtalk.sent) == 2   # one each: nothing sent twice


async def test_connection_reset_after_apply_is_not_retried_for_a_plain_post(sidecar: Running, platforms: Platforms,
                                                                           http: aiohttp.ClientSession) -> None:
    platforms.dingtalk.faults.script.append("reset_after")
    status, body, headers = await post(http, f"{sidecar.base}/dingtalk/topapi/message/corpconversation/asyncsend_v2", {})
    assert status == 502 and body["errcode"] == 9990502 and "broke" in body["errmsg"]
    assert len(platforms.dingtalk.sent) == 1


async def test_get_is_retried_after_503_and_timeout(start_sidecar: SidecarFactory, platforms: Platforms,
                                                      http: aiohttp.ClientSession) -> None:
    running = await start_sidecar(retry="{backoff_base: 1ms, per_try_timeout: 100ms}")
    platforms.feishu.faults.hang_seconds = 0.3
    # (A reset on a reused keep-alive connection is re-sent by aiohttp itself for GET, per RFC 9112 9.3.1.)
    platforms.feishu.faults.script.extend(["unavailable", "hang"])
    async with http.get(f"{running.base}/sales-bot/open-apis/bitable/v1/apps/bascnX/tables/tblY/records") as r:
        assert r.status == 200
        assert r.headers["X-Imsidecar-Retry-Reasons"] == "http_503,timeout"


async def test_declared_idempotent_route_is_retried_as_configured(start_sidecar: SidecarFactory, platforms: Platforms,
                                                                  http: aiohttp.ClientSession) -> None:
    running = await start_sidecar(
        retry="{backoff_base: 1ms, idempotent_routes: [/topapi/message/corpconversation/asyncsend_v2]}")
    platforms.dingtalk.faults.script.append("error_after")
    status, body, _ = await post(http, f"{running.base}/dingtalk/topapi/message/corpconversation/asyncsend_v2", {})
    assert body["errcode"] == 0
    assert len(platforms.dingtalk.sent) == 2   # the operator's declaration is trusted: the platform saw it twice


async def test_connect_failures_are_retried_then_said_plainly(http: aiohttp.ClientSession) -> None:
    from prometheus_client import CollectorRegistry

    from proxy import config
    from proxy.app import Sidecar

    listen, admin = unused_port(), unused_port()
    cfg = config.loads(f"""
listen: 127.0.0.1:{listen}
admin_listen: 127.0.0.1:{admin}
apps: [{{name: gone, platform: feishu, app_id: i, app_secret: s,
         upstreams: {{open: {{base_url: "http://127.0.0.1:{unused_port()}"}}}},
         retry: {{backoff_base: 1ms}}}}]
""", env={})
    sidecar = Sidecar(cfg, registry=CollectorRegistry())
    await sidecar.start()
    try:
        headers = {"Authorization": "Bearer u-user-token"}   # no token needed, so the connect failure shows
        status, body, h = await post(http, f"http://127.0.0.1:{listen}/gone/open-apis/im/v1/messages", MESSAGE,
                                     headers=headers)
    finally:
        await sidecar.stop()
    assert status == 502 and body["code"] == 9990502 and "could not connect" in body["msg"]
    # Never reached the platform: safe to retry, POST included. Every try fails, so the measured loss asks for more
    # attempts than healthy's 3, until five connect failures in a row open the breaker.
    assert h["X-Imsidecar-Attempts"] == "5" and h["X-Imsidecar-Outcome"] == "not-applied"


async def test_body_over_the_replay_buffer_is_sent_once(start_sidecar: SidecarFactory, platforms: Platforms,
                                                        http: aiohttp.ClientSession) -> None:
    running = await start_sidecar(limits="{deadline: 5s, replay_buffer_bytes: 1KiB}")
    platforms.feishu.faults.script.append("unavailable")
    async with http.post(f"{running.base}/sales-bot/open-apis/im/v1/files", data=b"z" * 4096) as r:
        assert r.status == 503 and r.headers["X-Imsidecar-Attempts"] == "1"
    assert running.metric("imsidecar_retries_withheld_total", app="sales-bot", upstream="open",
                          why="body_too_large") == 1


# Budget and deadline -----------------------------------------------------------------------------------------------


async def test_spent_budget_sends_the_first_answer_back(start_sidecar: SidecarFactory, platforms: Platforms,
                                                        http: aiohttp.ClientSession) -> None:
    running = await start_sidecar(retry="{backoff_base: 1ms, budget_ratio: 0, budget_min_per_second: 0}")
    platforms.feishu.faults.script.append("unavailable")
    async with http.get(f"{running.base}/sales-bot/open-apis/im/v1/messages/om_12345678") as r:
        assert r.status == 503 and r.headers["X-Imsidecar-Attempts"] == "1"
    assert running.metric("imsidecar_retry_budget_exhausted_total", app="sales-bot", upstream="open") == 1


async def test_no_wait_that_would_overrun_the_deadline(sidecar: Running, platforms: Platforms,
                                                       http: aiohttp.ClientSession) -> None:
    platforms.feishu.faults.script.append("throttle")   # 429 with x-ogw-ratelimit-reset: 1
    status, body, headers = await post(http, f"{sidecar.base}/sales-bot/open-apis/im/v1/messages", MESSAGE,
                                       headers={"X-Imsidecar-Timeout": "500ms"})
    assert status == 429 and body["code"] == 99991400   # at once, with the platform's real answer
    assert headers["X-Imsidecar-Attempts"] == "1"
    assert sidecar.metric("imsidecar_deadline_exceeded_total", app="sales-bot", upstream="open") == 1


class TestInVirtualTime:
    @pytest.fixture
    def clock(self) -> Clock:
        return AutoClock()

    async def test_the_platforms_wait_is_honoured(self, sidecar: Running, platforms: Platforms, clock: AutoClock,
                                                  http: aiohttp.ClientSession) -> None:
        platforms.feishu.faults.script.append("throttle")
        platforms.dingtalk.faults.script.append("throttle")
        started = clock.now()
        status, body, headers = await post(http, f"{sidecar.base}/sales-bot/open-apis/im/v1/messages", MESSAGE)
        assert body["code"] == 0 and headers["X-Imsidecar-Retry-Reasons"] == "code_99991400"
        assert clock.now() - started >= 1.0   # x-ogw-ratelimit-reset: 1
        started = clock.now()
        status, body, headers = await post(http, f"{sidecar.base}/dingtalk/topapi/message/corpconversation/asyncsend_v2", {})
        assert body["errcode"] == 0 and headers["X-Imsidecar-Retry-Reasons"] == "code_90018"
        assert clock.now() - started >= 1.0   # DingTalk's one-second rule for 90018

    async def test_absurd_waits_are_not_honoured(self, start_sidecar: SidecarFactory, platforms: Platforms,
                                                 clock: AutoClock, http: aiohttp.ClientSession) -> None:
        running = await start_sidecar(retry="{max_retry_after: 500ms}")
        platforms.feishu.faults.script.append("throttle")
        status, body, headers = await post(http, f"{running.base}/sales-bot/open-apis/im/v1/messages", MESSAGE)
        assert status == 429 and headers["X-Imsidecar-Attempts"] == "1"

    async def test_throttles_do_not_use_up_the_attempts_the_loss_needs(self, start_sidecar: SidecarFactory,
                                                                         platforms: Platforms, clock: AutoClock,
                                                                         http: aiohttp.ClientSession) -> None:
        running = await start_sidecar(retry="{max_attempts: 3, backoff_base: 1ms}", ratelimit="{enabled: false}",
                                      limits="{deadline: 30s}")
        platforms.feishu.faults.script.extend(["throttle", "unavailable", "throttle", "unavailable"])
        status, body, headers = await post(http, f"{running.base}/sales-bot/open-apis/im/v1/messages", MESSAGE)
        assert status == 200 and headers["X-Imsidecar-Attempts"] == "5"   # 2 throttles + 2 losses + the success
        platforms.feishu.faults.script.extend(["throttle"] * 5)            # ...but they have an allowance too
        status, body, headers = await post(http, f"{running.base}/sales-bot/open-apis/im/v1/messages", MESSAGE)
        assert status == 429 and headers["X-Imsidecar-Attempts"] == "3"
        assert running.metric("imsidecar_retries_withheld_total", app="sales-bot", upstream="open", why="attempts") == 1

    async def test_the_deadline_bounds_attempts_and_waits_together(self, start_sidecar: SidecarFactory,
                                                                   platforms: Platforms, clock: AutoClock,
                                                                   http: aiohttp.ClientSession) -> None:
        # The sidecar's own limiter would slow down after the first 429 too; this is about the retry engine alone.
        running = await start_sidecar(retry="{max_attempts: 10}", ratelimit="{enabled: false}")
        platforms.feishu.faults.script.extend(["throttle"] * 10)   # each asks for a one-second wait
        started = clock.now()
        status, body, headers = await post(http, f"{running.base}/sales-bot/open-apis/im/v1/messages", MESSAGE,
                                           headers={"X-Imsidecar-Timeout": "3s"})
        assert status == 429 and body["code"] == 99991400   # the platform's last real answer
        assert headers["X-Imsidecar-Attempts"] == "3"        # t≈0, ≈1.1, ≈2.2: a fourth would start past 3 s
        assert clock.now() - started <= 3.0


async def test_fixed_backoff_waits_the_same_each_time() -> None:
    from proxy.config import RetrySettings
    from proxy.clock import VirtualClock
    from proxy.retry import RetryPolicy

    policy = RetryPolicy(RetrySettings(backoff="fixed", backoff_base=1.0), VirtualClock())
    waits = policy.waits()
    assert [next(waits) for _ in range(3)] == [1.0, 1.0, 1.0]
    jittered = RetryPolicy(RetrySettings(backoff_base=1.0, backoff_cap=4.0), VirtualClock(), rng=lambda: 1.0).waits()
    assert [next(jittered) for _ in range(4)] == [1.0, 2.0, 4.0, 4.0]


async def test_a_retry_after_a_timeout_waits_longer(start_sidecar: SidecarFactory, platforms: Platforms,
                                                    http: aiohttp.ClientSession) -> None:
    running = await start_sidecar(retry="{backoff_base: 1ms, per_try_timeout: 100ms, max_attempts: 3}")
    platforms.feishu.faults.latency = 0.15   # the platform slowed down past the per-try timeout
    async with http.get(f"{running.base}/sales-bot/open-apis/bitable/v1/apps/bascnX/tables/tblY/records") as r:
        assert r.status == 200   # the second try had 200 ms, not another 100 ms
        assert r.headers["X-Imsidecar-Retry-Reasons"] == "timeout"


async def test_cached_parameters_are_read_again_on_a_change_on_enough_samples_or_when_stale() -> None:
    from proxy.clock import VirtualClock
    from proxy.retry import ENOUGH_NEW, QUIET_EVERY, RetryParams, refreshed

    clock, reads, moved, seen = VirtualClock(), [], [0], [0]

    def source() -> RetryParams:
        reads.append(clock.now())
        return RetryParams(1.0, 0.1, 1.0, 3)

    params = refreshed(source, clock, every=0.25, changes=lambda: moved[0], samples=lambda: seen[0])
    assert len(reads) == 1
    await clock.advance(0.3)
    seen[0] += ENOUGH_NEW - 1   # a quiet upstream: the window holds nearly the same samples
    params()
    assert len(reads) == 1
    moved[0] += 1               # a failure: the very next decision sees it
    params()
    assert len(reads) == 2
    await clock.advance(0.3)
    seen[0] += ENOUGH_NEW       # a busy one: every 0.25 s as before
    params()
    assert len(reads) == 3
    await clock.advance(QUIET_EVERY)
    params()                    # no samples at all, but stale
    assert len(reads) == 4
