import asyncio
import math
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.clock import VirtualClock
from proxy.network import AdaptiveSettings, NetworkMonitor, NetworkState
from proxy.outcome import Outcome, Signal, Verdict

Attempt = tuple[Signal, float]  # what an attempt signalled, and how long it took

_OUTCOMES = {
    Signal.OK: Outcome.SUCCESS,
    Signal.THROTTLED: Outcome.THROTTLED,
}


def verdict(signal: Signal) -> Verdict:
    return Verdict(_OUTCOMES.get(signal, Outcome.RETRYABLE), signal.value, signal)


async def drive(
    clock: VirtualClock,
    monitor: NetworkMonitor,
    seconds: float,
    attempt: Callable[[int], Attempt],
    rps: int = 20,
    on_step: Callable[[], None] | None = None,
) -> None:
    """Offer `rps` attempts per second for `seconds` of virtual time, in steps of 0.1 s."""
    per_step = rps / 10
    owed = 0.0
    for step in range(round(seconds * 10)):
        await clock.advance(0.1)
        owed += per_step
        while owed >= 1:
            owed -= 1
            signal, latency = attempt(step)
            monitor.record(verdict(signal), latency)
        if on_step:
            on_step()


def steady(latency: float) -> Callable[[int], Attempt]:
    return lambda _: (Signal.OK, latency)


def mix(share: float, bad: Signal, latency: float = 0.05, seed: int = 1) -> Callable[[int], Attempt]:
    rng = random.Random(seed)
    return lambda _: (bad, latency) if rng.random() < share else (Signal.OK, latency)


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


async def test_a_fresh_upstream_is_healthy_and_gets_the_untuned_defaults(clock):
    monitor = NetworkMonitor(clock)
    params = monitor.retry_params()
    assert monitor.state is NetworkState.HEALTHY
    assert params.per_try_timeout == 5.0  # no data yet: room for DingTalk's 3 s server timeout
    assert params.max_attempts == 3


async def test_random_resets_make_the_upstream_lossy_with_short_timeouts_and_more_attempts(clock):
    monitor = NetworkMonitor(clock)
    await drive(clock, monitor, 10, steady(0.05))
    healthy = monitor.retry_params()
    await drive(clock, monitor, 10, mix(0.10, Signal.RESET))
    lossy = monitor.retry_params()
    assert monitor.state is NetworkState.LOSSY
    assert lossy.max_attempts > healthy.max_attempts
    assert lossy.per_try_timeout <= healthy.per_try_timeout
    assert lossy.backoff_cap <= healthy.backoff_cap


async def test_steady_5xx_counts_as_loss_too(clock):
    monitor = NetworkMonitor(clock)
    await drive(clock, monitor, 10, mix(0.20, Signal.SERVER_ERROR))
    assert monitor.state is NetworkState.LOSSY


async def test_a_latency_spike_is_congestion_and_the_timeout_follows_it(clock):
    monitor = NetworkMonitor(clock)
    await drive(clock, monitor, 60, steady(0.05))
    fast = monitor.retry_params()
    await drive(clock, monitor, 10, steady(0.8))
    slow = monitor.retry_params()
    assert monitor.state is NetworkState.CONGESTED
    assert fast.per_try_timeout < 0.8 < slow.per_try_timeout  # the slow answers are no longer cut off
    assert slow.max_attempts < fast.max_attempts
    assert slow.backoff_base > fast.backoff_base


async def test_the_platform_refusing_for_rate_is_throttled_but_keeps_its_attempts(clock):
    monitor = NetworkMonitor(clock)
    healthy = monitor.retry_params().max_attempts
    await drive(clock, monitor, 10, mix(0.2, Signal.THROTTLED))
    params = monitor.retry_params()
    assert monitor.state is NetworkState.THROTTLED
    assert params.max_attempts >= healthy   # throttles are paced by the limiter; they never cost attempts
    assert monitor.snapshot().loss_ratio == 0.0


async def test_a_run_of_connect_failures_is_down_even_at_low_volume_and_answers_end_it(clock):
    monitor = NetworkMonitor(clock)
    await drive(clock, monitor, 1, steady(0.05), rps=2)
    await drive(clock, monitor, 4, lambda _: (Signal.CONNECT_FAILURE, 0.01), rps=2)
    assert monitor.state is NetworkState.DOWN
    assert monitor.retry_params().max_attempts == 1
    await drive(clock, monitor, 2, steady(0.05), rps=2)
    # The outage's failures do not linger as "loss" once the platform answers again.
    assert monitor.state is NetworkState.HEALTHY


