"""Keep-alive pools to the platforms (one per origin), each configured upstream, and one attempt sent through it.

Owns sessions, the URL each attempt goes to (always the configured scheme, host and port: checked at send time),
what is read into memory (never more than the classification limit: larger answers stream), the late answer of an
attempt cut off by its per-try timeout or left by its client, never sending one its request no longer waits for,
and error translation; it does not decide about retries or tokens.
"""

from __future__ import annotations

import asyncio
import math
import zlib
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.egress import Egress, EgressSettings
from proxy.errors import (NETWORK_ERRORS, AttemptFailed, AttemptTimeout, BadRequest, ConnectTimeout, QueuedPastDeadline,
                          translate)
from proxy.outcome import Verdict
from proxy.watchdog import Cut, Watchdog

if TYPE_CHECKING:
    from proxy.platforms.base import Platform

CLASSIFY_LIMIT = 1024 * 1024   # answers up to this size are read whole, so errors inside them can be seen
READ_CHUNK = 64 * 1024
URL_CACHE = 64   # targets whose URL an upstream keeps built, then starts afresh (~0.6 KB each)
LATE_LIMIT = 10.0   # how long a timed-out attempt is still listened to: the longest per-try timeout there is
HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "Proxy-Connection", "TE", "Trailer",
    "Transfer-Encoding", "Upgrade", "Host", "Content-Length",
    "Expect",   # not hop-by-hop, but the sidecar answers 100-continue itself and has the whole body before sending
))
SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")   # send only what the client sent
# The most connections one pool opens to one origin, however many apps reserved room on it: Envoy's default
# max_connections per cluster. Each costs a TLS handshake to open and ~5 KB to hold (bench.inflight), and past
# this many a sidecar is short of CPU, not of connections; calls beyond it wait for one, off their per-try clock.
ORIGIN_CONNECTIONS = 1024


@dataclass(slots=True)
class Answer:
    """The platform's answer to one attempt: read whole (`body`) or still streaming (`stream`)."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes | None
    stream: aiohttp.ClientResponse | None = None
    head: bytes = b""   # what was already read of a streamed answer (up to the classification limit)
    verdict: Verdict | None = None   # the platform's classification, once a stage asked for it (`classified`)
    queued: float = 0.0   # seconds the attempt waited for a free pooled connection: the sidecar's time, not the platform's

    def plain_body(self) -> bytes | None:
        """The body as the platform meant it, for classification (decompressed when it came gzipped)."""
        if self.body is None:
            return None
        encoding = self.headers.get("Content-Encoding", "").lower()
        if encoding in ("gzip", "deflate"):
            try:
                return zlib.decompress(self.body, zlib.MAX_WBITS | 32)
            except zlib.error:
                return None
        return None if encoding else self.body

    def classified(self, platform: Platform, upstream: str) -> Verdict:
        """The platform's verdict on this answer, worked out once however many stages ask (the quota meter, the
        retry loop, the read cache)."""
        if self.verdict is None:
            self.verdict = platform.classify(upstream, self.status, self.headers, self.plain_body())
        return self.verdict

    def release(self) -> None:
        if self.stream is not None:
            self.stream.release()
            self.stream = None

    async def chunks(self, size: int) -> AsyncIterator[bytes]:
        """A streamed answer's bytes, from the start: what was read to classify it, then the rest as it comes."""
        if self.head:
            yield self.head
        if self.stream is not None:
            async for chunk in self.stream.content.iter_chunked(size):
                yield chunk


LateAnswer = Callable[[float], None]   # told the latency, in seconds, of an answer that came after its cut-off


class MisdirectedRequest(BadRequest):
    """The request would have left for another origin than the configured one: a target the client crafted."""


class LeftInFlight(asyncio.CancelledError):
    """The request stopped waiting for an attempt that runs in a task of its own: its client left, or the drain
    cut it short. Still a cancellation, carrying that task, which goes on (up to LATE_LIMIT) so that what the
    platform answers is counted as any attempt's answer; one not yet sent never is (`WatchedConnector`)."""

    def __init__(self, attempt: asyncio.Task[Answer], queued: float) -> None:
        super().__init__("the request stopped waiting for its attempt")
        self.attempt = attempt
        self.queued = queued   # seconds it had waited for a pooled connection: not the platform's time


class LeftUnsent(asyncio.CancelledError):
    """The request stopped waiting (its client left, or the drain cut it) before its attempt was sent: it still
    queued for a pooled connection, or its connection was being made. Still a cancellation, but nothing of the
    request reached the platform, and the attempt never will."""


Origin = tuple[str, str | None, int | None]   # scheme, host, port


