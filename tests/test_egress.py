"""Egress: every outbound connection through the configured forward proxy (a real tinyproxy here), or direct.

Covers the route choice (no_proxy, the application's own endpoints, the environment), the `egress:` section's
problems, and the sidecar end to end: API calls and token fetches over plain HTTP and through a CONNECT tunnel, a
robot webhook, and an event stream's endpoint discovery and websocket, each seen passing through the proxy.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import unused_port
from prometheus_client import CollectorRegistry
from yarl import URL

from proxy import config
from proxy.app import Sidecar
from proxy.clock import SystemClock
from proxy.config import ConfigError
from proxy.egress import Egress, EgressSettings, ProxyRoute
from proxy.fakes.events import FakeApplication, FakeFeishuGateway, wait_for
from proxy.fakes.feishu import FakeFeishu
from proxy.fakes.net import wait_listening
from proxy.fakes.robots import FakeDingTalkRobot
from proxy.secret import Secret
from tests.conftest import FEISHU_SECRET, Platforms, make_config, require_binary
from tests.tls_support import TestCA

PROXY_USER, PROXY_PASSWORD = "sidecar", "proxy-pass-5ecret"
MESSAGE = {"receive_id": "oc_1", "msg_type": "text", "content": '{"text":"hi"}'}

# ----------------------------------------------------------------------------------------------------------------
# Which destinations go through the proxy

ROUTE = ProxyRoute("http://proxy.corp.example:3128")


def egress(no_proxy: tuple[str, ...] = (), direct: tuple[str, ...] = ()) -> Egress:
    return Egress(EgressSettings(https=ROUTE, http=ROUTE, no_proxy=no_proxy, source="config"), direct=direct)


@pytest.mark.parametrize(("url", "proxied"), [
    ("https://open.feishu.cn/open-apis/im/v1/messages", True),
    ("wss://msg-frontier.feishu.cn/ws/v2", True),
    ("https://corp.example/x", False),                 # the domain itself
    ("https://gw.corp.example/x", False),              # ...and its subdomains
    ("https://notcorp.example/x", True),               # but not a name that merely ends the same way
    ("http://10.20.30.40:8080/x", False),              # inside 10.0.0.0/8
    ("https://internal.gateway:8443/x", False),        # that host on that port
    ("https://internal.gateway/x", True),              # ...and not on another
    ("http://[fd00::5]/x", False),
])
def test_no_proxy_entries_choose_direct_connections(url: str, proxied: bool) -> None:
    chooser = egress(("corp.example", "10.0.0.0/8", "internal.gateway:8443", "fd00::/8"))
    assert (chooser.route(URL(url)) is ROUTE) is proxied


def test_loopback_is_direct_unless_no_proxy_says_otherwise() -> None:
    default = Egress(EgressSettings(https=ROUTE, http=ROUTE, source="config"))
    assert default.route(URL("http://127.0.0.1:9000/x")) is None
    assert default.route(URL("http://localhost:9000/x")) is None
    assert egress(()).route(URL("http://127.0.0.1:9000/x")) is ROUTE   # `no_proxy: []` replaces the default


def test_the_applications_own_endpoints_never_go_through_the_proxy() -> None:
    chooser = egress((), direct=("http://127.0.0.1:3000/events",))
    assert chooser.route(URL("http://127.0.0.1:3000/events")) is None
    assert chooser.route(URL("http://127.0.0.1:3001/events")) is ROUTE


def test_without_a_proxy_everything_is_direct() -> None:
    assert Egress(EgressSettings()).route(URL("https://open.feishu.cn/")) is None


# ----------------------------------------------------------------------------------------------------------------
# The `egress:` section

APP = "apps: [{name: a, platform: feishu, app_id: i, app_secret: s}]\n"


def load(section: str, **env: str) -> config.Config:
    return config.loads(APP + section, env=env)


def problems(section: str, **env: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(section, **env)
    return caught.value.problems


def test_a_configured_proxy_with_credentials_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "password").write_text("from-file\n")
    settings = load(f"""
egress:
  proxy: http://proxy.corp.example:3128
  username: ${{PROXY_USER}}
  password_file: {tmp_path / 'password'}
  no_proxy: [.corp.example, 10.0.0.0/8]
