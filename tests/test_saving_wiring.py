"""The quota-saving stages in the forwarding path, against the fake platforms: what an application sees, and what
the platform (and its monthly count) sees."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Platforms, SidecarFactory

USER = "/open-apis/contact/v3/users/ou_7d8a6e6df7621556"
MESSAGE = {"receive_id": "oc_1", "msg_type": "interactive", "content": json.dumps({"elements": []})}


def feishu_app(platforms: Platforms, sections: str, name: str = "saver") -> str:
    """One more Feishu app of the fake's tenant (the same app id as sales-bot), with these sections."""
    return f"""
  - name: {name}
    platform: feishu
    app_id: cli_test
    app_secret: ${{FEISHU_SECRET}}
    upstreams: {{open: {{base_url: "{platforms.feishu_url}"}}}}
    expose: [{{upstream: open, prefix: /{name}}}]
    retry: {{backoff_base: 1ms, backoff_cap: 5ms, per_try_timeout: 2s}}
""" + "".join(f"    {line}\n" for line in sections.strip().splitlines())


def ding_app(platforms: Platforms, sections: str) -> str:
    return f"""
  - name: ding-saver
    platform: dingtalk
    app_key: ding_test
    app_secret: ${{DING_SECRET}}
    upstreams: {{oapi: {{base_url: "{platforms.oapi_url}"}}, api: {{base_url: "{platforms.api_url}"}}}}
    expose: [{{upstream: oapi, prefix: /ding-oapi}}, {{upstream: api, prefix: /ding-api}}]
""" + "".join(f"    {line}\n" for line in sections.strip().splitlines())


async def get(http: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, dict, dict]:
    async with http.get(url, headers=headers) as r:
        return r.status, dict(r.headers), await r.json()


def calls_to(platforms: Platforms, path: str) -> int:
    return sum(1 for seen in platforms.feishu.requests if seen.path_qs.split("?")[0] == path)


async def test_identical_concurrent_gets_reach_the_platform_once(start_sidecar: SidecarFactory, platforms: Platforms,
                                                                 http: aiohttp.ClientSession) -> None:
    running = await start_sidecar()
    platforms.feishu.faults.latency = 0.05   # long enough for all of them to be in flight together
    answers = await asyncio.gather(*(get(http, f"{running.base}/sales-bot/open-apis/bot/v3/info") for _ in range(10)))
    assert calls_to(platforms, "/open-apis/bot/v3/info") == 1
    assert {json.dumps(body) for _, _, body in answers} == {json.dumps(answers[0][2])} and answers[0][0] == 200
    assert sorted(h.get("X-Imsidecar-Coalesced", "") for _, h, _ in answers) == [""] + ["read"] * 9
    assert running.metric("imsidecar_coalesced_requests_total", app="sales-bot", route="/open-apis/bot/v3/info",
                          kind="read") == 9


async def test_cached_reads_with_their_headers_and_identities_kept_apart(start_sidecar: SidecarFactory,
                                                                        platforms: Platforms,
                                                                        http: aiohttp.ClientSession) -> None:
    running = await start_sidecar(extra=feishu_app(platforms, "cache: {}"))
    url = f"{running.base}/saver{USER}"
    first = await get(http, url)
    second = await get(http, url)
    assert first[1]["X-Imsidecar-Cache"] == "miss" and second[1]["X-Imsidecar-Cache"] == "hit"
    assert second[1]["X-Imsidecar-Attempts"] == "0" and second[2] == first[2]
    as_user = await get(http, url, Authorization="Bearer u-alice-token")   # a user's own token: its own entry
    assert as_user[1]["X-Imsidecar-Cache"] == "miss"
    assert calls_to(platforms, USER) == 2
    assert [kind for path, kind, _ in platforms.feishu.calls if path == USER] == ["t", "u"]
    fresh = await get(http, url, **{"Cache-Control": "no-cache"})
    assert fresh[1]["X-Imsidecar-Cache"] == "bypass" and calls_to(platforms, USER) == 3


