"""The upstream client: what it sends to the platform besides the client's own request, and what it keeps."""

from __future__ import annotations

import asyncio
import math
from typing import Any, Awaitable, Callable
from unittest import mock

import aiohttp
import pytest
from aiohttp import TraceConfig, TraceRequestHeadersSentParams, web
from aiohttp.test_utils import TestServer
from hypothesis import given, settings, strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from proxy import upstream
from proxy.errors import AttemptTimeout, ConnectTimeout, QueuedPastDeadline
from proxy.outcome import Signal
from proxy.upstream import ORIGIN_CONNECTIONS, URL_CACHE, Answer, MisdirectedRequest, Pools, UpstreamClient


async def test_a_cookie_the_platform_sets_is_relayed_and_never_replayed_by_the_sidecar(
        aiohttp_server: Callable[..., Awaitable[TestServer]]) -> None:
    seen: list[str | None] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Cookie"))
        response = web.json_response({"code": 0})
        response.set_cookie("session", "client-a-secret")
        return response

    app = web.Application()
    app.router.add_get("/open-apis/x", handler)
    server = await aiohttp_server(app)
    # By name, as a platform is reached: aiohttp's jar would keep no cookie of a bare IP address.
    client = UpstreamClient(f"http://localhost:{server.port}", connect_timeout=1)
    try:
        first = await client.send("GET", "/open-apis/x", CIMultiDict(), None, 5.0)
        assert "client-a-secret" in first.headers.getone("Set-Cookie")   # the client that asked gets it
        await client.send("GET", "/open-apis/x", CIMultiDict(), None, 5.0)   # another client's call
        await client.send("GET", "/open-apis/x", CIMultiDict({"Cookie": "own=1"}), None, 5.0)
    finally:
        await client.close()
    assert seen == [None, None, "own=1"]   # only what a client itself sent, never a cookie the sidecar kept


async def slow_platform(aiohttp_server: Callable[..., Awaitable[TestServer]], path: str, seconds: float) -> TestServer:
    """A platform that answers GET `path` with success after `seconds`."""
    async def answer(request: web.Request) -> web.Response:
        await asyncio.sleep(seconds)
        return web.json_response({"code": 0})

    app = web.Application()
    app.router.add_get(path, answer)
    return await aiohttp_server(app)


