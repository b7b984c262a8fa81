"""Assembles the events subsystem from settings: the event store, one delivery lane per app, its callback route or
its stream client (each with its lease), and card relays.

Owns construction, route mounting and start/stop order; it does not parse config or own the web application.

    runtime = EventsRuntime(settings, store_settings, session, registry, SystemClock())
    runtime.mount(web_app.router)        # HTTP-mode apps: POST <callback_path>
    await runtime.start()                # opens the store, starts lanes and streams
    ...
    await runtime.stop_intake()          # SIGTERM: streams close first (the HTTP listener stops beside it)
    await runtime.close()                # lanes stop; what is queued stays stored for the next start
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.clock import Clock
from proxy.events.callbacks import DingTalkCallback, FeishuCallback
from proxy.events.cards import CardRelay
from proxy.events.delivery import Delivery
from proxy.events.dingtalk_stream import DingTalkStream
from proxy.events.feishu_ws import FeishuLongConnection
from proxy.events.lease import LeaseKeeper
from proxy.events.metrics import EventMetrics
from proxy.events.queue import EventStore, backend_for, open_event_store
from proxy.events.queue_memory import MemoryEventStore
from proxy.events.settings import EventApp, EventsSettings, Mode, Platform
from proxy.events.stream_client import StreamClient
from proxy.store import StoreSettings

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Events an app may have waiting when `delivery.queue_size` is not set.
DEFAULT_LIMITS = {"memory": 1_000, "journal": 100_000, "redis": 100_000}


class EventsRuntime:
    def __init__(self, settings: EventsSettings, store_settings: StoreSettings, session: aiohttp.ClientSession,
                 registry: CollectorRegistry, clock: Clock, rng: random.Random | None = None,
                 store: EventStore | None = None) -> None:
        names = [app.name for app in settings.apps]
        if len(set(names)) != len(names):
            raise ValueError("events apps must have unique names")
        self.backend = backend_for(settings.queue, store_settings)
        self.store = store or open_event_store(settings.queue, store_settings, clock)
        self.metrics = EventMetrics(registry)
        self._rng = rng or random.Random()
        self._lease_interval = settings.queue.lease_ttl / 3
        self.lanes: dict[str, Delivery] = {}
        self._routes: list[tuple[str, Handler]] = []
        self.streams: list[StreamClient] = []
        for app in settings.apps:
            self._build(app, session, clock)

    def _build(self, app: EventApp, session: aiohttp.ClientSession, clock: Clock) -> None:
        lane = Delivery(app.name, app.delivery, self.store, session, self.metrics, clock, self._rng,
                        default_limit=DEFAULT_LIMITS[self.backend], lease_interval=self._lease_interval)
        self.lanes[app.name] = lane
        cards = CardRelay(app.name, app.card, session, self.metrics, clock)
        if app.mode is Mode.HTTP:
            self._routes.append((app.callback_path, self._callback(app, lane, cards, clock).handle))
        else:
            self.streams.append(self._stream(app, lane, cards, session, clock))

    def _callback(self, app: EventApp, lane: Delivery, cards: CardRelay,
                  clock: Clock) -> FeishuCallback | DingTalkCallback:
        if app.platform is Platform.FEISHU:
            assert app.feishu is not None
            return FeishuCallback(app.name, app.feishu, lane, self.metrics, clock, cards)
        assert app.dingtalk is not None
        return DingTalkCallback(app.name, app.dingtalk, lane, self.metrics, clock)

    def _stream(self, app: EventApp, lane: Delivery, cards: CardRelay, session: aiohttp.ClientSession,
                clock: Clock) -> StreamClient:
        lease = self.store.lease(app.name, "connection", app.stream.connections)
        keeper = LeaseKeeper(lease, lane.health, clock, self._lease_interval, self.metrics, app.name, "connection")
        if app.platform is Platform.FEISHU:
            assert app.feishu is not None
            return FeishuLongConnection(app.name, app.feishu, app.stream, lane, session, self.metrics, clock,
                                        self._rng, keeper=keeper, cards=cards)
        assert app.dingtalk is not None
        return DingTalkStream(app.name, app.dingtalk, app.stream, lane, session, self.metrics, clock, self._rng,
                              keeper=keeper, cards=cards)

    def mount(self, router: web.UrlDispatcher) -> None:
        for path, handler in self._routes:
            router.add_post(path, handler)

    async def start(self) -> None:
        """Open the store (an unusable journal path stops start-up here, with the setting to fix), then start."""
        await self.store.start()
        for lane in self.lanes.values():
            lane.start()
        for stream in self.streams:
            stream.start()

    async def stop_intake(self) -> None:
        """Close the long connections and give up their leases; the platforms push what is not yet acked to the
        connection another replica opens, or again later."""
        await asyncio.gather(*(stream.close() for stream in self.streams))

    async def close(self) -> None:
        await self.stop_intake()
        await asyncio.gather(*(lane.close() for lane in self.lanes.values()))
        await self._count_lost()
        await self.store.close()

    async def _count_lost(self) -> None:
        # Only the memory backend loses what is queued; the journal and Redis keep it for the next start.
        if not isinstance(self.store, MemoryEventStore):
            return
        for name in self.lanes:
            lost = await self.store.depth(name)
            if lost:
                self.metrics.dropped.labels(name, "shutdown").inc(lost)
                log.error("events: app %s: %d queued events lost at shutdown (events.queue.backend: memory)",
                          name, lost)