class WatchedConnector(aiohttp.TCPConnector):
    """A pool that tells the watchdog while an attempt waits for one of its connections to come free: that wait is
    the sidecar's own queue, not the platform's time, and must not time the attempt out (nor, through it, count
    against the platform in the network monitor and the breaker). It also tells while an attempt makes a new
    connection: cut off then, it was not sent. An attempt whose request stopped waiting for it before it had a
    connection (cut off in that queue or while connecting, or its client gone) is not sent: the connection goes
    back to the pool unused, and the attempt ends cancelled."""

    def __init__(self, *, watchdog: Watchdog, **options: Any) -> None:
        super().__init__(**options)
        self._watchdog = watchdog

    async def connect(self, req: Any, traces: Any, timeout: Any) -> aiohttp.connector.Connection:
        connection = await super().connect(req, traces, timeout)
        if self._watchdog.abandoned():
            connection.release()
            raise asyncio.CancelledError("abandoned before it was sent")
        return connection

    async def _wait_for_available_connection(self, key: Any, traces: Any) -> None:   # aiohttp's own step
        self._watchdog.waiting()
        try:
            await super()._wait_for_available_connection(key, traces)
        except asyncio.CancelledError:   # the same exception goes on: aiohttp's own timeouts look for it
            self._watchdog.left_unsent()
            raise
        finally:
            self._watchdog.resumed()

    async def _create_connection(self, req: Any, traces: Any, timeout: Any) -> Any:   # aiohttp's own step
        self._watchdog.connecting()
        try:
            return await super()._create_connection(req, traces, timeout)
        except asyncio.CancelledError:
            self._watchdog.left_unsent()
            raise
        finally:
            self._watchdog.connected()


class Pools:
    """The keep-alive pools to the platforms, one per origin however many apps call it, and the one watchdog of
    every attempt's per-try timeout.

    A connection to open.feishu.cn carries any app's calls (the token is a header, not part of the connection), so
    1,000 apps share one pool instead of holding 1,000 (each mostly idle, each opening its own connections);
    an origin that hangs still holds only its own pool. A pool has room for the sum of the `pool_size`s reserved
    on it, so no app has less than it would alone, up to ORIGIN_CONNECTIONS.
    """

    def __init__(self, egress: Egress | None = None, *, connect_timeout: float,
                 trace_configs: Sequence[aiohttp.TraceConfig] = ()) -> None:
        self._egress = egress or Egress(EgressSettings())   # the proxy (or none) every connection goes through
        self._connect_timeout = connect_timeout
        self._trace_configs = list(trace_configs)
        self._sizes: dict[Origin, int] = {}
        self._sessions: dict[Origin, aiohttp.ClientSession] = {}
        # every attempt's per-try timeout, on one ticker: a ticker per app woke 100 times a second for each app
        # with an attempt in flight (32 tickers at 1,000 apps and 32 connections)
        self.watchdog = Watchdog()

    def reserve(self, origin: Origin, size: int) -> None:
        """Room for `size` more connections to `origin`; taken into account until its pool is first used."""
        self._sizes[origin] = self._sizes.get(origin, 0) + size

    def session(self, origin: Origin) -> aiohttp.ClientSession:
        session = self._sessions.get(origin)
        if session is None:
            session = self._sessions[origin] = self._create(min(self._sizes.get(origin, 0), ORIGIN_CONNECTIONS))
        return session

    def _create(self, size: int) -> aiohttp.ClientSession:
        return self._egress.session(
            limit=size, keepalive_timeout=30, ttl_dns_cache=300,
            connector_class=partial(WatchedConnector, watchdog=self.watchdog),
            auto_decompress=False, skip_auto_headers=SKIP_AUTO_HEADERS,
            # The sidecar relays cookies both ways and keeps none: a jar would replay one client's Set-Cookie
            # on every other client's calls (and costs a filter and an update per attempt).
            cookie_jar=aiohttp.DummyCookieJar(),
            # sock_connect, not connect: waiting for a free pooled connection is the sidecar's own congestion,
            # not the platform failing to accept one, and must not count (or open the breaker) as a connect failure.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout),
            trace_configs=self._trace_configs or None,
        )

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        await asyncio.gather(*(session.close() for session in sessions))


