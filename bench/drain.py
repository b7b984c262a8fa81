"""SIGTERM to exit: the real sidecar process with requests stuck at the platform, in back-off and in the limiter.

Run: python -m bench.drain [--drain 15] [--stuck 20]
The fake Feishu runs in this process and never answers the stuck requests; the sidecar runs as `python -m proxy run`.
Prints the seconds from SIGTERM to exit against `limits.drain_timeout` (the promise: within it, in total; aiohttp on
its own waited it twice), the exit code, and how many clients got an HTTP answer rather than a cut connection.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import unused_port

from proxy.fakes.faults import Faults
from proxy.fakes.feishu import FakeFeishu

SECRET = "bench-secret-feishu"
MESSAGES = "/sales-bot/open-apis/im/v1/messages?receive_id_type=chat_id"
BODY = {"receive_id": "oc_1", "msg_type": "text", "content": "{\"text\": \"hi\"}"}


def config(listen: int, admin: int, platform: int, drain: float) -> str:
    return f"""
listen: 127.0.0.1:{listen}
admin_listen: 127.0.0.1:{admin}
limits: {{drain_timeout: {drain}s, deadline: 120s}}
logging: {{access_log: false, level: WARNING}}
apps:
  - name: sales-bot
    platform: feishu
    app_id: cli_bench
    app_secret: {SECRET}
    upstreams: {{open: {{base_url: "http://127.0.0.1:{platform}"}}}}
    retry: {{per_try_timeout: 100s, max_retry_after: 60s}}
    ratelimit: {{routes: {{/open-apis/im/v1/messages/:message_id: {{per_minute: 1}}}}}}
"""


async def ask(http: aiohttp.ClientSession, url: str, method: str = "POST") -> str:
    try:
        async with http.request(method, url, json=BODY if method == "POST" else None) as r:
            await r.read()
            return f"{r.status} {r.headers.get('X-Imsidecar-Error', 'platform')}"
    except aiohttp.ClientError as exc:
        return f"cut ({type(exc).__name__})"


async def run(drain: float, stuck: int) -> None:
    fake = FakeFeishu(apps={"cli_bench": SECRET}, faults=Faults(hang_seconds=10 * drain + 60))
    runner = web.AppRunner(fake.app(), access_log=None)
    await runner.setup()
    platform = unused_port()
    await web.TCPSite(runner, "127.0.0.1", platform).start()
    listen, admin = unused_port(), unused_port()
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "config.yaml"
        path.write_text(config(listen, admin, platform, drain))
        process = await asyncio.create_subprocess_exec(sys.executable, "-m", "proxy", "run", "--config", str(path))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            await ready(http, f"http://127.0.0.1:{admin}/readyz")
            base = f"http://127.0.0.1:{listen}"
            fake.faults.script.extend(["hang"] * stuck + ["throttle"] * stuck)
            tasks = [asyncio.create_task(ask(http, base + MESSAGES)) for _ in range(2 * stuck)]
            tasks += [asyncio.create_task(ask(http, f"{base}/sales-bot/open-apis/im/v1/messages/om_{i}", "GET"))
                      for i in range(stuck)]   # one per minute: all but the first queue for the limiter
            await asyncio.sleep(0.3)   # the hung ones are at the platform, the throttled in their 1 s back-off
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            code = await process.wait()
            elapsed = time.monotonic() - signalled
            answers = await asyncio.gather(*tasks)
    await runner.cleanup()
    report(drain, elapsed, code, answers)


def report(drain: float, elapsed: float, code: int, answers: list[str]) -> None:
    kinds: dict[str, int] = {}
    for answer in answers:
        kinds[answer] = kinds.get(answer, 0) + 1
    answered = sum(n for kind, n in kinds.items() if not kind.startswith("cut"))
    print(f"drain_timeout {drain:g}s: SIGTERM to exit {elapsed:.2f}s, exit code {code}")
    print(f"clients answered: {answered} of {len(answers)}  " + ", ".join(f"{k}: {n}" for k, n in sorted(kinds.items())))
    verdict = "MET " if elapsed <= drain and code == 0 and answered == len(answers) else "MISS"
    print(f"{verdict} exit 0 within drain_timeout ({elapsed:.2f}s <= {drain:g}s), every client answered")


async def ready(http: aiohttp.ClientSession, url: str) -> None:
    for _ in range(400):
        try:
            async with http.get(url) as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise SystemExit(f"{url} never became ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drain", type=float, default=15.0, help="limits.drain_timeout, seconds (default 15)")
    parser.add_argument("--stuck", type=int, default=20, help="requests of each kind left waiting (default 20)")
    args = parser.parse_args()
    asyncio.run(run(args.drain, args.stuck))


if __name__ == "__main__":
    main()
