"""What the sidecar takes from a client before forwarding: the request target, `Expect`, and the body.

Owns refusing targets that are not origin-form, answering `100-continue`, reading the body within the size limit,
the idle timeout and the deadline, and noting a client fault met while the body streams upstream; it does not
forward (the pipeline does) and never blames the platform for what the client did.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator

from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError

from proxy.clock import Clock
from proxy.config import Limits
from proxy.errors import BadRequest, ClientFault, ClientGone, ExpectationFailed, RequestTimeout, RequestTooLarge
from proxy.watchdog import Watchdog

CHUNK = 64 * 1024
# CONNECT would make the sidecar a tunnel, TRACE would echo the request (and the token the sidecar added) back.
REFUSED_METHODS = frozenset({"CONNECT", "TRACE"})
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def target_problem(method: str, raw_target: str) -> BadRequest | None:
    """Why this request target is not forwarded, or None: only origin-form (`/path?query`, RFC 9112 §3.2.1) is.

    Absolute-form (`http://host/...`), authority-form (`CONNECT host:443`) and asterisk-form (`OPTIONS *`) name
    a destination of the client's choosing; a `#fragment` is never sent by a client and would swallow the
    `access_token` the sidecar appends to the query.
    """
    if method in REFUSED_METHODS:
        return BadRequest(f"{method} is not forwarded: the sidecar is neither a tunnel nor an echo")
    if not raw_target.startswith("/") or raw_target.startswith("//"):
        return BadRequest("only origin-form request targets (/path?query) are forwarded")
    if "#" in raw_target:
        return BadRequest("a request target cannot carry a #fragment")
    return None


@dataclass(slots=True)
class RequestBody:
    """Buffered (replayable) when it fits the replay buffer; otherwise a one-shot stream.

    `fault` is set when the client fails the stream while it is being sent (too large, stalled, gone): the
    attempt then failed because of the client, and must be answered and counted as the client's fault.
    """

    data: bytes | None
    stream: AsyncIterator[bytes] | None = None
    length: int | None = None
    replayable: bool = True
    fault: ClientFault | None = None

    def __post_init__(self) -> None:
        self.replayable = self.stream is None

    def take(self) -> bytes | AsyncIterator[bytes] | None:
        if self.stream is None:
            return self.data
        stream, self.stream = self.stream, None
        return stream


class BodyReader:
    """Reads a client's body within `limits`: size, an idle timeout between chunks, and the request's deadline."""

    def __init__(self, limits: Limits, clock: Clock) -> None:
        self.limits, self.clock = limits, clock
        self._watchdog = Watchdog()   # the idle timeouts of buffered reads, which run on the request's own task

    async def read(self, request: web.BaseRequest, deadline: float) -> RequestBody:
        limit, replay = self.limits.max_request_bytes, self.limits.replay_buffer_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise RequestTooLarge(f"request body of {length} bytes is over the limit of {limit}")
        await expect(request)   # after the size check: a body that will be refused is never asked for
        if not request.body_exists:
            return RequestBody(None, length=0)
        prefix = bytearray()
        while chunk := await self.chunk(request, deadline):
            prefix += chunk
            if len(prefix) > limit:
                raise RequestTooLarge(f"request body is over the limit of {limit} bytes")
            if len(prefix) > replay:
                body = RequestBody(None, length=length)
                body.stream, body.replayable = self.rest(bytes(prefix), request, deadline, body), False
                return body
        return RequestBody(bytes(prefix), length=len(prefix))

    async def chunk(self, request: web.BaseRequest, deadline: float) -> bytes:
        """The next chunk (b"" at the end); the watchdog cancels this task if the client goes quiet."""
        task = self._watchdog.watch(self.patience(deadline))
        try:
            return await _read(request)
        except asyncio.CancelledError:
            if self._watchdog.release(task):
                raise self.stalled() from None
            raise
        finally:
            self._watchdog.release(task)

    async def rest(self, prefix: bytes, request: web.BaseRequest, deadline: float,
                   body: RequestBody) -> AsyncIterator[bytes]:
        """A body too large to buffer: what was read so far, then the rest as it arrives, still within the limits.

        This runs inside the upstream client's writer task, so the idle timeout is a plain `asyncio.timeout`.
        """
        total, limit = len(prefix), self.limits.max_request_bytes
        yield prefix
        while True:
            try:
                async with asyncio.timeout(self.patience(deadline)):
                    chunk = await _read(request)
            except TimeoutError:
                body.fault = self.stalled()
            except ClientFault as fault:
                body.fault = fault
            else:
                total += len(chunk)
                if not chunk:
                    return
                if total > limit:
                    body.fault = RequestTooLarge(f"request body is over the limit of {limit} bytes")
            if body.fault is not None:
                raise body.fault
            yield chunk

    def patience(self, deadline: float) -> float:
        return max(0.001, min(self.limits.body_timeout, deadline - self.clock.now()))

    def stalled(self) -> RequestTimeout:
        return RequestTimeout(f"the request body stalled: nothing arrived for {self.limits.body_timeout:g}s, "
                              f"or the request's deadline passed while it was being sent")


async def _read(request: web.BaseRequest) -> bytes:
    try:
        return await request.content.read(CHUNK)
    except ConnectionError as exc:
        raise ClientGone("the client disconnected while sending its body") from exc
    except HttpProcessingError as exc:   # a chunked encoding or length the parser could not follow
        raise BadRequest(f"the request body is malformed ({type(exc).__name__})") from exc


async def expect(request: web.BaseRequest) -> None:
    """`Expect: 100-continue` is answered here (RFC 9110 §10.1.1) and never forwarded: the sidecar reads the
    whole body before the platform sees the request, so the platform could never answer it in time."""
    value = request.headers.get("Expect")
    if value is None:
        return
    if value.strip().lower() != "100-continue":
        raise ExpectationFailed(f"Expect: {value[:40]!r} cannot be met; only 100-continue is understood")
    if request.version >= HttpVersion11 and request.body_exists:
        await request.writer.write(CONTINUE)
        request.writer.output_size = 0   # the answer proper has not started (aiohttp's own expect handler does this)


__all__ = ["BodyReader", "RequestBody", "target_problem"]
