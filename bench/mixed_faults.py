"""Mixed faults at 10-40%: the share of requests that fail, the amplification and the attempts, per retry policy.

Run: python -m bench.faults --mixed [--requests 10000]   (or python -m bench.mixed_faults)
The issue's mix, in proportion (a quarter refused before acting with 503, half applied and then failed with 500, a
gateway's 504 or a reset, a quarter throttled with 429 + x-ogw-ratelimit-reset or 99991400 on HTTP 400) on
bitable batch_create, which the sidecar keys with client_token. The sidecar, the fake Feishu and a closed-loop
client run in this process on an AutoClock: back-off and the platforms' one-second waits pass in virtual time,
the requests themselves run for real, so many thousands fit in a short run.
Targets: at most 1e-4 of requests fail while the deadline and budget allow, and the amplification (attempts the
platform saw per request) is within 10% of 1/(1 - p). With N requests and no failure, the share is below 3/N with
95% confidence, so 10,000 requests can show 0 failures but not prove 1e-4; the bound is printed beside the share.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from aiohttp.test_utils import unused_port
from prometheus_client import CollectorRegistry

from proxy import config
from proxy.app import Sidecar
from proxy.clock import AutoClock
from proxy.fakes.faults import Faults
from proxy.fakes.feishu import FakeFeishu

SECRET = "bench-secret-feishu"
PATH = "/bench/open-apis/bitable/v1/apps/bascnBench/tables/tblBench01/records/batch_create"
MIX = {"unavailable": 0.25, "error_after": 1 / 6, "gateway_after": 1 / 6, "reset_after": 1 / 6,
       "throttle": 0.125, "throttle_400": 0.125}
RATES = (0.10, 0.20, 0.30, 0.40)
WORKERS = 64
# The fixed policies as clients write them today (a per-try timeout, a fixed number of attempts), through the same
# sidecar (keys, honest answers, breaker); imsidecar adaptive is the default config, nothing pinned.
POLICIES = {
    "no retries": "{adaptive: false, max_attempts: 1}",
    "fixed 3x1s": "{adaptive: false, max_attempts: 4, backoff: fixed, backoff_base: 1s}",
    "exponential": "{adaptive: false, max_attempts: 4, backoff_base: 100ms, backoff_cap: 2s}",
    "imsidecar adaptive": "{}",
}


@dataclass
class Cell:
    requests: int
    failed: int
    attempts: int
    max_attempts: int
    why: list[str]   # the first few failures of the adaptive policy: status and the sidecar's headers

    @property
    def share(self) -> float:
        return self.failed / self.requests

    @property
    def upper(self) -> float:
        """One-sided 95% upper bound of the failure share (the rule of three when nothing failed)."""
        if self.failed == 0:
            return 3.0 / self.requests
        p, n, z = self.share, self.requests, 1.645
        return (p + z * z / (2 * n) + z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)

    @property
    def amplification(self) -> float:
        return self.attempts / self.requests


def sidecar_config(listen: int, admin: int, platform_port: int, retry: str) -> str:
    return f"""
listen: 127.0.0.1:{listen}
admin_listen: 127.0.0.1:{admin}
logging: {{access_log: false, level: ERROR}}
apps:
  - name: bench
    platform: feishu
    app_id: cli_bench
    app_secret: {SECRET}
    upstreams: {{open: {{base_url: "http://127.0.0.1:{platform_port}"}}}}
    retry: {retry}
    ratelimit: {{enabled: false}}
