"""The `events:` section: parsed into the events settings, wired into the sidecar, problems named by path."""

from __future__ import annotations

import time

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from proxy import config
from proxy.app import Sidecar
from proxy.config import ConfigError
from proxy.events.settings import Mode, Platform
from proxy.fakes.events import FakeApplication, FeishuPusher, wait_for
from tests.conftest import distinct_ports

AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"   # 43 characters, as DingTalk issues them


def events_config(deliver_to: str, listen: int, admin: int, events_port: int, journal: str = "/tmp/x/e.db") -> str:
    return f"""
listen: 127.0.0.1:{listen}
admin_listen: 127.0.0.1:{admin}
events:
  listen: 127.0.0.1:{events_port}
  queue: {{path: "{journal}"}}
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
      delivery: {{max_age: 2h, backoff_base: 10ms}}
      cards: {{deadline: 2s}}
      stream: {{connections: 2, endpoint_timeout: 3s}}
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
    assert stream.mode is Mode.STREAM and stream.delivery.max_age == 7200 and stream.delivery.backoff_base == 0.01
    assert stream.card.deadline == 2 and stream.card.url == "http://127.0.0.1:3000/events"
    assert (stream.stream.connections, stream.stream.endpoint_timeout) == (2, 3)
    assert feishu.delivery.max_age == 86400 and feishu.delivery.dedupe_ttl == 12 * 3600 and feishu.card.deadline == 2.5
    assert c.events.queue.backend == "" and c.events.queue.path == "/tmp/x/e.db"
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
    ("events: {apps: [{name: a, platform: dingtalk, mode: stream, app_key: k, app_secret: s, deliver_to: 'http://x',"
     " delivery: {max_attempts: 8}}]}", "events.apps[0].delivery.max_attempts: replaced by max_age"),
    ("events: {apps: [{name: a, platform: dingtalk, mode: stream, app_key: k, app_secret: s, deliver_to: 'http://x',"
     " delivery: {dedupe_ttl: 10m}}]}", "events.apps[0].delivery.dedupe_ttl: must be at least 8h"),
    ("events: {apps: [{name: a, platform: dingtalk, mode: stream, app_key: k, app_secret: s, deliver_to: 'http://x',"
     " cards: {deadline: 5s}}]}", "events.apps[0].cards.deadline: must be under 3s"),
    ("events: {queue: {backend: redis}, apps: [{name: a, platform: dingtalk, mode: stream, app_key: k, app_secret: s,"
     " deliver_to: 'http://x'}]}", "events.queue.backend: redis needs the connection from `store"),
    ("events: {queue: {backend: disk}, apps: []}", "events.queue.backend: 'disk' is not one of redis, journal, memory"),
    ("events: {queue: {backend: memory, path: /x}, apps: []}", "events.queue.path: only with the journal backend"),
])
def test_problems_are_named_by_path(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.loads(text, env={})
    assert any(p.startswith(expected) for p in caught.value.problems), caught.value.problems


async def test_a_feishu_callback_reaches_the_application_through_the_sidecar(aiohttp_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    application = FakeApplication()
    server = await aiohttp_server(application.app())
    listen, admin, events_port = distinct_ports(3)
    text = events_config(str(server.make_url("/events")), listen, admin, events_port, str(tmp_path / "events.db"))
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


def test_the_shipped_robots_and_events_example_loads() -> None:
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "config" / "robots-and-events.yaml"
    env = {name: "x" for name in ("DINGTALK_APP_KEY", "DINGTALK_APP_SECRET", "DINGTALK_ROBOT_TOKEN",
                                  "DINGTALK_ROBOT_SECRET", "FEISHU_HOOK_TOKEN", "FEISHU_HOOK_SECRET", "FEISHU_APP_ID",
                                  "FEISHU_VERIFICATION_TOKEN", "FEISHU_ENCRYPT_KEY")}
    c = config.loads(path.read_text(), env=env)
    assert c.events is not None and c.events.queue.backend == "journal"
    assert [app.card.deadline for app in c.events.apps] == [2.5, 2.5]
