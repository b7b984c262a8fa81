"""A real Alertmanager routes a firing alert through the bridge to fake DingTalk and Feishu robots.

Needs the `prometheus-alertmanager` binary (Debian package `prometheus-alertmanager`); skipped only when it is absent.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from aiohttp.test_utils import unused_port
import pytest
from prometheus_client import CollectorRegistry

from yarl import URL

from proxy import config
from proxy.app import Sidecar
from proxy.clock import SystemClock
from proxy.fakes.robots import FakeDingTalkRobot, FakeFeishuRobot
from proxy.robots.signing import dingtalk_sign
from tests.conftest import require_binary, served

DT_SECRET, FS_SECRET = "SECe2e-dingtalk", "e2e-feishu"
BOUND = 20.0  # overall limit for any one wait; normally everything happens in well under a second


async def eventually(check, what: str, bound: float = BOUND) -> None:
    give_up = time.monotonic() + bound
    while not check():
        assert time.monotonic() < give_up, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.fixture
async def robots(aiohttp_server):
    clock = SystemClock()
    dingtalk = FakeDingTalkRobot(clock, token="dt-tok", secret=DT_SECRET, keyword="alert")
    feishu = FakeFeishuRobot(clock, token="fs-hook", secret=FS_SECRET)
    return dingtalk, feishu, await aiohttp_server(dingtalk.app()), await aiohttp_server(feishu.app())


@pytest.fixture
async def bridge(robots):
    """The real sidecar, with only its robot targets configured."""
    _, _, dt_server, fs_server = robots
    listen, admin = unused_port(), unused_port()
    text = f"""
listen: 127.0.0.1:{listen}
admin_listen: 127.0.0.1:{admin}
robots:
  deadline: 10s
  targets:
    - {{name: ops, platform: dingtalk, token: dt-tok, secret: {DT_SECRET}, keyword: alert,
       base_url: "{dt_server.make_url('')}", mention: {{mobiles: ["13800000000"]}}}}
    - {{name: dev, platform: feishu, token: fs-hook, secret: {FS_SECRET}, base_url: "{fs_server.make_url('')}"}}
"""
    sidecar = Sidecar(config.loads(text, env={}), registry=CollectorRegistry())
    await sidecar.start()
    yield URL(f"http://127.0.0.1:{listen}")
    await sidecar.stop()


@pytest.fixture
async def alertmanager(tmp_path: Path, bridge):
    port = unused_port()
    config = tmp_path / "alertmanager.yml"
    config.write_text(f"""
route:
  receiver: chat
  group_by: [alertname]
  group_wait: 100ms
  group_interval: 1m
  repeat_interval: 1h
receivers:
  - name: chat
    webhook_configs:
      - url: {bridge / 'alerts' / 'ops'}
        send_resolved: false
      - url: {bridge / 'alerts' / 'dev'}
        send_resolved: false
""")
    binary = require_binary("prometheus-alertmanager", "alertmanager", package="prometheus-alertmanager")
    argv = [binary, f"--config.file={config}", f"--storage.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=", "--log.level=warn"]
    base = f"http://127.0.0.1:{port}"
    async with served(argv, base, "/-/ready", BOUND) as session:
        yield session, base


async def test_a_firing_alert_reaches_both_robots_once_signed_and_rendered(alertmanager, robots):
    session, base = alertmanager
    dingtalk, feishu, _, _ = robots
    alert = {"labels": {"alertname": "ImsidecarRetryRate", "severity": "critical", "job": "imsidecar"},
             "annotations": {"summary": "retries above 20% of requests", "description": "The platform is failing.",
                             "runbook_url": "https://runbooks.example.com/imsidecar/runbook.md#imsidecarretryratiohigh"},
             "generatorURL": "http://prom/graph?g0"}
    async with session.post(f"{base}/api/v2/alerts", json=[alert]) as response:
        assert response.status == 200, await response.text()

    await eventually(lambda: dingtalk.log.accepted and feishu.log.accepted, "both robots to receive the alert")
    await asyncio.sleep(0.3)  # room for a (wrong) second delivery to show up
    assert len(dingtalk.log.accepted) == 1 and len(feishu.log.accepted) == 1
    assert dingtalk.log.refused == [] and feishu.log.refused == []

    dt = dingtalk.log.accepted[0]
    assert dt.query["sign"] == dingtalk_sign(DT_SECRET, int(dt.query["timestamp"]))
    assert dt.body["msgtype"] == "markdown"
    text = dt.body["markdown"]["text"]
    assert "ImsidecarRetryRate" in text and "retries above 20% of requests" in text and "@13800000000" in text
    assert "The platform is failing." in text and "UTC+08:00" in text   # Alertmanager's startsAt, in Asia/Shanghai
    assert "[Runbook](https://runbooks.example.com/imsidecar/runbook.md#imsidecarretryratiohigh)" in text
    assert dt.body["at"]["atMobiles"] == ["13800000000"]

    fs = feishu.log.accepted[0].body
    assert fs["msg_type"] == "interactive" and fs["card"]["header"]["template"] == "red"
    assert "ImsidecarRetryRate" in fs["card"]["header"]["title"]["content"]
    assert {"timestamp", "sign"} <= set(fs)
