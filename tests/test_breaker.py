import pytest

from proxy.breaker import BreakerSettings, BreakerState, CircuitBreaker
from proxy.clock import VirtualClock
from proxy.outcome import Outcome, Signal, Verdict

OK = Verdict(Outcome.SUCCESS, "ok", Signal.OK)
APP_ERROR = Verdict(Outcome.PERMANENT, "code_99991672", Signal.OK)  # missing scope: the platform is fine
THROTTLED = Verdict(Outcome.THROTTLED, "code_99991400", Signal.THROTTLED, retry_after=1.0)
HTTP_503 = Verdict(Outcome.RETRYABLE, "http_503", Signal.SERVER_ERROR)
TIMEOUT = Verdict(Outcome.RETRYABLE, "timeout", Signal.TIMEOUT)
REFUSED = Verdict(Outcome.RETRYABLE, "connect_error", Signal.CONNECT_FAILURE, processed=False)


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def transitions() -> list[tuple[BreakerState, BreakerState]]:
    return []


@pytest.fixture
def breaker(clock, transitions) -> CircuitBreaker:
    # rng 0.5 puts the jittered open period exactly at open_for (3 s by default)
    return CircuitBreaker(clock, on_transition=lambda old, new: transitions.append((old, new)), rng=lambda: 0.5)


def feed(breaker: CircuitBreaker, *verdicts: Verdict) -> None:
    for v in verdicts:
        assert breaker.allow()
        breaker.record(v)


async def open_it(breaker: CircuitBreaker) -> None:
    feed(breaker, *[REFUSED] * 5)
    assert breaker.state is BreakerState.OPEN


async def test_opens_when_most_attempts_fail_with_enough_volume(breaker, clock):
    feed(breaker, *[HTTP_503, HTTP_503, HTTP_503, HTTP_503, HTTP_503, OK] * 3)
    assert breaker.state is BreakerState.CLOSED  # 18 attempts: not enough volume to judge
    feed(breaker, HTTP_503, TIMEOUT)
    assert breaker.state is BreakerState.OPEN    # 17 of 20: surely more than half
    assert not breaker.allow()
    assert breaker.retry_after() == pytest.approx(3.0)


async def test_random_loss_that_retries_overcome_does_not_open_it(clock):
    """40% of attempts lost at random: retries get every request through, so cutting everyone off would be the
    failure. With 20 attempts, 11 failures happen a few times in a hundred; the ratio needs more than chance."""
    import random

    rng, opened = random.Random(3), 0
    for _ in range(200):
        breaker = CircuitBreaker(VirtualClock())
        for _ in range(200):
            breaker.record(HTTP_503 if rng.random() < 0.4 else OK)
        opened += breaker.state is not BreakerState.CLOSED
    assert opened == 0


async def test_a_failure_ratio_below_the_threshold_keeps_it_closed(breaker):
    feed(breaker, *[OK, OK, HTTP_503] * 30)
    assert breaker.state is BreakerState.CLOSED


async def test_old_failures_leave_the_window(breaker, clock):
    feed(breaker, *[HTTP_503, OK] * 5, HTTP_503)
    await clock.advance(31)
    feed(breaker, *[OK, HTTP_503] * 5)
    assert breaker.state is BreakerState.CLOSED  # 10 in the window now: the first 11 have aged out


async def test_a_run_of_connect_failures_opens_it_at_any_volume(breaker):
    feed(breaker, *[REFUSED] * 4, OK, *[REFUSED] * 4)
    assert breaker.state is BreakerState.CLOSED  # the run was broken by an answer
    feed(breaker, REFUSED)
    assert breaker.state is BreakerState.OPEN


async def test_application_errors_and_throttles_are_not_failures_of_the_upstream(breaker):
    feed(breaker, *[APP_ERROR, THROTTLED] * 50)
    assert breaker.state is BreakerState.CLOSED


async def test_half_open_admits_only_a_few_probes_after_the_open_period(breaker, clock):
    await open_it(breaker)
    await clock.advance(2.9)
    assert not breaker.allow()
    await clock.advance(0.2)
    assert breaker.state is BreakerState.HALF_OPEN
    assert [breaker.allow() for _ in range(5)] == [True, True, True, False, False]
    assert breaker.retry_after() == 1.0


