"""The nightly bitable sync that started it all, through a flaky platform: none lost, none doubled, none failed.

A sync job writes batches through the sidecar and never retries a call itself, while the fake Feishu fails a share
of calls in mixed ways: 503 before acting, 500 / a gateway's 504 / a reset after applying, 429 with
x-ogw-ratelimit-reset, 99991400 on HTTP 400. The sidecar runs its defaults: attempts come from what it measures.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import aiohttp
import pytest

from proxy.clock import AutoClock, Clock
from proxy.fakes.faults import Faults
from tests.conftest import Platforms, Running, SidecarFactory

RECORDS, BATCH, WORKERS = 6_000, 200, 6
TABLE = "tblNightly01"
ROUTE = "/open-apis/bitable/v1/apps/:app_token/tables/:table_id/records/batch_create"
PATH = f"/sales-bot/open-apis/bitable/v1/apps/bascnNightlySync/tables/{TABLE}/records/batch_create"
# The mix, in proportion: a quarter refused before acting, half applied then failed, a quarter throttled.
MIX = {"unavailable": 0.25, "error_after": 1 / 6, "gateway_after": 1 / 6, "reset_after": 1 / 6,
       "throttle": 0.125, "throttle_400": 0.125}
LIMITS = "{deadline: 30s}"


def mixed(share: float, seed: int = 11) -> Faults:
    return Faults(rates={name: share * weight for name, weight in MIX.items()}, rng=random.Random(seed))


@pytest.fixture
def clock() -> Clock:
    return AutoClock()   # back-off and the 429s' one-second waits pass in virtual time


async def sync(running: Running, keys: dict[int, str] | None = None) -> tuple[list[int], dict[int, str]]:
    """Write every batch once, the way a sync job does: no retries of its own. With `keys`, the rerun of a job:
    each batch sent again with the key its first run was answered with. Returns the failed batches and the keys."""
    batches: asyncio.Queue[int] = asyncio.Queue()
    for start in range(0, RECORDS, BATCH):
        batches.put_nowait(start)
    failed: list[int] = []
    returned: dict[int, str] = {}

    async def worker(http: aiohttp.ClientSession) -> None:
        while not batches.empty():
            start = batches.get_nowait()
            records = [{"fields": {"n": n, "name": f"row {n}"}} for n in range(start, start + BATCH)]
            headers = {"Idempotency-Key": f'"{keys[start]}"'} if keys else {}
            async with http.post(running.base + PATH, json={"records": records}, headers=headers) as r:
                body = await r.json(content_type=None)
                returned[start] = r.headers.get("X-Imsidecar-Idempotency-Key", "")
                if r.status != 200 or body.get("code") != 0:
                    failed.append(start)

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(worker(http) for _ in range(WORKERS)))
    return failed, returned


def written(platforms: Platforms) -> Counter[int]:
    return Counter(r["fields"]["n"] for r in platforms.feishu.records.get(TABLE, []))


def batch_attempts(platforms: Platforms) -> int:
    return sum(1 for r in platforms.feishu.requests if "batch_create" in r.path_qs)


@pytest.mark.parametrize("share", [0.3, 0.4])
async def test_a_sync_through_mixed_faults_writes_every_record_once_and_fails_nothing(
        start_sidecar: SidecarFactory, platforms: Platforms, share: float) -> None:
    platforms.feishu.faults = mixed(share)
    running = await start_sidecar(retry="{}", limits=LIMITS)   # the defaults: adaptive attempts, no pins
    failed, keys = await sync(running)
    counts = written(platforms)
    assert failed == []                                          # no client-visible failure
    assert sum(counts.values()) == RECORDS and set(counts.values()) == {1}
    first_run = batch_attempts(platforms)
    assert first_run - RECORDS // BATCH >= 5                     # the faults really happened
    applied_then_failed = sum(running.metric("imsidecar_retries_total", app="sales-bot", upstream="open", reason=r)
                              for r in ("code_1500", "http_504", "reset"))
    assert applied_then_failed >= 3                              # retried with the key the platform deduplicates on
    assert running.metric("imsidecar_retries_withheld_total", app="sales-bot", upstream="open",
                          why="attempts") == 0

    # The job's rerun ("失败任务重跑") with the keys it was given: exactly-once at the platform.
    failed, again = await sync(running, keys)
    assert failed == [] and again == keys
    assert sum(written(platforms).values()) == RECORDS
    assert batch_attempts(platforms) > first_run                 # it did reach the platform, which deduplicated
    # What the outcome counter claims is what happened: every batch of both runs, each applied.
    outcomes = {o: running.metric("imsidecar_request_outcomes_total", app="sales-bot", upstream="open", outcome=o)
                for o in ("applied", "not-applied", "unknown")}
    assert outcomes == {"applied": 2 * RECORDS // BATCH, "not-applied": 0, "unknown": 0}


async def test_the_same_run_without_idempotency_keys_duplicates(start_sidecar: SidecarFactory,
                                                                platforms: Platforms) -> None:
    """The control: retrying these POSTs without the platform's key writes records twice, so the test above can fail."""
    platforms.feishu.faults = mixed(0.3)
    running = await start_sidecar(retry=f"{{idempotency_keys: false, idempotent_routes: ['{ROUTE}']}}", limits=LIMITS)
    await sync(running)
    counts = written(platforms)
    assert sum(counts.values()) > RECORDS
    assert max(counts.values()) >= 2


async def test_a_rerun_without_the_returned_key_writes_twice(start_sidecar: SidecarFactory,
                                                             platforms: Platforms) -> None:
    """The control for the rerun: the key the sidecar returns is what makes it exactly-once."""
    running = await start_sidecar(limits=LIMITS)
    await sync(running)
    await sync(running)
    assert sum(written(platforms).values()) == 2 * RECORDS
