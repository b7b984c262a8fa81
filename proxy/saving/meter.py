"""The monthly quota meter: each account's metered calls this calendar month, counted the way the platform counts
them, persisted, exported with a projection to the month's end, and optionally a local refusal of bulk calls once
the count reaches the allowance minus a reserve (so interactive calls keep working until the month turns).

Owns the month (Asia/Shanghai), what is counted (every attempt the platform answered and counts: its `metered`
routes and `counted` answers), the projection and the refusal; where counts persist is meter_store.py's. An
account is a Feishu tenant or a DingTalk organisation: several apps may share one.
"""

from __future__ import annotations

import asyncio
import logging

from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Mapping

from proxy.clock import Clock
from proxy.errors import QuotaReserved
from proxy.guard import Guard
from proxy.metrics import SavingsMetrics
from proxy.outcome import Outcome
from proxy.saving.meter_store import Counts, CountsUnavailable, FileCounts, ProcessCounts, SharedCounts
from proxy.saving.settings import BULK, QuotaSettings
from proxy.store import SharedValues
from proxy.upstream import Answer

if TYPE_CHECKING:
    from proxy.pipeline import Exchange

log = logging.getLogger("imsidecar.quota")

# Both platforms count by the natural month in China Standard Time: UTC+8 all year (no daylight saving since 1991),
# so a fixed offset needs no time-zone database in the image.
SHANGHAI = timezone(timedelta(hours=8), "Asia/Shanghai")
FLUSH_EVERY = 1.0        # seconds between pushes of new counts to where they persist
PROJECTION_FLOOR = 3600.0   # the pace is measured over at least an hour, so the month's first call is not a trend


class Month:
    """A calendar month in Asia/Shanghai: its label (2026-07) and its bounds in wall seconds."""

    def __init__(self, wall: float) -> None:
        local = datetime.fromtimestamp(wall, SHANGHAI)
        first = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        self.label = first.strftime("%Y-%m")
        self.start = first.timestamp()
        self.end = (first + timedelta(days=32)).replace(day=1).timestamp()

    def __contains__(self, wall: float) -> bool:
        return self.start <= wall < self.end


class Flusher:
    """Pushes the counts of the accounts that have new ones every FLUSH_EVERY seconds, on one task for all of them
    (a task per account started and slept a thousand times a second with 1,000 busy apps)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._due: set[AccountMeter] = set()
        self._task: asyncio.Task[None] | None = None

    def schedule(self, meter: AccountMeter) -> None:
        self._due.add(meter)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while self._due:   # counts that came while the last ones were pushed go with the next second's
            await self._clock.sleep(FLUSH_EVERY)
            due, self._due = self._due, set()
            # Round trips to the store together; counts of this process or its files one after the other, in this
            # task: a task each (gather's) was one more task a second per busy account, for work that never waits.
            await asyncio.gather(*(meter.flush() for meter in due if meter.remote))
            for meter in due:
                if not meter.remote:
                    await meter.flush()

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


class AccountMeter:
    """One account's count of this month: counted here at once, pushed to the store every FLUSH_EVERY seconds."""

    def __init__(self, settings: QuotaSettings, counts: Counts, clock: Clock, flusher: Flusher) -> None:
        self.settings, self._counts, self._clock = settings, counts, clock
        self.month = Month(clock.wall())
        self.used = 0                         # this month, all replicas as last heard, plus what is pending here
        self._pending: dict[str, int] = {}    # month → calls counted here and not yet pushed
        self._flusher = flusher
        self._warned = False

    @property
    def remote(self) -> bool:
        return self._counts.remote

    async def start(self) -> None:
        try:
            self.used = await self._counts.load(self.settings.account, self.month.label)
        except CountsUnavailable as exc:
            log.warning("quota %s: cannot read this month's count yet (%s); counting from 0", self.settings.account, exc)

    def record(self) -> None:
        self._roll()
        self.used += 1
        self._pending[self.month.label] = self._pending.get(self.month.label, 0) + 1
        self._flusher.schedule(self)

    def _roll(self) -> None:
        now = self._clock.wall()
        if not self.month.start <= now < self.month.end:   # Month.__contains__, without a call per attempt
            self.month = Month(now)
            self.used = self._pending.get(self.month.label, 0)

    async def flush(self) -> None:
        for month, calls in list(self._pending.items()):
            try:
                total = await self._counts.add(self.settings.account, month, calls)
            except CountsUnavailable as exc:
                self._warn(exc)
                return   # kept pending: the next flush adds it
            self._pending[month] -= calls
            if not self._pending[month]:
                del self._pending[month]
            if month == self.month.label:
                self.used = total + self._pending.get(month, 0)

    def _warn(self, exc: Exception) -> None:
        if not self._warned:
            self._warned = True
            log.warning("quota %s: cannot save the count (%s); it is kept here and saved when possible",
                        self.settings.account, exc)

    # What the count means --------------------------------------------------------------------------------------

    def current(self) -> int:
        """This month's count so far (0 from the first instant of a new month)."""
        self._roll()
        return self.used

    def projected(self) -> float:
        """This month's count at this month's pace so far, carried to its end."""
        self._roll()
        now = self._clock.wall()
        elapsed = max(now - self.month.start, PROJECTION_FLOOR)
        return self.used + self.used / elapsed * max(0.0, self.month.end - now)

    def reserve_reached(self) -> bool:
        self._roll()
        threshold = self.settings.threshold
        return threshold is not None and self.used >= threshold

    def seconds_to_month_end(self) -> float:
        return max(0.0, self.month.end - self._clock.wall())


