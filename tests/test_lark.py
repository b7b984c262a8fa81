"""`platform: lark` moves every part of an app to Lark's domain, and a brand mix-up is said plainly.

End to end with no base_url override anywhere: a test resolver points open.larksuite.com (and open.feishu.cn) at
local TLS fakes holding certificates for those names, so the sidecar's own defaults are what is exercised.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import unused_port
from prometheus_client import CollectorRegistry

from proxy import config
from proxy.app import Sidecar, delivery_urls
from proxy.clock import SystemClock
from proxy.egress import Egress
from proxy.fakes.events import FakeApplication, FakeFeishuGateway, wait_for
from proxy.fakes.feishu import FakeFeishu
from proxy.fakes.robots import FakeFeishuRobot
from tests.tls_support import TestCA

SECRET = "lark-app-secret-0123456789"
MESSAGE = {"receive_id": "oc_1", "msg_type": "text", "content": '{"text":"hi"}'}


class PointAt(AbstractResolver):
    """Resolves the named hosts (any port) to a local port; nothing else resolves, so a stray call fails."""

    def __init__(self, hosts: dict[str, int]) -> None:
        self.hosts = hosts
        self.asked: list[str] = []

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        self.asked.append(host)
        if host not in self.hosts:
            raise OSError(f"{host} does not resolve in this test")
        return [ResolveResult(hostname=host, host="127.0.0.1", port=self.hosts[host], family=socket.AF_INET,
                              proto=0, flags=socket.AI_NUMERICHOST)]

    async def close(self) -> None:
        return None


def merged(*apps: web.Application) -> web.Application:
    """One server for one domain: the fakes' routes side by side, as the platform serves them on one host."""
    combined = web.Application()
    for app in apps:
        for route in app.router.routes():
            combined.router.add_route(route.method, route.resource.canonical, route.handler)  # type: ignore[union-attr]
    return combined


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA.create(tmp_path)


Start = Callable[[str, dict[str, int]], Awaitable[Sidecar]]


@pytest.fixture
async def start(ca: TestCA) -> AsyncIterator[Start]:
    """`await start(config_text, {host: port})`; virtual time (AutoClock), since Feishu-brand robots hold a send
    that falls near a :00 or :30 mark for a few seconds."""
    started: list[Sidecar] = []

    async def run(text: str, hosts: dict[str, int]) -> Sidecar:
        cfg = config.loads(text + f"\negress: {{ca_file: {ca.ca_file}}}\n", env={})
        egress = Egress(cfg.egress, direct=delivery_urls(cfg), resolver=PointAt(hosts))
        sidecar = Sidecar(cfg, registry=CollectorRegistry(), egress=egress)
        await sidecar.start()
        started.append(sidecar)
        return sidecar

    yield run
    for sidecar in started:
        await sidecar.stop()


async def test_every_part_of_a_lark_app_goes_to_larks_domain(aiohttp_server: Any, ca: TestCA, start: Start) -> None:
    api = FakeFeishu(apps={"cli_lark": SECRET})
    robot = FakeFeishuRobot(SystemClock(), token="lark-hook")
    gateway = FakeFeishuGateway("cli_lark", SECRET)
    lark = await aiohttp_server(merged(api.app(), robot.app(), gateway.app()),
                                ssl=ca.server_context("open.larksuite.com"))
    application = FakeApplication()
    app_url = str((await aiohttp_server(application.app())).make_url("/events"))
    listen, admin = unused_port(), unused_port()
    await start(f"""
listen: 127.0.0.1:{listen}
admin_listen: 127.0.0.1:{admin}
apps: [{{name: lark-bot, platform: lark, app_id: cli_lark, app_secret: {SECRET}}}]
robots:
  targets: [{{name: lark-ops, platform: lark, token: lark-hook}}]
events:
  queue: {{backend: memory}}
  apps: [{{name: lark-events, platform: lark, mode: stream, app_id: cli_lark, app_secret: {SECRET},
          deliver_to: "{app_url}"}}]
""", {"open.larksuite.com": lark.port})
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{listen}/lark-bot/open-apis/im/v1/messages", json=MESSAGE) as r:
            assert r.status == 200 and (await r.json())["code"] == 0            # the API, after the token endpoint
        card = {"msg_type": "text", "content": {"text": "deployed"}}
        async with http.post(f"http://127.0.0.1:{listen}/robots/lark-ops", json=card) as r:
            assert r.status == 200                                              # the robot webhook
    await wait_for(lambda: gateway.live is not None)                             # long-connection discovery + wss
    await gateway.push({"header": {"event_id": "ev-l", "event_type": "im.message.receive_v1"}, "event": {"x": 1}})
    await wait_for(lambda: application.received)
    assert api.token_calls == 1 and len(api.messages) == 1
    assert robot.log.accepted and gateway.endpoint_calls == 1
    assert application.received[0]["event"] == {"x": 1}


@pytest.mark.parametrize(("configured", "actual", "hint"), [
    ("feishu", "open.feishu.cn", "if it was created on Lark (open.larksuite.com), set platform: lark"),
    ("lark", "open.larksuite.com", "if it was created on Feishu (open.feishu.cn), set platform: feishu"),
])
async def test_an_app_of_the_other_brand_is_told_so(aiohttp_server: Any, ca: TestCA, start: Start, configured: str,
                                                    actual: str, hint: str) -> None:
    """The app exists on the other brand only: this domain's token endpoint answers 10014 "app id not exists"."""
    here = FakeFeishu(apps={})
    server = await aiohttp_server(here.app(), ssl=ca.server_context(actual))
    listen, admin = unused_port(), unused_port()
    sidecar = await start(f"""
listen: 127.0.0.1:{listen}
admin_listen: 127.0.0.1:{admin}
apps: [{{name: bot, platform: {configured}, app_id: cli_elsewhere, app_secret: {SECRET}}}]
""", {actual: server.port})
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{listen}/bot/open-apis/im/v1/messages", json=MESSAGE) as r:
            body = await r.json()
            assert r.status == 503 and r.headers["X-Imsidecar-Error"] == "TokenUnavailableError"
    assert hint in body["msg"] and "code 10014: app id not exists" in body["msg"]
    assert hint in sidecar.readiness().body["apps"]["bot"]["token"]
    assert here.token_calls == 1   # refused for good: no retry will make the app exist here


def test_lark_robots_take_a_bare_token_to_larks_domain() -> None:
    loaded = config.loads("robots: {targets: [{name: r, platform: lark, token: tok}]}", env={})
    assert loaded.robots is not None
    target = loaded.robots.targets["r"]
    assert target.platform == "feishu"   # Feishu's robot rules: body, signature, codes
    assert target.webhook.reveal() == "https://open.larksuite.com/open-apis/bot/v2/hook/tok"