async def test_a_spent_month_is_bridged_by_the_last_good_answer(start_sidecar: SidecarFactory, platforms: Platforms,
                                                               http: aiohttp.ClientSession) -> None:
    running = await start_sidecar(extra=feishu_app(platforms, "cache: {routes: {/open-apis/bot/v3/info: 1ms}}"))
    url = f"{running.base}/saver/open-apis/bot/v3/info"
    good = await get(http, url)
    platforms.feishu.monthly_allowance = platforms.feishu.metered_calls   # the month's calls are spent
    await asyncio.sleep(0.01)   # the 1 ms TTL is over
    status, headers, body = await get(http, url)
    assert status == 200 and body == good[2] and headers["X-Imsidecar-Cache"] == "stale"
    async with http.post(f"{running.base}/saver/open-apis/im/v1/messages", json=MESSAGE) as r:
        assert r.status == 429 and (await r.json())["code"] == 99991403   # nothing cached for a write
        assert r.headers["X-Imsidecar-Attempts"] == "1"                   # and not retried: no wait brings it back


async def test_card_updates_are_merged_and_the_card_ends_showing_the_last(start_sidecar: SidecarFactory,
                                                                         platforms: Platforms,
                                                                         http: aiohttp.ClientSession) -> None:
    running = await start_sidecar(ratelimit="{per_second: 1000}")
    path = "/open-apis/im/v1/messages/om_dc13264520392913"

    sent: list[float] = []

    async def patch(n: int) -> tuple[int, dict, dict]:
        await asyncio.sleep(n * 0.02)   # 50 updates a second, as a model streams
        body = {"content": json.dumps({"elements": [{"tag": "markdown", "content": "x" * n}]})}
        sent.append(asyncio.get_running_loop().time())
        async with http.patch(f"{running.base}/sales-bot{path}", json=body) as r:
            return r.status, dict(r.headers), await r.json()

    answers = await asyncio.gather(*(patch(n) for n in range(1, 41)))
    assert all(status == 200 and body["code"] == 0 for status, _, body in answers)
    shown = platforms.feishu.card_updates["om_dc13264520392913"]
    assert json.loads(shown[-1])["elements"][0]["content"] == "x" * 40   # the last update is what the card shows
    # One every 500 ms over the time the 40 took to send (0.8 s on a quiet machine, longer on a loaded one), not 40.
    assert len(shown) <= (max(sent) - min(sent)) / 0.5 + 2
    assert platforms.feishu.card_throttled == 0                          # and never 230020
    superseded = sum(h.get("X-Imsidecar-Coalesced") == "superseded" for _, h, _ in answers)
    assert superseded == 40 - len(shown)


async def test_ai_card_streaming_keeps_appends_and_the_final_frame(start_sidecar: SidecarFactory, platforms: Platforms,
                                                                  http: aiohttp.ClientSession) -> None:
    running = await start_sidecar(extra=ding_app(platforms, "cards: {interval: 200ms}"))
    url = f"{running.base}/ding-api/v1.0/card/streaming"

    sent: list[float] = []

    async def frame(n: int, **flags: bool) -> int:
        await asyncio.sleep(n * 0.01)
        sent.append(asyncio.get_running_loop().time())
        body = {"outTrackId": "track-1", "guid": f"g{n}", "key": "content", "content": "w" * n, "isFull": True, **flags}
        async with http.put(url, json=body) as r:
            return r.status

    statuses = await asyncio.gather(*(frame(n) for n in range(1, 30)), frame(30, isFinalize=True))
    assert set(statuses) == {200}
    frames = platforms.dingtalk.card_frames["track-1"]
    assert frames[-1]["isFinalize"] is True and platforms.dingtalk.cards["track-1"]["content"] == "w" * 30
    assert len(frames) <= max(8, (max(sent) - min(sent)) / 0.2 + 3)   # 30 frames, merged every 200 ms
    async with http.put(url, json={"outTrackId": "track-1", "guid": "late", "key": "note", "content": "!",
                                   "isFull": False}) as r:
        assert r.status == 200
    assert platforms.dingtalk.cards["track-1"]["note"] == "!"   # an update after the final frame is not lost


async def test_a_lane_that_does_not_exist_is_refused_in_the_platforms_shape(start_sidecar: SidecarFactory,
                                                                          platforms: Platforms,
                                                                          http: aiohttp.ClientSession) -> None:
    running = await start_sidecar()
    headers = {"X-Imsidecar-Priority": "asap"}
    async with http.post(f"{running.base}/sales-bot/open-apis/im/v1/messages", json=MESSAGE, headers=headers) as r:
        assert r.status == 400 and r.headers["X-Imsidecar-Error"] == "BadRequest"
        assert (await r.json())["code"] == 9990400
    async with http.get(f"{running.api_base}/v1.0/contact/users/manager001", headers=headers) as r:
        assert r.status == 400 and (await r.json())["code"] == "imsidecar.badRequest"
    assert platforms.feishu.calls == [] and platforms.dingtalk.calls == []
    assert running.metric("imsidecar_upstream_attempts_total", app="sales-bot", upstream="open",
                          route="/open-apis/im/v1/messages", outcome="success", reason="ok") == 0
    assert running.metric("imsidecar_circuit_transitions_total", app="sales-bot", upstream="open", state="open") == 0


