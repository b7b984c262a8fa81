"""Honest final answers through the sidecar: once an attempt may have been applied, the client is never told that
nothing happened, and it gets the platform's last real answer rather than an earlier attempt's."""

from __future__ import annotations

import json

import aiohttp
import pytest

from proxy.clock import AutoClock, Clock
from tests.conftest import Platforms, SidecarFactory

MESSAGE = {"receive_id": "oc_1", "msg_type": "text", "content": json.dumps({"text": "hi"})}
BATCH = {"records": [{"fields": {"n": i}} for i in range(3)]}
BITABLE = "/sales-bot/open-apis/bitable/v1/apps/bascnAbCdEfGh/tables/tblAbCdEf12/records/batch_create"
ASYNCSEND = "/dingtalk/topapi/message/corpconversation/asyncsend_v2"


@pytest.fixture
def clock() -> Clock:
    return AutoClock()   # the 429s' one-second waits pass in virtual time


async def post(http: aiohttp.ClientSession, url: str, payload: object) -> tuple[int, dict, dict[str, str]]:
    async with http.post(url, json=payload) as r:
        return r.status, await r.json(content_type=None), dict(r.headers)


async def test_refused_then_applied_then_refused_never_ends_as_not_processed(
        start_sidecar: SidecarFactory, platforms: Platforms, http: aiohttp.ClientSession) -> None:
    """503 -> applied+500 -> 503: the last answer says "not processed", but the second attempt was applied."""
    running = await start_sidecar(retry="{max_attempts: 3, backoff_base: 1ms}")
    platforms.feishu.faults.script.extend(["unavailable", "error_after", "unavailable"])
    status, body, headers = await post(http, running.base + BITABLE, BATCH)
    assert status not in (429, 503) and status == 502
    assert body["code"] == 9990512 and "may have been applied" in body["msg"]
    assert headers["X-Imsidecar-Outcome"] == "unknown" and headers["X-Imsidecar-Error"] == "OutcomeUnknown"
    assert headers["X-Imsidecar-Attempts"] == "3"
    assert len(platforms.feishu.records["tblAbCdEf12"]) == 3    # it was applied, once
    # ...and the key it carried is on the answer, so the client can rerun it safely.
    key = headers["X-Imsidecar-Idempotency-Key"]
    assert all(f"client_token={key}" in r.path_qs for r in platforms.feishu.requests if "batch_create" in r.path_qs)
    assert running.metric("imsidecar_request_outcomes_total", app="sales-bot", upstream="open", outcome="unknown") == 1


async def test_throttled_twice_then_applied_and_reset_is_not_answered_with_the_earlier_throttle(
        start_sidecar: SidecarFactory, platforms: Platforms, http: aiohttp.ClientSession) -> None:
    """429 -> 429 -> applied+reset (no key on this route, so no retry after the reset): the client must not see
    the earlier 90018 "too many requests", which says nothing was done."""
    running = await start_sidecar()
    platforms.dingtalk.faults.script.extend(["throttle", "throttle", "reset_after"])
    status, body, headers = await post(http, running.base + ASYNCSEND, {"agent_id": 1, "msg": {"msgtype": "text"}})
    assert body.get("errcode") != 90018
    assert status == 502 and body["errcode"] == 9990502 and "broke" in body["errmsg"]
    assert headers["X-Imsidecar-Outcome"] == "unknown"
    assert headers["X-Imsidecar-Retry-Reasons"] == "code_90018,code_90018"
    assert len(platforms.dingtalk.sent) == 1


async def test_what_a_client_may_assume_is_said_on_every_answer(
        start_sidecar: SidecarFactory, platforms: Platforms, http: aiohttp.ClientSession) -> None:
    running = await start_sidecar(retry="{backoff_base: 1ms, idempotency_keys: false}")
    url = f"{running.base}/sales-bot/open-apis/im/v1/messages"
    status, _, headers = await post(http, url, MESSAGE)
    assert status == 200 and headers["X-Imsidecar-Outcome"] == "applied"
    platforms.feishu.faults.script.append("unavailable")        # 503 (not processed), retried, then...
    status, _, headers = await post(http, url, {"receive_id": "oc_1"})   # ...refused for its body: 230001, HTTP 400
    assert status == 400 and headers["X-Imsidecar-Outcome"] == "not-applied"
    platforms.feishu.faults.script.append("error_after")         # applied, then 500; no key: not retried
    status, body, headers = await post(http, url, MESSAGE)
    assert status == 500 and body["code"] == 1500 and headers["X-Imsidecar-Outcome"] == "unknown"


async def test_a_read_that_timed_out_after_a_503_still_gets_the_platforms_answer(
        start_sidecar: SidecarFactory, platforms: Platforms, http: aiohttp.ClientSession) -> None:
    """Reads cannot have been applied: their last real answer stands, as before."""
    running = await start_sidecar(retry="{max_attempts: 2, backoff_base: 1ms, per_try_timeout: 100ms}")
    platforms.feishu.faults.hang_seconds = 0.3
    platforms.feishu.faults.script.extend(["unavailable", "hang"])
    async with http.get(f"{running.base}/sales-bot/open-apis/bitable/v1/apps/bascnX/tables/tblY/records") as r:
        assert r.status == 503 and r.headers["X-Imsidecar-Outcome"] == "not-applied"