class UpstreamClient:
    """One configured upstream (an app's base URL): its URL checks and its attempts; the connections and the
    watchdog are the shared `pools`' (pools of its own when none is given)."""

    def __init__(self, base_url: str, *, connect_timeout: float, pool_size: int = 256,
                 egress: Egress | None = None, trace_configs: Sequence[aiohttp.TraceConfig] = (),
                 pools: Pools | None = None) -> None:
        self.base_url = base_url
        self._base = URL(base_url)
        self._origin: Origin = (self._base.scheme, self._base.raw_host, self._base.port)
        self._prefix = self._base.raw_path.rstrip("/")
        self._own_pools = pools is None
        self._pools = pools or Pools(egress, connect_timeout=connect_timeout, trace_configs=trace_configs)
        self._pools.reserve(self._origin, pool_size)
        self._urls: dict[str, URL] = {}

    @property
    def session(self) -> aiohttp.ClientSession:
        return self._pools.session(self._origin)

    def url(self, path_qs: str) -> URL:
        """The configured origin and base path, then `path_qs` (origin-form, already encoded): built from parts,
        then checked, so no target can move the scheme, host or port (`CONNECT evil.com:443` once made
        `https://open.feishu.cnevil.com:443`). The last URL_CACHE targets built are kept: most calls repeat one."""
        url = self._urls.get(path_qs)
        if url is None:
            url = self._build(path_qs)
            if len(self._urls) >= URL_CACHE:
                self._urls.clear()
            self._urls[path_qs] = url
        return url

    def _build(self, path_qs: str) -> URL:
        path, _, query = path_qs.partition("?")
        if not path.startswith("/") or path.startswith("//") or "#" in path_qs:
            raise MisdirectedRequest("the request target must be a path starting with a single /, without #fragment")
        b = self._base
        url = URL.build(scheme=b.scheme, host=b.raw_host or "", port=b.explicit_port, path=self._prefix + path,
                        query_string=query, encoded=True)
        if (url.scheme, url.raw_host, url.port) != self._origin:
            raise MisdirectedRequest("the request target would leave the configured platform host")
        return url

    async def close(self) -> None:
        """Closes the pool only when it is this client's own; shared pools are closed by their owner."""
        if self._own_pools:
            await self._pools.close()

    async def send(self, method: str, path_qs: str, headers: CIMultiDict[str],
                   body: bytes | AsyncIterable[bytes] | None, timeout: float,
                   on_late: LateAnswer | None = None, within: float = math.inf) -> Answer:
        """One attempt. Raises a translated AttemptFailed when the network fails it.

        With `on_late`, an attempt cut off by `timeout` goes on in the background (up to LATE_LIMIT) and its
        answer's latency is reported when it comes: the answer is dropped, but what it says about the platform's
        speed is what a per-try timeout must learn, and a slow platform is told apart from one that is gone.
        `timeout` is the platform's time (proxy/watchdog.py does not count the event loop's stalls in it); `within`
        is wall time no stall extends: what is left of the request's deadline.

        Every attempt that can be heard out is, from the first: the late answers of a slowdown's first timeouts are
        what tell a platform slowed past the down silence (1 s after the first timeout) from one that is gone.
        Such an attempt whose request stops waiting for another reason (its client left, the drain) goes on too,
        up to LATE_LIMIT, handed to the caller in LeftInFlight, so that its answer is still counted.
        """
        url = self.url(path_qs)   # refused here, before anything is sent, if it would leave the platform's origin
        if on_late is None:
            return await self._watched(self._exchange(method, url, headers, body), timeout, within)
        loop = asyncio.get_running_loop()
        exchange = loop.create_task(self._exchange(method, url, headers, body))
        started = loop.time()
        try:
            return await self._watched(_shielded(exchange), timeout, within, runs_in=exchange)
        except AttemptTimeout as exc:
            _listen_late(exchange, started, on_late)
            exc.heard_out = exchange
            raise
        except LeftInFlight:
            _bound(exchange, started)
            raise
        except BaseException:
            exchange.cancel()
            raise

    async def _watched(self, exchange: Awaitable[Answer], timeout: float, within: float,
                       runs_in: asyncio.Task[Answer] | None = None) -> Answer:
        task = self._pools.watchdog.watch(timeout, within, runs_in)
        try:
            answer = await exchange
            answer.queued = self._pools.watchdog.queued(task)
            return answer
        except asyncio.CancelledError as exc:
            queued, unsent = self._pools.watchdog.queued(task), self._pools.watchdog.unsent(task)
            cut = self._pools.watchdog.release(task, runs_in)
            if cut is Cut.QUEUED:
                raise QueuedPastDeadline("the request's deadline passed while it waited for a free connection to the "
                                         "platform (the sidecar's own queue); it was not sent") from exc
            if cut is Cut.CONNECTING:
                raise ConnectTimeout("no connection to the platform within the attempt's timeout; it was not "
                                     "sent") from exc
            if cut is not None:
                raise translate(asyncio.TimeoutError()) from exc
            if unsent:
                raise LeftUnsent("the request stopped waiting before its attempt was sent") from exc
            if runs_in is not None:
                raise LeftInFlight(runs_in, queued) from exc
            raise
        except NETWORK_ERRORS as exc:
            raise translate(exc) from exc
        finally:
            self._pools.watchdog.release(task, runs_in)

    async def _exchange(self, method: str, url: URL, headers: CIMultiDict[str],
                        body: bytes | AsyncIterable[bytes] | None) -> Answer:
        response = await self.session.request(method, url, headers=headers, data=body, allow_redirects=False)
        if not _should_read(response):
            return Answer(response.status, response.headers, None, response)
        if response.content_length is not None:   # within the limit (_should_read): read whole, in one go
            try:
                return Answer(response.status, response.headers, await response.read())
            finally:
                response.release()
        try:
            head, whole = await _read_up_to(response, CLASSIFY_LIMIT)
        except BaseException:
            response.release()
            raise
        if whole:
            response.release()
            return Answer(response.status, response.headers, head)
        # Longer than anything worth classifying (a chunked text download): stream it, starting with what was read.
        return Answer(response.status, response.headers, None, response, head)


