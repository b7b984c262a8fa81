"""The monthly quota meter: the calendar month in Asia/Shanghai, counted as each platform counts, kept across a
restart and a month boundary, shared by replicas through Redis, projected, and refusing bulk past the reserve."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from proxy.clock import VirtualClock, settle
from proxy.errors import QuotaReserved
from proxy.saving.meter import FLUSH_EVERY, Month, QuotaMeter
from proxy.store import StoreSettings
from tests.redis_support import running_redis
from tests.saving_support import guard, DING_APP, app_config, binding, exchange, json_answer, savings_metrics

SEND = "/open-apis/im/v1/messages"
JULY_LAST_MINUTE = datetime(2026, 7, 31, 15, 59, tzinfo=timezone.utc).timestamp()   # 23:59 in Shanghai


def meter(app, clock: VirtualClock, values=None):  # type: ignore[no-untyped-def]
    metrics, registry = savings_metrics()
    return QuotaMeter({app.name: app.quota}, values, clock, metrics, guard(registry)), registry


def used(registry: CollectorRegistry, account: str = "bot") -> float:
    return registry.get_sample_value("imsidecar_quota_used_calls", {"account": account}) or 0


def test_the_month_is_the_calendar_month_in_shanghai() -> None:
    month = Month(JULY_LAST_MINUTE)
    assert month.label == "2026-07"
    assert month.end == datetime(2026, 7, 31, 16, tzinfo=timezone.utc).timestamp()   # Aug 1st 00:00 +08:00
    assert JULY_LAST_MINUTE + 59 in month and JULY_LAST_MINUTE + 60 not in month
    assert Month(JULY_LAST_MINUTE + 60).label == "2026-08"
    assert Month(datetime(2026, 12, 31, 16, tzinfo=timezone.utc).timestamp()).label == "2027-01"


@pytest.mark.parametrize("app_text, upstream, path, answer, counted", [
    (None, "open", SEND, json_answer({"code": 0, "msg": "success"}), True),
    (None, "open", "/open-apis/contact/v3/users/ou_1234567", json_answer({"code": 0}), False),   # contacts: free
    (None, "open", SEND, json_answer({"code": 230001, "msg": "invalid"}, status=400), False),     # 4xx: not counted
    (None, "open", SEND, json_answer({"code": 99991400, "msg": "frequency limit"}, status=429), False),
    (None, "open", SEND, json_answer({"code": 1500, "msg": "internal error"}, status=500), False),
    (DING_APP, "oapi", "/topapi/message/corpconversation/asyncsend_v2", json_answer({"errcode": 0}), True),
    (DING_APP, "oapi", "/topapi/message/corpconversation/asyncsend_v2", json_answer({"errcode": 90018}), False),
    (DING_APP, "oapi", "/topapi/v2/user/get", json_answer({"errcode": 0}), False),                 # address book
    (DING_APP, "api", "/v1.0/card/streaming", json_answer({"success": True}), True),
    (DING_APP, "api", "/v1.0/card/streaming",
     json_answer({"code": "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi", "message": "qps"}, status=403), False),
])
async def test_calls_are_counted_the_way_the_platform_counts_them(app_text, upstream, path, answer, counted) -> None:  # type: ignore[no-untyped-def]
    app = app_config(app_text) if app_text else app_config()
    stage, registry = meter(app, VirtualClock())
    stage.observe(exchange(binding(app, upstream), "POST", path), answer)
    assert used(registry, app.name) == (1 if counted else 0)
    assert registry.get_sample_value("imsidecar_quota_metered_calls_total", {"account": app.name}) == (1 if counted else 0)


@pytest.mark.parametrize("app_text, upstream, answer", [
    (None, "open", json_answer({"code": 99991403, "msg": "This month's API call quota has been exceeded"}, status=429)),
    (DING_APP, "oapi", json_answer({"errcode": 90020, "errmsg": "您的企业本月api调用量已超过限制"})),
    (DING_APP, "api", json_answer({"code": "Forbidden.AccessDenied.ApiCountLimitForOrg", "message": "x"}, status=403)),
])
async def test_the_platform_saying_the_month_is_spent_is_counted_apart(app_text, upstream, answer) -> None:  # type: ignore[no-untyped-def]
    app = app_config(app_text) if app_text else app_config()
    stage, registry = meter(app, VirtualClock())
    stage.observe(exchange(binding(app, upstream), "POST", "/v1.0/robot/oToMessages/batchSend"
                           if upstream == "api" else SEND if upstream == "open" else "/topapi/message/corpconversation/asyncsend_v2"),
                  answer)
    assert used(registry, app.name) == 0
    assert registry.get_sample_value("imsidecar_quota_exhausted_answers_total", {"account": app.name}) == 1


async def test_the_count_survives_a_restart_and_starts_again_with_the_month(tmp_path: Path) -> None:
    clock = VirtualClock(start=JULY_LAST_MINUTE - 3600)
    app = app_config(sections=f"quota: {{state_dir: {tmp_path}}}")
    first, _ = meter(app, clock)
    await first.start()
    for _ in range(7):
        first.observe(exchange(binding(app), "POST", SEND), json_answer({"code": 0}))
    await first.stop()   # a restart
    second, registry = meter(app, clock)
    await second.start()
    assert used(registry) == 7
    second.observe(exchange(binding(app), "POST", SEND), json_answer({"code": 0}))
    await clock.advance(3600 + 60)   # into August
    assert used(registry) == 0
    second.observe(exchange(binding(app), "POST", SEND), json_answer({"code": 0}))
    assert used(registry) == 1
    await second.stop()
    third, registry = meter(app, clock)
    await third.start()
    assert used(registry) == 1   # August's own count; July's 8 stayed in July
    assert '"month": "2026-08"' in (tmp_path / "quota-bot.json").read_text()


async def test_counts_are_saved_every_second_and_kept_while_they_cannot_be(tmp_path: Path) -> None:
    clock = VirtualClock()
    app = app_config(sections=f"quota: {{state_dir: {tmp_path}}}")
    stage, _ = meter(app, clock)
    await stage.start()
    stage.observe(exchange(binding(app), "POST", SEND), json_answer({"code": 0}))
    await settle()   # the flusher is waiting for its second
    await clock.advance(FLUSH_EVERY)
    await settle()
    assert '"calls": 1' in (tmp_path / "quota-bot.json").read_text()
    (tmp_path / "quota-bot.tmp").mkdir()   # the file cannot be written (a read-only volume; root ignores modes)
    try:
        stage.observe(exchange(binding(app), "POST", SEND), json_answer({"code": 0}))
        await settle()
        await clock.advance(FLUSH_EVERY)
        await settle()
        assert '"calls": 1' in (tmp_path / "quota-bot.json").read_text()
    finally:
        (tmp_path / "quota-bot.tmp").rmdir()
    await stage.stop()   # writable again: nothing counted was lost
    assert '"calls": 2' in (tmp_path / "quota-bot.json").read_text()


async def test_counts_saved_to_files_take_no_task_per_account(tmp_path: Path) -> None:
    """A task each (gather's) was one more task a second per busy account, a thousand a second at 1,000 apps, for
    adds that never wait: they go one after the other in the flusher's own task."""
    clock = VirtualClock()
    quotas = {f"bot-{i}": app_config(sections=f"quota: {{account: acct-{i}, state_dir: {tmp_path}}}").quota
              for i in range(20)}
    metrics, registry = savings_metrics()
    stage = QuotaMeter(quotas, None, clock, metrics, guard(registry))
    await stage.start()
    for account in stage.accounts.values():
        account.record()
    await settle()   # the flusher is waiting for its second
    loop = asyncio.get_running_loop()
    made: list[str] = []
    loop.set_task_factory(lambda loop, coro, **kw: made.append(coro.__qualname__) or asyncio.Task(coro, loop=loop, **kw))
    try:
        await clock.advance(FLUSH_EVERY)
        await settle()
    finally:
        loop.set_task_factory(None)
    assert all('"calls": 1' in (tmp_path / f"quota-acct-{i}.json").read_text() for i in range(20))
    assert "AccountMeter.flush" not in made
    await stage.stop()


async def test_replicas_add_up_through_redis(tmp_path: Path) -> None:
    from proxy.store_redis import RedisStore

    async with running_redis(tmp_path) as server:
        clock = VirtualClock()
        stores = [RedisStore(StoreSettings(backend="redis", url=server.url, timeout=0.2), clock, CollectorRegistry())
                  for _ in range(2)]
        apps = [app_config(sections="quota: {account: acme}"), app_config(sections="quota: {account: acme}")]
        (one, _), (two, r2) = meter(apps[0], clock, stores[0].values), meter(apps[1], clock, stores[1].values)
        for stage in (one, two):
            await stage.start()
        for stage, app, n in ((one, apps[0], 3), (two, apps[1], 4)):
            for _ in range(n):
                stage.observe(exchange(binding(app), "POST", SEND), json_answer({"code": 0}))
        await one.stop()
        await two.stop()
        assert used(r2, "acme") == 7   # the one that saved last has heard of the other's
        restarted, r3 = meter(apps[0], clock, stores[0].values)
        await restarted.start()
        assert used(r3, "acme") == 7
        for store in stores:
            await store.close()


async def test_the_projection_carries_this_months_pace_to_its_end() -> None:
    mid_july = datetime(2026, 7, 16, 16, tzinfo=timezone.utc).timestamp()   # July 17th 00:00 in Shanghai
    clock = VirtualClock(start=mid_july)
    app = app_config(sections="quota: {allowance: 10000}")
    stage, registry = meter(app, clock)
    for _ in range(4000):
        stage.observe(exchange(binding(app), "POST", SEND), json_answer({"code": 0}))
    projected = registry.get_sample_value("imsidecar_quota_projected_calls", {"account": "bot"})
    assert projected == pytest.approx(4000 * 31 / 16)   # 16 of July's 31 days have passed
    assert registry.get_sample_value("imsidecar_quota_allowance_calls", {"account": "bot"}) == 10000


async def test_past_the_reserve_only_bulk_calls_to_metered_apis_are_refused() -> None:
    clock = VirtualClock(start=JULY_LAST_MINUTE - 86400)
    app = app_config(sections="quota: {allowance: 100, reserve: 10, refuse_bulk: true}")
    stage, registry = meter(app, clock)

    def call(path: str = SEND, lane: str = "bulk"):  # type: ignore[no-untyped-def]
        e = exchange(binding(app), "POST", path)
        e.priority = lane
        return e

    for _ in range(89):
        stage.admit(call())
        stage.observe(call(), json_answer({"code": 0}))
    stage.admit(call())   # 89 used: one more bulk call may go
    stage.observe(call(), json_answer({"code": 0}))
    with pytest.raises(QuotaReserved) as refused:
        stage.admit(call())
    assert refused.value.status == 429 and refused.value.retry_after == pytest.approx(86400 + 60)
    assert "has used 90 of its 100 calls" in str(refused.value)
    stage.admit(call(lane="interactive"))                                  # interactive: still sent
    stage.admit(call("/open-apis/contact/v3/users/ou_1234567"))            # not metered: still sent
    assert registry.get_sample_value("imsidecar_quota_refusals_total", {"account": "bot"}) == 1
