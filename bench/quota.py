"""A bot's day through the sidecar against the fake Feishu, with and without the quota-saving features.

Run: python -m bench.quota [--actions 80] [--incident 30] [--users 1000] [--seed 7] [--chart bench-quota.png]
(the chart needs matplotlib: pip install '.[bench]').

One virtual day (00:00 to 24:00 in Asia/Shanghai, the 1st of July) in compressed time: the fake platform, the sidecar
and the load run in this process over real loopback HTTP, on a clock that moves only when nothing in the process can
run, so a request's latency is what it waited for (the platform's latency, rate limits, card pacing), never this
machine's speed. The day:

- user actions spread over the day, plus `--incident` of them while the nightly sync runs (a night incident: people
  ask the bot while the directory sync is going). Each looks up the user and the user's department (who asks is
  Zipf-distributed over the 300 most active users), creates a card, sends it, streams the answer into it at 10
  updates a second for 3-6 s (fired without waiting for each other, as streaming bots do) and ends streaming.
  Its user-visible latency is the time to the first reply (lookups, card, message);
- a health probe, GET /open-apis/bot/v3/info, every minute;
- at 02:00 a directory sync: every user of the tenant read (bulk: X-Imsidecar-Priority), then written to a bitable
  500 records at a time.

The platform answers in about 80 ms, limits each API to 50 calls a second per app and each card to 10 operations a
second, wants every operation on a card to carry a growing `sequence`, and counts its metered calls. The sidecar
runs with its defaults both times (rate limits of 50/s and 1000/min per API); "with" adds `cache: {}` and leaves
coalescing, card merging and priority lanes on, "without" turns those four off.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import math
import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import unused_port
from prometheus_client import CollectorRegistry

from proxy import config
from proxy.app import Sidecar
from proxy.clock import VirtualClock
from proxy.fakes.feishu import FakeFeishu
from proxy.saving.meter import SHANGHAI

SECRET = "bench-secret-feishu"
DAY_START = datetime(2026, 7, 1, tzinfo=SHANGHAI).timestamp()
DAY = 86400.0
DAYS_IN_MONTH = 31
SYNC_AT = 2 * 3600.0
SYNC_WINDOW = 80.0   # the incident's questions come in the sync's first minute and a bit
QUIET_ROUNDS = 3   # loop iterations with nothing runnable before virtual time moves
HOURLY = [1, 1, 1, 1, 1, 1, 2, 4, 8, 10, 10, 9, 7, 9, 10, 10, 9, 7, 5, 4, 3, 2, 2, 1]   # messages per hour, relative
TABLE = "/open-apis/bitable/v1/apps/bascnBench0001/tables/tblBench0001/records/batch_create"
SOURCE = "X-Bench-Source"   # which traffic a platform call served (the sidecar forwards it like any header)
# "with": the read cache on, user and department reads kept 10 minutes (they change rarely; the curated default is
# 60 s), and card updates merged over 1 s: both platforms' streaming cards type out the difference between two
# updates on the client, so one a second still reads as typing. `--defaults` measures the defaults instead.
WITH = ("cache: {routes: {/open-apis/contact/v3/users/:user_id: 10m, /open-apis/contact/v3/departments/:department_id: "
        "10m}}\n    cards: {interval: 1s}")
WITH_DEFAULTS = "cache: {}"
WITHOUT = "coalesce: {enabled: false}\n    cards: {enabled: false}\n    priority: {max_bulk_wait: 0s, bulk_share: 1}"


class QuietClock(VirtualClock):
    """Virtual time that jumps to the next sleeper only once the event loop has had nothing to run for a few rounds:
    every task then waits on this clock (or on nothing), and no byte is on its way over loopback."""

    async def run_until(self, end: float) -> None:
        loop = asyncio.get_running_loop()
        quiet = 0
        while self.now() < end:
            await asyncio.sleep(0)
            quiet = 0 if loop._ready else quiet + 1   # type: ignore[attr-defined]  # a benchmark may look inside
            if quiet < QUIET_ROUNDS:
                continue
            quiet = 0
            if not self.wake_next(end):
                return

    def wake_next(self, end: float) -> bool:
        """Move to the earliest sleeper's deadline (not past `end`) and wake every sleeper due then."""
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)   # cancelled sleepers
        if not self._sleepers:
            return False
        self._now = max(self._now, min(self._sleepers[0][0], end))
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)
        return True


@dataclass
class Request:
    started: float
    latency: float
    route: str
    status: int
    code: Any = None


