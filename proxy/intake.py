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
        """The next chunk (b"" at the end), waiting at most the idle timeout (or what is left of the deadline).

        What has already arrived is taken without a timer: on loopback a body is usually there with its headers.
        """
        arrived = _buffered(request)
        if arrived or request.content.at_eof():
            return arrived
        try:
            async with asyncio.timeout(self.patience(deadline)):
                return await _read(request)
        except TimeoutError:
            raise self.stalled() from None

    async def rest(self, prefix: bytes, request: web.BaseRequest, deadline: float,
                   body: RequestBody) -> AsyncIterator[bytes]:
        """A body too large to buffer: what was read so far, then the rest as it arrives, still within the limits.

        This runs inside the upstream client's writer task: a fault is noted on `body` for the pipeline to see.
        """
        total, limit = len(prefix), self.limits.max_request_bytes
        yield prefix
        while True:
            try:
                chunk = await self.chunk(request, deadline)
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
    except (ConnectionError, HttpProcessingError) as exc:
        raise _client_fault(exc) from exc


def _buffered(request: web.BaseRequest) -> bytes:
    try:
        return request.content.read_nowait(CHUNK)
    except (ConnectionError, HttpProcessingError) as exc:
        raise _client_fault(exc) from exc


def _client_fault(exc: Exception) -> ClientFault:
    if isinstance(exc, ConnectionError):
        return ClientGone("the client disconnected while sending its body")
    # a chunked encoding or length the parser could not follow
    return BadRequest(f"the request body is malformed ({type(exc).__name__})")


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
