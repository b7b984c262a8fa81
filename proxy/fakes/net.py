"""Waiting for a real process's socket, for the tests and benchmarks that start one (a sidecar, tinyproxy)."""

from __future__ import annotations

import asyncio


async def wait_listening(port: int, process: asyncio.subprocess.Process | None = None, *, bound: float = 5.0,
                         pause: float = 0.01) -> None:
    """Return once 127.0.0.1:`port` accepts a connection; fail if `process` exits first or `bound` seconds pass."""
    for _ in range(max(1, round(bound / pause))):
        assert process is None or process.returncode is None, f"the process meant to listen on {port} exited"
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(pause)
            continue
        writer.close()
        return
    raise AssertionError(f"nothing listens on {port}")
