"""Slow is not down, and down is found fast: the sidecar's defaults against a platform that slows to 800 +- 400 ms
after a fast start, and against one that stops answering at all. Real time: per-try timeouts are real timers.
The breaker's one second and the monitor's evidence are tested in virtual time in test_breaker.py/test_network.py.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp

from proxy.fakes.faults import Faults
from tests.conftest import Platforms, Running, SidecarFactory

MESSAGE = {"receive_id": "oc_1", "msg_type": "text", "content": json.dumps({"text": "hi"})}
LIMITS = "{deadline: 10s}"


async def send(http: aiohttp.ClientSession, running: Running) -> tuple[int, str]:
    async with http.post(f"{running.base}/sales-bot/open-apis/im/v1/messages", json=MESSAGE) as r:
        await r.read()
        return r.status, r.headers.get("X-Imsidecar-Error", "")


async def paced(http: aiohttp.ClientSession, running: Running, count: int, rate: float) -> list[tuple[int, str]]:
    async def later(i: int) -> tuple[int, str]:
        await asyncio.sleep(i / rate)
        return await send(http, running)
    return await asyncio.gather(*(later(i) for i in range(count)))


async def warm_up(http: aiohttp.ClientSession, running: Running, platforms: Platforms) -> None:
    """Fast answers first, so the learned per-try timeout sits at its 0.5 s floor when the platform slows."""
    platforms.feishu.faults = Faults(latency=0.01)
    await paced(http, running, 40, rate=80)
    assert running.metric("imsidecar_adaptive_per_try_timeout_seconds", app="sales-bot", upstream="open") == 0.5


async def watch_states(running: Running, seen: set[str]) -> None:
    """The monitor's state as the gauges show it, every 10 ms."""
    while True:
        seen.update(state for state in ("healthy", "congested", "lossy", "throttled", "down")
                    if running.metric("imsidecar_network_state", app="sales-bot", upstream="open", state=state))
        await asyncio.sleep(0.01)


async def test_a_platform_slowed_to_800_ms_give_or_take_400_fails_nothing(
        start_sidecar: SidecarFactory, platforms: Platforms, http: aiohttp.ClientSession) -> None:
    running = await start_sidecar(retry="{}", limits=LIMITS)    # the defaults: nothing pinned
    await warm_up(http, running, platforms)
    platforms.feishu.faults = Faults(latency=0.8, latency_spread=0.4)
    states: set[str] = set()
    watcher = asyncio.create_task(watch_states(running, states))
    outcomes = await paced(http, running, 40, rate=30)
    watcher.cancel()
    assert {status for status, _ in outcomes} == {200}
    assert "down" not in states                              # a run of timeouts, but every answer arrived
    assert running.metric("imsidecar_circuit_transitions_total", app="sales-bot", upstream="open", state="open") == 0
    assert running.metric("imsidecar_upstream_late_answers_total", app="sales-bot", upstream="open") >= 1
    # The timeout now follows what the platform shows, late answers included: no longer the 0.5 s floor.
    assert running.metric("imsidecar_adaptive_per_try_timeout_seconds", app="sales-bot", upstream="open") >= 1.2
    assert len(platforms.feishu.messages) == 40 + 40       # retried with the message's uuid: each one written once


async def test_a_platform_slowed_past_the_down_silence_is_slow_not_down(
        start_sidecar: SidecarFactory, platforms: Platforms, http: aiohttp.ClientSession) -> None:
    """Every answer takes 1.3 s: longer than the second of silence `down` waits for after the first timeout (at
    0.5 s), shorter than that timeout plus the second. Only the late answers of the first timeouts arrive in time
    to say the platform is slow; unheard (as they once were, to save a task per attempt), it was judged down."""
    running = await start_sidecar(retry="{}", limits=LIMITS)
    await warm_up(http, running, platforms)
    platforms.feishu.faults = Faults(latency=1.3)
    states: set[str] = set()
    watcher = asyncio.create_task(watch_states(running, states))
    outcomes = await paced(http, running, 40, rate=30)
    watcher.cancel()
    assert {status for status, _ in outcomes} == {200}
    assert "down" not in states
    assert running.metric("imsidecar_circuit_transitions_total", app="sales-bot", upstream="open", state="open") == 0


async def test_a_platform_that_answers_nothing_opens_the_breaker_and_nobody_waits_out_the_deadline(
        start_sidecar: SidecarFactory, platforms: Platforms, http: aiohttp.ClientSession) -> None:
    running = await start_sidecar(retry="{}", limits=LIMITS)
    await warm_up(http, running, platforms)
    platforms.feishu.faults = Faults(rates={"hang": 1.0}, hang_seconds=30.0)   # a blackhole
    outcomes = await paced(http, running, 40, rate=20)
    errors = [error for _, error in outcomes]
    assert running.metric("imsidecar_circuit_transitions_total", app="sales-bot", upstream="open", state="open") >= 1
    assert "CircuitOpen" in errors                           # the later callers were told at once
    assert "DeadlineExceeded" not in errors                  # and nobody waited out the whole 10 s
    assert running.metric("imsidecar_upstream_late_answers_total", app="sales-bot", upstream="open") == 0
