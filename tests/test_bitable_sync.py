"""The nightly bitable sync that started it all: 10,000 records through a flaky platform, none lost, none doubled.

8 workers write batches of 500 through the sidecar and never retry themselves, while the fake Feishu fails 20% of
calls in mixed ways: 5xx after applying, reset after applying, 429 with a reset header, HTTP 200 with a busy code.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
import pytest

from proxy.clock import AutoClock, Clock
from proxy.fakes.faults import Faults
from tests.conftest import Platforms, Running, SidecarFactory

RECORDS, BATCH, WORKERS = 10_000, 500, 8
TABLE = "tblNightly01"
ROUTE = "/open-apis/bitable/v1/apps/:app_token/tables/:table_id/records/batch_create"
PATH = f"/sales-bot/open-apis/bitable/v1/apps/bascnNightlySync/tables/{TABLE}/records/batch_create"
MIXED = {"error_after": 0.05, "reset_after": 0.05, "throttle": 0.05, "busy": 0.05}


@pytest.fixture
def clock() -> Clock:
    return AutoClock()   # the 429's one-second waits pass in virtual time


async def sync(running: Running) -> list[int]:
    """Write every record once, the way a naive job would: no retries of its own. Returns the failed batches."""
    batches: asyncio.Queue[int] = asyncio.Queue()
    for start in range(0, RECORDS, BATCH):
        batches.put_nowait(start)
    failed: list[int] = []

    async def worker(http: aiohttp.ClientSession) -> None:
        while not batches.empty():
            start = batches.get_nowait()
            records = [{"fields": {"n": n, "name": f"row {n}"}} for n in range(start, start + BATCH)]
            async with http.post(running.base + PATH, json={"records": records}) as r:
                body = await r.json(content_type=None)
                if r.status != 200 or body.get("code") != 0:
                    failed.append(start)

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(worker(http) for _ in range(WORKERS)))
    return failed


def written(platforms: Platforms) -> Counter[int]:
    return Counter(r["fields"]["n"] for r in platforms.feishu.records.get(TABLE, []))


async def test_ten_thousand_records_arrive_exactly_once(start_sidecar: SidecarFactory, platforms: Platforms) -> None:
    platforms.feishu.faults = Faults(rates=MIXED)
    running = await start_sidecar(retry="{max_attempts: 8, backoff_base: 10ms, backoff_cap: 200ms}")
    failed = await sync(running)
    counts = written(platforms)
    assert failed == []
    assert sum(counts.values()) == RECORDS and set(counts.values()) == {1}
    injected = sum(1 for r in platforms.feishu.requests if "batch_create" in r.path_qs) - RECORDS // BATCH
    assert injected >= 3   # the faults really happened: retries were needed to get here
    assert running.metric("imsidecar_idempotency_keys_added_total", app="sales-bot", route=ROUTE) == RECORDS // BATCH


async def test_the_same_run_without_idempotency_keys_duplicates(start_sidecar: SidecarFactory,
                                                                platforms: Platforms) -> None:
    """The control: retrying these POSTs without the platform's key writes records twice, so the test above can fail."""
    platforms.feishu.faults = Faults(rates=MIXED)
    running = await start_sidecar(
        retry=f"{{max_attempts: 8, backoff_base: 10ms, backoff_cap: 200ms, idempotency_keys: false, "
              f"idempotent_routes: ['{ROUTE}']}}")
    await sync(running)
    counts = written(platforms)
    assert sum(counts.values()) > RECORDS
    assert max(counts.values()) >= 2
