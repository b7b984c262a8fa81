"""Costs that should stay flat as the work grows: configured apps, concurrent connections, start-up.

Run: python -m bench.scale [--duration 4]
The same processes as bench.overhead (nginx upstream on core 1 with wrk, the sidecar pinned to core 0, every feature
on, access log off). Two tables, each row a few seconds of load:
- apps: 1, 10, 100 and 1,000 configured Feishu apps on one listener (prefix /app-<i>), wrk spreading its requests
  over all of them, 32 connections; each a fresh sidecar process, with its start-up time;
- connections: 32, 512 and 4,096 concurrent keep-alive connections against one sidecar with 10 apps.
Each table is judged: throughput within 10% and RSS within +50 MB across its range. Start-up with 1,000 apps is judged
against 1 s, measured from spawning the process (interpreter start and imports included) to the first /readyz 200;
the listener's first accepted connection and the config load alone (the same `config.load`, in this process) are
printed beside it. The package is byte-compiled first, as the image does (Dockerfile: compileall), so start-up is
not charged for compiling sources a deployed sidecar never compiles.
"""

from __future__ import annotations

import argparse
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from aiohttp.test_utils import unused_port

import proxy
from bench.overhead import (PATH, cpu_seconds, machine, nginx_conf, rss_mb, run_wrk, start, stop, wait_http,
                            wrk_result)

APPS = (1, 10, 100, 1000)
CONNECTIONS = (32, 512, 4096)
RPS_SPREAD, RSS_GROWTH_MB, STARTUP_S = 0.10, 50.0, 1.0


@dataclass
class Step:
    label: str
    rps: float
    p99_ms: float
    rss_mb: float
    errors: int
    cpu_us: float = float("nan")   # the sidecar's CPU per request (/proc): steadier than rps when the host steals
    startup: Startup | None = None


@dataclass
class Startup:
    config_s: float     # config.load of the same file, in this process
    listening_s: float  # spawn → the app listener accepts a connection
    ready_s: float      # spawn → /readyz answers 200


# Config and load ---------------------------------------------------------------------------------------------


def sidecar_conf(workdir: Path, apps: int, port: int, admin: int, upstream: int, backlog: int | None = None, *,
                 limits: str = "max_connections: 8192", app_lines: tuple[str, ...] = ()) -> Path:
    """`apps` Feishu apps on one listener (prefix /app-<i>), every feature on; room for 4,096 connections and more.
    `limits` and `app_lines` (each app's, indented as its other keys) are what another benchmark changes."""
    conf = workdir / f"scale-{apps}.yaml"
    limits += f", backlog: {backlog}" if backlog else ""
    lines = [f"listen: 127.0.0.1:{port}", f"admin_listen: 127.0.0.1:{admin}",
             "logging: {access_log: false, level: WARNING}", f"limits: {{{limits}}}", "apps:"]
    for i in range(apps):
        lines += [f"  - name: app-{i}", "    platform: feishu", f"    app_id: cli_scale_{i}",
                  f"    app_secret: scale-secret-{i}",
                  f'    upstreams: {{open: {{base_url: "http://127.0.0.1:{upstream}"}}}}',
                  "    ratelimit: {per_second: 1000000}",   # armed, with a quota the load never reaches
                  "    coalesce: {enabled: false}",          # every identical GET proxied
                  *app_lines]
    conf.write_text("\n".join(lines) + "\n")
    return conf


def spread_script(workdir: Path, apps: int) -> Path:
    """A wrk script that sends request i to app i mod `apps`, so every configured app's route is in use."""
    script = workdir / f"spread-{apps}.lua"
    script.write_text(f"""
local i = 0
request = function()
  i = (i + 1) % {apps}
  return wrk.format("GET", "/app-" .. i .. "{PATH}")
end
""")
    return script


def wrk(url: str, connections: int, duration: float, script: Path) -> tuple[float, float, int, int]:
    """rps, p99 ms, errors (socket errors and non-2xx answers) and requests of one wrk run."""
    out = run_wrk(url, connections, duration, "--timeout", "10s", "-s", str(script))
    result = wrk_result(out)
    return result.rps, result.p99_ms, wrk_errors(out), result.requests


def wrk_errors(out: str) -> int:
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    failed = sum(int(n) for n in sockets.groups()) if sockets else 0
    return failed + (int(non_2xx.group(1)) if non_2xx else 0)


