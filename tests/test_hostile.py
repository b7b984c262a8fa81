"""A hostile or careless client against a running sidecar: targets that would misdirect the token, faults that are
the client's own, `Expect`, and the limits on what a slow client may hold. Raw sockets where aiohttp's client
cannot make the request."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import traceback
from types import SimpleNamespace
from typing import Any, AsyncIterator

import aiohttp
import pytest

from proxy import config
from proxy.breaker import BreakerState
from tests.conftest import Platforms, Running, SidecarFactory

MESSAGE = json.dumps({"receive_id": "oc_1", "msg_type": "text", "content": json.dumps({"text": "hi"})}).encode()


# Raw HTTP --------------------------------------------------------------------------------------------------------

class Raw:
    """One client connection, spoken to byte by byte."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, base: str) -> Raw:
        host, port = base.removeprefix("http://").split(":")
        return cls(*await asyncio.open_connection(host, int(port)))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, bound: float = 5.0) -> tuple[int, dict[str, str], bytes]:
        """The next response: status, headers (lower-case names) and a Content-Length body."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), bound)
        lines = head.decode("latin-1").split("\r\n")
        headers = dict((k.strip().lower(), v.strip()) for k, v in (line.split(":", 1) for line in lines[1:] if line))
        body = await asyncio.wait_for(self.reader.readexactly(int(headers.get("content-length", 0))), bound)
        return int(lines[0].split()[1]), headers, body

    async def closed(self, bound: float = 5.0) -> bool:
        """True when the sidecar closes the connection (EOF) within `bound`."""
        try:
            return await asyncio.wait_for(self.reader.read(), bound) is not None
        except ConnectionError:
            return True

    def close(self) -> None:
        self.writer.close()


async def exchange(base: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    raw = await Raw.open(base)
    try:
        await raw.send(request)
        return await raw.answer()
    finally:
        raw.close()


def recording_traces(seen: list[str]) -> list[aiohttp.TraceConfig]:
    """Every host the sidecar resolves or sends a request to."""
    trace = aiohttp.TraceConfig()

    async def on_request(session: Any, context: SimpleNamespace, params: Any) -> None:
        seen.append(f"{params.url.host}:{params.url.port}")

    async def on_resolve(session: Any, context: SimpleNamespace, params: Any) -> None:
        seen.append(f"resolve {params.host}")

    trace.on_request_start.append(on_request)
    trace.on_dns_resolvehost_start.append(on_resolve)
    return [trace]


def platform_calls(platforms: Platforms) -> list[str]:
    """What reached the fake platforms, the sidecar's own token fetches aside."""
    seen = platforms.feishu.requests + platforms.dingtalk.requests
    tokens = ("access_token/internal", "/gettoken", "/oauth2/accessToken")
    return [r.path_qs for r in seen if not any(t in r.path_qs for t in tokens)]


async def wait_for_metric(running: Running, name: str, value: float, **labels: str) -> None:
    for _ in range(500):
        if running.metric(name, **labels) >= value:
            return
        await asyncio.sleep(0.01)
    assert running.metric(name, **labels) >= value, (name, labels, running.metric(name, **labels))


def sidecar_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """ERROR lines (tracebacks included) of the sidecar's own, not of the fake platform it abandoned."""
    def from_fake(record: logging.LogRecord) -> bool:
        return record.exc_info is not None and "proxy/fakes/" in "".join(traceback.format_tb(record.exc_info[2]))
    return [r for r in caplog.records if r.levelno >= logging.ERROR and not from_fake(r)]


def errors(running: Running, kind: str) -> float:
    return running.metric("imsidecar_sidecar_errors_total", app="sales-bot", upstream="open", error=kind)


def health(running: Running, app: str = "sales-bot", upstream: str = "open") -> tuple[BreakerState, float]:
    binding = next(b for b in running.sidecar.router.targets(running.sidecar.config.listen)
                   if b.app.name == app and b.upstream == upstream)
    healthy = running.metric("imsidecar_network_state", app=app, upstream=upstream, state="healthy")
    return binding.breaker.state, healthy


