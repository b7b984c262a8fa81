"""What a client is told about its write is true, whatever the platform and the network do: a random sequence.

Random writes (Feishu messages, whose route has the platform's own key; DingTalk work notices on oapi, errors in
HTTP 200, and robot messages on api, errors in 4xx/5xx, which only the sidecar's exactly-once store guards), some
keyed and repeated, some with a short deadline of their own, some whose client
leaves, through a pool of 1, 2 or 256 connections, on one sidecar or two replicas sharing a real Redis, sometimes with SIGTERM's drain in the middle; the platforms
answer with a random script of faults (dropped before or after acting, 5xx after acting, busy, throttled, hung
past the per-try timeout). After everything has settled, each write was applied at most once,
and every answer a client read says what happened: `applied` only if the platform has it, `not-applied` only if it
never will, the platform's success only with `applied`. Each example runs its own fakes and sidecar in real time (fractions of a
second); what they race on is the point, not a flake: the claims hold for every interleaving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
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
from tests.redis_support import running_redis

FAULTS = (None, None, "reset_before", "reset_after", "error_after", "gateway_after", "hang", "busy", "throttle",
          "unavailable")
# (seconds every call takes, give or take; seconds more a hung one takes; the per-try timeout). Timing out: a hung
# call is past the per-try timeout. Slow: every call is within it, and many still at the platform when the drain
# (0.5 s) ends.
PLATFORMS = {"timing out": (0.0, 0.0, 0.25, "100ms"), "slow": (0.5, 0.3, 0.6, "2s")}
ROUTES = {
    "feishu": "/sales-bot/open-apis/im/v1/messages?receive_id_type=chat_id",
    "oapi": "/dingtalk/topapi/message/corpconversation/asyncsend_v2",
    "api": "/dingtalk-api/v1.0/robot/oToMessages/batchSend",
}


@dataclass(frozen=True)
class Write:
    route: str                # which platform API (ROUTES)
    keyed: bool
    repeated: bool            # sent again under its key once its first answer came (keyed writes only)
    deadline: int | None      # X-Imsidecar-Timeout, ms
    leaves_after: int | None  # the client disconnects after this many ms


writes = st.lists(st.builds(Write, st.sampled_from(sorted(ROUTES)), st.booleans(), st.booleans(),
                            st.one_of(st.none(), st.integers(30, 300)), st.one_of(st.none(), st.integers(0, 200))),
                  min_size=1, max_size=6)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(writes, st.lists(st.sampled_from(FAULTS), max_size=12), st.sampled_from(sorted(PLATFORMS)),
       st.sampled_from([1, 2, 256]), st.one_of(st.none(), st.integers(0, 300)), st.booleans())
def test_every_answer_about_a_write_is_true_and_no_write_is_applied_twice(
        planned: list[Write], script: list[str | None], platform: str, pool: int, sigterm: int | None,
        replicas: bool) -> None:
    """`platform`: how long a hung call takes against the per-try timeout. `pool`: connections to each platform
    origin, so that writes also queue for one in the sidecar. `sigterm`: the sidecar is stopped
    this many ms after the writes began (its drain: 0.5 s): a slow platform still has writes when it ends.
    `replicas`: two sidecars share a real Redis, and each repeat goes to the one its first try did not."""
    with mock.patch.object(upstream, "ORIGIN_CONNECTIONS", pool):
        asyncio.run(run(planned, script, *PLATFORMS[platform], sigterm, replicas))


async def run(planned: list[Write], script: list[str | None], latency: float, spread: float, hang: float,
              per_try: str, sigterm: int | None = None, replicas: bool = False) -> None:
    clock = SystemClock()
    feishu = FakeFeishu(apps={"cli_test": FEISHU_SECRET}, clock=clock)
    ding = FakeDingTalk(apps={"ding_test": DING_SECRET}, clock=clock)
    for fake in (feishu, ding):
        fake.faults.script.extend(script)
        fake.faults.hang_seconds = hang
        fake.faults.latency, fake.faults.latency_spread = latency, spread
        fake.faults.enabled_paths = ("/im/v1/messages", "/asyncsend_v2", "/batchSend")   # not token fetches
    servers = [TestServer(feishu.app()), TestServer(ding.oapi_app()), TestServer(ding.api_app())]
    for server in servers:
        await server.start_server()
    platforms = Platforms(feishu, ding, *(str(server.make_url("")).rstrip("/") for server in servers))
    async with contextlib.AsyncExitStack() as stack:
        store = ""
        if replicas:
            redis = await stack.enter_async_context(running_redis(Path(stack.enter_context(TemporaryDirectory()))))
            store = f"\nstore: {{backend: redis, url: '{redis.url}'}}\n"
        sidecars, bases = [], []
        for _ in range(2 if replicas else 1):
            cfg, ports = make_config(platforms, store, limits="{deadline: 2s, drain_timeout: 500ms}",
                                     retry=f"{{backoff_base: 1ms, backoff_cap: 5ms, per_try_timeout: {per_try}}}")
            sidecars.append(Sidecar(cfg, clock=clock, registry=CollectorRegistry()))
            bases.append(f"http://127.0.0.1:{ports['listen']}")
            await sidecars[-1].start()
        stopping: list[asyncio.Future[None]] = []
        try:
            await wait_for(lambda: all(t.default.current() is not None for s in sidecars for t in s.tokens.values()),
                           5000)
            if sigterm is not None:   # the first replica: where every first try goes
                asyncio.get_running_loop().call_later(
                    sigterm / 1000, lambda: stopping.append(asyncio.ensure_future(sidecars[0].stop())))
            async with aiohttp.ClientSession() as http:
                told = await asyncio.gather(*(client(http, bases, n, write) for n, write in enumerate(planned)))
                await asyncio.sleep(latency + spread + hang + 0.3)   # whatever was heard out or hung has landed
        finally:
            await (stopping[0] if stopping else sidecars[0].stop())
            for sidecar in sidecars[1:]:
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


async def client(http: aiohttp.ClientSession, bases: list[str], n: int, write: Write) -> list[tuple[bool, str]]:
    """What this write's client read: (the platform's success, X-Imsidecar-Outcome) of each answer it waited for.
    The first try goes to the first replica, a repeat to the last."""
    payloads: dict[str, dict[str, Any]] = {
        "feishu": {"receive_id": "oc_1", "msg_type": "text", "content": json.dumps({"text": f"w{n}"})},
        "oapi": {"agent_id": 1, "userid_list": "manager001", "msg": {"msgtype": "text", "text": {"content": f"w{n}"}}},
        "api": {"robotCode": "ding_test", "userIds": ["manager001"], "msgKey": "sampleText",
                "msgParam": json.dumps({"content": f"w{n}"})},
    }
    url, payload = bases[0] + ROUTES[write.route], payloads[write.route]
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
        pass   # the client left (or the sidecar had stopped listening): it read nothing
    if write.keyed and write.repeated:
        headers.pop("X-Imsidecar-Timeout", None)
        try:
            answers.append(await send(http, bases[-1] + ROUTES[write.route], payload, headers))
        except aiohttp.ClientError:
            pass   # the sidecar had stopped
    return answers


async def send(http: aiohttp.ClientSession, url: str, payload: dict[str, Any],
               headers: dict[str, str]) -> tuple[bool, str]:
    """Success is a 2xx whose body does not say otherwise: Feishu and DingTalk's oapi put errors inside HTTP 200
    (DingTalk's busy is errcode -1 in a 200); DingTalk's api answers success with no code at all."""
    async with http.post(url, json=payload, headers=headers) as r:
        text = await r.text()
        body = json.loads(text) if text.startswith("{") else {}
        ok = 200 <= r.status < 300 and body.get("code", body.get("errcode", 0)) == 0
        return ok, r.headers.get("X-Imsidecar-Outcome", "")


def applied_at_the_platforms(feishu: FakeFeishu, ding: FakeDingTalk) -> dict[str, int]:
    """How many times each write was applied: messages Feishu created, notices DingTalk accepted."""
    counts: dict[str, int] = {}
    for message in feishu.messages:
        name = json.loads(message["content"])["text"]
        counts[name] = counts.get(name, 0) + 1
    for sent in ding.sent:   # work notices, and robot messages
        name = sent["msg"]["text"]["content"] if "msg" in sent else json.loads(sent["msgParam"])["content"]
        counts[name] = counts.get(name, 0) + 1
    return counts
