"""TokenSource in virtual time: single flight, refresh timing, sanitised lifetimes, invalidation."""

from __future__ import annotations

import asyncio

import pytest

from proxy.clock import VirtualClock, settle
from proxy.config import TokenSettings
from proxy.platforms.base import TokenFetchError, TokenGrant
from proxy.tokens import MIN_REFRESH_INTERVAL, TokenSource, TokenUnavailable, sanitise_lifetime


class Platform:
    """A token endpoint that counts calls and can be told what to answer."""

    def __init__(self, clock: VirtualClock, expire: float = 7200, delay: float = 0.0) -> None:
        self.clock, self.expire, self.delay = clock, expire, delay
        self.calls = 0
        self.failures: list[TokenFetchError] = []

    async def fetch(self) -> TokenGrant:
        self.calls += 1
        if self.delay:
            await self.clock.sleep(self.delay)
        if self.failures:
            raise self.failures.pop(0)
        return TokenGrant(f"token-{self.calls}", self.expire)


def source(clock: VirtualClock, platform: Platform, **settings: float) -> TokenSource:
    return TokenSource(platform.fetch, clock, TokenSettings(**settings), rng=lambda: 0.5)


async def test_a_thousand_cold_callers_share_one_fetch() -> None:
    clock = VirtualClock()
    platform = Platform(clock, delay=0.2)
    tokens = source(clock, platform)
    waiters = [asyncio.create_task(tokens.get()) for _ in range(1000)]
    await settle()
    await clock.advance(0.2)
    assert set(await asyncio.gather(*waiters)) == {"token-1"}
    assert platform.calls == 1