# Targets ---------------------------------------------------------------------------------------------------------

HOSTILE_TARGETS = [
    b"CONNECT evil.com:443 HTTP/1.1\r\nHost: evil.com:443\r\n\r\n",
    b"GET http://evil.com/open-apis/im/v1/messages HTTP/1.1\r\nHost: evil.com\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"TRACE /open-apis/im/v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"GET /open-apis/im/v1/messages#x?access_token=stolen HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"GET //evil.com/open-apis HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
]


@pytest.mark.parametrize("request_bytes", HOSTILE_TARGETS, ids=["connect", "absolute", "asterisk", "trace",
                                                                "fragment", "scheme-relative"])
@pytest.mark.parametrize("port", ["feishu_base", "api_base"])
async def test_a_target_that_is_not_origin_form_is_refused_and_no_other_host_is_tried(
        start_sidecar: SidecarFactory, platforms: Platforms, request_bytes: bytes, port: str) -> None:
    seen: list[str] = []
    running = await start_sidecar(upstream_traces=recording_traces(seen))
    await asyncio.sleep(0.05)   # the token warm-up has gone to the platform by now
    status, headers, body = await exchange(getattr(running, port), request_bytes)
    assert status == 400 and headers["x-imsidecar-error"] == "BadRequest"
    answer = json.loads(body)
    if port == "feishu_base":
        assert answer["code"] == 9990400 and "msg" in answer
    else:
        assert answer["code"] == "imsidecar.badRequest" and "message" in answer
    assert platform_calls(platforms) == []
    assert all(host.startswith("127.0.0.1") or host == "resolve 127.0.0.1" for host in seen), seen
    assert not any("evil" in host for host in seen)