async def test_past_the_reserve_bulk_calls_are_refused_and_interactive_ones_go(start_sidecar: SidecarFactory,
                                                                             platforms: Platforms,
                                                                             http: aiohttp.ClientSession) -> None:
    running = await start_sidecar(extra=feishu_app(
        platforms, "quota: {account: acme, allowance: 5, reserve: 2, refuse_bulk: true}"))
    url = f"{running.base}/saver/open-apis/im/v1/messages"
    bulk = {"X-Imsidecar-Priority": "bulk"}
    for _ in range(3):
        async with http.post(url, json=MESSAGE, headers=bulk) as r:
            assert r.status == 200
    async with http.post(url, json=MESSAGE, headers=bulk) as r:
        body = await r.json()
        assert r.status == 429 and r.headers["X-Imsidecar-Error"] == "QuotaReserved"
        assert int(r.headers["Retry-After"]) > 0
    assert body["code"] == 9990430 and "has used 3 of its 5 calls" in body["msg"]
    async with http.post(url, json=MESSAGE) as r:   # interactive (the default lane): still sent
        assert r.status == 200
    assert len(platforms.feishu.messages) == 4
    assert running.metric("imsidecar_quota_refusals_total", account="acme") == 1


async def test_the_meter_counts_what_the_platform_counts(start_sidecar: SidecarFactory, platforms: Platforms,
                                                         http: aiohttp.ClientSession, tmp_path: Path) -> None:
    running = await start_sidecar(extra=feishu_app(platforms, f"quota: {{state_dir: {tmp_path}}}"))
    base = f"{running.base}/saver/open-apis"
    platforms.feishu.faults.script.extend(["unavailable", None, "throttle", None])
    for _ in range(2):   # a 503 then a success; a 429 then a success
        async with http.post(f"{base}/im/v1/messages", json=MESSAGE) as r:
            assert r.status == 200
    platforms.feishu.revoke("cli_test")   # the next call's first attempt is refused (99991663), then replayed
    async with http.get(f"{base}/bot/v3/info") as r:
        assert r.status == 200
    async with http.get(f"{base}{USER[len('/open-apis'):]}") as r:   # contacts: not metered
        assert r.status == 200
    async with http.post(f"{base}/im/v1/messages", json={"receive_id": "oc_1"}) as r:   # refused: not counted
        assert r.status == 400
    assert platforms.feishu.metered_calls == 3
    assert running.metric("imsidecar_quota_used_calls", account="saver") == 3
    assert running.metric("imsidecar_quota_metered_calls_total", account="saver") == 3
    await running.sidecar.stop()
    assert json.loads((tmp_path / "quota-saver.json").read_text())["calls"] == 3


async def test_a_saving_stage_that_fails_is_bypassed_counted_and_the_request_still_answered(
        start_sidecar: SidecarFactory, platforms: Platforms, http: aiohttp.ClientSession,
        monkeypatch: pytest.MonkeyPatch) -> None:
    running = await start_sidecar(extra=feishu_app(platforms, "cache: {}\nquota: {allowance: 100, refuse_bulk: true}"))
    saving = running.sidecar.saving

    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("a bug in a stage")

    for stage, name in ((saving.cache, "route"), (saving.coalescer, "_key"), (saving.cards, "_update"),
                        (saving.meter, "_refusal"), (saving.meter, "observe"), (saving.lanes, "_default")):
        monkeypatch.setattr(stage, name, broken)
    async with http.get(f"{running.base}/saver{USER}") as r:
        assert r.status == 200 and (await r.json())["code"] == 0
    async with http.patch(f"{running.base}/saver/open-apis/im/v1/messages/om_dc13264520392913",
                          json={"content": "{}"}) as r:
        assert r.status == 200
    failed = {stage: running.metric("imsidecar_stage_failures_total", stage=stage)
              for stage in ("cache", "coalesce", "cards", "meter", "lanes")}
    assert all(count >= 1 for count in failed.values()), failed
