import json

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.clock import VirtualClock
from proxy.events.journal import Journal
from proxy.events.queue import EventStoreError
from proxy.events.queue_memory import MemoryEventStore
from proxy.events.runtime import EventsRuntime
from proxy.events.settings import (
    DeliverySettings,
    EventApp,
    EventsSettings,
    FeishuEvents,
    Mode,
    Platform,
    QueueSettings,
    Secret,
)
from proxy.fakes.events import FakeApplication, FeishuPusher, wait_for
from proxy.store import StoreSettings


def feishu_app(url):
    return EventApp("fs", Platform.FEISHU, Mode.HTTP, DeliverySettings(url=url), callback_path="/cb/fs",
                    feishu=FeishuEvents(app_id="cli_1", verification_token=Secret("vt"), encrypt_key=Secret("ek")))


async def test_runtime_mounts_callbacks_and_delivers_through_the_web_app(aiohttp_server, aiohttp_client, tmp_path):
    fake = FakeApplication()
    url = str((await aiohttp_server(fake.app())).make_url("/events"))
    clock = VirtualClock()
    settings = EventsSettings(None, (feishu_app(url),), QueueSettings(path=str(tmp_path / "events.db")))
    async with aiohttp.ClientSession() as session:
        runtime = EventsRuntime(settings, StoreSettings(), session, CollectorRegistry(), clock)
        assert isinstance(runtime.store, Journal)   # durable by default, without Redis
        web_app = web.Application()
        runtime.mount(web_app.router)
        await runtime.start()
        client = await aiohttp_client(web_app)
        pusher = FeishuPusher("cli_1", "vt", "ek", now=clock.wall)
        body, headers = pusher.request(pusher.envelope({"hello": 1}))
        assert (await client.post("/cb/fs", data=body, headers=headers)).status == 200
        await wait_for(lambda: fake.received)
        assert fake.received[0]["event"] == {"hello": 1}
        await client.close()
        await runtime.close()


async def test_a_journal_path_that_cannot_be_opened_stops_start_up_with_the_setting_to_fix(tmp_path):
    settings = EventsSettings(None, (feishu_app("http://127.0.0.1:1/e"),),
                              QueueSettings(path=str(tmp_path / "missing" / "events.db")))
    async with aiohttp.ClientSession() as session:
        runtime = EventsRuntime(settings, StoreSettings(), session, CollectorRegistry(), VirtualClock())
        with pytest.raises(EventStoreError, match=r"events\.queue\.path: cannot open the journal at .*missing"):
            await runtime.start()


async def test_the_memory_backend_counts_what_a_shutdown_loses(tmp_path):
    clock = VirtualClock()
    settings = EventsSettings(None, (feishu_app("http://127.0.0.1:1/e"),), QueueSettings(backend="memory"))
    registry = CollectorRegistry()
    async with aiohttp.ClientSession() as session:
        runtime = EventsRuntime(settings, StoreSettings(), session, registry, clock)
        assert isinstance(runtime.store, MemoryEventStore)
        await runtime.start()
        from proxy.events.queue import Event
        for n in range(3):
            await runtime.lanes["fs"].submit(Event(f"k{n}", b"{}", (), clock.wall()))
        await runtime.close()
    assert registry.get_sample_value("imsidecar_events_dropped_total", {"app": "fs", "reason": "shutdown"}) == 3


def test_settings_refuse_a_missing_platform_block_and_mask_secrets():
    with pytest.raises(ValueError):
        EventApp("x", Platform.DINGTALK, Mode.STREAM, DeliverySettings(url="http://127.0.0.1:1/"))
    settings = FeishuEvents(app_id="cli", encrypt_key=Secret("very-secret"), app_secret=Secret("s2"))
    assert "very-secret" not in repr(settings) and "s2" not in repr(settings)
    assert json.dumps(str(Secret("abc"))).count("abc") == 0