@dataclass
class Action:
    started: float
    first_reply: float = math.nan
    card: str = ""
    answer: str = ""


@dataclass
class Run:
    name: str
    requests: list[Request] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    calls: list[tuple[float, str, str]] = field(default_factory=list)   # reached the platform: (when, path, source)
    sync: tuple[float, float] = (0.0, 0.0)
    fake: FakeFeishu | None = None
    projected_metered: float = 0.0
    wall_seconds: float = 0.0

    @property
    def api_calls(self) -> list[tuple[float, str, str]]:
        return [c for c in self.calls if not c[1].startswith("/open-apis/auth/")]

    def calls_of(self, source: str) -> int:
        return sum(1 for _, _, s in self.api_calls if s == source)

    def first_replies(self, during_sync: bool) -> list[float]:
        start, end = self.sync
        return [a.first_reply for a in self.actions if (start <= a.started <= end) == during_sync]


class World:
    """The fake Feishu, the sidecar in front of it and the application's HTTP client, on one quiet clock."""

    def __init__(self, run: Run, sections: str, users: list[str], seed: int) -> None:
        self.run, self.sections, self.users = run, sections, users
        self.clock = QuietClock(start=DAY_START)
        self.rng = random.Random(seed)
        self.fake = FakeFeishu(apps={"cli_bench": SECRET}, clock=self.clock, quota_per_second=50)
        self.fake.users = {user: f"user {n}" for n, user in enumerate(users)}
        run.fake = self.fake

    async def __aenter__(self) -> World:
        app = self.fake.app()
        app.middlewares.append(self._platform_latency())
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        port = unused_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        listen, admin = unused_port(), unused_port()
        self.sidecar = Sidecar(config.loads(f"""
listen: 127.0.0.1:{listen}
admin_listen: 127.0.0.1:{admin}
apps:
  - name: bot
    platform: feishu
    app_id: cli_bench
    app_secret: {SECRET}
    upstreams: {{open: {{base_url: "http://127.0.0.1:{port}"}}}}
    quota: {{allowance: 10000}}
    {self.sections}
""", env={}), clock=self.clock, registry=CollectorRegistry())
        await self.sidecar.start()
        self.base = f"http://127.0.0.1:{listen}/bot"
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self

    async def __aexit__(self, *exc: object) -> None:
        registry = self.sidecar.metrics.registry
        self.run.projected_metered = registry.get_sample_value("imsidecar_quota_projected_calls", {"account": "bot"}) or 0
        await self.http.close()
        await self.sidecar.stop()
        await self.runner.cleanup()

    def _platform_latency(self):  # type: ignore[no-untyped-def]
        @web.middleware
        async def latency(request: web.Request, handler):  # type: ignore[no-untyped-def]
            self.run.calls.append((self.clock.now(), request.path, request.headers.get(SOURCE, "")))
            await self.clock.sleep(self.rng.lognormvariate(math.log(0.08), 0.35))
            return await handler(request)
        return latency

    async def call(self, method: str, path: str, body: Any = None, route: str = "", **headers: str) -> dict[str, Any]:
        started = self.clock.now()
        headers[SOURCE] = {"probe": "probe", "sync": "sync"}.get(route, "action")
        async with self.http.request(method, self.base + path, json=body, headers=headers) as response:
            answer = await response.json(content_type=None)
            status = response.status
        code = answer.get("code") if isinstance(answer, dict) else None
        self.run.requests.append(Request(started, self.clock.now() - started, route or path, status, code))
        return answer if isinstance(answer, dict) else {}

    # The day's traffic ----------------------------------------------------------------------------------------

    async def at(self, moment: float) -> None:
        """Wait until `moment` seconds into the day (the clock's `now` counts from the day's start)."""
        await self.clock.sleep(max(0.0, moment - self.clock.now()))

    async def action(self, moment: float, user: str) -> None:
        await self.at(moment)
        start = self.clock.now()   # seconds since the day began
        done = Action(start)
        await self.call("GET", f"/open-apis/contact/v3/users/{user}?user_id_type=open_id", route="user")
        await self.call("GET", f"/open-apis/contact/v3/departments/{department(user)}", route="department")
        card = await self.call("POST", "/open-apis/cardkit/v1/cards", {"type": "card_json", "data": CARD}, route="create")
        card_id = (card.get("data") or {}).get("card_id", "")
        content = json.dumps({"type": "card", "data": {"card_id": card_id}})
        await self.call("POST", "/open-apis/im/v1/messages?receive_id_type=open_id",
                        {"receive_id": user, "msg_type": "interactive", "content": content}, route="send")
        done.first_reply, done.card = self.clock.now() - start, card_id
        done.answer = await self.stream(card_id)
        self.run.actions.append(done)

    async def stream(self, card_id: str) -> str:
        """The answer streamed into the card at 10 updates a second, each fired without waiting for the last."""
        path = f"/open-apis/cardkit/v1/cards/{card_id}/elements/answer/content"
        text, sequence, fired = "", 0, []
        for _ in range(int(self.rng.uniform(3, 6) * 10)):
            await self.clock.sleep(self.rng.uniform(0.05, 0.15))
            text += self.rng.choice(WORDS) + " "
            sequence += 1
            fired.append(asyncio.ensure_future(self.call("PUT", path, {"content": text, "sequence": sequence,
                                                                       "uuid": str(uuid.uuid4())}, route="update")))
        await asyncio.gather(*fired)   # the last of them carried the whole answer: now streaming ends
        await self.call("PATCH", f"/open-apis/cardkit/v1/cards/{card_id}/settings",
                        {"settings": json.dumps({"config": {"streaming_mode": False}}), "sequence": sequence + 1},
                        route="update")
        return text

    async def probe(self) -> None:
        for minute in range(int(DAY // 60)):
            await self.at(minute * 60.0)
            await self.call("GET", "/open-apis/bot/v3/info", route="probe")

    async def sync(self, workers: int = 25) -> None:
        await self.at(SYNC_AT)
        started = self.clock.now()
        pending = list(self.users)

        async def worker() -> None:
            while pending:
                user = pending.pop()
                await self.call("GET", f"/open-apis/contact/v3/users/{user}?user_id_type=open_id", route="sync",
                                **{"X-Imsidecar-Priority": "bulk"})

        await asyncio.gather(*(worker() for _ in range(workers)))
        for first in range(0, len(self.users), 500):
            records = [{"fields": {"open_id": u}} for u in self.users[first:first + 500]]
            await self.call("POST", TABLE, {"records": records}, route="sync")
        self.run.sync = (started, self.clock.now())


CARD = json.dumps({"schema": "2.0", "config": {"streaming_mode": True},
                   "body": {"elements": [{"tag": "markdown", "content": "", "element_id": "answer"}]}})
WORDS = ["the", "sidecar", "keeps", "its", "promises", "under", "faults", "quota", "card", "answer", "platform"]


def department(user: str) -> str:
    return f"od-{int(user[3:]) % 60:06d}"


def schedule(actions: int, incident: int, users: list[str], rng: random.Random) -> list[tuple[float, str]]:
    """When each user action comes and who asks: by the hour's weight, plus the incident during the sync."""
    active = users[:300]
    weights = [1 / (k + 1) ** 1.1 for k in range(len(active))]
    hours = rng.choices(range(24), weights=HOURLY, k=actions)
    moments = [hour * 3600 + rng.uniform(0, 3600) for hour in hours]
    moments += [SYNC_AT + 5 + rng.uniform(0, SYNC_WINDOW - 10) for _ in range(incident)]
    return sorted((moment, rng.choices(active, weights=weights)[0]) for moment in moments)


async def one_day(name: str, sections: str, args: argparse.Namespace) -> Run:
    run = Run(name)
    users = [f"ou_{n:016d}" for n in range(1, args.users + 1)]
    plan = schedule(args.actions, args.incident, users, random.Random(args.seed))
    started = time.perf_counter()
    async with World(run, sections, users, args.seed) as world:
        tasks = [asyncio.ensure_future(world.action(moment, user)) for moment, user in plan]
        tasks += [asyncio.ensure_future(world.probe()), asyncio.ensure_future(world.sync())]
        await world.clock.run_until(world.clock.now() + DAY + 120)
        await asyncio.gather(*tasks)
    run.wall_seconds = time.perf_counter() - started
    return run


# Report -----------------------------------------------------------------------------------------------------


def p99(values: list[float]) -> float:
    ordered = sorted(v for v in values if not math.isnan(v))
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)] if ordered else math.nan


