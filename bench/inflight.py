"""Memory per request in flight, without load noise: requests held open against a platform that never answers.

Run: python -m bench.inflight [--requests 2000]
The naive aiohttp proxy (uvloop) and imsidecar (10 apps, every feature on, per-try timeout and deadline longer than
the run) each get `--requests` connections with one GET on each, against an upstream that answers the token
endpoint and nothing else. Each proxy's RSS is read before the requests and once it has stopped growing with all of
them held; the difference per request is what a request in flight costs, its client connection and its share of
the connections to the platform included. bench.scale's RSS across 4,096 connections is the same cost under load,
where how many requests are inside the proxy at the instant of the reading moves by thousands between runs; here
every request is inside, so the figure repeats within ~1 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aiohttp.test_utils import unused_port

from bench import scale
from bench.overhead import PATH, TOKEN_BODY, machine, rss_mb, start, stop, wait_http

APPS = 10


# The platform that never answers -------------------------------------------------------------------------------


async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The token endpoint answers; any other request is read and never answered."""
    token = TOKEN_BODY.encode()
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        await reader.readexactly(length)
        if b"tenant_access_token" not in head.split(b"\r\n", 1)[0]:
            await asyncio.Event().wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(token), token))


async def serve_upstream(port: int) -> None:
    server = await asyncio.start_server(hold, "127.0.0.1", port, backlog=8192)
    await server.serve_forever()


# The proxies ---------------------------------------------------------------------------------------------------


def sidecar_conf(workdir: Path, port: int, admin: int, upstream: int) -> Path:
    """bench.scale's apps, with nothing timing out while the requests are held."""
    return scale.sidecar_conf(workdir, APPS, port, admin, upstream, limits="max_connections: 16384, deadline: 120s",
                              app_lines=("    retry: {per_try_timeout: 60s}",))


def held(port: int, count: int, prefixed: bool) -> list[socket.socket]:
    """`count` connections, one GET sent on each (to app i mod 10 when `prefixed`), kept open."""
    sockets = []
    for i in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        path = (f"/app-{i % APPS}" if prefixed else "") + PATH
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        sockets.append(s)
    return sockets


def settled_rss(pid: int, bound: float = 20.0) -> float:
    """VmRSS once it has stopped growing (three readings 0.3 s apart within 0.1 MB)."""
    readings = [rss_mb(pid, "VmRSS")]
    give_up = time.monotonic() + bound
    while time.monotonic() < give_up:
        time.sleep(0.3)
        readings.append(rss_mb(pid, "VmRSS"))
        if len(readings) >= 3 and max(readings[-3:]) - min(readings[-3:]) < 0.1:
            break
    return readings[-1]


def upstream_connections(port: int) -> int:
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( dport = :{port} )"], capture_output=True,
                         text=True).stdout
    return len(out.splitlines())


def measure(name: str, argv: list[str], port: int, ready: str, upstream: int, count: int,
            prefixed: bool) -> str:
    process = start(argv, 0)
    try:
        wait_http(ready, process)
        for s in held(port, APPS, prefixed):   # warm: tokens, pools, metric children
            s.close()
        time.sleep(1.0)
        before = settled_rss(process.pid)
        sockets = held(port, count, prefixed)
        after = settled_rss(process.pid)
        connections = upstream_connections(upstream)
        for s in sockets:
            s.close()
    finally:
        stop(process)
    grown = after - before
    return (f"| {name} | {count:,} | {connections:,} | {before:.1f} | {after:.1f} | {grown:+.1f} | "
            f"{grown * 1024 / count:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000, help="requests held in flight")
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)   # run as the never-answering platform
    args = parser.parse_args()
    if args.upstream:
        asyncio.run(serve_upstream(args.upstream))
        return
    scale.raise_fd_limit(4 * args.requests + 1024)
    work = Path(tempfile.mkdtemp(prefix="imsidecar-inflight-"))
    upstream, naive, side, admin = (unused_port() for _ in range(4))
    platform = start([sys.executable, "-m", "bench.inflight", "--upstream", str(upstream)], 1)
    try:
        time.sleep(0.5)
        rows = [measure("naive aiohttp + uvloop",
                        [sys.executable, "-m", "bench.naive_proxy", str(naive), f"http://127.0.0.1:{upstream}",
                         "--uvloop"], naive, f"http://127.0.0.1:{naive}/open-apis/auth/v3/tenant_access_token/internal",
                        upstream, args.requests, prefixed=False),
                measure("imsidecar", [sys.executable, "-m", "proxy", "run", "--config",
                                      str(sidecar_conf(work, side, admin, upstream))],
                        side, f"http://127.0.0.1:{admin}/readyz?verbose=0", upstream, args.requests, prefixed=True)]
    finally:
        stop(platform)
    print(f"\nMachine: {machine()}\n")
    print("| proxy | requests held | connections to the platform | RSS before MB | RSS held MB | growth MB | KB per request |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