class QuotaMeter:
    """Every account's meter, the refusal stage before a call and the count after each attempt."""

    def __init__(self, settings: Mapping[str, QuotaSettings], values: SharedValues | None, clock: Clock,
                 metrics: SavingsMetrics, guard: Guard) -> None:
        self._metrics, self._guard = metrics, guard
        counts: dict[str | None, Counts] = {}
        self.accounts: dict[str, AccountMeter] = {}
        self._by_app: dict[str, AccountMeter] = {}
        self._flusher = Flusher(clock)
        for app, quota in settings.items():
            if quota.account not in self.accounts:
                where = None if values is not None else quota.state_dir
                store = counts.setdefault(where, _counts(values, where))
                self.accounts[quota.account] = self._export(AccountMeter(quota, store, clock, self._flusher))
            self._by_app[app] = self.accounts[quota.account]

    def _export(self, meter: AccountMeter) -> AccountMeter:
        account, allowance = meter.settings.account, meter.settings.allowance
        self._metrics.quota_used.labels(account).set_function(meter.current)
        self._metrics.quota_allowance.labels(account).set(allowance or 0)
        self._metrics.quota_projected.labels(account).set_function(meter.projected)
        self._metrics.prepare_account(account)
        return meter

    def admit(self, exchange: Exchange) -> None:
        """Past the reserve threshold, a bulk call to a metered route is refused here (the platform is not asked)."""
        try:
            refusal = self._refusal(exchange)
        except Exception as exc:   # fail open: the call goes to the platform
            self._guard.failed("meter", exc)
            return
        if refusal is not None:
            raise refusal

    def _refusal(self, exchange: Exchange) -> QuotaReserved | None:
        b = exchange.binding
        meter = self._by_app.get(b.app.name)
        if meter is None or exchange.priority != BULK or not meter.reserve_reached():
            return None
        if not b.platform.metered(b.upstream, exchange.template):
            return None
        self._metrics.quota_refusals.labels(meter.settings.account).inc()
        s = meter.settings
        return QuotaReserved(f"app {b.app.name}: account {s.account} has used {meter.used} of its {s.allowance} calls "
                            f"this month, down to the {s.reserve} kept for interactive calls; bulk calls to metered "
                            "APIs are refused until the month turns (Asia/Shanghai)", meter.seconds_to_month_end())

    def counted(self, exchange: Exchange, answer: Answer) -> None:
        """An answered attempt, counted as the platform counts it (the pipeline tells every one)."""
        try:
            self.observe(exchange, answer)
        except Exception as exc:   # fail open: the answer goes on, uncounted
            self._guard.failed("meter", exc)

    def observe(self, exchange: Exchange, answer: Answer) -> None:
        b = exchange.binding
        meter = self._by_app.get(b.app.name)
        if meter is None or not b.platform.metered(b.upstream, exchange.template):
            return
        verdict = answer.classified(b.platform, b.upstream)
        if verdict.outcome is not Outcome.SUCCESS and b.platform.quota_exhausted(answer.status, answer.plain_body()):
            self._metrics.quota_exhausted.labels(meter.settings.account).inc()
        elif b.platform.counted(answer.status, verdict):
            meter.record()
            self._metrics.hot_quota_counted(meter.settings.account).inc()

    async def start(self) -> None:
        await asyncio.gather(*(meter.start() for meter in self.accounts.values()))

    async def stop(self) -> None:
        self._flusher.cancel()
        await asyncio.gather(*(meter.flush() for meter in self.accounts.values()))


def _counts(values: SharedValues | None, state_dir: str | None) -> Counts:
    if values is not None:
        return SharedCounts(values)
    return FileCounts(state_dir) if state_dir is not None else ProcessCounts()


__all__ = ["SHANGHAI", "AccountMeter", "Month", "QuotaMeter"]

