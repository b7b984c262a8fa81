"""What a client is told about its write is true, whatever the platform and the network do: a random sequence.

Random writes (Feishu messages, whose route has the platform's own key; DingTalk notices, which only the sidecar's
exactly-once store guards), some keyed and repeated, some with a short deadline of their own, some whose client
leaves; the platforms answer with a random script of faults (dropped before or after acting, 5xx after acting,
busy, throttled, hung past the per-try timeout). After everything has settled, each write was applied at most once,
and every answer a client read says what happened: `applied` only if the platform has it, `not-applied` only if it
never will, the platform's success only with `applied`. Each example runs its own fakes and sidecar in real time (fractions of a
second); what they race on is the point, not a flake: the claims hold for every interleaving.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from unittest import mock

import aiohttp
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings, strategies as st
from prometheus_client import CollectorRegistry

from proxy import upstream
from proxy.app import Sidecar
from proxy.clock import SystemClock
from proxy.fakes.dingtalk import FakeDingTalk
from proxy.fakes.events import wait_for
from proxy.fakes.feishu import FakeFeishu
from tests.conftest import DING_SECRET, FEISHU_SECRET, Platforms, make_config

FAULTS = (None, None, "reset_before", "reset_after", "error_after", "gateway_after", "hang", "busy", "throttle",
          "unavailable")
HANG = 0.25   # seconds a hung call takes before the platform acts: past the 100 ms per-try timeout
RETRY = "{backoff_base: 1ms, backoff_cap: 5ms, per_try_timeout: 100ms}"
FEISHU = "/sales-bot/open-apis/im/v1/messages?receive_id_type=chat_id"
DINGTALK = "/dingtalk/topapi/message/corpconversation/asyncsend_v2"


@dataclass(frozen=True)
class Write:
    feishu: bool
    keyed: bool
    repeated: bool            # sent again under its key once its first answer came (keyed writes only)
    deadline: int | None      # X-Imsidecar-Timeout, ms
    leaves_after: int | None  # the client disconnects after this many ms


writes = st.lists(st.builds(Write, st.booleans(), st.booleans(), st.booleans(),
                            st.one_of(st.none(), st.integers(30, 300)), st.one_of(st.none(), st.integers(0, 200))),
                  min_size=1, max_size=6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(writes, st.lists(st.sampled_from(FAULTS), max_size=12), st.sampled_from([1, 2, 256]))
def test_every_answer_about_a_write_is_true_and_no_write_is_applied_twice(
        planned: list[Write], script: list[str | None], pool: int) -> None:
    """`pool`: connections to each platform origin, so that writes also queue for one in the sidecar."""
    with mock.patch.object(upstream, "ORIGIN_CONNECTIONS", pool):
        asyncio.run(run(planned, script))


async def run(planned: list[Write], script: list[str | None]) -> None:
    clock = SystemClock()
    feishu = FakeFeishu(apps={"cli_test": FEISHU_SECRET}, clock=clock)
    ding = FakeDingTalk(apps={"ding_test": DING_SECRET}, clock=clock)
    for fake in (feishu, ding):
        fake.faults.script.extend(script)
        fake.faults.hang_seconds = HANG
        fake.faults.enabled_paths = ("/im/v1/messages", "/asyncsend_v2")   # token fetches are not the subject
    servers = [TestServer(feishu.app()), TestServer(ding.oapi_app()), TestServer(ding.api_app())]
    for server in servers:
        await server.start_server()
    urls = [str(server.make_url("")).rstrip("/") for server in servers]
    cfg, ports = make_config(Platforms(feishu, ding, *urls), limits="{deadline: 2s}", retry=RETRY)
    sidecar = Sidecar(cfg, clock=clock, registry=CollectorRegistry())
    await sidecar.start()
    base = f"http://127.0.0.1:{ports['listen']}"
    try:
        await wait_for(lambda: all(t.default.current() is not None for t in sidecar.tokens.values()), 5000)
        async with aiohttp.ClientSession() as http:
            told = await asyncio.gather(*(client(http, base, n, write) for n, write in enumerate(planned)))
            await asyncio.sleep(HANG + 0.3)   # whatever was heard out or hung has landed by now
    finally:
        await sidecar.stop()
        for server in servers:
            await server.close()
    applied = applied_at_the_platforms(feishu, ding)
    for n, answers in enumerate(told):
        count = applied.get(f"w{n}", 0)
        assert count <= 1, (n, planned[n], answers, count)
        for ok, outcome in answers:
            assert not ok or outcome == "applied", (n, planned[n], answers)
            assert outcome != "applied" or count == 1, (n, planned[n], answers, count)
        if answers and all(outcome == "not-applied" for _, outcome in answers):
            assert count == 0, (n, planned[n], answers)


async def client(http: aiohttp.ClientSession, base: str, n: int, write: Write) -> list[tuple[bool, str]]:
    """What this write's client read: (the platform's success, X-Imsidecar-Outcome) of each answer it waited for."""
    payload: dict[str, Any]
    if write.feishu:
        url, payload = base + FEISHU, {"receive_id": "oc_1", "msg_type": "text",
                                       "content": json.dumps({"text": f"w{n}"})}
    else:
        url, payload = base + DINGTALK, {"agent_id": 1, "userid_list": "manager001",
                                         "msg": {"msgtype": "text", "text": {"content": f"w{n}"}}}
    headers = {"Idempotency-Key": f'"key-{n}"'} if write.keyed else {}
    if write.deadline is not None:
        headers["X-Imsidecar-Timeout"] = f"{write.deadline}ms"
    answers: list[tuple[bool, str]] = []
    first = asyncio.ensure_future(send(http, url, payload, headers))
    if write.leaves_after is not None:
        asyncio.get_running_loop().call_later(write.leaves_after / 1000, first.cancel)
    try:
        answers.append(await first)
    except (asyncio.CancelledError, aiohttp.ClientError):
        pass   # the client left: it read nothing
    if write.keyed and write.repeated:
        headers.pop("X-Imsidecar-Timeout", None)
        answers.append(await send(http, url, payload, headers))
    return answers


async def send(http: aiohttp.ClientSession, url: str, payload: dict[str, Any],
               headers: dict[str, str]) -> tuple[bool, str]:
    """Success is a 2xx whose body says so too: both platforms put errors inside HTTP 200 (DingTalk's busy is
    errcode -1 in a 200)."""
    async with http.post(url, json=payload, headers=headers) as r:
        text = await r.text()
        body = json.loads(text) if text.startswith("{") else {}
        ok = 200 <= r.status < 300 and body.get("code", body.get("errcode")) == 0
        return ok, r.headers.get("X-Imsidecar-Outcome", "")


def applied_at_the_platforms(feishu: FakeFeishu, ding: FakeDingTalk) -> dict[str, int]:
    """How many times each write was applied: messages Feishu created, notices DingTalk accepted."""
    counts: dict[str, int] = {}
    for message in feishu.messages:
        name = json.loads(message["content"])["text"]
        counts[name] = counts.get(name, 0) + 1
    for notice in ding.sent:
        name = notice["msg"]["text"]["content"]
        counts[name] = counts.get(name, 0) + 1
    return counts