""", PROXY_USER="svc").egress
    assert settings.https == settings.http == ProxyRoute("http://proxy.corp.example:3128", "svc", Secret("from-file"))
    assert settings.no_proxy == (".corp.example", "10.0.0.0/8") and settings.source == "config"
    assert "from-file" not in repr(settings)


def test_no_egress_section_means_direct() -> None:
    assert not load("").egress.proxied


@pytest.mark.parametrize(("section", "expected"), [
    ("egress: {proxy: 'http://svc:hunter2@proxy:3128'}", "egress.proxy: credentials do not belong in the URL"),
    ("egress: {proxy: 'socks5://proxy:1080'}", "egress.proxy: expected http://host:port or https://host:port"),
    ("egress: {proxy: 'http://proxy:3128', trust_env: true}", "egress: give proxy or trust_env: true, not both"),
    ("egress: {proxy: 'http://proxy:3128', password: x}", "egress.username: a proxy password needs a username"),
    ("egress: {proxy: 'http://proxy:3128', no_proxy: ['http://x/']}", "egress.no_proxy: 'http://x/' is not a"),
    ("egress: {proxy: 'http://proxy:3128', ca_file: /nonexistent/ca.pem}", "egress.ca_file: cannot load"),
    ("egress: {proxy: 'http://proxy:3128', colour: red}", "egress.colour: unknown key"),
])
def test_egress_problems_are_named_by_path(section: str, expected: str) -> None:
    found = problems(section)
    assert any(p.startswith(expected) for p in found), found
    assert not any("hunter2" in p for p in found)


def test_trust_env_reads_the_proxy_variables_once() -> None:
    settings = load("egress: {trust_env: true}", HTTPS_PROXY="http://svc:p%40ss@proxy.corp.example:3128",
                    http_proxy="http://plain.corp.example:8080", HTTP_PROXY="http://ignored:1",
                    NO_PROXY="corp.example, .svc.cluster.local").egress
    assert settings.https == ProxyRoute("http://proxy.corp.example:3128", "svc", Secret("p@ss"))
    assert settings.http == ProxyRoute("http://plain.corp.example:8080")   # lower-case first, as curl reads it
    assert settings.no_proxy == ("corp.example", ".svc.cluster.local") and settings.source == "env"
    assert "p@ss" not in repr(settings)


def test_trust_env_without_variables_is_direct_and_a_bad_variable_is_named() -> None:
    assert not load("egress: {trust_env: true}").egress.proxied
    found = problems("egress: {trust_env: true}", HTTPS_PROXY="socks5://u:hunter2@proxy:1080")
    assert found == ["egress.trust_env: HTTPS_PROXY: expected http://host:port or https://host:port"]


# ----------------------------------------------------------------------------------------------------------------
# A real forward proxy


@dataclass
class Tinyproxy:
    url: str
    log: Path

    def requests(self) -> list[str]:
        """The request lines the proxy received (`CONNECT host:port`, `GET http://host:port/path`)."""
        text = self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""
        return re.findall(r"Request \(file descriptor \d+\): (\S+ \S+)", text)

    def tunnels(self) -> list[str]:
        return [line.split()[1] for line in self.requests() if line.startswith("CONNECT ")]


@pytest.fixture
async def tinyproxy(tmp_path: Path) -> AsyncIterator[Tinyproxy]:
    """tinyproxy on a free loopback port, asking for Basic credentials and logging every request line."""
    binary = require_binary("tinyproxy", package="tinyproxy")
    port, log = unused_port(), tmp_path / "tinyproxy.log"
    conf = tmp_path / "tinyproxy.conf"
    conf.write_text(f'Port {port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 50\nLogLevel Connect\n'
                    f'LogFile "{log}"\nAllow 127.0.0.1\nBasicAuth {PROXY_USER} {PROXY_PASSWORD}\n')
    process = await asyncio.create_subprocess_exec(binary, "-d", "-c", str(conf), stdout=asyncio.subprocess.DEVNULL,
                                                   stderr=asyncio.subprocess.DEVNULL)
    try:
        await wait_listening(port, process, pause=0.025)
        yield Tinyproxy(f"http://127.0.0.1:{port}", log)
    finally:
        process.terminate()
        await process.wait()




def proxy_section(proxy: Tinyproxy, ca: TestCA | None = None, password: str = "${PROXY_PASSWORD}") -> str:
    """`no_proxy: []`: the fakes are on loopback, which is otherwise direct."""
    ca_line = f"\n  ca_file: {ca.ca_file}" if ca else ""
    return f"""
