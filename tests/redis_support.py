"""A real redis-server for the store tests: started on a free port, stopped and restarted at will, killed at the end."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from pathlib import Path
from typing import Any, AsyncIterator

import redis.asyncio as aioredis
from aiohttp.test_utils import unused_port

from proxy.clock import VirtualClock
from tests.conftest import require_binary

READY_TRIES = 500   # 5 ms apart: a redis-server is up in a few milliseconds


class RedisServer:
    def __init__(self, binary: str, workdir: Path, password: str | None = None) -> None:
        self.binary, self.workdir, self.password = binary, workdir, password
        self.port = unused_port()
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir)]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = await asyncio.create_subprocess_exec(*args, stdout=subprocess.DEVNULL,
                                                            stderr=subprocess.DEVNULL)
        await self._ready()

    async def _ready(self) -> None:
        client = aioredis.Redis(port=self.port, password=self.password, socket_connect_timeout=0.2)
        try:
            for _ in range(READY_TRIES):
                try:
                    await client.ping()
                    return
                except (OSError, aioredis.ConnectionError):
                    await asyncio.sleep(0.005)
            raise RuntimeError(f"redis-server on port {self.port} did not come up")
        finally:
            await client.aclose()

    async def stop(self) -> None:
        """Terminate the process, as when the Redis pod goes away."""
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()
        self.process = None

    async def client(self) -> aioredis.Redis:
        return aioredis.Redis(port=self.port, password=self.password, decode_responses=True)


@contextlib.asynccontextmanager
async def running_redis(workdir: Path, password: str | None = None) -> AsyncIterator[RedisServer]:
    """A redis-server of the test's own, killed however the test ends (skipped where none is installed)."""
    server = RedisServer(require_binary("redis-server", package="redis-server"), workdir, password)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


class LockstepClock(VirtualClock):
    """Virtual time for tasks that mix real I/O (Redis round trips) with waits on the clock.

    Time moves only when every watched task is asleep on this clock, and only to the next sleeper's deadline,
    so each task sees exactly the instants it asked for, as it would with instant I/O in real time.
    """

    def __init__(self) -> None:
        super().__init__()
        self.asleep: set[asyncio.Task[Any]] = set()

    async def sleep(self, seconds: float) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.asleep.add(task)
        try:
            await super().sleep(seconds)
        finally:
            self.asleep.discard(task)

    def next_deadline(self) -> float | None:
        pending = [deadline for deadline, _, future in self._sleepers if not future.done()]
        return min(pending, default=None)

    async def run(self, tasks: list[asyncio.Task[Any]], until: float) -> None:
        while self.now() < until and not all(t.done() for t in tasks):
            while not all(t.done() or t in self.asleep for t in tasks):
                await asyncio.sleep(0.0002)   # a Redis reply on its way
            deadline = self.next_deadline()
            if deadline is None:
                return
            await self.advance(max(0.0, min(deadline, until) - self.now()))