async def test_a_successful_probe_closes_it_and_the_old_failures_are_forgotten(breaker, clock, transitions):
    await open_it(breaker)
    await clock.advance(3)
    assert breaker.allow()
    breaker.record(OK)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.retry_after() == 0.0
    feed(breaker, *[REFUSED] * 4, HTTP_503)
    assert breaker.state is BreakerState.CLOSED
    assert transitions == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]


async def test_a_failed_probe_reopens_it_for_another_period(breaker, clock, transitions):
    await open_it(breaker)
    await clock.advance(3)
    assert breaker.allow()
    breaker.record(TIMEOUT)
    assert breaker.state is BreakerState.OPEN
    assert breaker.retry_after() == pytest.approx(3.0)
    assert transitions[-1] == (BreakerState.HALF_OPEN, BreakerState.OPEN)


async def test_a_released_or_lost_probe_slot_is_given_back(clock):
    breaker = CircuitBreaker(clock, BreakerSettings(probes=1, probe_lease=10.0), rng=lambda: 0.5)
    await open_it(breaker)
    await clock.advance(3)
    assert breaker.allow() and not breaker.allow()
    breaker.release_probe()  # e.g. the client went away before the probe was sent
    assert breaker.allow()
    await clock.advance(10)  # ...or the probe never reported at all
    assert breaker.allow()


async def test_open_periods_are_jittered_within_bounds(clock):
    settings = BreakerSettings(open_for=10.0, jitter=0.2)
    periods = []
    for u in (0.0, 0.5, 0.999):
        breaker = CircuitBreaker(clock, settings, rng=lambda u=u: u)
        feed(breaker, *[REFUSED] * 5)
        periods.append(breaker.retry_after())
    assert periods[0] == pytest.approx(8.0) and periods[1] == pytest.approx(10.0)
    assert 11.9 < periods[2] <= 12.0


async def test_late_answers_while_open_change_nothing(breaker, clock):
    await open_it(breaker)
    breaker.record(OK)
    assert breaker.state is BreakerState.OPEN


# Blackhole versus slow: timeouts alone do not tell them apart, answers (late ones included) do ---------------------


async def attempts_at(clock: VirtualClock, breaker: CircuitBreaker, rate: float, seconds: float, cut_off: float,
                      answered_after: float | None) -> float | None:
    """`rate` attempts per second for `seconds`, each cut off after `cut_off`; with `answered_after`, each answer
    still arrives that long after it was sent. Returns when the breaker opened (seconds from the start), if it did."""
    events: list[tuple[float, str]] = []
    for i in range(round(rate * seconds)):
        sent = i / rate
        events.append((sent + cut_off, "timeout"))
        if answered_after is not None:
            events.append((sent + answered_after, "late"))
    start = clock.now()
    for at, kind in sorted(events):
        await clock.advance(start + at - clock.now())
        if kind == "timeout":
            breaker.record(TIMEOUT)
        else:
            breaker.record_late()
        if breaker.state is BreakerState.OPEN:
            return clock.now() - start
    return None


async def test_a_blackhole_opens_it_within_about_a_second(clock, breaker):
    feed(breaker, *[OK] * 50)
    opened = await attempts_at(clock, breaker, rate=30, seconds=5, cut_off=0.5, answered_after=None)
    assert opened is not None and opened <= 0.5 + 1.05   # the first timeout, then 1 s in which nothing answers


async def test_a_slow_platform_whose_answers_come_after_the_cut_off_keeps_it_closed(clock, breaker):
    feed(breaker, *[OK] * 50)
    opened = await attempts_at(clock, breaker, rate=30, seconds=10, cut_off=0.5, answered_after=1.2)
    assert opened is None   # every attempt timed out, and every one was answered: slow is not down


async def test_timeouts_right_after_an_answer_are_not_silence(clock, breaker):
    breaker.record(OK)
    await clock.advance(5)
    breaker.record(OK)
    for _ in range(10):   # a burst of timeouts, all at once: a cut-off that is too short, or the start of a blackhole
        breaker.record(TIMEOUT)
    assert breaker.state is BreakerState.CLOSED
    await clock.advance(1.0)
    breaker.record(TIMEOUT)   # a second of nothing since: a blackhole
    assert breaker.state is BreakerState.OPEN