def raise_fd_limit(wanted: int = 16384) -> int:
    """The soft limit up to the hard one (inherited by the sidecar and wrk): 4,096 connections need ~8k fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(max(soft, wanted), hard) if hard != resource.RLIM_INFINITY else max(soft, wanted)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


# The sidecar -------------------------------------------------------------------------------------------------


def launch(conf: Path, port: int, admin: int) -> tuple[subprocess.Popen[bytes], Startup]:
    from proxy import config

    began = time.perf_counter()
    config.load(str(conf))
    config_s = time.perf_counter() - began
    began = time.perf_counter()
    process = start([sys.executable, "-m", "proxy", "run", "--config", str(conf)], 0)
    listening = wait_connect(port, process) - began
    ready = wait_ready(f"http://127.0.0.1:{admin}/readyz?verbose=0", process) - began
    return process, Startup(config_s, listening, ready)


def wait_connect(port: int, process: subprocess.Popen[bytes], bound: float = 30.0) -> float:
    give_up = time.perf_counter() + bound
    while time.perf_counter() < give_up and process.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return time.perf_counter()
        except OSError:
            time.sleep(0.002)
    wait_http(f"http://127.0.0.1:{port}/", process, 0.1)   # says why the process exited
    raise SystemExit(f"port {port} never accepted")


READY_POLL = 0.05   # seconds between /readyz probes (the reading's resolution). The summary (?verbose=0), as the
                   # status is all a kubelet reads: at 1,000 apps the full report costs the sidecar 20-30 ms a probe
                   # and took that time from the start-up being measured; the summary 2-8 ms


def wait_ready(url: str, process: subprocess.Popen[bytes], bound: float = 30.0) -> float:
    give_up = time.perf_counter() + bound
    while time.perf_counter() < give_up and process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return time.perf_counter()
        except OSError:
            time.sleep(READY_POLL)
    wait_http(url, process, 0.1)
    raise SystemExit(f"{url} never answered 200")


WARM_UP = 3.0   # seconds: at ~1,000 rps, every one of 1,000 apps called before the measured run


def step(label: str, pid: int, url: str, connections: int, duration: float, script: Path) -> Step:
    wrk(url, connections, WARM_UP, script)   # warm up: pools, tokens, route caches, each app's first children
    cpu = cpu_seconds(pid)
    rps, p99, errors, requests = wrk(url, connections, duration, script)
    cpu_us = (cpu_seconds(pid) - cpu) / max(1, requests) * 1e6
    return Step(label, rps, p99, rss_mb(pid, "VmRSS"), errors, cpu_us)


def apps_table(work: Path, upstream: int, duration: float, backlog: int | None = None) -> list[Step]:
    steps = []
    for apps in APPS:
        port, admin = unused_port(), unused_port()
        process, startup = launch(sidecar_conf(work, apps, port, admin, upstream, backlog), port, admin)
        try:
            found = step(f"{apps:,} apps", process.pid, f"http://127.0.0.1:{port}", 32, duration,
                         spread_script(work, apps))
            found.startup = startup
            steps.append(found)
        finally:
            stop(process)
    return steps


def connections_table(work: Path, upstream: int, duration: float, backlog: int | None = None,
                      apps: int = 10) -> list[Step]:
    port, admin = unused_port(), unused_port()
    process, _ = launch(sidecar_conf(work, apps, port, admin, upstream, backlog), port, admin)
    try:
        return [step(f"{c:,} connections", process.pid, f"http://127.0.0.1:{port}", c, duration,
                     spread_script(work, apps)) for c in CONNECTIONS]
    finally:
        stop(process)


# Report ------------------------------------------------------------------------------------------------------


def flat(steps: list[Step]) -> list[str]:
    """The two verdicts of a table: rps within 10% of the best row, RSS within +50 MB of the first."""
    best, worst = max(s.rps for s in steps), min(s.rps for s in steps)
    spread = (best - worst) / best
    growth = max(s.rss_mb for s in steps) - steps[0].rss_mb
    return [f"{'MET   ' if spread <= RPS_SPREAD else 'MISSED'}  throughput within 10%: lowest {worst:,.0f} rps "
            f"is {spread:.1%} below highest {best:,.0f}",
            f"{'MET   ' if growth <= RSS_GROWTH_MB else 'MISSED'}  RSS within +50 MB: {growth:+.1f} MB over the "
            f"first row's {steps[0].rss_mb:.1f} MB"]


def table(title: str, steps: list[Step]) -> str:
    startup = steps[0].startup is not None
    head = f"| {title} | rps | p99 ms | RSS MB | errors | CPU µs/req |" + (" config load s | listening s | /readyz s |" if startup else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in steps:
        line = f"| {s.label} | {s.rps:,.0f} | {s.p99_ms:.1f} | {s.rss_mb:.1f} | {s.errors} | {s.cpu_us:.0f} |"
        if s.startup:
            line += f" {s.startup.config_s:.3f} | {s.startup.listening_s:.3f} | {s.startup.ready_s:.3f} |"
        lines.append(line)
    return "\n".join(lines + [""] + flat(steps))


def startup_verdict(steps: list[Step]) -> str:
    last = steps[-1]
    assert last.startup is not None
    met = last.startup.ready_s < STARTUP_S
    return (f"{'MET   ' if met else 'MISSED'}  start-up with {last.label}: {last.startup.ready_s:.3f} s from spawn to "
            f"/readyz 200 (listening after {last.startup.listening_s:.3f} s; config load alone "
            f"{last.startup.config_s:.3f} s)   (target < {STARTUP_S:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds of load per row")
    parser.add_argument("--backlog", type=int, help="the sidecar's limits.backlog (default: the sidecar's default)")
    args = parser.parse_args()
    if not (shutil.which("nginx") and shutil.which("wrk")):
        raise SystemExit("bench.scale needs nginx and wrk: apt-get install nginx-light wrk")
    fds = raise_fd_limit()
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(proxy.__file__).parent)], check=True)
    work = Path(tempfile.mkdtemp(prefix="imsidecar-scale-"))
    upstream = unused_port()
    nginx = start(["nginx", "-c", str(nginx_conf(work, upstream, unused_port())), "-p", str(work)], 1)
    try:
        wait_http(f"http://127.0.0.1:{upstream}{PATH}", nginx)
        apps = apps_table(work, upstream, args.duration, args.backlog)
        connections = connections_table(work, upstream, args.duration, args.backlog)
        print(f"\nMachine: {machine()}; open files limit {fds}\n")
        print(table("configured apps (32 connections)", apps) + "\n" + startup_verdict(apps) + "\n")
        print(table("connections (10 apps)", connections))
    finally:
        stop(nginx)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
