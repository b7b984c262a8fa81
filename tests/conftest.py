"""Shared fixtures: fake platforms on loopback test servers and a sidecar in front of them."""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

import asyncio
import os
import shutil
import time

import aiohttp
import pytest
from aiohttp.test_utils import TestServer, unused_port
from prometheus_client import CollectorRegistry

from proxy import config
from proxy.app import Sidecar
from proxy.clock import Clock, SystemClock
from proxy.fakes.dingtalk import FakeDingTalk
from proxy.fakes.feishu import FakeFeishu

FEISHU_SECRET = "feishu-app-secret-0123456789"
DING_SECRET = "dingtalk-app-secret-0123456789"

BASE_CONFIG = """
listen: 127.0.0.1:{listen}
admin_listen: 127.0.0.1:{admin}
limits: {limits}
apps:
  - name: sales-bot
    platform: feishu
    app_id: cli_test
    app_secret: ${{FEISHU_SECRET}}
    upstreams: {{open: {{base_url: "{feishu}"}}}}
    expose:
      - {{upstream: open, prefix: /sales-bot}}
      - {{upstream: open, listen: "127.0.0.1:{feishu_port}"}}   # lark-oapi takes an origin only, no path
    retry: {retry}
    ratelimit: {ratelimit}
    breaker: {breaker}
  - name: ops-ding
    platform: dingtalk
    app_key: ding_test
    app_secret: ${{DING_SECRET}}
    upstreams:
      oapi: {{base_url: "{oapi}"}}
      api: {{base_url: "{api}"}}
    expose:
      - {{upstream: oapi, prefix: /dingtalk}}
      - {{upstream: api, prefix: /dingtalk-api}}
      - {{upstream: api, listen: "127.0.0.1:{api_port}"}}
    retry: {retry}
    ratelimit: {ratelimit}
    breaker: {breaker}
"""


def require_binary(*names: str, package: str) -> str:
    """The path of a real component the test needs; skipped when absent, except in CI where it must be there."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    message = f"{names[0]} not found: apt-get install {package}"
    if os.environ.get("IMSIDECAR_REQUIRE_E2E"):
        pytest.fail(message)
    pytest.skip(message)


async def wait_ready(session: aiohttp.ClientSession, url: str, process: asyncio.subprocess.Process,
                     bound: float = 20.0) -> None:
    """Poll `url` until it answers 200; fail at once, with the process's stderr, if it exits first."""
    give_up = time.monotonic() + bound
    while True:
        if process.returncode is not None:
            error = (await process.stderr.read()).decode()[-2000:] if process.stderr else ""
            pytest.fail(f"the process exited: {error}")
        try:
            async with session.get(url) as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        assert time.monotonic() < give_up, f"{url} never became ready"
        await asyncio.sleep(0.05)


@asynccontextmanager
async def served(argv: list[str], base: str, ready_path: str, bound: float = 20.0) -> AsyncIterator[aiohttp.ClientSession]:
    """A real server process (Prometheus, Alertmanager...) started for one test and stopped after it."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, base + ready_path, process, bound)
            yield session
    finally:
        process.terminate()
        await process.wait()


@dataclass
class Platforms:
    feishu: FakeFeishu
    dingtalk: FakeDingTalk
    feishu_url: str
    oapi_url: str
    api_url: str


@dataclass
class Running:
    sidecar: Sidecar
    base: str          # main listener
    api_base: str      # the DingTalk api port of its own
    feishu_base: str   # the Feishu port of its own
    admin: str
    registry: CollectorRegistry

    def metric(self, name: str, **labels: str) -> float:
        return self.sidecar.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def clock() -> Clock:
    return SystemClock()


@pytest.fixture
async def platforms(aiohttp_server: Callable[..., Awaitable[TestServer]], clock: Clock) -> Platforms:
    feishu = FakeFeishu(apps={"cli_test": FEISHU_SECRET}, clock=clock)
    ding = FakeDingTalk(apps={"ding_test": DING_SECRET}, clock=clock)
    f = await aiohttp_server(feishu.app(), access_log=None)
    o = await aiohttp_server(ding.oapi_app(), access_log=None)
    a = await aiohttp_server(ding.api_app(), access_log=None)
    return Platforms(feishu, ding, str(f.make_url("")).rstrip("/"), str(o.make_url("")).rstrip("/"),
                     str(a.make_url("")).rstrip("/"))


DEFAULT_RETRY = "{backoff_base: 1ms, backoff_cap: 5ms, per_try_timeout: 2s}"


def make_config(platforms: Platforms, extra: str = "", limits: str = "{deadline: 5s}", retry: str = DEFAULT_RETRY,
                ratelimit: str = "{enabled: true}", breaker: str = "{}", **env: str) -> tuple[config.Config, dict[str, int]]:
    ports = dict(zip(("listen", "admin", "api_port", "feishu_port"), distinct_ports(4)))
    text = BASE_CONFIG.format(feishu=platforms.feishu_url, oapi=platforms.oapi_url, api=platforms.api_url,
                              limits=limits, retry=retry, ratelimit=ratelimit, breaker=breaker, **ports) + extra
    environment = {"FEISHU_SECRET": FEISHU_SECRET, "DING_SECRET": DING_SECRET, **env}
    return config.loads(text, env=environment), ports


def distinct_ports(count: int) -> list[int]:
    """Free ports, no two alike: unused_port() can hand out the same port twice in a row."""
    ports: list[int] = []
    while len(ports) < count:
        port = unused_port()
        if port not in ports:
            ports.append(port)
    return ports


SidecarFactory = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_sidecar(platforms: Platforms, clock: Clock) -> AsyncIterator[SidecarFactory]:
    started: list[Sidecar] = []

    async def start(extra: str = "", limits: str = "{deadline: 5s}", retry: str = DEFAULT_RETRY,
                    ratelimit: str = "{enabled: true}", breaker: str = "{}", **kwargs: Any) -> Running:
        cfg, ports = make_config(platforms, extra, limits, retry, ratelimit, breaker)
        registry = CollectorRegistry()
        sidecar = Sidecar(cfg, clock=kwargs.get("clock", clock), registry=registry,
                          upstream_traces=kwargs.get("upstream_traces", ()))
        await sidecar.start()
        started.append(sidecar)
        return Running(sidecar, f"http://127.0.0.1:{ports['listen']}", f"http://127.0.0.1:{ports['api_port']}",
                       f"http://127.0.0.1:{ports['feishu_port']}",
                       f"http://127.0.0.1:{ports['admin']}", registry)

    yield start
    for sidecar in started:
        await sidecar.stop()


@pytest.fixture
async def sidecar(start_sidecar: SidecarFactory) -> Running:
    return await start_sidecar()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
