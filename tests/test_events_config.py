"""The `events:` section: parsed into the events settings, wired into the sidecar, problems named by path."""

from __future__ import annotations

import time

import aiohttp
import pytest
from aiohttp.test_utils import unused_port
from prometheus_client import CollectorRegistry

from proxy import config
from proxy.app import Sidecar
from proxy.config import ConfigError
from proxy.events.settings import Mode, Platform
from proxy.fakes.events import FakeApplication, FeishuPusher, wait_for

AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"   # 43 characters, as DingTalk issues them


def events_config(deliver_to: str, listen: int, admin: int, events_port: int) -> str:
    return f"""
listen: 127.0.0.1:{listen}
admin_listen: 127.0.0.1:{admin}
events:
  listen: 127.0.0.1:{events_port}
  apps:
    - name: feishu-main
      platform: feishu
      app_id: cli_events
      verification_token: ${{VT}}
      encrypt_key: ${{EK}}
      deliver_to: {deliver_to}
    - name: ding-stream
      platform: dingtalk
      mode: stream
      app_key: ding_events
      app_secret: stream-secret-123456
      api: http://127.0.0.1:9
      deliver_to: {deliver_to}
      delivery: {{max_attempts: 3, backoff_base: 10ms}}
    - name: ding-http
      platform: dingtalk
      app_key: ding_events
      token: tok
      aes_key: {AES_KEY}
      callback_path: /dingtalk/callback
      deliver_to: {deliver_to}
"""


def test_the_section_parses_into_event_apps() -> None:
    c = config.loads(events_config("http://127.0.0.1:3000/events", 1081, 1082, 1083), env={"VT": "vt", "EK": "ek"})
    assert c.events is not None and c.events.listen is not None and c.events.listen.port == 1083
    feishu, stream, http = c.events.apps
    assert (feishu.platform, feishu.mode, feishu.callback_path) == (Platform.FEISHU, Mode.HTTP, "/events/feishu-main")
    assert feishu.feishu is not None and feishu.feishu.verification_token.reveal() == "vt"
    assert stream.mode is Mode.STREAM and stream.delivery.max_attempts == 3 and stream.delivery.backoff_base == 0.01
    assert http.callback_path == "/dingtalk/callback" and http.dingtalk is not None
    assert "stream-secret-123456" not in repr(c)


@pytest.mark.parametrize("text, expected", [
    ("events: {apps: [{name: a, platform: feishu, app_id: i, verification_token: t}]}",
     "events.apps[0].deliver_to: is required"),
    ("events: {apps: [{name: a, platform: feishu, app_id: i, verification_token: t, deliver_to: 'http://x'}]}",
     "events.listen: HTTP callbacks need a public listener"),
    ("events: {listen: '127.0.0.1:1', apps: [{name: a, platform: dingtalk, app_key: k, token: t, aes_key: short,"
     " deliver_to: 'http://x'}]}", "events.apps[0].aes_key: must be the 43-character EncodingAESKey"),
    ("events: {apps: [{name: a, platform: dingtalk, mode: stream, app_key: k, deliver_to: 'http://x'}]}",
     "events.apps[0].app_secret: is required"),
    ("events: {apps: [{name: a, platform: feishu, mode: push, app_id: i, deliver_to: 'http://x'}]}",
     "events.apps[0].mode: 'push' is not one of http, stream"),
])
def test_problems_are_named_by_path(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.loads(text, env={})
    assert any(p.startswith(expected) for p in caught.value.problems), caught.value.problems


async def test_a_feishu_callback_reaches_the_application_through_the_sidecar(aiohttp_server) -> None:  # type: ignore[no-untyped-def]
    application = FakeApplication()
    server = await aiohttp_server(application.app())
    listen, admin, events_port = unused_port(), unused_port(), unused_port()
    text = events_config(str(server.make_url("/events")), listen, admin, events_port)
    sidecar = Sidecar(config.loads(text, env={"VT": "vt", "EK": "ek"}), registry=CollectorRegistry())
    await sidecar.start()
    try:
        pusher = FeishuPusher("cli_events", "vt", "ek", now=time.time)
        body, headers = pusher.request(pusher.envelope({"message": {"text": "hi"}}))
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{events_port}/events/feishu-main", data=body, headers=headers) as r:
                assert r.status == 200
        await wait_for(lambda: application.received)
        assert application.received[0]["event"] == {"message": {"text": "hi"}}
    finally:
        await sidecar.stop()
    assert sidecar.metrics.registry.get_sample_value("imsidecar_events_delivered_total", {"app": "feishu-main"}) == 1
