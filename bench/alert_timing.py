"""How fast the shipped alerts fire and resolve, over their real windows, in a real Prometheus.

Run: python -m bench.alert_timing   (needs `prometheus` and `promtool`; takes about half a minute)

Writes three days and a half of per-minute counters for four apps (a 20% retry episode of 30 minutes, a steady 2%,
a steady 0.5% and 0%) as OpenMetrics, turns them into TSDB blocks with `promtool tsdb create-blocks-from
openmetrics`, starts Prometheus on them and asks, minute by minute, whether each tier's alert expression from
dashboards/prometheus/imsidecar-rules.yaml (recording rules written out, since Prometheus does not evaluate rules
backwards) holds. An alert without `for:` fires at the first evaluation where its expression holds, so the first
minute with a result is when it fires and the first without one after the faults stop is when it resolves (plus up
to one evaluation interval either way). Then, for the latency buckets, the p95 the histogram reports for requests
that waited out a per-try timeout of 10 s (as under 20% faults) against the true p95, with the old and new buckets.
"""

from __future__ import annotations

import asyncio
import bisect
import random
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml
from aiohttp.test_utils import unused_port

from proxy.metrics import LATENCY_BUCKETS

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "dashboards" / "prometheus" / "imsidecar-rules.yaml"
HISTORY = 3 * 24 * 60 + 60   # minutes of 0% before the episodes: the 3d window is full
AFTER = 120                  # minutes observed from the episodes' start
SCENARIOS = {"fast": (0.2, 30), "slow": (0.02, AFTER), "steady": (0.005, AFTER), "zero": (0.0, 0)}   # ratio, minutes
OLD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def openmetrics(start: int) -> str:
    """Per-minute counters: 60 requests a minute; retries at the scenario's ratio during its episode."""
    lines = ["# TYPE imsidecar_requests counter", "# TYPE imsidecar_retries counter"]
    requests, retries = [], []
    for app, (ratio, minutes) in SCENARIOS.items():
        labels = f'app="{app}",upstream="open"'
        sent = 0.0
        for m in range(HISTORY + AFTER + 1):
            at = start + 60 * m
            if HISTORY < m <= HISTORY + minutes:
                sent += 60 * ratio
            requests.append(f'imsidecar_requests_total{{{labels},outcome="success"}} {60 * m} {at}')
            retries.append(f"imsidecar_retries_total{{{labels}}} {sent:g} {at}")
    return "\n".join([lines[0], *requests, lines[1], *retries, "# EOF"]) + "\n"


