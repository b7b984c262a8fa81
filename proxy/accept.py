"""Accepting connections: every connection waiting in a listen queue, each time its listening socket is ready.

Owns the listening sockets of the sidecar's listeners (`AcceptingSite`, aiohttp's `TCPSite` with this accept loop);
what a connection may then hold is proxy/listener.py's. uvloop's libuv accepts one connection per turn of its loop
(`uv__server_io`), and a saturated sidecar turns its loop a few dozen times a second: 512 connections opened at once
waited seconds in the kernel's queue, their requests already sent (p99 7 s at 512 connections, bench.scale), and a
deeper `limits.backlog` only made the queue longer. asyncio's own loop accepts up to the backlog per turn; this does
so on either loop, then hands each socket to the loop as an accepted connection.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import Callable

from aiohttp import web

log = logging.getLogger("imsidecar.accept")

PAUSE_WHEN_EXHAUSTED = 1.0   # seconds without accepting once the process is out of descriptors (asyncio's own)
_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class Acceptor(asyncio.AbstractServer):
    """The listening sockets of one address, drained on every readiness: up to `backlog` connections per turn."""

    def __init__(self, sockets: list[socket.socket], protocol_factory: Callable[[], asyncio.Protocol],
                 backlog: int, pause: float = PAUSE_WHEN_EXHAUSTED) -> None:
        self._sockets, self._factory, self._backlog, self._pause_for = sockets, protocol_factory, backlog, pause
        self._loop = asyncio.get_running_loop()
        self._adopting: set[asyncio.Task[object]] = set()
        self._paused: dict[socket.socket, asyncio.TimerHandle] = {}
        self._serving = False
        self._closed = asyncio.Event()

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        self._serving = True
        for sock in self._sockets:
            self._loop.add_reader(sock.fileno(), self._ready, sock)

    async def serve_forever(self) -> None:
        if not self._serving:
            await self.start_serving()
        await self._closed.wait()

    def close(self) -> None:
        """Stop accepting at once (a second call does nothing); connections already accepted are the server's."""
        self._serving = False
        for handle in self._paused.values():
            handle.cancel()
        self._paused.clear()
        for sock in self._sockets:
            if sock.fileno() != -1:
                self._loop.remove_reader(sock.fileno())
                sock.close()
        self._closed.set()

    async def wait_closed(self) -> None:
        if self._adopting:
            await asyncio.wait(list(self._adopting))

    def _ready(self, sock: socket.socket) -> None:
        for _ in range(self._backlog):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:   # the client gave up while queued
                continue
            except OSError as exc:
                if exc.errno not in _EXHAUSTED:
                    raise
                self._pause(sock, exc)
                return
            self._adopt(conn)

    def _pause(self, sock: socket.socket, exc: OSError) -> None:
        """Out of descriptors: leave the queue to the kernel for a while instead of spinning on the error."""
        log.warning("imsidecar: cannot accept on %s (%s); accepting again in %.1f s",
                    sock.getsockname(), exc.strerror, self._pause_for)
        self._loop.remove_reader(sock.fileno())
        self._paused[sock] = self._loop.call_later(self._pause_for, self._unpause, sock)

    def _unpause(self, sock: socket.socket) -> None:
        del self._paused[sock]
        if self._serving:
            self._loop.add_reader(sock.fileno(), self._ready, sock)

    def _adopt(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # as asyncio's transports do
        task: asyncio.Task[object] = self._loop.create_task(self._loop.connect_accepted_socket(self._factory, conn))
        self._adopting.add(task)
        task.add_done_callback(self._adopted)

    def _adopted(self, task: asyncio.Task[object]) -> None:
        self._adopting.discard(task)
        if not task.cancelled() and task.exception() is not None:   # e.g. reset between accept and adoption
            log.debug("imsidecar: an accepted connection could not be set up: %s", task.exception())


async def listening_sockets(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Bound and listening, one per address `host` resolves to, as `loop.create_server` binds them (resolved off the
    loop, as it does)."""
    found = await asyncio.get_running_loop().getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(found):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class AcceptingSite(web.BaseSite):
    """A TCP site of an aiohttp runner whose connections are accepted by an `Acceptor`."""

    __slots__ = ("_host", "_port")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, backlog: int) -> None:
        super().__init__(runner, backlog=backlog)
        self._host, self._port = host, port

    @property
    def name(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        acceptor = Acceptor(await listening_sockets(self._host, self._port, self._backlog), server, self._backlog)
        await acceptor.start_serving()
        self._server = acceptor


__all__ = ["AcceptingSite", "Acceptor", "listening_sockets"]