async def test_background_refresh_keeps_a_valid_token_through_three_lifetimes() -> None:
    clock = VirtualClock()
    platform = Platform(clock)
    tokens = source(clock, platform)
    await tokens.get()
    tokens.start()
    for _ in range(3 * 7200 // 30):
        await clock.advance(30)
        assert tokens.current() is not None   # a request at any moment finds a valid token, without waiting
    assert 3 <= platform.calls <= 5
    await tokens.stop()


@pytest.mark.parametrize("expire", [0, -1, float("nan")])
async def test_missing_or_zero_expire_does_not_loop(expire: float) -> None:
    clock = VirtualClock()
    platform = Platform(clock, expire=expire)
    tokens = source(clock, platform)
    await tokens.get()
    tokens.start()
    await clock.advance(3600)
    assert platform.calls == 1   # treated as the platforms' 7200 s, so no refetch within the hour
    await tokens.stop()


async def test_tiny_expire_refetches_at_most_every_min_interval() -> None:
    clock = VirtualClock()
    platform = Platform(clock, expire=1)
    tokens = source(clock, platform)
    await tokens.get()
    tokens.start()
    await clock.advance(600)
    assert platform.calls <= 600 / MIN_REFRESH_INTERVAL + 1
    await tokens.stop()


def test_lifetime_is_sanitised() -> None:
    assert sanitise_lifetime(0) == 7200
    assert sanitise_lifetime(5) == 60
    assert sanitise_lifetime(10**9) == 86400
    assert sanitise_lifetime(7200) == 7200


async def test_invalidate_forgets_only_the_refused_token() -> None:
    clock = VirtualClock()
    platform = Platform(clock)
    tokens = source(clock, platform)
    assert await tokens.get() == "token-1"
    tokens.invalidate("token-0")   # an older token: the current one stays
    assert await tokens.get() == "token-1"
    tokens.invalidate("token-1")
    assert await tokens.get() == "token-2"


async def test_transient_fetch_failures_are_retried_with_backoff() -> None:
    clock = VirtualClock()
    platform = Platform(clock)
    platform.failures = [TokenFetchError("token endpoint unreachable", permanent=False)] * 2
    tokens = source(clock, platform)
    waiter = asyncio.create_task(tokens.get())
    for _ in range(50):
        await clock.advance(0.5)
        if waiter.done():
            break
    assert await waiter == "token-3"


async def test_rejected_credentials_fail_at_once_and_plainly() -> None:
    clock = VirtualClock()
    platform = Platform(clock)
    platform.failures = [TokenFetchError("app_id or app_secret rejected (code 10014: app secret invalid)", permanent=True)]
    tokens = source(clock, platform)
    with pytest.raises(TokenUnavailable, match="rejected"):
        await tokens.get()
    assert platform.calls == 1
    assert tokens.last_error and "rejected" in tokens.last_error


async def test_a_request_just_after_a_refusal_is_told_at_once_not_after_the_cool_down() -> None:
    clock = VirtualClock()
    platform = Platform(clock)
    platform.failures = [TokenFetchError("app_id cli_x is not an app of Lark (code 10014: app id not exists)",
                                         permanent=True)] * 3
    tokens = source(clock, platform)
    with pytest.raises(TokenUnavailable):
        await tokens.get(deadline=clock.now() + 5.0)
    before = clock.now()
    with pytest.raises(TokenUnavailable, match="code 10014") as caught:   # inside the 1 s cool-down
        await asyncio.wait_for(tokens.get(deadline=clock.now() + 5.0), 1.0)   # real time: it must not wait at all
    assert clock.now() == before and platform.calls == 1   # no wait, no second fetch of the same refusal
    assert "refused this app's credentials" in str(caught.value)
    platform.failures.clear()   # the credentials were fixed: after the cool-down a request fetches again
    await clock.advance(1.2)
    assert await tokens.get(deadline=clock.now() + 5.0) == "token-2"


async def test_a_failed_background_refresh_is_logged_with_the_apps_name(caplog: pytest.LogCaptureFixture) -> None:
    clock = VirtualClock()
    platform = Platform(clock)
    tokens = TokenSource(platform.fetch, clock, TokenSettings(), rng=lambda: 0.5, app="sales-bot")
    await tokens.get()
    tokens.start()
    await settle()   # the refresher is now asleep until the refresh margin
    platform.failures = [TokenFetchError("token endpoint unreachable (ClientConnectorError)", permanent=False)]
    await clock.advance(7200 - 600)
    assert "app sales-bot: token refresh failed, will retry: token endpoint unreachable (ClientConnectorError)" in [
        record.getMessage() for record in caplog.records]
    await tokens.stop()


async def test_refresh_failure_keeps_serving_the_valid_token_and_retries() -> None:
    clock = VirtualClock()
    platform = Platform(clock)
    tokens = source(clock, platform, refresh_margin=600)
    await tokens.get()
    tokens.start()
    platform.failures = [TokenFetchError("token endpoint unreachable", permanent=False)] * 3
    await clock.advance(7200 - 600)
    assert tokens.current() is not None and tokens.current().value == "token-1"
    await clock.advance(300)
    assert tokens.current().value.startswith("token-") and platform.calls >= 4
    assert tokens.current().value != "token-1"
    await tokens.stop()


# How long a request waits for a token, and what a failing token endpoint costs ------------------------------------


class Hanging(Platform):
    """A token endpoint that does not answer until told to."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__(clock)
        self.release = asyncio.Event()

    async def fetch(self) -> TokenGrant:
        self.calls += 1
        await self.release.wait()
        return TokenGrant(f"token-{self.calls}", 7200)


async def test_the_request_deadline_bounds_the_wait_for_a_token() -> None:
    clock = VirtualClock()
    platform = Hanging(clock)
    tokens = source(clock, platform)
    waiter = asyncio.create_task(tokens.get(deadline=clock.now() + 2.0))
    await settle()
    await clock.advance(2.0)
    with pytest.raises(TokenUnavailable, match="deadline"):
        await waiter
    assert clock.now() == 2.0   # not the 3 fetch tries of up to 5 s each
    platform.release.set()      # the fetch itself went on, for the requests after
    await settle()
    assert await tokens.get(deadline=clock.now() + 1.0) == "token-1" and platform.calls == 1


async def test_after_a_failed_fetch_new_requests_do_not_each_start_one() -> None:
    clock = VirtualClock()
    platform = Platform(clock)
    tokens = source(clock, platform)
    platform.failures = [TokenFetchError("token endpoint answered code 500", permanent=False)] * 3
    with pytest.raises(TokenUnavailable):
        await _get_in_virtual_time(clock, tokens, deadline=clock.now() + 10.0)
    calls = platform.calls
    platform.failures = [TokenFetchError("token endpoint answered code 500", permanent=False)] * 100
    outcomes = await asyncio.gather(*(tokens.get(deadline=clock.now() + 0.5) for _ in range(100)),
                                    return_exceptions=True)
    assert all(isinstance(o, TokenUnavailable) for o in outcomes)
    assert platform.calls == calls    # 100 requests inside the 1 s cool-down: no new fetch, each told at once
    assert "next try" in str(outcomes[0])
    waiters = [asyncio.create_task(tokens.get(deadline=clock.now() + 5.0)) for _ in range(100)]
    platform.failures.clear()
    await _run_in_virtual_time(clock, waiters)
    assert {w.result() for w in waiters} == {f"token-{calls + 1}"} and platform.calls == calls + 1   # one for all


async def test_while_no_new_token_can_be_had_the_current_one_is_used_until_it_really_expires() -> None:
    clock = VirtualClock()
    platform = Platform(clock, expire=7200)
    tokens = source(clock, platform)
    assert await tokens.get() == "token-1"
    platform.failures = [TokenFetchError("token endpoint unreachable", permanent=False)] * 1000
    await clock.advance(7200 - 8)   # inside the last 10 s, where a new token is asked for
    assert await _get_in_virtual_time(clock, tokens, deadline=clock.now() + 5) == "token-1"   # still valid: used
    await clock.advance(7)
    assert tokens.current() is not None and tokens.current().value == "token-1"
    await clock.advance(2)           # really expired now
    with pytest.raises(TokenUnavailable):
        await _get_in_virtual_time(clock, tokens, deadline=clock.now() + 5)


async def _get_in_virtual_time(clock: VirtualClock, tokens: TokenSource, deadline: float) -> str:
    """`tokens.get(deadline)`, with virtual time moved along while it waits (fetch back-off, cool-downs)."""
    waiter = asyncio.create_task(tokens.get(deadline=deadline))
    await _run_in_virtual_time(clock, [waiter])
    return await waiter


async def _run_in_virtual_time(clock: VirtualClock, tasks: list[asyncio.Task[str]]) -> None:
    while not all(t.done() for t in tasks):
        await settle()
        if not all(t.done() for t in tasks):
            await clock.advance(0.05)