async def test_on_a_shared_listener_a_hostile_target_gets_both_shapes(start_sidecar: SidecarFactory,
                                                                     platforms: Platforms,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    running = await start_sidecar()
    caplog.set_level(logging.INFO, logger="imsidecar.access")
    status, headers, body = await exchange(running.base, HOSTILE_TARGETS[0])
    assert [r.getMessage() for r in caplog.records if r.name == "imsidecar.access"] == ["- - CONNECT - 400 attempts=0"]
    answer = json.loads(body)
    assert status == 400 and answer["code"] == answer["errcode"] == 9990400
    assert running.metric("imsidecar_client_faults_total", listen=str(running.sidecar.config.listen),
                          kind="bad_target") == 1
    status, _, body = await exchange(running.base, b"POST /dingtalk/topapi/v2/user/get#f HTTP/1.1\r\n"
                                                   b"Host: a\r\nContent-Length: 2\r\n\r\n{}")
    assert status == 400 and json.loads(body)["errcode"] == 9990400   # DingTalk oapi's shape: the app is known
    assert platform_calls(platforms) == []


def test_the_upstream_url_keeps_the_configured_origin() -> None:
    from proxy.upstream import MisdirectedRequest, UpstreamClient

    client = UpstreamClient("https://open.feishu.cn", connect_timeout=1)
    assert str(client.url("/open-apis/x?a=%20b")) == "https://open.feishu.cn/open-apis/x?a=%20b"
    for target in ("evil.com:443", "@evil.com/x", "//evil.com/x", "/x#y", "*", ""):
        with pytest.raises(MisdirectedRequest):
            client.url(target)


# Client faults -----------------------------------------------------------------------------------------------------

async def chunked(size: int, piece: int = 1024) -> AsyncIterator[bytes]:
    for _ in range(size // piece):
        yield b"y" * piece


async def test_oversized_chunked_bodies_never_open_the_breaker(start_sidecar: SidecarFactory, platforms: Platforms,
                                                               http: aiohttp.ClientSession) -> None:
    running = await start_sidecar(limits="{deadline: 5s, max_request_bytes: 4KiB, replay_buffer_bytes: 1KiB}")
    for _ in range(25):
        async with http.post(f"{running.base}/sales-bot/open-apis/im/v1/files", data=chunked(16 * 1024)) as r:
            assert r.status == 413 and r.headers["X-Imsidecar-Error"] == "RequestTooLarge"
            assert (await r.json())["code"] == 9990413
    assert health(running) == (BreakerState.CLOSED, 1.0)
    assert running.metric("imsidecar_requests_total", app="sales-bot", upstream="open", route="/open-apis/im/v1/files",
                          method="POST", status_class="4xx", outcome="client_error") == 25
    assert errors(running, "RequestTooLarge") == 25
    assert running.metric("imsidecar_upstream_attempts_total", app="sales-bot", upstream="open",
                          route="/open-apis/im/v1/files", outcome="retryable", reason="reset") == 0
    assert platforms.feishu.faults.script == type(platforms.feishu.faults.script)()   # nothing scripted: no faults


async def test_client_faults_are_the_clients_and_leave_the_upstream_healthy(
        start_sidecar: SidecarFactory, platforms: Platforms, caplog: pytest.LogCaptureFixture) -> None:
    running = await start_sidecar(limits="{deadline: 5s, body_timeout: 100ms}")
    caplog.set_level(logging.INFO)
    head = (b"POST /sales-bot/open-apis/im/v1/messages?receive_id_type=chat_id HTTP/1.1\r\nHost: a\r\n"
            b"Content-Type: application/json\r\n")
    for _ in range(7):
        # The body stops after 10 of 100 bytes: 408 once body_timeout passes, not a request held to its deadline.
        status, headers, _ = await exchange(running.base, head + b"Content-Length: 100\r\n\r\n" + MESSAGE[:10])
        assert status == 408 and headers["x-imsidecar-error"] == "RequestTimeout"
        # A chunked encoding the parser cannot follow.
        status, headers, _ = await exchange(running.base, head + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n")
        assert status == 400 and headers["x-imsidecar-error"] == "MalformedRequest"
        # The client leaves mid-body.
        raw = await Raw.open(running.base)
        await raw.send(head + b"Content-Length: 100\r\n\r\n" + MESSAGE[:10])
        raw.close()
        # The client leaves while the platform is still working on its request.
        platforms.feishu.faults.hang_seconds = 0.3
        platforms.feishu.faults.script.append("hang")
        raw = await Raw.open(running.base)
        await raw.send(head + b"Content-Length: %d\r\n\r\n" % len(MESSAGE) + MESSAGE)
        await asyncio.sleep(0.05)
        raw.close()
        await asyncio.sleep(0.3)
    labels = dict(app="sales-bot", upstream="open", route="/open-apis/im/v1/messages", method="POST", status_class="4xx")
    await wait_for_metric(running, "imsidecar_sidecar_errors_total", 14, app="sales-bot", upstream="open",
                          error="ClientGone")
    assert errors(running, "RequestTimeout") == 7
    assert running.metric("imsidecar_requests_total", outcome="client_error", **labels) == 21
    # The bad chunk arrived with the headers: aiohttp's parser refused the request before any handler saw it.
    assert running.metric("imsidecar_client_faults_total", listen=str(running.sidecar.config.listen),
                          kind="malformed") == 7
    assert health(running) == (BreakerState.CLOSED, 1.0)
    attempts = running.sidecar.metrics.registry.get_sample_value
    assert not attempts("imsidecar_upstream_attempts_total", dict(app="sales-bot", upstream="open",
                        route="/open-apis/im/v1/messages", outcome="retryable", reason="timeout"))
    access = [r for r in caplog.records if r.name == "imsidecar.access" and " 499 " in r.getMessage()]
    assert len(access) == 14
    assert not sidecar_errors(caplog)


async def test_every_abandoned_download_is_counted_and_logged(start_sidecar: SidecarFactory,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    running = await start_sidecar()
    caplog.set_level(logging.INFO)
    size = 8 * 1024 * 1024
    for _ in range(21):
        raw = await Raw.open(running.base)
        await raw.send(b"GET /sales-bot/open-apis/im/v1/files/file_%d HTTP/1.1\r\nHost: a\r\n\r\n" % size)
        await asyncio.wait_for(raw.reader.readexactly(100_000), 5)   # part of it, then gone
        raw.close()
    labels = dict(app="sales-bot", upstream="open", route="/open-apis/im/v1/files/:file_key", method="GET")
    await wait_for_metric(running, "imsidecar_requests_total", 21, status_class="4xx", outcome="client_error", **labels)
    assert errors(running, "ClientGone") == 21
    assert running.metric("imsidecar_requests_total", status_class="2xx", outcome="success", **labels) == 0
    assert len([r for r in caplog.records if r.name == "imsidecar.access" and " 499 " in r.getMessage()]) == 21
    assert not sidecar_errors(caplog)


async def test_a_malformed_request_gets_json_and_no_traceback(start_sidecar: SidecarFactory,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    running = await start_sidecar()
    status, headers, body = await exchange(running.feishu_base, b"GARBAGE\r\n\r\n")
    assert status == 400 and headers["x-imsidecar-error"] == "MalformedRequest"
    assert json.loads(body)["code"] == 9990400
    assert running.metric("imsidecar_client_faults_total", listen=f"127.0.0.1:{running.feishu_base.rsplit(':')[-1]}",
                          kind="malformed") == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


# Expect ------------------------------------------------------------------------------------------------------------

async def test_expect_100_continue_is_answered_by_the_sidecar_and_not_forwarded(
        start_sidecar: SidecarFactory, platforms: Platforms) -> None:
    running = await start_sidecar()
    raw = await Raw.open(running.base)
    await raw.send(b"POST /sales-bot/open-apis/im/v1/messages?receive_id_type=chat_id HTTP/1.1\r\nHost: a\r\n"
                   b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
                   b"Content-Length: %d\r\n\r\n" % len(MESSAGE))
    interim = await asyncio.wait_for(raw.reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    await raw.send(MESSAGE)
    status, _, body = await raw.answer()
    raw.close()
    assert status == 200 and json.loads(body)["code"] == 0
    sent = [r for r in platforms.feishu.requests if r.path_qs.startswith("/open-apis/im/v1/messages")]
    assert len(sent) == 1 and "Expect" not in sent[0].headers
    assert json.loads(json.dumps(platforms.feishu.messages[0]["content"])) == json.loads(MESSAGE)["content"]


async def test_expect_on_a_body_over_the_limit_gets_413_without_100(start_sidecar: SidecarFactory,
                                                                    platforms: Platforms) -> None:
    running = await start_sidecar(limits="{deadline: 5s, max_request_bytes: 1KiB}")
    status, headers, _ = await exchange(running.base, b"POST /sales-bot/open-apis/im/v1/files HTTP/1.1\r\nHost: a\r\n"
                                                      b"Expect: 100-continue\r\nContent-Length: 5000\r\n\r\n")
    assert status == 413 and headers["x-imsidecar-error"] == "RequestTooLarge"
    status, headers, _ = await exchange(running.base, b"POST /sales-bot/open-apis/im/v1/files HTTP/1.1\r\nHost: a\r\n"
                                                      b"Expect: a-pony\r\nContent-Length: 2\r\n\r\n{}")
    assert status == 417 and headers["x-imsidecar-error"] == "ExpectationFailed"
    assert platform_calls(platforms) == []


# Limits on what a client may hold ----------------------------------------------------------------------------------

async def test_headers_that_trickle_in_are_cut_off(start_sidecar: SidecarFactory) -> None:
    running = await start_sidecar(limits="{deadline: 5s, header_timeout: 200ms}")
    raw = await Raw.open(running.base)
    await raw.send(b"GET /sales-bot/open-apis/im/v1/messages/om_1 HTTP/1.1\r\nHo")
    await asyncio.sleep(0.1)
    await raw.send(b"s")   # still trickling: the timer runs from the first byte, not the last
    status, _, _ = await raw.answer()
    assert status == 408 and await raw.closed()
    assert running.metric("imsidecar_client_faults_total", listen=str(running.sidecar.config.listen),
                          kind="header_timeout") == 1


async def test_an_idle_keep_alive_connection_is_closed(start_sidecar: SidecarFactory) -> None:
    running = await start_sidecar(limits="{deadline: 5s, keepalive_timeout: 200ms}")
    raw = await Raw.open(running.base)
    await raw.send(b"GET /sales-bot/open-apis/im/v1/messages/om_1 HTTP/1.1\r\nHost: a\r\n\r\n")
    status, _, _ = await raw.answer()
    assert status in (200, 400) and await raw.closed(bound=5)


async def test_past_the_connection_cap_the_idle_go_first_then_new_ones_are_refused(
        start_sidecar: SidecarFactory) -> None:
    running = await start_sidecar(limits="{deadline: 5s, max_connections: 3}")
    listen = str(running.sidecar.config.listen)
    idle = [await Raw.open(running.base) for _ in range(3)]
    await asyncio.sleep(0.05)
    newcomer = await Raw.open(running.base)
    assert await idle[0].closed()   # the oldest idle connection made room
    assert running.metric("imsidecar_client_faults_total", listen=listen, kind="idle_closed") == 1
    busy = idle[1:] + [newcomer]
    for connection in busy:   # part of a request each: no longer idle
        await connection.send(b"GET /sales-bot/open-apis/im/v1/messages/om_1 HTTP/1.1\r\n")
    await asyncio.sleep(0.05)
    refused = await Raw.open(running.base)
    status, headers, _ = await refused.answer()
    assert status == 503 and headers["x-imsidecar-error"] == "TooManyConnections" and await refused.closed()
    assert running.metric("imsidecar_client_faults_total", listen=listen, kind="over_capacity") == 1
    for connection in busy + [refused]:
        connection.close()


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to read a listening socket's backlog")
async def test_each_listener_takes_the_configured_backlog(start_sidecar: SidecarFactory) -> None:
    """A burst past the backlog waits ~1 s for a SYN retry: a deployment expecting bursts can deepen it."""
    running = await start_sidecar(limits="{deadline: 5s, backlog: 777}")
    for address in (running.sidecar.config.listen, running.sidecar.config.admin_listen):
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{address.port}"], capture_output=True, text=True,
                                   check=True).stdout.split()
        assert listening[2] == "777", listening   # Send-Q of a listening socket: its backlog
    default = config.loads("apps: [{name: a, platform: feishu, app_id: i, app_secret: s}]", env={})
    assert default.limits.backlog == 128


async def test_a_client_deadline_shorter_than_the_platform_needs_is_not_held_against_it(
        start_sidecar: SidecarFactory, platforms: Platforms, http: aiohttp.ClientSession) -> None:
    running = await start_sidecar(limits="{deadline: 10s}")
    platforms.feishu.faults.hang_seconds = 0.1
    for _ in range(25):
        platforms.feishu.faults.script.append("hang")
        async with http.get(f"{running.base}/sales-bot/open-apis/im/v1/messages/om_1",
                            headers={"X-Imsidecar-Timeout": "10ms"}) as r:
            assert r.status == 504 and r.headers["X-Imsidecar-Error"] == "DeadlineExceeded"
    assert health(running) == (BreakerState.CLOSED, 1.0)
    assert running.metric("imsidecar_upstream_attempts_total", app="sales-bot", upstream="open",
                          route="/open-apis/im/v1/messages/:message_id", outcome="retryable", reason="timeout") == 0
