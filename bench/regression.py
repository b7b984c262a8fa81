"""CI's performance regression check: imsidecar's CPU per request against the naive proxy's, in the same run.

Run: python -m bench.regression [--seconds 3] [--rounds 2] [--baseline bench/regression_baseline.json]
nginx serves the upstream answer and wrk drives 32 connections from core 1; the naive proxy on uvloop
(bench/naive_proxy.py) and imsidecar with every feature on (bench.overhead's config, access log off) both run
pinned to core 0, loaded in turn, `rounds` times each, so a drift of the machine falls on both. CPU is each
process's utime+stime from /proc/<pid>/stat over its load run. Each round gives one ratio (imsidecar's CPU per
request over the naive proxy's); the check fails (exit 1) when the median round's ratio is more than 20% above the
committed baseline ratio, and always prints the figures it saw. It judges a ratio, never a speed, so a slower or
faster machine moves both sides alike; the median keeps one disturbed round from deciding.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from aiohttp.test_utils import unused_port

from bench.overhead import PATH, cpu_seconds, nginx_conf, sidecar_conf, start, stop, wait_http, wrk

BASELINE = Path(__file__).with_name("regression_baseline.json")
TOLERANCE = 0.20


@dataclass
class Cost:
    """CPU seconds and requests served by one process over its load runs."""

    cpu_s: float = 0.0
    requests: int = 0

    @property
    def per_request_us(self) -> float:
        return self.cpu_s / self.requests * 1e6 if self.requests else float("inf")


@dataclass(frozen=True)
class Verdict:
    ratio: float
    baseline: float
    tolerance: float

    @property
    def limit(self) -> float:
        return self.baseline * (1 + self.tolerance)

    @property
    def passed(self) -> bool:
        return self.ratio <= self.limit

    def line(self) -> str:
        word = "ok" if self.passed else "REGRESSION"
        return (f"{word}: imsidecar / naive CPU per request {self.ratio:.3f}, baseline {self.baseline:.3f}, "
                f"fails above {self.limit:.3f} (+{self.tolerance:.0%})")


def ratio(sidecar: Cost, naive: Cost) -> float:
    """imsidecar's CPU per request over the naive proxy's; a side that served nothing counts as infinitely costly."""
    if not sidecar.requests or not naive.requests or not naive.cpu_s:
        return float("inf")
    return sidecar.per_request_us / naive.per_request_us


def judge(rounds: list[tuple[Cost, Cost]], baseline: float, tolerance: float = TOLERANCE) -> Verdict:
    """The decision: the median round's ratio against baseline × (1 + tolerance); no rounds is a failure."""
    ratios = [ratio(sidecar, naive) for sidecar, naive in rounds]
    return Verdict(statistics.median(ratios) if ratios else float("inf"), baseline, tolerance)


def read_baseline(path: Path) -> float:
    return float(json.loads(path.read_text())["ratio"])


def run_load(url: str, pid: int, seconds: float) -> Cost:
    before = cpu_seconds(pid)
    result = wrk(url, 32, seconds)
    return Cost(cpu_seconds(pid) - before, result.requests)


def measure(seconds: float, rounds: int) -> list[tuple[Cost, Cost]]:
    """(imsidecar, naive) for each of `rounds` alternating load runs of `seconds`, after one warm-up each."""
    work = Path(tempfile.mkdtemp(prefix="imsidecar-regression-"))
    upstream, naive_port, side, admin = (unused_port() for _ in range(4))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(start(["nginx", "-c", str(nginx_conf(work, upstream, unused_port())), "-p", str(work)], 1))
        wait_http(f"http://127.0.0.1:{upstream}{PATH}", procs[-1])
        procs.append(start([sys.executable, "-m", "bench.naive_proxy", str(naive_port),
                            f"http://127.0.0.1:{upstream}", "--uvloop"], 0))
        wait_http(f"http://127.0.0.1:{naive_port}{PATH}", procs[-1])
        conf = sidecar_conf(work, side, admin, upstream)
        procs.append(start([sys.executable, "-m", "proxy", "run", "--config", str(conf)], 0))
        wait_http(f"http://127.0.0.1:{admin}/readyz", procs[-1])
        sidecar_url, naive_url = f"http://127.0.0.1:{side}{PATH}", f"http://127.0.0.1:{naive_port}{PATH}"
        for url in (sidecar_url, naive_url):
            wrk(url, 32, 1.0)   # warm up: pools, token, caches
        return [(run_load(sidecar_url, procs[2].pid, seconds), run_load(naive_url, procs[1].pid, seconds))
                for _ in range(rounds)]
    finally:
        for proc in procs:
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds of load per run")
    parser.add_argument("--rounds", type=int, default=5, help="load runs per process, alternating")
    parser.add_argument("--baseline", type=Path, default=BASELINE)
    args = parser.parse_args()
    missing = [tool for tool in ("nginx", "wrk", "taskset") if not shutil.which(tool)]
    if missing or importlib.util.find_spec("uvloop") is None:
        print(f"bench.regression needs nginx, wrk, taskset and uvloop (pip install '.[fast]'); missing: "
              f"{', '.join(missing) or 'uvloop'}", file=sys.stderr)
        return 2
    rounds = measure(args.seconds, args.rounds)
    for number, (sidecar, naive) in enumerate(rounds, 1):
        print(f"round {number}: naive proxy (uvloop) {naive.requests:,} requests, {naive.cpu_s:.2f} CPU s, "
              f"{naive.per_request_us:.1f} us each; imsidecar {sidecar.requests:,} requests, {sidecar.cpu_s:.2f} "
              f"CPU s, {sidecar.per_request_us:.1f} us each; ratio {ratio(sidecar, naive):.3f}")
    verdict = judge(rounds, read_baseline(args.baseline))
    print(verdict.line())
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
