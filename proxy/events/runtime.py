"""Assembles the events subsystem from settings: one delivery lane per app, its callback route or its stream client.

Owns construction, route mounting and start/stop order; it does not parse config or own the web application.

    runtime = EventsRuntime(apps, session, registry, SystemClock())
    runtime.mount(web_app.router)                    # HTTP-mode apps: POST <callback_path>
    web_app.cleanup_ctx.append(runtime.lifecycle)    # starts lanes and streams, stops them on shutdown
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.clock import Clock
from proxy.events.callbacks import DingTalkCallback, FeishuCallback
from proxy.events.delivery import Delivery
from proxy.events.dingtalk_stream import DingTalkStream
from proxy.events.feishu_ws import FeishuLongConnection
from proxy.events.metrics import EventMetrics
from proxy.events.settings import EventApp, Mode, Platform


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Runnable(Protocol):
    def start(self) -> None: ...

    async def close(self) -> None: ...


class EventsRuntime:
    def __init__(self, apps: Sequence[EventApp], session: aiohttp.ClientSession, registry: CollectorRegistry,
                 clock: Clock, rng: random.Random | None = None) -> None:
        names = [app.name for app in apps]
        if len(set(names)) != len(names):
            raise ValueError("events apps must have unique names")
        self._metrics = EventMetrics(registry)
        self._rng = rng or random.Random()
        self.lanes = {app.name: Delivery(app.name, app.delivery, session, self._metrics, clock, self._rng)
                      for app in apps}
        self._routes: list[tuple[str, Handler]] = []
        self._streams: list[_Runnable] = []
        for app in apps:
            self._build(app, session, clock)

    def _build(self, app: EventApp, session: aiohttp.ClientSession, clock: Clock) -> None:
        lane = self.lanes[app.name]
        if app.mode is Mode.HTTP and app.platform is Platform.FEISHU:
            assert app.feishu is not None
            handler = FeishuCallback(app.name, app.feishu, lane, self._metrics, clock).handle
            self._routes.append((app.callback_path, handler))
        elif app.mode is Mode.HTTP:
            assert app.dingtalk is not None
            callback = DingTalkCallback(app.name, app.dingtalk, lane, self._metrics, clock)
            self._routes.append((app.callback_path, callback.handle))
        elif app.platform is Platform.FEISHU:
            assert app.feishu is not None
            self._streams.append(FeishuLongConnection(app.name, app.feishu, app.stream, lane, session,
                                                      self._metrics, clock, self._rng))
        else:
            assert app.dingtalk is not None
            self._streams.append(DingTalkStream(app.name, app.dingtalk, app.stream, lane, session, self._metrics,
                                                clock, self._rng))

    def mount(self, router: web.UrlDispatcher) -> None:
        for path, handler in self._routes:
            router.add_post(path, handler)

    async def start(self) -> None:
        for lane in self.lanes.values():
            lane.start()
        for stream in self._streams:
            stream.start()

    async def close(self) -> None:
        # Streams first, so nothing new is admitted while the lanes wind down.
        for stream in self._streams:
            await stream.close()
        for lane in self.lanes.values():
            await lane.close()

    async def lifecycle(self, _app: web.Application) -> AsyncIterator[None]:
        await self.start()
        yield
        await self.close()
