"""The server side of a forwarding listener: what a connection may hold, and answers for what never became a request.

Owns the connection cap, the header-read timeout, the keep-alive idle timeout (aiohttp's own), malformed requests
answered as JSON, and handler cancellation when a client leaves; what a request gets is the pipeline's business.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

from aiohttp import web

from proxy.config import Address, Limits
from proxy.drain import Drain
from proxy.guard import Guard
from proxy.metrics import Metrics
from proxy.platforms.base import BAD_REQUEST, INTERNAL_ERROR, TOO_LARGE

log = logging.getLogger("imsidecar.listener")

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
ErrorBody = Callable[[int, str], bytes]   # (sidecar code, message) -> a body in the listener's error shape

REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
# A status line is all an over-cap client gets: it has sent nothing yet that could say which platform it speaks.
OVER_CAPACITY = (b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 1\r\n"
                 b"X-Imsidecar-Error: TooManyConnections\r\nContent-Length: 0\r\n\r\n")


class Listener(web.Server):
    """aiohttp's low-level server with the limits of `limits` and a handler cancelled when its client leaves."""

    def __init__(self, handler: Handler, *, limits: Limits, address: Address, metrics: Metrics, guard: Guard,
                 drain: Drain, error_body: ErrorBody, **kwargs: Any) -> None:
        super().__init__(self._tracked, handler_cancellation=True, **kwargs)
        self.limits, self.address, self.guard, self.drain, self.error_body = limits, address, guard, drain, error_body
        self._inner = handler
        self._faults = metrics.client_faults
        self._protocol_kwargs = {"keepalive_timeout": limits.keepalive_timeout, **kwargs}
        self._reading: set[GuardedProtocol] = set()   # connections part-way through a request's headers
        self._sweeper: asyncio.Task[None] | None = None

    def __call__(self) -> GuardedProtocol:
        return GuardedProtocol(self, loop=asyncio.get_running_loop(), **self._protocol_kwargs)

    async def _tracked(self, request: web.BaseRequest) -> web.StreamResponse:
        protocol = request.protocol
        if isinstance(protocol, GuardedProtocol):
            protocol.request_started()
        task = self.drain.enter()
        try:
            return await self._inner(request)
        finally:
            self.drain.leave(task)
            if isinstance(protocol, GuardedProtocol):
                protocol.request_ended()

    def connection_made(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if len(self.connections) <= self.limits.max_connections:
            return
        idle = next((c for c in self.connections if c is not handler and isinstance(c, GuardedProtocol) and c.idle),
                    None)
        if idle is not None:   # as nginx does: an idle keep-alive connection costs its client only a reconnect
            self.fault("idle_closed")
            idle.force_close()
            return
        self.fault("over_capacity")
        transport.write(OVER_CAPACITY)
        handler.force_close()

    def fault(self, kind: str) -> None:
        self._faults.labels(str(self.address), kind).inc()

    def reading(self, protocol: GuardedProtocol) -> None:
        """`protocol` has started receiving a request: its headers are now on the clock."""
        self._reading.add(protocol)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        """One ticking sweep instead of a timer per request (a timer-heap insert and removal each, as the
        watchdog avoids for attempts): a connection is cut within a quarter of the header timeout, at most 1 s."""
        timeout = self.limits.header_timeout
        loop = asyncio.get_running_loop()
        while self._reading:
            await asyncio.sleep(min(1.0, timeout / 4))
            now = loop.time()
            for protocol in list(self._reading):
                started = protocol.first_byte_at
                if started is None:
                    self._reading.discard(protocol)
                elif now - started >= timeout:
                    self._reading.discard(protocol)
                    protocol.headers_too_slow()


class GuardedProtocol(web.RequestHandler):
    """One connection: the header clock runs from a request's first byte until its handler is called."""

    def __init__(self, listener: Listener, **kwargs: Any) -> None:
        super().__init__(listener, **kwargs)
        self.listener = listener
        self.busy = False
        self.first_byte_at: float | None = None   # loop time of the first byte of a request still being read

    @property
    def idle(self) -> bool:
        """Between requests with nothing of the next one received yet."""
        return not self.busy and self.first_byte_at is None

    def data_received(self, data: bytes) -> None:
        if data and not self.busy and self.first_byte_at is None:
            self.first_byte_at = asyncio.get_running_loop().time()
            self.listener.reading(self)
        super().data_received(data)

    def request_started(self) -> None:
        self.busy = True
        self.first_byte_at = None

    def request_ended(self) -> None:
        self.busy = False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.first_byte_at = None
        super().connection_lost(exc)

    def headers_too_slow(self) -> None:
        self.first_byte_at = None
        if self.busy or self.transport is None:
            return
        self.listener.fault("header_timeout")
        self.transport.write(REQUEST_TIMEOUT)
        self.force_close()

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's answer to what its parser refused (or a handler raised), as JSON in the listener's shape."""
        self.first_byte_at = None
        if request.writer.output_size > 0:
            raise ConnectionError("the answer had started; the connection is dropped instead")
        if status >= 500:
            self.listener.guard.failed("handler", exc or RuntimeError(message or "handler failed"))
            kind, code, text = "InternalError", INTERNAL_ERROR, "the sidecar failed; the failure is logged"
        else:
            self.listener.fault("malformed")
            log.warning("malformed request on %s: %s", self.listener.address, (message or str(exc))[:200])
            kind, code = "MalformedRequest", TOO_LARGE if status == 413 else BAD_REQUEST
            text = "the request could not be parsed as HTTP/1.1"
        response = web.Response(status=status, body=self.listener.error_body(code, f"imsidecar: {text}"),
                                headers={"X-Imsidecar-Error": kind}, content_type="application/json")
        response.force_close()
        return response


__all__ = ["GuardedProtocol", "Listener"]