def card_refusals(run: Run) -> int:
    """Card updates the platform refused for rate (429, 230020) or order (300317)."""
    return sum(1 for r in run.requests if r.route == "update" and r.code in (99991400, 230020, 300317))


def full_answers(run: Run) -> int:
    assert run.fake is not None
    shown = run.fake.card_updates
    return sum(1 for a in run.actions if [s for s in shown.get(a.card, []) if isinstance(s, str)][-1:] == [a.answer])


def report(runs: list[Run], args: argparse.Namespace) -> None:
    actions = len(runs[0].actions)
    print(f"bench.quota: one virtual day: {actions} user actions ({args.incident} of them during the sync), a probe a "
          f"minute, a directory sync of {args.users} users at 02:00")
    print("with: " + (WITH_DEFAULTS if args.defaults else WITH).replace("\n   ", ";") + "\n")
    print("| run | calls per user action | probe calls | sync calls | platform calls a day | a month projected "
          "| metered a month (meter) | card updates refused | cards with the full answer "
          "| first reply p99 quiet s | during the sync s | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        calls = len(run.api_calls)
        quiet, busy = p99(run.first_replies(False)), p99(run.first_replies(True))
        print(f"| {run.name} | {run.calls_of('action') / actions:.1f} | {run.calls_of('probe'):,} | "
              f"{run.calls_of('sync'):,} | {calls:,} | {calls * DAYS_IN_MONTH:,} | {run.projected_metered:,.0f} | "
              f"{card_refusals(run)} | {full_answers(run)}/{actions} | {quiet:.3f} | {busy:.3f} | {run.wall_seconds:.0f} |")
    without, with_ = runs
    user_facing = [r.calls_of("action") + r.calls_of("probe") for r in runs]
    ratio = user_facing[0] / max(1, user_facing[1])
    total = len(without.api_calls) / max(1, len(with_.api_calls))
    quiet, busy = p99(with_.first_replies(False)), p99(with_.first_replies(True))
    baseline = p99(without.first_replies(True)) / p99(without.first_replies(False))
    print()
    print(f"{'MET ' if ratio >= 5 else 'MISSED'} platform calls for the same user-visible result (user actions and "
          f"probe): {ratio:.1f}x fewer (target ≥ 5x); with the sync's {with_.calls_of('sync'):,}, which no feature "
          f"can save: {total:.1f}x")
    refusals = card_refusals(with_)
    print(f"{'MET ' if refusals == 0 else 'MISSED'} card updates refused for rate or order (429, 230020, 300317) "
          f"with the features: {refusals} (target 0; without: {card_refusals(without)})")
    print(f"{'MET ' if busy <= 2 * quiet else 'MISSED'} interactive p99 (time to the first reply) during the sync: "
          f"{busy:.3f} s vs {quiet:.3f} s quiet = {busy / quiet:.2f}x (target ≤ 2x; without: {baseline:.2f}x)")


def chart(runs: list[Run], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(no chart: pip install '.[bench]' for matplotlib)")
        return
    bucket = 600.0
    figure, axes = plt.subplots(figsize=(10, 4.5))
    for run in runs:
        counts = [0] * int(DAY // bucket + 1)
        for moment, _, _ in run.api_calls:
            counts[min(len(counts) - 1, int(moment // bucket))] += 1
        axes.step([n * bucket / 3600 for n in range(len(counts))], counts, where="post",
                  label=f"{run.name} ({len(run.api_calls):,} calls)")
    start, end = runs[1].sync
    axes.axvspan(start / 3600, end / 3600, color="grey", alpha=0.2, label="directory sync")
    axes.set(xlabel="hour of the day (Asia/Shanghai)", ylabel="platform calls per 10 minutes", xlim=(0, 24),
             title="A bot's day through imsidecar: platform calls with and without the quota-saving features")
    axes.set_yscale("symlog", linthresh=1)   # quiet buckets (0 or 1 call) stay on the chart
    axes.set_ylim(bottom=0)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"\nchart: {path}")


async def main(args: argparse.Namespace) -> None:
    runs = [await one_day("without", WITHOUT, args), await one_day("with", WITH_DEFAULTS if args.defaults else WITH, args)]
    report(runs, args)
    chart(runs, args.chart)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.quota", description=__doc__.splitlines()[0])
    parser.add_argument("--actions", type=int, default=80, help="user actions spread over the day")
    parser.add_argument("--incident", type=int, default=30, help="more user actions during the nightly sync")
    parser.add_argument("--users", type=int, default=1000, help="users in the tenant (the sync reads them all)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--chart", default="bench-quota.png")
    parser.add_argument("--defaults", action="store_true",
                        help="the features at their defaults (cache: {}, card interval 500 ms, TTLs 60 s)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