def expanded_alerts() -> dict[tuple[str, str], str]:
    """(alert, long window) → its expression with every recording rule written out."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    records = {r["record"]: r["expr"].strip() for g in groups for r in g["rules"] if "record" in r}
    names = re.compile("|".join(re.escape(n) for n in sorted(records, key=len, reverse=True)))
    found = {}
    for g in groups:
        for r in g["rules"]:
            if r.get("alert") in ("ImsidecarRetryRatioHigh",):
                expr = names.sub(lambda m: f"({records[m.group(0)]})", r["expr"])
                found[(r["alert"], r["labels"]["long_window"])] = expr
    return found


async def firing_minutes(http: aiohttp.ClientSession, base: str, expr: str, start: int) -> dict[str, set[int]]:
    """app → the minutes (from the episodes' start) at which the expression holds for it."""
    params = {"query": expr, "start": str(start - 600), "end": str(start + 60 * AFTER), "step": "60"}
    async with http.get(f"{base}/api/v1/query_range", params=params) as response:
        answer = await response.json()
    assert answer["status"] == "success", answer
    return {s["metric"]["app"]: {round((float(t) - start) / 60) for t, _ in s["values"]}
            for s in answer["data"]["result"]}


async def measure(workdir: Path) -> dict[tuple[str, str], dict[str, set[int]]]:
    now = int(time.time()) // 60 * 60
    first = now - 60 * (HISTORY + AFTER + 5)
    (workdir / "series.om").write_text(openmetrics(first))
    subprocess.run([binary("promtool"), "tsdb", "create-blocks-from", "openmetrics", str(workdir / "series.om"),
                    str(workdir / "data")], check=True, capture_output=True, timeout=300)
    port = unused_port()
    process = await asyncio.create_subprocess_exec(
        binary("prometheus"), f"--storage.tsdb.path={workdir / 'data'}", "--storage.tsdb.retention.time=30d",
        f"--config.file={write_config(workdir)}", f"--web.listen-address=127.0.0.1:{port}", "--log.level=error",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{port}"
            await ready(http, base)
            episodes = first + 60 * HISTORY
            return {key: await firing_minutes(http, base, expr, episodes) for key, expr in expanded_alerts().items()}
    finally:
        process.terminate()
        await process.wait()


def write_config(workdir: Path) -> Path:
    path = workdir / "prometheus.yml"
    path.write_text("global: {scrape_interval: 1m}\n")
    return path


async def ready(http: aiohttp.ClientSession, base: str) -> None:
    give_up = time.monotonic() + 60
    while time.monotonic() < give_up:
        try:
            async with http.get(f"{base}/-/ready") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit("prometheus did not become ready")


def binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: apt-get install prometheus")
    return found


def describe(minutes: set[int], episode: int) -> str:
    if not minutes:
        return "never"
    fired = min(m for m in minutes if m >= 0) if any(m >= 0 for m in minutes) else None
    ended = [m for m in range(episode, AFTER + 1) if m not in minutes and m - 1 in minutes]
    text = f"fires at {fired} min"
    if 0 < episode < AFTER:
        text += f", resolves {ended[0] - episode} min after the faults end" if ended else ", still firing"
    return text


def histogram_p95(samples: list[float], buckets: tuple[float, ...]) -> float:
    """Prometheus's histogram_quantile(0.95, ...): linear interpolation inside the bucket holding the rank."""
    counts = [bisect.bisect_right(sorted(samples), b) for b in buckets]
    rank = 0.95 * len(samples)
    i = next(k for k, c in enumerate(counts) if c >= rank)
    low, below = (buckets[i - 1], counts[i - 1]) if i else (0.0, 0)
    return low + (buckets[i] - low) * (rank - below) / (counts[i] - below)


def latency_figures() -> list[str]:
    """Requests under 20% faults: most answer in 50-500 ms; those whose first try hung waited out a 10 s per-try
    timeout, then answered on the retry (tens to hundreds of ms, some a second try more)."""
    rng = random.Random(15)
    samples = [rng.uniform(0.05, 0.5) if rng.random() > 0.07 else 10 + rng.expovariate(1 / 0.8) for _ in range(100_000)]
    true = sorted(samples)[int(0.95 * len(samples))]
    return [f"  p95 of 100,000 requests, 7% of which waited out a 10 s per-try timeout: true {true:.1f} s; "
            f"histogram with the old buckets (10, 30) {histogram_p95(samples, OLD_BUCKETS):.1f} s; "
            f"with the new (10, 12.5, 15, 20, 25, 30) {histogram_p95(samples, LATENCY_BUCKETS):.1f} s"]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="imsidecar-alerts-") as tmp:
        results = asyncio.run(measure(Path(tmp)))
    print("\nImsidecarRetryRatioHigh over real windows (3 days of 0% before, 60 requests/min, 1-minute steps):")
    for app, (ratio, minutes) in SCENARIOS.items():
        episode = f"{ratio:.1%} for {minutes} min" if 0 < minutes < AFTER else f"{ratio:.1%} from minute 0"
        print(f"  {app:6s} {episode}:")
        for (_, long), by_app in sorted(results.items(), key=lambda kv: ["1h", "6h", "1d", "3d"].index(kv[0][1])):
            print(f"    {long:>2} tier: {describe(by_app.get(app, set()), minutes)}")
    print("\nLatency buckets:")
    print("\n".join(latency_figures()))


if __name__ == "__main__":
    main()
