import json

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.clock import VirtualClock
from proxy.events.runtime import EventsRuntime
from proxy.events.settings import DeliverySettings, EventApp, FeishuEvents, Mode, Platform, Secret
from proxy.fakes.events import FakeApplication, FeishuPusher, wait_for


async def test_runtime_mounts_callbacks_and_delivers_through_the_web_app(aiohttp_server, aiohttp_client):
    fake = FakeApplication()
    url = str((await aiohttp_server(fake.app())).make_url("/events"))
    clock = VirtualClock()
    apps = [EventApp("fs", Platform.FEISHU, Mode.HTTP, DeliverySettings(url=url), callback_path="/cb/fs",
                     feishu=FeishuEvents(app_id="cli_1", verification_token=Secret("vt"),
                                         encrypt_key=Secret("ek")))]
    session = aiohttp.ClientSession()
    runtime = EventsRuntime(apps, session, CollectorRegistry(), clock)
    web_app = web.Application()
    runtime.mount(web_app.router)
    web_app.cleanup_ctx.append(runtime.lifecycle)
    client = await aiohttp_client(web_app)
    pusher = FeishuPusher("cli_1", "vt", "ek", now=clock.wall)
    body, headers = pusher.request(pusher.envelope({"hello": 1}))
    assert (await client.post("/cb/fs", data=body, headers=headers)).status == 200
    await wait_for(lambda: fake.received)
    assert fake.received[0]["event"] == {"hello": 1}
    await client.close()
    await session.close()


def test_settings_refuse_a_missing_platform_block_and_mask_secrets():
    with pytest.raises(ValueError):
        EventApp("x", Platform.DINGTALK, Mode.STREAM, DeliverySettings(url="http://127.0.0.1:1/"))
    settings = FeishuEvents(app_id="cli", encrypt_key=Secret("very-secret"), app_secret=Secret("s2"))
    assert "very-secret" not in repr(settings) and "s2" not in repr(settings)
    assert json.dumps(str(Secret("abc"))).count("abc") == 0