egress:
  proxy: {proxy.url}
  username: {PROXY_USER}
  password: {password}
  no_proxy: []{ca_line}
"""



@pytest.fixture
async def run() -> AsyncIterator[Callable[[config.Config], Awaitable[Sidecar]]]:
    """`await run(cfg)`: a started sidecar, stopped at teardown."""
    started: list[Sidecar] = []

    async def start(cfg: config.Config) -> Sidecar:
        sidecar = Sidecar(cfg, registry=CollectorRegistry())
        await sidecar.start()
        started.append(sidecar)
        return sidecar

    yield start
    for sidecar in started:
        await sidecar.stop()


async def test_api_calls_and_token_fetches_go_through_the_proxy(platforms: Platforms, tinyproxy: Tinyproxy, run,
                                                                 http: aiohttp.ClientSession) -> None:
    cfg, ports = make_config(platforms, proxy_section(tinyproxy), PROXY_PASSWORD=PROXY_PASSWORD)
    await run(cfg)
    base = f"http://127.0.0.1:{ports['listen']}"
    async with http.post(f"{base}/sales-bot/open-apis/im/v1/messages", json=MESSAGE) as r:
        assert r.status == 200 and (await r.json())["code"] == 0
    async with http.post(f"{base}/dingtalk/topapi/v2/user/get", json={"userid": "manager001"}) as r:
        assert r.status == 200 and (await r.json())["errcode"] == 0
    seen = tinyproxy.requests()
    feishu, oapi, api = platforms.feishu_url, platforms.oapi_url, platforms.api_url
    assert f"POST {feishu}/open-apis/auth/v3/tenant_access_token/internal" in seen
    assert any(line.startswith(f"POST {feishu}/open-apis/im/v1/messages") for line in seen)
    assert f"POST {api}/v1.0/oauth2/accessToken" in seen
    assert any(line.startswith(f"POST {oapi}/topapi/v2/user/get") for line in seen)


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA.create(tmp_path)


async def tls_feishu(aiohttp_server, ca: TestCA) -> tuple[FakeFeishu, str]:  # type: ignore[no-untyped-def]
    fake = FakeFeishu(apps={"cli_test": FEISHU_SECRET})
    server = await aiohttp_server(fake.app(), ssl=ca.server_context("127.0.0.1"))
    return fake, str(server.make_url("")).rstrip("/")


def feishu_only(url: str, listen: int, admin: int, section: str) -> str:
    return f"""
listen: 127.0.0.1:{listen}
admin_listen: 127.0.0.1:{admin}
apps:
  - {{name: sales-bot, platform: feishu, app_id: cli_test, app_secret: {FEISHU_SECRET},
     upstreams: {{open: {{base_url: "{url}"}}}}}}