"""


async def one_cell(share: float, retry: str, requests: int, seed: int) -> Cell:
    clock = AutoClock()
    fake = FakeFeishu(apps={"cli_bench": SECRET}, clock=clock,
                      faults=Faults(rates={k: share * w for k, w in MIX.items()}, rng=random.Random(seed)))
    runner = web.AppRunner(fake.app(), access_log=None)
    await runner.setup()
    port = unused_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    listen, admin = unused_port(), unused_port()
    sidecar = Sidecar(config.loads(sidecar_config(listen, admin, port, retry), env={}), clock=clock,
                      registry=CollectorRegistry())
    await sidecar.start()
    try:
        failed, most, why = await drive(f"http://127.0.0.1:{listen}{PATH}", requests)
    finally:
        await sidecar.stop()
        await runner.cleanup()
    attempts = sum(1 for r in fake.requests if "batch_create" in r.path_qs)
    return Cell(requests, failed, attempts, most, why)


async def drive(url: str, requests: int) -> tuple[int, int, list[str]]:
    """A sync job's workers: each request once, no retries of their own. Returns failures, the most attempts and
    what the first few failures said."""
    left = iter(range(requests))
    failed, most, why = 0, 0, list[str]()
    body = {"records": [{"fields": {"n": 1}}]}

    async def worker(http: aiohttp.ClientSession) -> None:
        nonlocal failed, most
        for _ in left:
            async with http.post(url, json=body) as r:
                answer = await r.read()
                most = max(most, int(r.headers.get("X-Imsidecar-Attempts", "0")))
                if r.status != 200 or not answer.startswith(b'{"code":0,'):
                    failed += 1
                    if len(why) < 5:
                        said = {k: v for k, v in r.headers.items() if k.startswith("X-Imsidecar") and "Key" not in k}
                        why.append(f"HTTP {r.status} {said}")

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        await asyncio.gather(*(worker(http) for _ in range(WORKERS)))
    return failed, most, why


def table(results: dict[float, dict[str, Cell]]) -> str:
    lines = ["| faults | policy | requests | failed | failure share | 95% bound | amplification | 1/(1-p) "
             "| max attempts |", "|---|---|---|---|---|---|---|---|---|"]
    for share, by_policy in results.items():
        for policy, c in by_policy.items():
            lines.append(f"| {share:.0%} | {policy} | {c.requests:,} | {c.failed} | {c.share:.2e} | {c.upper:.1e} | "
                         f"{c.amplification:.3f} | {1 / (1 - share):.3f} | {c.max_attempts} |")
    return "\n".join(lines)


def verdicts(results: dict[float, dict[str, Cell]]) -> list[str]:
    out = []
    for share, by_policy in results.items():
        c = by_policy.get("imsidecar adaptive")
        if c is None:
            continue
        ideal = 1 / (1 - share)
        met = c.share <= 1e-4 and abs(c.amplification - ideal) <= 0.1 * ideal
        out.append(f"{'MET ' if met else 'MISSED'} {share:.0%} mixed faults: failure share {c.share:.2e} (target "
                   f"<= 1e-4; 95% bound {c.upper:.1e} from {c.requests:,} requests), amplification "
                   f"{c.amplification:.3f} (target {ideal:.3f} +- 10%)")
    return out


async def run(requests: int, fixed_requests: int, policies: list[str]) -> None:
    results: dict[float, dict[str, Cell]] = {}
    for i, share in enumerate(RATES):
        for policy in policies:
            n = requests if policy == "imsidecar adaptive" else fixed_requests
            cell = await one_cell(share, POLICIES[policy], n, seed=100 + i)
            results.setdefault(share, {})[policy] = cell
            print(f"  done: {share:.0%} / {policy}: {cell.failed}/{cell.requests} failed, "
                  f"amplification {cell.amplification:.3f}", flush=True)
            if policy == "imsidecar adaptive":
                for line in cell.why:
                    print(f"    failed: {line}", flush=True)
    print(f"\nMixed faults on bitable batch_create, {WORKERS} workers, closed loop, virtual time for waits.\n")
    print(table(results))
    print()
    for line in verdicts(results):
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=10_000, help="requests per fault rate, adaptive policy")
    parser.add_argument("--fixed-requests", type=int, default=1_000, help="requests per fault rate, fixed policies")
    parser.add_argument("--policy", help="run policies whose name starts with this")
    args = parser.parse_args()
    policies = [p for p in POLICIES if not args.policy or p.startswith(args.policy)]
    asyncio.run(run(args.requests, args.fixed_requests, policies))


if __name__ == "__main__":
    main()
