"""Robots on the sidecar's main listener: beside the forwarded prefixes, and config that keeps them apart."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp.test_utils import unused_port
from prometheus_client import CollectorRegistry

from proxy import config
from proxy.app import Sidecar
from proxy.clock import SystemClock
from proxy.config import ConfigError
from proxy.fakes.robots import FakeDingTalkRobot
from proxy.robots.signing import dingtalk_sign


async def test_a_native_message_is_signed_and_sent_beside_the_forwarded_apps(aiohttp_server) -> None:  # type: ignore[no-untyped-def]
    robot = FakeDingTalkRobot(SystemClock(), token="dt-tok", secret="SECwired")
    server = await aiohttp_server(robot.app())
    listen, admin = unused_port(), unused_port()
    sidecar = Sidecar(config.loads(f"""
listen: 127.0.0.1:{listen}
admin_listen: 127.0.0.1:{admin}
apps: [{{name: ops, platform: feishu, app_id: i, app_secret: s, upstreams: {{open: {{base_url: "http://127.0.0.1:9"}}}}}}]
robots:
  targets: [{{name: ops, platform: dingtalk, token: dt-tok, secret: SECwired, base_url: "{server.make_url('')}"}}]
""", env={}), registry=CollectorRegistry())
    await sidecar.start()
    try:
        async with aiohttp.ClientSession() as http:
            message = {"msgtype": "text", "text": {"content": "deploy finished"}}
            async with http.post(f"http://127.0.0.1:{listen}/robots/ops", json=message) as r:
                assert r.status == 200
            async with http.post(f"http://127.0.0.1:{listen}/robots/nobody", json=message) as r:
                assert r.status == 404
            async with http.get(f"http://127.0.0.1:{listen}/elsewhere") as r:
                assert (await r.json())["error"] == "imsidecar.noRoute"   # the forwarding path is untouched
    finally:
        await sidecar.stop()
    received = robot.log.accepted[0]
    assert received.body["text"]["content"] == "deploy finished"
    assert received.query["sign"] == dingtalk_sign("SECwired", int(received.query["timestamp"]))


def test_an_app_cannot_take_the_robot_prefixes() -> None:
    with pytest.raises(ConfigError) as caught:
        config.loads("apps: [{name: a, platform: feishu, app_id: i, app_secret: s, "
                     "expose: [{upstream: open, prefix: /robots}]}]", env={})
    assert any("/robots is reserved" in p for p in caught.value.problems)


async def test_an_alert_whose_caller_gave_up_is_not_sent_and_its_retry_is_the_only_one(aiohttp_server) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from proxy.clock import VirtualClock

    clock = VirtualClock()
    robot = FakeDingTalkRobot(clock, token="dt-tok")
    server = await aiohttp_server(robot.app())
    listen, admin = unused_port(), unused_port()
    registry = CollectorRegistry()
    sidecar = Sidecar(config.loads(f"""
listen: 127.0.0.1:{listen}
admin_listen: 127.0.0.1:{admin}
robots:
  deadline: 5m
  targets: [{{name: ops, platform: dingtalk, token: dt-tok, base_url: "{server.make_url('')}"}}]
""", env={}), clock=clock, registry=registry)
    await sidecar.start()
    url = f"http://127.0.0.1:{listen}/robots/ops"
    message = {"msgtype": "text", "text": {"content": "disk full"}}
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(20):   # DingTalk's minute is full: the next send waits 61 s
                async with http.post(url, json=message) as r:
                    assert r.status == 200
            with pytest.raises(asyncio.TimeoutError):   # Alertmanager's timeout: it gives up and hangs up
                await http.post(url, json=message, timeout=aiohttp.ClientTimeout(total=0.2))
            for _ in range(200):
                if registry.get_sample_value("imsidecar_robot_messages_total", {"target": "ops", "result": "abandoned"}):
                    break
                await asyncio.sleep(0.01)
            retry = asyncio.create_task(http.post(url, json=message))   # ...and sends the notification again
            while not retry.done():
                await clock.advance(1.0)
                await asyncio.sleep(0.005)
                assert clock.now() < 120, "the retry was never sent"
            assert (await retry).status == 200
            await clock.advance(120.0)   # time enough for an abandoned send to have gone out too
            await asyncio.sleep(0.05)
    finally:
        await sidecar.stop()
    assert len(robot.log.accepted) == 21
    assert registry.get_sample_value("imsidecar_robot_messages_total", {"target": "ops", "result": "abandoned"}) == 1
    assert 61 <= robot.log.accepted[-1].at <= 63   # the retry took the first free slot
