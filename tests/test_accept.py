"""proxy/accept.py: a burst of new connections is accepted at once even while the loop is saturated, on uvloop too."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from typing import Awaitable, Callable

import pytest
from aiohttp import web

from proxy.accept import AcceptingSite, Acceptor, listening_sockets

uvloop = pytest.importorskip("uvloop")

BURST = 200
BUSY_TURN = 0.002   # seconds of work in every turn of the loop, as when the sidecar is saturated


async def ok(request: web.BaseRequest) -> web.Response:
    return web.Response(text="ok")


SiteFactory = Callable[[web.BaseRunner], web.BaseSite]


async def turns_to_accept(make_site: SiteFactory) -> int:
    """Turns of a busy loop until all of BURST connections, opened at once, are connections of the server."""
    server = web.Server(ok)
    runner = web.ServerRunner(server)
    await runner.setup()
    site = make_site(runner)
    await site.start()
    port = runner.addresses[0][1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(BURST)]   # the kernel's handshake
    turns = 0

    def busy() -> None:
        nonlocal turns
        turns += 1
        until = time.perf_counter() + BUSY_TURN
        while time.perf_counter() < until:
            pass
        loop.call_soon(busy)

    loop = asyncio.get_running_loop()
    loop.call_soon(busy)
    try:
        while len(server.connections) < BURST and turns < 10 * BURST:
            await asyncio.sleep(0)
        return turns
    finally:
        for client in clients:
            client.close()
        await runner.cleanup()


def on_uvloop(scenario: Awaitable[int]) -> int:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(scenario)


def test_a_burst_of_connections_is_accepted_in_a_few_turns_of_a_busy_uvloop() -> None:
    turns = on_uvloop(turns_to_accept(lambda runner: AcceptingSite(runner, "127.0.0.1", 0, backlog=1024)))
    assert turns <= 5


def test_why_the_module_exists_uvloop_accepts_one_connection_per_turn() -> None:
    """aiohttp's own TCPSite on uvloop: one connection per turn (libuv's uv__server_io). Should this start to fail,
    libuv accepts more per turn again and proxy/accept.py may no longer be needed."""
    turns = on_uvloop(turns_to_accept(lambda runner: web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)))
    assert turns >= BURST / 2


async def test_the_same_on_asyncio() -> None:
    assert await turns_to_accept(lambda runner: AcceptingSite(runner, "127.0.0.1", 0, backlog=1024)) <= 5


class Exhausted(socket.socket):
    """A listening socket whose first accept fails as it does when the process is out of file descriptors."""

    failures = 1

    def accept(self) -> tuple[socket.socket, object]:
        if Exhausted.failures:
            Exhausted.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return super().accept()


async def test_out_of_descriptors_it_warns_pauses_and_then_accepts_what_waited(
        caplog: pytest.LogCaptureFixture) -> None:
    listening = Exhausted(socket.AF_INET, socket.SOCK_STREAM)
    listening.bind(("127.0.0.1", 0))
    listening.listen(8)
    listening.setblocking(False)
    server = web.Server(ok)
    acceptor = Acceptor([listening], server, backlog=8, pause=0.05)
    await acceptor.start_serving()
    client = socket.create_connection(listening.getsockname())
    try:
        with caplog.at_level(logging.WARNING, "imsidecar.accept"):
            for _ in range(200):
                if server.connections:
                    break
                await asyncio.sleep(0.01)
        assert len(server.connections) == 1 and Exhausted.failures == 0
        assert "cannot accept on" in caplog.text and "Too many open files" in caplog.text
    finally:
        client.close()
        acceptor.close()
        await server.shutdown(0.1)


async def test_a_taken_address_fails_before_anything_listens(unused_tcp_port: int) -> None:
    port = unused_tcp_port
    taken = await listening_sockets("127.0.0.1", port, 8)
    try:
        with pytest.raises(OSError) as caught:
            await listening_sockets("127.0.0.1", port, 8)
        assert caught.value.errno == errno.EADDRINUSE
    finally:
        for sock in taken:
            sock.close()


async def test_closing_stops_accepting_at_once(unused_tcp_port: int) -> None:
    port = unused_tcp_port
    server = web.Server(ok)
    acceptor = Acceptor(await listening_sockets("127.0.0.1", port, 8), server, backlog=8)
    await acceptor.start_serving()
    acceptor.close()
    acceptor.close()   # as a failed start and the stop after it both do
    await acceptor.wait_closed()
    assert not acceptor.is_serving()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