""" + section


async def test_https_calls_tunnel_through_the_proxy_with_connect(aiohttp_server, ca: TestCA, tinyproxy: Tinyproxy,
                                                                  run, http: aiohttp.ClientSession) -> None:
    fake, url = await tls_feishu(aiohttp_server, ca)
    listen, admin = unused_port(), unused_port()
    await run(config.loads(feishu_only(url, listen, admin, proxy_section(tinyproxy, ca)),
                           env={"PROXY_PASSWORD": PROXY_PASSWORD}))
    async with http.post(f"http://127.0.0.1:{listen}/sales-bot/open-apis/im/v1/messages", json=MESSAGE) as r:
        assert r.status == 200 and (await r.json())["code"] == 0
    assert fake.messages and fake.token_calls == 1
    assert URL(url).authority in tinyproxy.tunnels()


async def test_a_proxy_refusing_the_credentials_is_said_plainly(aiohttp_server, ca: TestCA, tinyproxy: Tinyproxy,
                                                                run, http: aiohttp.ClientSession) -> None:
    fake, url = await tls_feishu(aiohttp_server, ca)
    listen, admin = unused_port(), unused_port()
    await run(config.loads(feishu_only(url, listen, admin, proxy_section(tinyproxy, ca, password="wrong-pass")),
                           env={}))
    async with http.get(f"http://127.0.0.1:{listen}/sales-bot/open-apis/im/v1/messages/om_1",
                        headers={"Authorization": "Bearer u-user-token"}) as r:
        body = await r.text()
        assert r.status == 502 and r.headers["X-Imsidecar-Error"] == "ConnectFailure"
    assert "egress proxy refused the tunnel with HTTP 4" in body and "check egress.username" in body and "wrong-pass" not in body
    assert fake.requests == []


async def test_robot_webhooks_go_through_the_proxy(aiohttp_server, tinyproxy: Tinyproxy, run,
                                                   http: aiohttp.ClientSession) -> None:
    robot = FakeDingTalkRobot(SystemClock(), token="dt-tok")
    robot_url = str((await aiohttp_server(robot.app())).make_url("")).rstrip("/")
    listen, admin = unused_port(), unused_port()
    await run(config.loads(f"""
listen: 127.0.0.1:{listen}
admin_listen: 127.0.0.1:{admin}
robots:
  targets: [{{name: ops, platform: dingtalk, token: dt-tok, base_url: "{robot_url}"}}]
""" + proxy_section(tinyproxy), env={"PROXY_PASSWORD": PROXY_PASSWORD}))
    async with http.post(f"http://127.0.0.1:{listen}/robots/ops", json={"msgtype": "text",
                                                                         "text": {"content": "deployed"}}) as r:
        assert r.status == 200
    assert robot.log.accepted and any(line.startswith(f"POST {robot_url}/robot/send") for line in tinyproxy.requests())


async def test_an_event_streams_endpoint_and_websocket_go_through_the_proxy(aiohttp_server, ca: TestCA,
                                                                            tinyproxy: Tinyproxy, run) -> None:
    """The long connection's endpoint discovery and its wss:// websocket (on another host, as on the real platform)
    both tunnel through the proxy; the event then reaches the application directly."""
    gateway = FakeFeishuGateway("cli_ws", "ws-secret")
    websocket = await aiohttp_server(gateway.app(), ssl=ca.server_context("127.0.0.1"))
    discovery = await aiohttp_server(endpoint_app(gateway, websocket.port), ssl=ca.server_context("127.0.0.1"))
    application = FakeApplication()
    app_url = str((await aiohttp_server(application.app())).make_url("/events"))
    listen, admin = unused_port(), unused_port()
    await run(config.loads(f"""
listen: 127.0.0.1:{listen}
admin_listen: 127.0.0.1:{admin}
events:
  queue: {{backend: memory}}
  apps:
    - {{name: fs, platform: feishu, mode: stream, app_id: cli_ws, app_secret: ws-secret,
       domain: "https://127.0.0.1:{discovery.port}", deliver_to: "{app_url}"}}
""" + proxy_section(tinyproxy, ca), env={"PROXY_PASSWORD": PROXY_PASSWORD}))
    await wait_for(lambda: gateway.live is not None)
    await gateway.push({"header": {"event_id": "ev-1", "event_type": "im.message.receive_v1"}, "event": {"n": 1}})
    await wait_for(lambda: application.received)
    assert application.received[0]["event"] == {"n": 1}
    assert tinyproxy.tunnels() == [f"127.0.0.1:{discovery.port}", f"127.0.0.1:{websocket.port}"]
    assert not any(f":{URL(app_url).port}/" in line for line in tinyproxy.requests())


def endpoint_app(gateway: FakeFeishuGateway, ws_port: int) -> web.Application:
    """/callback/ws/endpoint answering with a websocket URL on another server, as Feishu's msg-frontier host is."""
    async def endpoint(request: web.Request) -> web.Response:
        url = f"wss://127.0.0.1:{ws_port}/ws?device_id=d1&service_id=33"
        return web.json_response({"code": 0, "msg": "ok", "data": {"URL": url, "ClientConfig": gateway.client_config}})

    app = web.Application()
    app.router.add_post("/callback/ws/endpoint", endpoint)
    return app
