"""`imsidecar demo`: the sidecar in front of simulated Feishu and DingTalk platforms, on loopback, no credentials.

Owns the demo's wiring and what it prints; the fakes are the same ones the tests use.
"""

from __future__ import annotations

import asyncio
import signal

from aiohttp import web

from proxy import config
from proxy.app import Sidecar
from proxy.config import LogSettings
from proxy.fakes.dingtalk import FakeDingTalk
from proxy.fakes.faults import Faults
from proxy.fakes.feishu import FakeFeishu
from proxy.logs import configure

DEMO_CONFIG = """
listen: {listen}
admin_listen: {admin}
limits: {{deadline: 10s}}
apps:
  - name: demo-feishu
    platform: feishu
    app_id: cli_demo
    app_secret: demo-secret-feishu
    upstreams: {{open: {{base_url: "{feishu}"}}}}
  - name: demo-ding
    platform: dingtalk
    app_key: ding_demo
    app_secret: demo-secret-dingtalk
    upstreams:
      oapi: {{base_url: "{oapi}"}}
      api: {{base_url: "{api}"}}
"""


def mixed_faults(share: float) -> Faults:
    """Split `share` across the failure modes the retry engine handles."""
    parts = {"unavailable": 0.3, "throttle": 0.2, "busy": 0.2, "reset_before": 0.1, "reset_after": 0.1, "error_after": 0.1}
    return Faults(rates={name: share * weight for name, weight in parts.items()}, hang_seconds=2.0)


async def start_fakes(share: float) -> tuple[list[web.AppRunner], dict[str, str]]:
    feishu, ding = FakeFeishu(faults=mixed_faults(share)), FakeDingTalk(faults=mixed_faults(share))
    runners, urls = [], {}
    for name, app in (("feishu", feishu.app()), ("oapi", ding.oapi_app()), ("api", ding.api_app())):
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        runners.append(runner)
        urls[name] = f"http://127.0.0.1:{port}"
    return runners, urls


def banner(listen: str, admin: str, share: float) -> str:
    base = f"http://{listen}"
    faults = f"on: {share * 100:g}% of platform calls fail in mixed ways" if share else "off (add --faults to watch retries)"
    return f"""
imsidecar demo: the sidecar is in front of simulated Feishu and DingTalk platforms (faults {faults}).

  Feishu base URL:        {base}/demo-feishu
  DingTalk oapi base URL: {base}/demo-ding/oapi
  DingTalk api base URL:  {base}/demo-ding/api
  Metrics:                http://{admin}/metrics   (ready: http://{admin}/readyz)

Try, with no token at all (the sidecar adds it):
  curl -s -X POST '{base}/demo-feishu/open-apis/im/v1/messages?receive_id_type=chat_id' \\
       -H 'Content-Type: application/json' -d '{{"receive_id":"oc_demo","msg_type":"text","content":"{{\\"text\\":\\"hi\\"}}"}}'
  curl -s -X POST '{base}/demo-ding/oapi/topapi/v2/user/get' -H 'Content-Type: application/json' -d '{{"userid":"manager001"}}'
  curl -s '{base}/demo-ding/api/v1.0/contact/users/manager001'
  curl -s http://{admin}/metrics | grep imsidecar_upstream_attempts_total

Ctrl-C to stop.
"""


async def serve_demo(listen: str, admin: str, share: float) -> None:
    runners, urls = await start_fakes(share)
    text = DEMO_CONFIG.format(listen=listen, admin=admin, feishu=urls["feishu"], oapi=urls["oapi"], api=urls["api"])
    sidecar = Sidecar(config.loads(text, env={}))
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await sidecar.start()
    print(banner(listen, admin, share), flush=True)
    await stop.wait()
    await sidecar.stop()
    for runner in runners:
        await runner.cleanup()


def run_demo(listen: str, admin: str, share: float) -> int:
    try:
        config.loads(DEMO_CONFIG.format(listen=listen, admin=admin, feishu="http://x", oapi="http://x", api="http://x"), env={})
    except config.ConfigError as exc:
        for problem in exc.problems:
            print(f"imsidecar demo: {problem}")
        return 2
    configure(LogSettings())
    asyncio.run(serve_demo(listen, admin, share))
    return 0