async def test_a_few_failures_on_little_traffic_do_not_leave_healthy(clock):
    monitor = NetworkMonitor(clock)
    await drive(clock, monitor, 10, lambda step: (Signal.TIMEOUT if step in (5, 50) else Signal.OK, 0.05), rps=1)
    assert monitor.state is NetworkState.HEALTHY  # 2 timeouts in 10 attempts is a coin toss, not a state


async def test_failures_on_little_traffic_become_loss_once_successes_bring_the_volume(clock):
    """The successes that follow a few failures can be what makes the loss count: the state is judged on them too."""
    monitor = NetworkMonitor(clock)
    for _ in range(3):
        monitor.record(verdict(Signal.RESET), 0.05)
    await clock.advance(0.2)
    assert monitor.state is NetworkState.HEALTHY   # 3 of 3: not yet the volume a ratio needs
    for _ in range(17):   # only successes now; the 20th attempt brings the volume, and 3 of 20 is loss
        await clock.advance(0.2)
        monitor.record(verdict(Signal.OK), 0.05)
    assert monitor.state is NetworkState.LOSSY


async def test_loss_is_forgotten_once_it_leaves_the_window(clock):
    monitor = NetworkMonitor(clock)
    await drive(clock, monitor, 10, mix(0.10, Signal.TIMEOUT))
    assert monitor.state is NetworkState.LOSSY
    await drive(clock, monitor, 31, steady(0.05))
    assert monitor.state is NetworkState.HEALTHY


async def test_hysteresis_keeps_a_borderline_mix_from_flapping(clock):
    borderline = AdaptiveSettings()
    naive = AdaptiveSettings(lossy_exit=borderline.lossy_enter, min_dwell=0.0)
    flapping, steady_ = await _transitions(naive), await _transitions(borderline)
    assert flapping >= 10  # without hysteresis, the state follows every wobble of a 3% loss
    assert steady_ <= 2


async def _transitions(settings: AdaptiveSettings) -> int:
    clock = VirtualClock()
    monitor = NetworkMonitor(clock, settings)
    seen = [monitor.state]

    def watch() -> None:
        if monitor.state is not seen[-1]:
            seen.append(monitor.state)

    await drive(clock, monitor, 600, mix(settings.lossy_enter, Signal.RESET, seed=7), on_step=watch)
    return len(seen) - 1


async def test_the_timeout_is_clamped_for_very_fast_and_very_slow_upstreams(clock):
    fast, slow = NetworkMonitor(clock), NetworkMonitor(clock)
    await drive(clock, fast, 10, steady(0.002))
    await drive(clock, slow, 10, steady(8.0), rps=2)
    assert fast.retry_params().per_try_timeout == 0.5
    assert slow.retry_params().per_try_timeout == 10.0  # a dead connection is never waited on for 30 s


async def test_when_every_attempt_times_out_the_cut_off_grows_instead_of_staying_too_short(clock):
    monitor = NetworkMonitor(clock)
    await drive(clock, monitor, 30, steady(0.05))
    cut_off = monitor.retry_params().per_try_timeout
    await drive(clock, monitor, 3, lambda _: (Signal.TIMEOUT, cut_off), rps=2)
    assert monitor.retry_params().per_try_timeout > 2 * cut_off


async def test_pinned_parameters_override_every_state(clock):
    pins = AdaptiveSettings(per_try_timeout=2.0, backoff_base=0.1, backoff_cap=3.0, max_attempts=4)
    monitor = NetworkMonitor(clock, pins)
    await drive(clock, monitor, 5, lambda _: (Signal.CONNECT_FAILURE, 0.01))
    assert monitor.state is NetworkState.DOWN
    params = monitor.retry_params()
    assert (params.per_try_timeout, params.backoff_base, params.backoff_cap, params.max_attempts) == (2.0, 0.1, 3.0, 4)


async def test_snapshot_carries_every_gauge(clock):
    monitor = NetworkMonitor(clock)
    await drive(clock, monitor, 10, mix(0.1, Signal.THROTTLED, latency=0.1))
    snap = monitor.snapshot()
    assert snap.state is NetworkState.THROTTLED
    assert snap.attempts == 200
    assert 0.05 < snap.throttle_ratio < 0.15 and snap.loss_ratio == 0.0
    assert snap.latency_ewma == pytest.approx(0.1)
    assert snap.latency_p50 is not None and snap.latency_p99 is not None and snap.latency_p50 <= snap.latency_p99
    assert snap.per_try_timeout == monitor.retry_params().per_try_timeout
    assert snap.max_attempts == monitor.retry_params().max_attempts


