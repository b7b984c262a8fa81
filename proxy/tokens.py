"""Access tokens: fetched once per app and kind (single flight), refreshed ahead of expiry, dropped when refused.

Owns caching, refresh timing, fetch retries and how long a request waits for a token (never past its deadline;
after a failed fetch, not a fresh fetch per request); how a token is requested and attached is each platform's.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterator, TypeVar

import backoff

from proxy.clock import Clock, finished_within
from proxy.config import TokenSettings
from proxy.platforms.base import TokenFetchError, TokenGrant

log = logging.getLogger("imsidecar.tokens")

DEFAULT_LIFETIME = 7200.0   # both platforms; DingTalk has answered expireIn 0, which must not mean "refetch now"
MIN_LIFETIME = 60.0
MAX_LIFETIME = 86400.0
MIN_REFRESH_INTERVAL = 30.0  # never refetch more often than this from the background, whatever the platform said
EXPIRY_SKEW = 10.0           # treat a token as expired this long before the platform would, while a new one can be had
FOREGROUND_TRIES = 3         # a request waiting for a token tries this often before answering 503
COOLDOWN_BASE, COOLDOWN_CAP = 1.0, 30.0   # after a failed fetch, the next one waits 1 s, 2 s, ... up to 30 s

Fetch = Callable[[], Awaitable[TokenGrant]]
Observer = Callable[[str], None]   # called with "success" | "failure" | "rejected" after every fetch
Refusal = Callable[[str], None]    # called with a token the platform refused (the shared store drops it too)


class TokenUnavailable(Exception):
    """No valid token could be had; the message names the cause (never the secret)."""


@dataclass(frozen=True, slots=True)
class HeldToken:
    value: str
    expires_at: float   # clock.now() based
    lifetime: float


def sanitise_lifetime(expires_in: float) -> float:
    """A missing, zero or absurd `expire` must not turn into a refetch loop or an eternal token."""
    if not expires_in > 0:
        return DEFAULT_LIFETIME
    return min(max(expires_in, MIN_LIFETIME), MAX_LIFETIME)


def fetch_waits(base: float = 0.2, cap: float = 30.0) -> Iterator[float]:
    """Exponential back-off with full jitter between token fetch attempts (the `backoff` package's generators)."""
    for value in backoff.expo(base=2, factor=base, max_value=cap):
        if value is not None:
            yield backoff.full_jitter(value)


class TokenSource:
    """One token of one app: the cache, the single in-flight fetch, and the background refresher."""

    def __init__(self, fetch: Fetch, clock: Clock, settings: TokenSettings, *,
                 observe: Observer = lambda result: None, rng: Callable[[], float] = random.random,
                 on_invalid: Refusal = lambda value: None, app: str = "") -> None:
        self._fetch, self._clock, self._settings, self._app = fetch, clock, settings, app   # app: for log lines
        self._observe, self._rng, self._on_invalid = observe, rng, on_invalid
        self._held: HeldToken | None = None
        self._inflight: asyncio.Task[HeldToken] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self.last_error: str | None = None
        self._retry_at = -math.inf             # no fetch for requests before this, after one failed
        self._refused = False                  # the last fetch was refused for good (wrong app id or secret)
        self._cooldowns = self._new_cooldowns()

    def current(self) -> HeldToken | None:
        """The token to use now. Near its end (EXPIRY_SKEW) a new one is fetched; while none can be had, the
        current one serves until it really expires: the platform still accepts it."""
        held = self._held
        if held is None:
            return None
        now = self._clock.now()
        if now < held.expires_at - EXPIRY_SKEW or (now < held.expires_at and self.last_error is not None):
            return held
        return None

    def seconds_to_expiry(self) -> float:
        return max(0.0, self._held.expires_at - self._clock.now()) if self._held else 0.0

    async def get(self, deadline: float | None = None) -> str:
        """A valid token, waiting for a fetch at most until `deadline` (a `clock.now()` time)."""
        held = self.current()
        if held is not None:
            return held.value
        try:
            return (await self._fetch_by(deadline)).value
        except TokenUnavailable:
            held = self.current()   # the fetch failed, but the token it was to replace is still good
            if held is None:
                raise
            return held.value

    async def _fetch_by(self, deadline: float | None) -> HeldToken:
        now = self._clock.now()
        if deadline is not None and self._inflight is None and self._retry_at >= deadline:
            raise TokenUnavailable(f"{self.last_error or 'token fetch failed'}; the next try is in "
                                   f"{self._retry_at - now:.1f}s, after the request's deadline")
        if deadline is None:
            return await self._next_fetch()
        return await _within(self._clock, self._next_fetch(), deadline - now)

    async def _next_fetch(self) -> HeldToken:
        """The fetch in flight, or a new one; after a failed one, not before its cool-down (one fetch for all)."""
        if self._inflight is None and self._retry_at > self._clock.now():
            if self._refused:   # waiting out the cool-down would only fetch the same refusal: say so at once
                raise TokenUnavailable(f"{self.last_error}; the platform refused this app's credentials (asked "
                                       f"again in the background)")
            await self._clock.sleep(self._retry_at - self._clock.now())
            held = self.current()   # the first one awake may have fetched it already
            if held is not None:
                return held
        return await self.refresh()

    def invalidate(self, value: str) -> None:
        """The platform refused `value`: forget it, unless a newer token has already replaced it."""
        if self._held is not None and self._held.value == value:
            self._held = None
            self._on_invalid(value)

    async def refresh(self, tries: int = FOREGROUND_TRIES) -> HeldToken:
        """Fetch a new token; concurrent callers share one fetch."""
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._fetch_with_retries(tries))
            self._inflight.add_done_callback(self._forget_inflight)
        return await asyncio.shield(self._inflight)

    def _forget_inflight(self, task: asyncio.Task[HeldToken]) -> None:
        self._inflight = None
        if task.cancelled():
            return
        if task.exception() is None:   # retrieved here so an unawaited failure is not logged as "never retrieved"
            self._retry_at, self._cooldowns = -math.inf, self._new_cooldowns()
        else:
            self._retry_at = self._clock.now() + next(self._cooldowns)

    def _new_cooldowns(self) -> Iterator[float]:
        """1 s, 2 s, 4 s ... up to 30 s, within +-10% so that replicas drift apart."""
        for value in backoff.expo(base=2, factor=COOLDOWN_BASE, max_value=COOLDOWN_CAP):
            if value is not None:
                yield value * (0.9 + 0.2 * self._rng())

    async def _fetch_with_retries(self, tries: int) -> HeldToken:
        waits = fetch_waits()
        for attempt in range(1, tries + 1):
            try:
                return self._keep(await self._fetch())
            except TokenFetchError as exc:
                self.last_error, self._refused = str(exc), exc.permanent
                self._observe("rejected" if exc.permanent else "failure")
                if exc.permanent or attempt == tries:
                    raise TokenUnavailable(str(exc)) from exc
            await self._clock.sleep(next(waits))
        raise AssertionError("unreachable")

    def _keep(self, grant: TokenGrant) -> HeldToken:
        lifetime = sanitise_lifetime(grant.expires_in)
        self._held = HeldToken(grant.value, self._clock.now() + lifetime, lifetime)
        self.last_error, self._refused = None, False
        self._observe("success")
        return self._held

    # Background refresh -------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh_forever())

    async def stop(self) -> None:
        for task in (self._refresher, self._inflight):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._refresher = None

    def refresh_delay(self) -> float:
        """Seconds until the next background refresh: a margin (with jitter) ahead of expiry."""
        held = self._held
        if held is None:
            return 0.0
        margin = min(self._settings.refresh_margin, held.lifetime / 2)   # short-lived tokens refresh at half-life
        jitter = self._rng() * min(self._settings.refresh_jitter, margin / 2)
        return max(MIN_REFRESH_INTERVAL, held.expires_at - self._clock.now() - margin - jitter)

    async def _refresh_forever(self) -> None:
        waits: Iterator[float] | None = None   # made at the first failure: a generator pair per app otherwise
        while True:
            if self.last_error is None:
                delay = self.refresh_delay()
            else:
                waits = waits or fetch_waits(base=1.0, cap=60.0)
                delay = next(waits)
            await self._clock.sleep(delay)
            try:
                await self.refresh(tries=1)
                waits = None
            except TokenUnavailable as exc:
                log.warning("app %s: token refresh failed, will retry: %s", self._app, exc)
            except asyncio.CancelledError:
                raise
            except Exception:   # a refresher must outlive any single surprise
                log.exception("token refresher error")
                self.last_error = "internal error"


T = TypeVar("T")


async def _within(clock: Clock, work: Awaitable[T], seconds: float) -> T:
    """`work`, or TokenUnavailable once `seconds` of clock time have passed (the work itself goes on: shared)."""
    task = asyncio.ensure_future(work)
    if not await finished_within(clock, task, max(0.0, seconds)):
        raise TokenUnavailable(f"no token within the request's deadline ({seconds:.1f}s left when it began waiting)")
    return task.result()
