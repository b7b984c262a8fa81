"""Events end to end: Feishu callbacks into the real sidecar process, stored, delivered to a local application.

Run: python -m bench.events [--burst 2000] [--rate 50] [--seconds 6] [--only memory|journal|redis]
For each event store (the in-memory queue, the SQLite journal, a Redis Stream on a redis-server of its own) the
sidecar runs as its own process (`python -m proxy run`); the pusher (encrypted, signed Feishu v2 callbacks, made
before the clock starts) and the application run in this process.

- events/s: a burst of --burst events pushed by 16 concurrent senders, counted from the first push to the moment
  the application has every one of them (each event acknowledged to the "platform" only once stored).
- added delay: at a steady --rate for --seconds, the time from the push starting to the application receiving the
  event (verification, decryption, storing, acknowledging, delivery), median and p99.
Every event must arrive exactly once and in order; the table says whether it did.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from proxy.fakes.events import FeishuPusher
from proxy.fakes.net import wait_listening
from tests.conftest import distinct_ports

BACKENDS = ("memory", "journal", "redis")
SENDERS = 16


@dataclass
class Application:
    """Records when each event (by its n) arrived, in arrival order."""

    arrivals: dict[int, float] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)
    duplicates: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        n = (await request.json())["event"]["n"]
        if n in self.arrivals:
            self.duplicates += 1
        else:
            self.arrivals[n] = time.monotonic()
            self.order.append(n)
        return web.json_response({"ok": True})


def config(backend: str, workdir: Path, redis_url: str, app_url: str, ports: list[int]) -> str:
    listen, admin, events = ports
    queue = {"memory": "{backend: memory}", "journal": f'{{path: "{workdir / "events.db"}"}}',
             "redis": "{backend: redis}"}[backend]
    store = f"store: {{backend: redis, url: '{redis_url}'}}" if backend == "redis" else ""
    return f"""
listen: 127.0.0.1:{listen}
admin_listen: 127.0.0.1:{admin}
logging: {{level: WARNING}}
{store}
events:
  listen: 127.0.0.1:{events}
  queue: {queue}
  apps:
    - name: bench
      platform: feishu
      app_id: cli_bench
      verification_token: vt-bench
      encrypt_key: ek-bench
      deliver_to: {app_url}
      delivery: {{queue_size: 100000}}