async def test_leaving_healthy_does_not_wait_for_the_dwell_and_loss_sets_the_attempts() -> None:
    import random

    from proxy.clock import VirtualClock
    from proxy.network import NetworkMonitor, NetworkState
    from proxy.outcome import Outcome, Signal, Verdict

    clock, rng = VirtualClock(), random.Random(1)
    monitor = NetworkMonitor(clock)
    ok = Verdict(Outcome.SUCCESS, "ok", Signal.OK)
    lost = Verdict(Outcome.RETRYABLE, "http_503", Signal.SERVER_ERROR, processed=False)
    for _ in range(50):   # one second of 50 attempts/s, a fifth of them failing
        await clock.advance(0.02)
        monitor.record(lost if rng.random() < 0.2 else ok, 0.05)
    assert monitor.state is NetworkState.LOSSY
    assert monitor.retry_params().max_attempts >= 6   # 0.2**6 < 1e-4
    ratio = monitor.retry_params().budget_ratio
    assert ratio is not None and 0.25 < ratio <= 1.5   # 20% loss needs 0.25 retries per request, plus headroom


def test_budget_ratio_is_the_configured_one_outside_random_loss() -> None:
    from proxy.clock import VirtualClock
    from proxy.network import AdaptiveSettings, NetworkMonitor

    assert NetworkMonitor(VirtualClock()).retry_params().budget_ratio is None
    assert NetworkMonitor(VirtualClock(), AdaptiveSettings(budget_ratio=0.1)).retry_params().budget_ratio == 0.1


# Attempts sized from the measured loss, in every state ----------------------------------------------------------


async def test_throttles_mixed_with_loss_never_shrink_the_attempts_the_loss_needs(clock):
    """The issue's mix: throttling that would name the state `throttled`, with 13-27% plain loss beside it."""
    rng = random.Random(5)

    def attempt(_: int) -> Attempt:
        roll = rng.random()
        return (Signal.THROTTLED, 0.05) if roll < 0.15 else (Signal.SERVER_ERROR, 0.05) if roll < 0.40 else (Signal.OK, 0.05)

    monitor = NetworkMonitor(clock)
    await drive(clock, monitor, 20, attempt)
    params = monitor.retry_params()
    loss = 0.25 / 0.85   # lost among the attempts that were not throttled
    assert params.max_attempts >= math.ceil(math.log(1e-4) / math.log(loss))   # 8 or more, where `throttled` gave 2
    assert params.budget_ratio is not None and params.budget_ratio >= loss / (1 - loss)


async def test_the_first_failures_raise_the_attempts_before_there_is_volume_for_a_state(clock):
    monitor = NetworkMonitor(clock)
    monitor.record(verdict(Signal.RESET), 0.05)
    assert monitor.state is NetworkState.HEALTHY          # one failure names no state...
    assert monitor.retry_params().max_attempts == 14      # ...but nothing yet rules out heavy loss
    await drive(clock, monitor, 30, steady(0.05))
    assert monitor.retry_params().max_attempts == 3       # gone with the window, back to healthy's own


async def test_forty_percent_loss_gets_enough_attempts_for_the_target(clock):
    monitor = NetworkMonitor(clock)
    await drive(clock, monitor, 30, mix(0.4, Signal.SERVER_ERROR, seed=2))
    attempts = monitor.retry_params().max_attempts
    assert 0.4 ** attempts <= 1e-4


# Slow is not down ---------------------------------------------------------------------------------------------


async def slow_after_fast(clock: VirtualClock, monitor: NetworkMonitor, *, late: bool, seconds: float = 5) -> None:
    """20 attempts/s: fast first, then answers of 800 +- 400 ms against a cut-off learned from the fast ones. Every
    attempt times out; with `late`, its answer still arrives (and is reported) after the cut-off."""
    await drive(clock, monitor, 20, steady(0.05))
    rng = random.Random(9)
    for _ in range(round(seconds * 20)):
        await clock.advance(0.05)
        cut_off = monitor.retry_params().per_try_timeout
        latency = 0.8 + 0.4 * (2 * rng.random() - 1)
        if latency <= cut_off:
            monitor.record(verdict(Signal.OK), latency)
        else:
            monitor.record(verdict(Signal.TIMEOUT), cut_off)
            if late:
                monitor.record_late(latency)   # in truth it arrives latency - cut_off later; close enough here


async def test_answers_that_come_after_the_cut_off_teach_the_timeout_and_are_not_down(clock):
    monitor = NetworkMonitor(clock)
    await slow_after_fast(clock, monitor, late=True)
    params = monitor.retry_params()
    assert monitor.state is not NetworkState.DOWN
    assert params.per_try_timeout >= 1.2          # the latency the platform shows, late answers included
    assert params.max_attempts >= 2
    assert monitor.snapshot().late_answers > 0