async def _read_up_to(response: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """At most a little over `limit` bytes of the answer, and whether that was all of it."""
    buffer = bytearray()
    while len(buffer) <= limit:
        chunk = await response.content.read(READ_CHUNK)
        if not chunk:
            return bytes(buffer), True
        buffer += chunk
    return bytes(buffer), False


def _shielded(task: asyncio.Task[Answer]) -> asyncio.Future[Answer]:
    """What a request awaits of an attempt run in `task`: cancelling it (a timeout) leaves the task running.
    asyncio.shield, less what it does for a future not yet a task and for an outer future done first."""
    waiter: asyncio.Future[Answer] = task.get_loop().create_future()
    task.add_done_callback(partial(_settle, waiter))
    return waiter


def _settle(waiter: asyncio.Future[Answer], task: asyncio.Task[Answer]) -> None:
    if waiter.done():   # the request stopped waiting (a timeout, or it left): what the task ended with is not its
        answer = answer_of(task)   # (an error retrieved, so asyncio logs none lost)
        if answer is not None:
            answer.release()   # a streamed answer nobody reads gives its pooled connection back now
    elif task.cancelled():
        waiter.cancel()
    elif (exc := task.exception()) is not None:
        waiter.set_exception(exc)
    else:
        waiter.set_result(task.result())


def _listen_late(exchange: asyncio.Task[Answer], started: float, on_late: LateAnswer) -> None:
    """Hear out a timed-out attempt, up to LATE_LIMIT after it was sent; its answer itself is not used (`_settle`,
    which the request stopped waiting through, has released it)."""
    _bound(exchange, started)
    loop = exchange.get_loop()

    def done(future: asyncio.Task[Answer]) -> None:
        if answer_of(future) is not None:   # none after all (or the connection broke): nothing to learn
            on_late(loop.time() - started)

    exchange.add_done_callback(done)


def _bound(attempt: asyncio.Task[Answer], started: float) -> None:
    """An attempt nobody waits for any more is cancelled if it still runs LATE_LIMIT after it began."""
    limit = attempt.get_loop().call_at(started + LATE_LIMIT, attempt.cancel)
    attempt.add_done_callback(lambda _: limit.cancel())


def answer_of(attempt: asyncio.Task[Answer]) -> Answer | None:
    """What an attempt's task ended with, if it was an answer (not a failure, not a cancellation)."""
    if attempt.cancelled() or attempt.exception() is not None:
        return None
    return attempt.result()


def _should_read(response: aiohttp.ClientResponse) -> bool:
    """Read error answers and JSON/text answers (up to the limit, whatever their length); stream everything else."""
    length = response.content_length
    if length is not None and length > CLASSIFY_LIMIT:
        return False
    if response.status >= 300:
        return True
    content_type = response.headers.get("Content-Type", "")
    return "json" in content_type or content_type.startswith("text/")


def forward_headers(source: CIMultiDictProxy[str] | CIMultiDict[str], *, drop_prefix: str = "x-imsidecar-") -> CIMultiDict[str]:
    """Every end-to-end header, minus hop-by-hop ones and those the `Connection` header names."""
    connection = source.get("Connection")
    named = HOP_BY_HOP | {h.strip().lower() for h in connection.split(",")} if connection else HOP_BY_HOP
    kept = CIMultiDict(source)
    dropped = [name for name in kept if (lower := name.lower()) in named or lower.startswith(drop_prefix)]
    for name in dropped:
        kept.popall(name, None)
    return kept


__all__ = ["Answer", "AttemptFailed", "MisdirectedRequest", "Pools", "UpstreamClient", "forward_headers"]