"""


@contextlib.asynccontextmanager
async def redis_server(workdir: Path) -> AsyncIterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found: apt-get install redis-server (or --only memory|journal)")
    (port,) = distinct_ports(1)
    process = await asyncio.create_subprocess_exec(binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                                   "--appendonly", "no", "--dir", str(workdir),
                                                   stdout=asyncio.subprocess.DEVNULL)
    try:
        await wait_listening(port, bound=10.0)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        await process.wait()


@contextlib.asynccontextmanager
async def sidecar(path: Path, events_port: int) -> AsyncIterator[None]:
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "proxy", "run", "--config", str(path),
                                                   stdout=asyncio.subprocess.DEVNULL)
    try:
        await wait_listening(events_port, bound=10.0)
        yield
    finally:
        process.terminate()
        await process.wait()


def prepared(count: int, start: int) -> list[tuple[int, bytes, dict[str, str]]]:
    pusher = FeishuPusher("cli_bench", "vt-bench", "ek-bench", now=time.time)
    return [(n, *pusher.request(pusher.envelope({"n": n}, event_id=f"ev-{n}"))) for n in range(start, start + count)]


async def push(http: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]) -> None:
    async with http.post(url, data=body, headers=headers) as response:
        if response.status != 200:
            raise SystemExit(f"the sidecar answered {response.status}: {await response.text()}")


@dataclass
class Pushes:
    """When each push started and when the sidecar acknowledged it (stored)."""

    sent: dict[int, float] = field(default_factory=dict)
    acked: dict[int, float] = field(default_factory=dict)

    def in_order(self, order: list[int]) -> bool:
        """Whether delivery kept the order the sidecar could see: an event acknowledged before another was even
        sent must reach the application first (concurrent pushes may be stored either way round)."""
        position = {n: i for i, n in enumerate(order)}
        acks = sorted(self.acked, key=self.acked.__getitem__)
        latest, i = -1, 0
        for n in sorted(self.sent, key=self.sent.__getitem__):
            while i < len(acks) and self.acked[acks[i]] < self.sent[n]:
                latest, i = max(latest, position[acks[i]]), i + 1
            if position[n] < latest:
                return False
        return True


async def burst(http: aiohttp.ClientSession, url: str, app: Application, events: list,  # type: ignore[type-arg]
                pushes: Pushes) -> float:
    queue: asyncio.Queue[tuple[int, bytes, dict[str, str]]] = asyncio.Queue()
    for item in events:
        queue.put_nowait(item)

    async def sender() -> None:
        while not queue.empty():
            n, body, headers = queue.get_nowait()
            pushes.sent[n] = time.monotonic()
            await push(http, url, body, headers)
            pushes.acked[n] = time.monotonic()
    started = time.monotonic()
    await asyncio.gather(*(sender() for _ in range(SENDERS)))
    wanted = {n for n, _, _ in events}
    while not wanted <= app.arrivals.keys():
        await asyncio.sleep(0.005)
    return len(events) / (max(app.arrivals[n] for n in wanted) - started)


async def steady(http: aiohttp.ClientSession, url: str, app: Application, events: list, rate: float,  # type: ignore[type-arg]
                 pushes: Pushes) -> list[float]:
    sent = pushes.sent

    async def one(n: int, body: bytes, headers: dict[str, str]) -> None:
        sent[n] = time.monotonic()
        await push(http, url, body, headers)
        pushes.acked[n] = time.monotonic()
    started, tasks = time.monotonic(), []
    for i, (n, body, headers) in enumerate(events):
        await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
        tasks.append(asyncio.create_task(one(n, body, headers)))
    await asyncio.gather(*tasks)
    while not sent.keys() <= app.arrivals.keys():
        await asyncio.sleep(0.005)
    return sorted(app.arrivals[n] - sent[n] for n in sent)


async def one_backend(backend: str, args: argparse.Namespace) -> dict[str, object]:
    app = Application()
    web_app = web.Application()
    web_app.router.add_post("/events", app.handle)
    runner = web.AppRunner(web_app, access_log=None)
    await runner.setup()
    (app_port,) = distinct_ports(1)
    await web.TCPSite(runner, "127.0.0.1", app_port).start()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        async with contextlib.AsyncExitStack() as stack:
            redis_url = await stack.enter_async_context(redis_server(workdir)) if backend == "redis" else ""
            ports = distinct_ports(3)
            path = workdir / "config.yaml"
            path.write_text(config(backend, workdir, redis_url, f"http://127.0.0.1:{app_port}/events", ports))
            await stack.enter_async_context(sidecar(path, ports[2]))
            url = f"http://127.0.0.1:{ports[2]}/events/bench"
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=SENDERS)) as http:
                await burst(http, url, app, prepared(50, 0), Pushes())          # warm-up, not counted
                app.order.clear()
                pushes = Pushes()
                rate = await burst(http, url, app, prepared(args.burst, 100), pushes)
                in_order = pushes.in_order(app.order) and len(app.order) == args.burst
                app.order.clear()
                pushes = Pushes()
                delays = await steady(http, url, app, prepared(int(args.rate * args.seconds), 10**6), args.rate,
                                      pushes)
                in_order = in_order and pushes.in_order(app.order)
    await runner.cleanup()
    return {"backend": backend, "rate": rate, "p50": 1000 * statistics.median(delays),
            "p99": 1000 * delays[max(0, int(0.99 * len(delays)) - 1)], "once_in_order": in_order and not app.duplicates}


def table(rows: list[dict[str, object]], args: argparse.Namespace) -> str:
    lines = [f"| event store | events/s delivered (burst of {args.burst}) | added delay p50 ms | p99 ms "
             f"(at {args.rate:g}/s) | every event once, in order |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['rate']:,.0f} | {r['p50']:.1f} | {r['p99']:.1f} | "
                     f"{'yes' if r['once_in_order'] else 'NO'} |")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> None:
    rows = [await one_backend(backend, args) for backend in (args.only or BACKENDS)]
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print(table(rows, args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--only", action="append", choices=BACKENDS)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