async def test_timeouts_with_no_answer_at_all_are_down(clock):
    monitor = NetworkMonitor(clock)
    await drive(clock, monitor, 5, steady(0.05))
    await drive(clock, monitor, 1.5, lambda _: (Signal.TIMEOUT, 0.5))
    assert monitor.state is NetworkState.DOWN


async def test_coming_back_from_down_moves_the_changes_counter(clock):
    """Cached retry parameters are read again when `changes()` moves: recovering on successes alone must move it,
    or a quiet upstream would keep the down profile's single attempt for seconds."""
    monitor = NetworkMonitor(clock)
    await drive(clock, monitor, 5, steady(0.05))
    await drive(clock, monitor, 1.5, lambda _: (Signal.TIMEOUT, 0.5))
    assert monitor.state is NetworkState.DOWN
    down = monitor.changes()
    for _ in range(50):
        await clock.advance(0.1)
        monitor.record(verdict(Signal.OK), 0.05)
        if monitor.state is not NetworkState.DOWN:
            break
    assert monitor.state is not NetworkState.DOWN and monitor.changes() > down


async def test_a_run_of_timeouts_while_other_answers_arrive_is_not_down(clock):
    monitor = NetworkMonitor(clock)
    await drive(clock, monitor, 5, steady(0.05))
    for _ in range(20):   # 20 timeouts in a row, and then an answer to some other request, every 0.5 s
        await drive(clock, monitor, 0.5, lambda _: (Signal.TIMEOUT, 0.5))
        monitor.record(verdict(Signal.OK), 0.9)
    assert monitor.state is not NetworkState.DOWN


async def test_a_run_of_timeouts_outliving_the_window_does_not_crash_the_parameters(clock):
    """Issue 13: three timeouts, then 30 s of quiet: the window forgot them, the run counter did not."""
    monitor = NetworkMonitor(clock)
    for _ in range(3):
        monitor.record(verdict(Signal.TIMEOUT), 1.0)
    await clock.advance(31)
    params = monitor.retry_params()
    assert params.per_try_timeout > 0 and params.max_attempts >= 1


# The state machine under random sequences (hypothesis) --------------------------------------------------------

SIGNALS = st.sampled_from(list(Signal))
EVENTS = st.one_of(
    st.tuples(st.just("attempt"), SIGNALS, st.floats(0.0, 30.0)),
    st.tuples(st.just("late"), st.just(Signal.OK), st.floats(0.0, 30.0)),
    st.tuples(st.just("advance"), st.just(Signal.OK), st.one_of(st.floats(0.0, 2.0), st.sampled_from([29.9, 30.0,
                                                                                                      300.0, 1e6]))),
)


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(EVENTS, max_size=200))
def test_any_sequence_of_signals_and_clock_jumps_keeps_the_monitor_sound(events: list[tuple[str, Signal, float]]) -> None:
    asyncio.run(_replay(events))


async def _replay(events: list[tuple[str, Signal, float]]) -> None:
    """A model of the two runs beside the monitor: down only on evidence that nothing answers, left only on answers."""
    clock, s = VirtualClock(), AdaptiveSettings()
    monitor = NetworkMonitor(clock, s)
    silent_since, silent_run, answer_run = math.inf, 0, 0
    for kind, signal, value in events:
        before = monitor.state
        if kind == "advance":
            await clock.advance(value)
        elif kind == "late" or signal not in (Signal.CONNECT_FAILURE, Signal.TIMEOUT, Signal.RESET):
            monitor.record_late(value) if kind == "late" else monitor.record(verdict(signal), value)
            silent_since, silent_run, answer_run = math.inf, 0, answer_run + 1
        else:
            monitor.record(verdict(signal), value)
            silent_since, silent_run, answer_run = min(silent_since, clock.now()), silent_run + 1, 0
        after, params, snapshot = monitor.state, monitor.retry_params(), monitor.snapshot()
        shortcut = monitor._candidate(clock.now())
        monitor._clean = None   # the same judgement from the window's figures, with no shortcut
        assert shortcut is monitor._candidate(clock.now())
        assert s.min_timeout <= params.per_try_timeout <= s.max_timeout
        assert 1 <= params.max_attempts <= 14
        assert 0 < params.backoff_base <= params.backoff_cap
        assert params.budget_ratio is None or 0 <= params.budget_ratio <= 1.5
        assert 0.0 <= snapshot.loss_ratio <= 1.0 and 0.0 <= snapshot.throttle_ratio <= 1.0
        assert (after is NetworkState.DOWN) == (params.max_attempts == 1)
        if after is NetworkState.DOWN and before is not NetworkState.DOWN:
            assert silent_run >= s.down_run and clock.now() - silent_since >= s.down_silence
        if before is NetworkState.DOWN and after is not NetworkState.DOWN:
            assert answer_run >= s.up_run
