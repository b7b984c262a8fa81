"""What the DingTalk Stream and Feishu long-connection clients share: their constructor, start/close lifecycle
and the short per-event tasks they spawn; no protocol, endpoint or reconnect policy lives here.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Coroutine
from typing import Any

import aiohttp

from proxy.clock import Clock
from proxy.events.delivery import Delivery
from proxy.events.metrics import EventMetrics
from proxy.events.settings import StreamSettings


class StreamClient:
    """One app's outbound connection, run as one long task by `run` (each platform writes its own, with its own
    reconnect rules); per-event tasks started with `_spawn` are cancelled with it on `close`."""

    task_prefix = "events-stream"

    def __init__(self, name: str, stream: StreamSettings, delivery: Delivery, session: aiohttp.ClientSession,
                 metrics: EventMetrics, clock: Clock, rng: random.Random | None = None) -> None:
        self.name, self._stream = name, stream
        self._delivery, self._session, self._metrics, self._clock = delivery, session, metrics, clock
        self._rng = rng or random.Random()
        self._task: asyncio.Task[None] | None = None
        self._children: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=f"{self.task_prefix}-{self.name}")

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._children) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._task = None
        self._metrics.connected.labels(self.name).set(0)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        # Held until done, so close() can cancel an answer still waiting on its delivery.
        task = asyncio.create_task(work)
        self._children.add(task)
        task.add_done_callback(self._children.discard)
