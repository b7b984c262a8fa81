"""The real process (`python -m proxy run --config`), on the journal and on a real Redis: SIGTERM with events queued
and a restart delivers every one once and in order; a SIGKILL mid-delivery redelivers.

Real time with the durations scaled down (back-off 10-50 ms, one POST at most 500 ms, Redis leases 1 s): each run
waits about a second for the sidecar itself; starting the processes (about a second each) is most of the time.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from proxy.fakes.events import FakeApplication, FeishuPusher
from proxy.fakes.net import wait_listening
from tests.conftest import distinct_ports, wait_ready
from tests.events_support import serve
from tests.redis_support import running_redis

DELIVERY = "{backoff_base: 10ms, backoff_cap: 50ms, attempt_timeout: 500ms}"


def config(app_url: str, backend: str, where: str, ports: list[int]) -> str:
    listen, admin, events = ports
    # lease_ttl 1 s (10 s in production): how long a killed sidecar's lease keeps its successor waiting.
    queue = f'{{path: "{where}"}}' if backend == "journal" else "{backend: redis, lease_ttl: 1s}"
    store = f"store: {{backend: redis, url: '{where}'}}" if backend == "redis" else ""
    return f"""
listen: 127.0.0.1:{listen}
admin_listen: 127.0.0.1:{admin}
{store}
events:
  listen: 127.0.0.1:{events}
  queue: {queue}
  apps:
    - name: fs
      platform: feishu
      app_id: cli_1
      verification_token: vt
      deliver_to: {app_url}
      delivery: {DELIVERY}
"""


class Sidecar:
    """One `python -m proxy run` process at a time on the same config (and so the same journal or Redis)."""

    def __init__(self, path: Path, ports: list[int]) -> None:
        self.path, self.ports = path, ports
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, http: aiohttp.ClientSession) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "run", "--config", str(self.path),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        await wait_ready(http, f"http://127.0.0.1:{self.ports[1]}/healthz", self.process)
        await wait_listening(self.ports[2])   # the events listener opens just after the admin one

    async def push(self, http: aiohttp.ClientSession, n: int) -> int:
        pusher = FeishuPusher("cli_1", "vt", "", now=time.time)
        body = pusher.envelope({"n": n}, event_id=f"ev-{n}")
        async with http.post(f"http://127.0.0.1:{self.ports[2]}/events/fs", data=body,
                             headers={"Content-Type": "application/json"}) as response:
            return response.status

    async def stop(self, sig: signal.Signals) -> tuple[int, str]:
        assert self.process is not None
        self.process.send_signal(sig)
        _, stderr = await asyncio.wait_for(self.process.communicate(), 20)
        return self.process.returncode or 0, stderr.decode()

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


@pytest.fixture(params=["journal", "redis"])
async def where(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    if request.param == "journal":
        yield "journal", str(tmp_path / "events.db")
        return
    async with running_redis(tmp_path) as server:
        yield "redis", server.url


@pytest.fixture
async def sidecar(where, tmp_path: Path, aiohttp_server) -> AsyncIterator[tuple[Sidecar, FakeApplication]]:
    application = FakeApplication()
    url = await serve(aiohttp_server, application.app(), "/events")
    ports = distinct_ports(3)
    path = tmp_path / "config.yaml"
    path.write_text(config(url, *where, ports))
    running = Sidecar(path, ports)
    yield running, application
    await running.kill()


async def until(condition, bound: float = 15.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    give_up = time.monotonic() + bound
    while not condition():
        assert time.monotonic() < give_up, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_sigterm_with_events_queued_then_a_restart_delivers_all_once_in_order(sidecar, http):
    """The issue's second failure: three acked callbacks queued, app slow, SIGTERM: the sidecar exited in 0.1 s
    and logged three "gave up (shutdown)"."""
    process, application = sidecar
    application.down = True
    await process.start(http)
    assert [await process.push(http, n) for n in range(3)] == [200, 200, 200]
    await until(lambda: len(application.started) >= 2, what="delivery attempts")
    code, stderr = await process.stop(signal.SIGTERM)
    assert code == 0 and "gave up" not in stderr and "events lost" not in stderr
    assert application.received == []
    application.down = False
    await process.start(http)
    await until(lambda: len(application.received) == 3, what="the restarted sidecar to deliver")
    await asyncio.sleep(0.2)
    assert [e["event"]["n"] for e in application.received] == [0, 1, 2]
    code, _ = await process.stop(signal.SIGTERM)
    assert code == 0


async def test_sigterm_while_the_application_is_answering_finishes_that_post_first(sidecar, http):
    process, application = sidecar
    application.gate = asyncio.Event()                # the application is slow to answer the first one
    await process.start(http)
    assert [await process.push(http, n) for n in range(3)] == [200, 200, 200]
    await until(lambda: application.started, what="the first POST")
    process.process.send_signal(signal.SIGTERM)       # type: ignore[union-attr]
    await asyncio.sleep(0.1)
    application.gate.set()                            # it answers while the sidecar stops
    code, _ = await process.stop(signal.SIGTERM)
    assert code == 0 and [e["event"]["n"] for e in application.received] == [0]
    application.gate = None
    await process.start(http)
    await until(lambda: len(application.received) == 3)
    await asyncio.sleep(0.2)
    assert [e["event"]["n"] for e in application.received] == [0, 1, 2]   # 0 was settled: not sent again


async def test_a_sigkill_mid_delivery_is_redelivered_after_the_restart(sidecar, http):
    process, application = sidecar
    application.gate = asyncio.Event()                # the application takes event 0 and is still working on it...
    await process.start(http)
    assert [await process.push(http, n) for n in range(2)] == [200, 200]
    await until(lambda: application.started, what="the first POST")
    await process.kill()                              # ... when the sidecar is killed
    assert application.received == []
    application.gate = None                           # (that request's answer goes nowhere)
    await process.start(http)
    await until(lambda: len(application.received) == 2, what="redelivery")
    assert [e["event"]["n"] for e in application.received] == [0, 1]
    assert [e["event"]["n"] for e in application.started].count(0) == 2   # sent before the kill, and again after