async def test_the_first_attempt_to_time_out_is_heard_out(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> None:
    """Its late answer says the platform is slow, not gone: heard out only from the second timeout on (as one
    stop tried, to save a task per attempt), a platform slowed to 1.3 s was judged down (test_slow_and_down.py)."""
    server = await slow_platform(aiohttp_server, "/open-apis/slow", 0.15)
    heard: list[float] = []
    client = UpstreamClient(f"http://127.0.0.1:{server.port}", connect_timeout=1)
    try:
        with pytest.raises(AttemptTimeout):
            await client.send("GET", "/open-apis/slow", CIMultiDict(), None, 0.03, heard.append)
        await asyncio.sleep(0.2)   # the answer has come by now
    finally:
        await client.close()
    assert len(heard) == 1 and 0.15 <= heard[0] < 1.0


@pytest.mark.parametrize("heard_out", [False, True])
async def test_the_wait_for_a_free_pooled_connection_is_not_the_platforms_time(
        aiohttp_server: Callable[..., Awaitable[TestServer]], heard_out: bool) -> None:
    """Two attempts, one connection: the second waits 0.2 s for it, then the platform answers in 0.2 s. Its 0.3 s
    per-try timeout is the platform's time and holds; the queue was the sidecar's (counted, it would have timed out
    and gone against the platform in the monitor and the breaker). The wall-time bound still counts the wait. The
    same when the attempts run in tasks of their own, to be heard out."""
    server = await slow_platform(aiohttp_server, "/open-apis/x", 0.2)
    client = UpstreamClient(f"http://127.0.0.1:{server.port}", connect_timeout=1, pool_size=1)
    heard: list[float] = []
    on_late = heard.append if heard_out else None

    async def attempt(within: float = math.inf, delay: float = 0.0) -> float:
        await asyncio.sleep(delay)   # the second one asks once the first holds the connection
        answer = await client.send("GET", "/open-apis/x", CIMultiDict(), None, 0.3, on_late, within)
        assert answer.status == 200
        return answer.queued

    try:
        first, second = await asyncio.gather(attempt(), attempt(delay=0.01))
        assert first == 0.0 and 0.15 <= second <= 0.3   # what the second waited is told, for its latency
        first, second = await asyncio.gather(attempt(), attempt(within=0.25, delay=0.01), return_exceptions=True)
        assert first == 0.0 and isinstance(second, AttemptTimeout)   # the request's own deadline: wall time
    finally:
        await client.close()



async def counting_platform(aiohttp_server: Callable[..., Awaitable[TestServer]], seconds: float,
                            arrived: list[str]) -> TestServer:
    """A platform that notes each POST's path as it arrives, then answers success after `seconds`."""
    async def answer(request: web.Request) -> web.Response:
        arrived.append(request.path)
        await asyncio.sleep(seconds)
        return web.json_response({"code": 0})

    app = web.Application()
    app.router.add_post("/open-apis/{name}", answer)
    return await aiohttp_server(app)


@pytest.mark.parametrize("heard_out", [False, True])
async def test_an_attempt_whose_request_stopped_waiting_in_the_pools_queue_is_never_sent(
        aiohttp_server: Callable[..., Awaitable[TestServer]], heard_out: bool) -> None:
    """One connection, held 0.3 s by a first write. A second write's deadline (0.1 s) comes while it queues for
    that connection: the sidecar's own queue, not the platform's timeout, and the write must not go out once the
    connection is free (its client has its answer; "unknown" must not turn into "applied later"). A third one's
    client leaves while it queues: not sent either. Heard out or not, the platform sees the first write only."""
    arrived: list[str] = []
    server = await counting_platform(aiohttp_server, 0.3, arrived)
    client = UpstreamClient(f"http://127.0.0.1:{server.port}", connect_timeout=1, pool_size=1)
    on_late = (lambda latency: None) if heard_out else None

    def write(name: str, within: float = math.inf) -> Awaitable[Answer]:
        return client.send("POST", f"/open-apis/{name}", CIMultiDict(), b"{}", 1.0, on_late, within)

    try:
        first = asyncio.ensure_future(write("first"))
        await asyncio.sleep(0.05)
        with pytest.raises(QueuedPastDeadline):
            await write("second", within=0.1)
        third = asyncio.ensure_future(write("third"))
        await asyncio.sleep(0.05)
        third.cancel()
        with pytest.raises(upstream.LeftUnsent):   # a cancellation that says nothing went out, heard out or not
            await third
        assert (await first).status == 200
        again = await write("fourth")   # the connection went back to the pool, and serves the next one
        assert again.status == 200
        await asyncio.sleep(0.05)
    finally:
        await client.close()
    assert arrived == ["/open-apis/first", "/open-apis/fourth"]


async def test_an_attempt_cut_off_while_its_connection_is_made_is_not_sent_and_the_connection_is_kept(
        aiohttp_server: Callable[..., Awaitable[TestServer]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Making a connection is the platform's time (a slow TLS handshake): the per-try timeout can cut the attempt
    off before it was sent, which says so (`ConnectTimeout`: not processed, so a write may be retried and is not
    "maybe applied"). Heard out, it must not be sent once connected; the new connection joins the pool."""
    arrived: list[str] = []
    server = await counting_platform(aiohttp_server, 0.0, arrived)
    made: list[int] = []
    create = aiohttp.TCPConnector._create_connection

    async def slow_create(self: aiohttp.TCPConnector, *args: object, **kwargs: object) -> object:
        made.append(1)
        await asyncio.sleep(0.15)
        return await create(self, *args, **kwargs)   # type: ignore[arg-type]

    monkeypatch.setattr(aiohttp.TCPConnector, "_create_connection", slow_create)
    client = UpstreamClient(f"http://127.0.0.1:{server.port}", connect_timeout=1)
    try:
        with pytest.raises(ConnectTimeout) as cut:
            await client.send("POST", "/open-apis/cut", CIMultiDict(), b"{}", 0.03, lambda latency: None)
        assert not cut.value.verdict.processed and cut.value.verdict.signal is Signal.TIMEOUT
        await asyncio.sleep(0.25)   # connected by now
        assert arrived == []
        answer = await client.send("POST", "/open-apis/next", CIMultiDict(), b"{}", 1.0, lambda latency: None)
        assert answer.status == 200
    finally:
        await client.close()
    assert arrived == ["/open-apis/next"] and len(made) == 1   # the next one went out on the kept connection


async def test_an_origins_pool_has_room_for_its_apps_up_to_its_cap() -> None:
    pools = Pools(connect_timeout=1)
    two, many = ("https", "open.feishu.cn", 443), ("https", "api.dingtalk.com", 443)
    for origin, apps in ((two, 2), (many, 10)):
        for _ in range(apps):
            pools.reserve(origin, 256)
    try:
        assert pools.session(two).connector is not None and pools.session(two).connector.limit == 512
        assert pools.session(many).connector is not None and pools.session(many).connector.limit == ORIGIN_CONNECTIONS
    finally:
        await pools.close()


def test_a_repeated_target_reuses_its_url_and_a_refused_one_is_refused_every_time() -> None:
    """Building the URL was 1% of the sidecar's instructions per request; a kept one must not be a way around the
    origin check, nor grow without bound when every call names another message ID."""
    client = UpstreamClient("https://open.feishu.cn", connect_timeout=1)
    first = client.url("/open-apis/im/v1/messages?receive_id_type=chat_id")
    assert client.url("/open-apis/im/v1/messages?receive_id_type=chat_id") is first
    for _ in range(2):
        with pytest.raises(MisdirectedRequest):
            client.url("@evil.com/x")
    for n in range(3 * URL_CACHE):
        url = client.url(f"/open-apis/im/v1/messages/om_{n}")
        assert (url.host, url.path) == ("open.feishu.cn", f"/open-apis/im/v1/messages/om_{n}")
        assert len(client._urls) <= URL_CACHE


async def test_an_attempt_run_in_its_own_task_outlives_the_wait_for_it_and_tells_what_it_ended_with() -> None:
    """What a heard-out attempt is awaited through (upstream._shielded): the request that stops waiting (its
    timeout) leaves the attempt running; a result, an error or a cancellation of the attempt reaches the request."""
    gate = asyncio.Event()

    async def attempt(ends: BaseException | None) -> str:
        await gate.wait()
        if ends is not None:
            raise ends
        return "answer"

    loop = asyncio.get_running_loop()
    running = loop.create_task(attempt(None))
    waiter = upstream._shielded(running)
    waiter.cancel()
    gate.set()
    assert await running == "answer"   # the request's timeout did not cut the attempt short

    failing = loop.create_task(attempt(ConnectionResetError("reset")))
    with pytest.raises(ConnectionResetError):
        await upstream._shielded(failing)
    assert await upstream._shielded(loop.create_task(attempt(None))) == "answer"
    cancelled = loop.create_task(attempt(None))
    told = upstream._shielded(cancelled)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await told


async def test_an_answer_that_comes_after_its_request_stopped_waiting_gives_its_connection_back() -> None:
    """The client left (or the attempt timed out) just as a streamed answer arrived: nobody will read it, so its
    pooled connection is released at once rather than when the garbage is collected."""
    released: list[bool] = []

    class Stream:
        def release(self) -> None:
            released.append(True)

    async def answered() -> Answer:
        return Answer(200, CIMultiDictProxy(CIMultiDict()), None, Stream())  # type: ignore[arg-type]

    task = asyncio.get_running_loop().create_task(answered())
    upstream._shielded(task).cancel()   # the request stops waiting before the answer is in
    await task
    await asyncio.sleep(0)   # the task's done-callbacks run
    assert released == [True]



@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(0, 40),
       st.lists(st.tuples(st.integers(5, 60), st.one_of(st.none(), st.integers(5, 120)),
                          st.one_of(st.none(), st.integers(0, 80)), st.booleans()), min_size=2, max_size=8))
def test_no_write_is_sent_after_its_request_stopped_waiting_for_it(
        pool: int, handshake: int, writes: list[tuple[int, int | None, int | None, bool]]) -> None:
    """Random writes through a small pool whose new connections take `handshake` ms: each takes some ms at the
    platform, may have a deadline, may lose its client, may be heard out. Whatever the interleaving, each write is
    sent (aiohttp's own trace of its headers going out) only while its request still waits for it, and none told
    QueuedPastDeadline or ConnectTimeout (not sent) is ever sent. Before the fix, a heard-out write queued past its
    deadline went out once a connection came free."""
    create = aiohttp.TCPConnector._create_connection

    async def slow_handshake(self: aiohttp.TCPConnector, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(handshake / 1000)
        return await create(self, *args, **kwargs)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        sent: dict[str, float] = {}
        stopped: dict[str, float] = {}

        async def headers_sent(session: object, context: object, params: TraceRequestHeadersSentParams) -> None:
            sent[params.url.path.rsplit("/", 1)[1]] = loop.time()

        async def answer(request: web.Request) -> web.Response:
            await asyncio.sleep(int(request.query["ms"]) / 1000)
            return web.json_response({"code": 0})

        trace = TraceConfig()
        trace.on_request_headers_sent.append(headers_sent)
        app = web.Application()
        app.router.add_post("/open-apis/{name}", answer)
        async with TestServer(app) as server:
            client = UpstreamClient(f"http://127.0.0.1:{server.port}", connect_timeout=1, pool_size=pool,
                                    trace_configs=[trace])

            async def write(name: str, ms: int, deadline: int | None, heard_out: bool) -> str:
                within = deadline / 1000 if deadline is not None else math.inf
                try:
                    await client.send("POST", f"/open-apis/{name}?ms={ms}", CIMultiDict(), b"{}", 1.0,
                                      (lambda latency: None) if heard_out else None, within)
                    return "answered"
                except (QueuedPastDeadline, ConnectTimeout):
                    return "unsent"
                except AttemptTimeout:
                    return "timed out"
                finally:
                    stopped[name] = loop.time()

            tasks = [asyncio.ensure_future(write(f"w{i}", ms, deadline, heard_out))
                     for i, (ms, deadline, _, heard_out) in enumerate(writes)]
            for task, (_, _, leaves_after, _) in zip(tasks, writes):
                if leaves_after is not None:
                    loop.call_later(leaves_after / 1000, task.cancel)
            ended = await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.sleep(0.2)   # every connection free by now: anything still queued would have gone out
            await client.close()
        assert all(isinstance(result, (str, asyncio.CancelledError)) for result in ended)
        assert not {f"w{i}" for i, result in enumerate(ended) if result == "unsent"} & set(sent)
        assert all(at <= stopped[name] for name, at in sent.items())

    with mock.patch.object(aiohttp.TCPConnector, "_create_connection", slow_handshake):
        asyncio.run(run())
