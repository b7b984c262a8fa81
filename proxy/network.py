"""Per-upstream network monitor: measures attempts, names the network's state, derives retry parameters.

Owns the latency/loss/throttle statistics of one upstream and the RetryParams they imply; it does not retry,
sleep, break circuits or export metrics (the retry engine, breaker and metrics layer read it).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeVar

from proxy.clock import Clock
from proxy.outcome import Outcome, Signal, Verdict
from proxy.window import DecayingMean, LatencyHistogram, SlidingWindow


class NetworkState(enum.Enum):
    __hash__ = object.__hash__   # as proxy/outcome.py's enums: members hashed by identity
    HEALTHY = "healthy"
    CONGESTED = "congested"  # answers come, but much slower than this upstream's normal
    LOSSY = "lossy"          # a moderate share of attempts die at random (resets, timeouts, 5xx)
    THROTTLED = "throttled"  # the platform refuses for rate
    DOWN = "down"            # nothing answers: refused connections, or timeouts with no answer, not even late


EVALUATE_EVERY = 0.1        # seconds between re-judging the state from the windows (they move slowly anyway)
# Attempts are sized for a tenth of the 1e-4 failure share promised: the loss is an estimate, and a sizing that
# only just reaches 1e-4 fails 1 request in 10,000 when the estimate is a little low (bench.faults --mixed did).
TARGET_FAILURE = 1e-5       # share of requests random loss may still fail, when attempts are derived from it
MAX_ATTEMPTS = 14           # 40% loss needs 13 attempts for TARGET_FAILURE (0.4**13 = 7e-6)
MAX_BUDGET = 1.5            # retries per request the loss may claim: 1.5 x what 40% loss needs (0.67)
CONFIDENCE_Z = 1.645        # one-sided 95%: attempts are sized for the loss the window cannot rule out


@dataclass(frozen=True, slots=True)
class RetryParams:
    per_try_timeout: float
    backoff_base: float
    backoff_cap: float
    max_attempts: int  # the first try included
    budget_ratio: float | None = None   # retries allowed per request over the budget window (None: as configured)


@dataclass(frozen=True, slots=True)
class StateProfile:
    """How to retry in one state; the per-try timeout is `timeout_multiplier` × the `timeout_quantile` latency."""

    max_attempts: int
    backoff_base: float
    backoff_cap: float
    timeout_quantile: float
    timeout_multiplier: float


# Why these: healthy retries quickly (Envoy's 25 ms base); a congested upstream gets slower retries because more
# load only deepens the queue; random loss is beaten by short timeouts; down sends one attempt and leaves recovery
# to the breaker's probes. `max_attempts` is a floor in every state but down: the measured loss raises it to what
# TARGET_FAILURE needs (at 20% loss, 8 attempts fail 0.0003% of requests while sending ~1.25 attempts per request).
# Throttled answers are paced by the limiter and the platform's reset headers, not by these back-offs, and never
# count against the attempts: the throttled profile's back-off only paces the loss mixed in with the throttles.
DEFAULT_PROFILES: Mapping[NetworkState, StateProfile] = MappingProxyType({
    NetworkState.HEALTHY: StateProfile(3, 0.025, 0.25, 0.99, 3.0),
    NetworkState.CONGESTED: StateProfile(2, 0.5, 5.0, 0.99, 4.0),
    NetworkState.LOSSY: StateProfile(5, 0.025, 0.25, 0.95, 2.0),
    NetworkState.THROTTLED: StateProfile(3, 0.1, 2.0, 0.99, 3.0),
    NetworkState.DOWN: StateProfile(1, 1.0, 10.0, 0.99, 3.0),
})


@dataclass(frozen=True)
class AdaptiveSettings:
    """Tuning of the monitor. The four pins (`None` = adaptive) override whatever the state implies."""

    per_try_timeout: float | None = None
    backoff_base: float | None = None
    backoff_cap: float | None = None
    max_attempts: int | None = None
    budget_ratio: float | None = None

    window: float = 30.0            # seconds of history behind every ratio and quantile
    bucket: float = 1.0
    min_volume: int = 20            # attempts in the window before a ratio may move the state
    min_events: int = 3             # ...and at least this many of the events the ratio counts
    min_dwell: float = 5.0          # seconds a state holds before another may replace it (DOWN excepted)

    lossy_enter: float = 0.03       # share of attempts failing at network/server level
    lossy_exit: float = 0.01
    throttled_enter: float = 0.05   # share of attempts the platform refused for rate
    throttled_exit: float = 0.01
    down_run: int = 8               # consecutive attempts without an answer that mean down, whatever the volume...
    down_silence: float = 1.0       # ...when nothing at all (not even a late answer) came back for this long since
                                    # the first of them: a slow platform's late answers arrive within it
    up_run: int = 3                 # consecutive answers that end down

    ewma_tau: float = 5.0           # horizon of the "now" latency
    baseline_tau: float = 300.0     # horizon of the "normal" latency; a lasting slowdown becomes normal
    congested_ratio_enter: float = 3.0
    congested_ratio_exit: float = 2.0
    congested_floor: float = 0.25   # below this nothing is "slow", however it compares to the baseline
    congested_absolute_enter: float = 1.5  # half of DingTalk's 3 s server timeout: slow for any platform API
    congested_absolute_exit: float = 1.0

    min_latency_samples: int = 10   # answers needed before quantiles replace `initial_timeout`
    initial_timeout: float = 5.0    # DingTalk gives up on its side after 3 s; leave room for the network
    min_timeout: float = 0.5
    max_timeout: float = 10.0       # never wait on a dead connection longer than this
    escalate_timeout_share: float = 0.5  # when most attempts time out, the cut-off may be too short: grow it
    escalate_timeout_run: int = 3        # ...or when the last few did, so a sudden slowdown is not cut off for long

    profiles: Mapping[NetworkState, StateProfile] = field(default_factory=lambda: DEFAULT_PROFILES)


@dataclass(frozen=True, slots=True)
class NetworkSnapshot:
    """The numbers a metrics layer exports as gauges (seconds, ratios, counts)."""

    state: NetworkState
    latency_ewma: float | None
    latency_p50: float | None
    latency_p95: float | None
    latency_p99: float | None
    per_try_timeout: float
    backoff_base: float
    backoff_cap: float
    max_attempts: int
    loss_ratio: float
    throttle_ratio: float
    attempts: int
    late_answers: int = 0


_FAILURES = (Signal.CONNECT_FAILURE, Signal.TIMEOUT, Signal.RESET, Signal.SERVER_ERROR)
_ANSWERS = (Signal.OK, Signal.SERVER_ERROR, Signal.THROTTLED)  # the platform replied: the latency is an RTT
_SILENT = (Signal.CONNECT_FAILURE, Signal.TIMEOUT, Signal.RESET)   # no answer came back (yet)
_SIGNALS = tuple(Signal)
_TIMEOUT_ELAPSED = len(_SIGNALS)  # an extra column: seconds spent in attempts that timed out
_LATE = _TIMEOUT_ELAPSED + 1      # ...and one for timed-out attempts whose answer arrived after the cut-off
_FAILURE_COLUMNS = tuple(_SIGNALS.index(signal) for signal in _FAILURES)
_THROTTLED_COLUMN = _SIGNALS.index(Signal.THROTTLED)


@dataclass(frozen=True, slots=True)
class _Stats:
    attempts: int
    loss_ratio: float
    throttle_ratio: float
    failures: float     # attempts lost: failed at the network or server level, minus those answered late
    throttles: float
    late: float

    @property
    def loss_per_try(self) -> float:
        """The share of attempts that are not throttled which are lost: what sizing attempts is about."""
        tries = self.attempts - self.throttles
        return self.failures / tries if tries > 0 else 0.0

    def loss_bound(self) -> float:
        """The upper one-sided 95% Wilson bound of `loss_per_try`: little evidence, a pessimistic loss."""
        n = self.attempts - self.throttles
        if n <= 0:
            return 1.0
        p, z2 = self.failures / n, CONFIDENCE_Z ** 2
        spread = CONFIDENCE_Z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
        return min(1.0, (p + z2 / (2 * n) + spread) / (1 + z2 / n))


class NetworkMonitor:
    """Watches one upstream's attempts and says what the network is like and how to retry on it."""

    def __init__(self, clock: Clock, settings: AdaptiveSettings = AdaptiveSettings()) -> None:
        self._clock = clock
        self._settings = settings
        self._counts = SlidingWindow(len(_SIGNALS) + 2, settings.window, settings.bucket)
        self._latency = LatencyHistogram(settings.window, settings.bucket)
        self._ewma = DecayingMean(settings.ewma_tau)
        self._baseline = DecayingMean(settings.baseline_tau)
        self._silent_run = 0
        self._answer_run = 0
        self._timeout_run = 0
        self._silent_since = math.inf   # when the first attempt without an answer since the last answer ended
        self._changes = 0   # attempts that were not plain successes: what makes cached parameters stale
        self._recorded = 0   # moves whenever the counts window does: with the time, what `_stats` is memoised on
        self._memo: tuple[tuple[float, int], _Stats] | None = None
        # `_changes` when the window last held no failure, throttle or late answer: until it moves, only successes
        # came, so loss and throttling cannot hold and a state is judged on latency alone (a quiet upstream, called
        # a few times a second, is judged on nearly every request: at 1,000 apps the window's figures were read on
        # each). Only when exiting loss or throttling needs some of it (thresholds above 0, as every default is).
        self._clean: int | None = None
        self._shortcut = min(settings.lossy_enter, settings.lossy_exit, settings.throttled_enter,
                             settings.throttled_exit) > 0
        self._state = NetworkState.HEALTHY
        self._since = clock.now()
        self._evaluated = -EVALUATE_EVERY

    def record(self, verdict: Verdict, latency: float) -> None:
        """Account one upstream attempt: what it signalled and how long it took, in seconds."""
        now = self._clock.now()
        signal = verdict.signal
        self._counts.add(now, _SIGNALS.index(signal))
        self._recorded += 1
        if signal is Signal.TIMEOUT:
            self._counts.add(now, _TIMEOUT_ELAPSED, latency)
        if signal in _ANSWERS:
            self._latency.record(now, latency)
            self._ewma.update(now, latency)
        if signal is Signal.OK:
            self._baseline.update(now, latency)
        if verdict.outcome is not Outcome.SUCCESS:
            self._changes += 1
        self._count_runs(signal, now)
        self._update_state(now)

    def changes(self) -> int:
        """A counter that moves with every attempt that was not a success, every late answer and every change of
        state."""
        return self._changes

    def samples(self) -> int:
        """A counter that moves with every attempt and late answer recorded (and when the window is cleared)."""
        return self._recorded

    def record_late(self, latency: float) -> None:
        """A timed-out attempt's answer arrived after all, `latency` seconds after it was sent: the platform is
        slow, not gone. The latency is what the per-try timeout must learn from, and the attempt is not lost."""
        now = self._clock.now()
        self._counts.add(now, _LATE)
        self._recorded += 1
        self._changes += 1
        self._latency.record(now, latency)
        self._ewma.update(now, latency)
        self._heard(now)
        self._update_state(now)

    @property
    def state(self) -> NetworkState:
        self._update_state(self._clock.now())
        return self._state

    def retry_params(self) -> RetryParams:
        now = self._clock.now()
        self._update_state(now)
        state, pins = self._state, self._settings
        profile = pins.profiles[state]
        stats = self._stats(now)   # once, for the attempts and the budget: one read of the window, not three
        return RetryParams(
            per_try_timeout=_pick(pins.per_try_timeout, self._per_try_timeout(profile, now)),
            backoff_base=_pick(pins.backoff_base, profile.backoff_base),
            backoff_cap=_pick(pins.backoff_cap, profile.backoff_cap),
            max_attempts=_pick(pins.max_attempts, self._attempts(state, profile, stats)),
            budget_ratio=self._budget_ratio(state, stats),
        )

    def _budget_ratio(self, state: NetworkState, stats: _Stats) -> float | None:
        """Loss p needs p/(1-p) retries per request; give that with headroom, in every state with loss, up to a cap.

        A down upstream keeps the configured budget: that is where a budget earns its keep. Throttled retries are
        paced by the limiter and are not charged to the budget (the retry engine's rule), so they need none here.
        """
        if state is NetworkState.DOWN or self._settings.budget_ratio is not None:
            return self._settings.budget_ratio
        if stats.failures <= 0:
            return None
        loss = min(stats.loss_bound(), 0.6)
        return min(MAX_BUDGET, 1.5 * loss / (1.0 - loss))

    def _attempts(self, state: NetworkState, profile: StateProfile, stats: _Stats) -> int:
        """Under random loss p, n attempts all fail with p**n: take enough for TARGET_FAILURE, within bounds.

        p is the loss the window cannot rule out (its upper bound), so a few early failures already raise the
        attempts instead of waiting for enough volume to name a state; throttles are not loss and do not lower it.
        With no loss in the window, the state's own attempts.
        """
        if state is NetworkState.DOWN:
            return profile.max_attempts
        if stats.failures <= 0:
            return profile.max_attempts
        loss = stats.loss_bound()
        needed = MAX_ATTEMPTS if loss >= 1.0 else math.ceil(math.log(TARGET_FAILURE) / math.log(max(loss, 1e-9)))
        return max(profile.max_attempts, min(MAX_ATTEMPTS, needed))

    def snapshot(self) -> NetworkSnapshot:
        now = self._clock.now()
        params = self.retry_params()
        stats = self._stats(now)
        return NetworkSnapshot(
            state=self._state,
            latency_ewma=self._ewma.value,
            latency_p50=self._latency.quantile(now, 0.50),
            latency_p95=self._latency.quantile(now, 0.95),
            latency_p99=self._latency.quantile(now, 0.99),
            per_try_timeout=params.per_try_timeout,
            backoff_base=params.backoff_base,
            backoff_cap=params.backoff_cap,
            max_attempts=params.max_attempts,
            loss_ratio=stats.loss_ratio,
            throttle_ratio=stats.throttle_ratio,
            attempts=stats.attempts,
            late_answers=round(stats.late),
        )

    # -- the per-try timeout ------------------------------------------------------------------------

    def _per_try_timeout(self, profile: StateProfile, now: float) -> float:
        s = self._settings
        latency = self._latency.quantile(now, profile.timeout_quantile, at_least=max(1, s.min_latency_samples))
        if latency is None:   # too few answers to learn from yet
            latency = s.initial_timeout / profile.timeout_multiplier
        # When most attempts time out we have no answers to learn from: the upstream may simply be slower
        # than our cut-off. Grow past the time those attempts already waited, up to max_timeout.
        latency = max(latency, self._censored_latency(now))
        return min(s.max_timeout, max(s.min_timeout, profile.timeout_multiplier * latency))

    def _censored_latency(self, now: float) -> float:
        totals = self._counts.totals(now)
        timeouts = totals[_SIGNALS.index(Signal.TIMEOUT)]
        if timeouts <= 0:
            return 0.0   # the run of timeouts may outlive the window that held them (issue 13: a ZeroDivisionError)
        attempts = sum(totals[: len(_SIGNALS)])
        s = self._settings
        dominant = timeouts >= s.min_events and timeouts >= s.escalate_timeout_share * attempts
        if not (dominant or self._timeout_run >= s.escalate_timeout_run):
            return 0.0
        return totals[_TIMEOUT_ELAPSED] / timeouts

    # -- the state machine --------------------------------------------------------------------------

    def _count_runs(self, signal: Signal, now: float) -> None:
        self._timeout_run = self._timeout_run + 1 if signal is Signal.TIMEOUT else 0
        if signal in _SILENT:
            self._silent_run += 1
            self._answer_run = 0
            self._silent_since = min(self._silent_since, now)
        else:
            self._heard(now)

    def _heard(self, now: float) -> None:
        """The platform answered something (an error, a throttle or a late answer count): it is not down."""
        self._silent_run = 0
        self._answer_run += 1
        self._silent_since = math.inf

    def _silent(self, now: float) -> bool:
        """Down needs evidence that nothing answers: a run of unanswered attempts, and no answer for a while."""
        s = self._settings
        return self._silent_run >= s.down_run and now - self._silent_since >= s.down_silence

    def _update_state(self, now: float) -> None:
        s = self._settings
        if self._state is not NetworkState.DOWN and self._silent(now):
            self._enter(NetworkState.DOWN, now)
        elif self._state is NetworkState.DOWN:
            if self._answer_run >= s.up_run:
                # The outage's failures say nothing about the loss now that answers come back.
                self._counts.clear()
                self._recorded += 1
                self._enter(self._candidate(now), now)
        elif now - self._evaluated >= EVALUATE_EVERY or now < self._evaluated:
            # Leaving healthy is at once: the first seconds of an incident are when retries matter most.
            # Every other move waits out the dwell, so a borderline mix does not flap.
            self._evaluated = now
            candidate = self._candidate(now)
            settled = self._state is NetworkState.HEALTHY or now - self._since >= s.min_dwell
            if candidate is not self._state and settled:
                self._enter(candidate, now)

    def _enter(self, state: NetworkState, now: float) -> None:
        if state is not self._state:
            self._changes += 1   # another profile: cached retry parameters are read again at once
        self._state = state
        self._since = now

    def _candidate(self, now: float) -> NetworkState:
        """The worst state whose condition holds; the current state is held to its (looser) exit threshold."""
        if self._clean == self._changes:
            return NetworkState.CONGESTED if self._holds_congested() else NetworkState.HEALTHY
        stats = self._stats(now)
        clean = self._shortcut and stats.failures <= 0 and stats.throttles <= 0 and stats.late <= 0
        self._clean = self._changes if clean else None
        # Loss before throttling: lost attempts want prompt retries, while throttled ones are paced whatever the state.
        if self._holds_lossy(stats):
            return NetworkState.LOSSY
        if self._holds_throttled(stats):
            return NetworkState.THROTTLED
        if self._holds_congested():
            return NetworkState.CONGESTED
        return NetworkState.HEALTHY

    def _threshold(self, state: NetworkState, enter: float, exit_: float) -> float:
        return exit_ if self._state is state else enter

    def _holds_throttled(self, stats: _Stats) -> bool:
        s = self._settings
        limit = self._threshold(NetworkState.THROTTLED, s.throttled_enter, s.throttled_exit)
        return self._enough(NetworkState.THROTTLED, stats, stats.throttles) and stats.throttle_ratio >= limit

    def _holds_lossy(self, stats: _Stats) -> bool:
        s = self._settings
        limit = self._threshold(NetworkState.LOSSY, s.lossy_enter, s.lossy_exit)
        return self._enough(NetworkState.LOSSY, stats, stats.failures) and stats.loss_ratio >= limit

    def _holds_congested(self) -> bool:
        s = self._settings
        ewma, baseline = self._ewma.value, self._baseline.value
        if ewma is None or baseline is None:
            return False
        ratio = self._threshold(NetworkState.CONGESTED, s.congested_ratio_enter, s.congested_ratio_exit)
        absolute = self._threshold(NetworkState.CONGESTED, s.congested_absolute_enter, s.congested_absolute_exit)
        return ewma >= absolute or ewma >= max(s.congested_floor, ratio * baseline)

    def _enough(self, state: NetworkState, stats: _Stats, events: float) -> bool:
        # Below this volume a single unlucky attempt would be a large share: no new state on so little.
        if self._state is state:
            return True
        return stats.attempts >= self._settings.min_volume and events >= self._settings.min_events

    def _stats(self, now: float) -> _Stats:
        """The window's figures at `now`: worked out once however many decisions read them at that instant."""
        key = (now, self._recorded)
        if self._memo is not None and self._memo[0] == key:
            return self._memo[1]
        totals = self._counts.totals(now)
        attempts = sum(totals[:_TIMEOUT_ELAPSED])
        late = totals[_LATE]
        failures = max(0.0, sum(totals[i] for i in _FAILURE_COLUMNS) - late)
        throttles = totals[_THROTTLED_COLUMN]
        stats = _Stats(
            attempts=round(attempts),
            loss_ratio=failures / attempts if attempts else 0.0,
            throttle_ratio=throttles / attempts if attempts else 0.0,
            failures=failures,
            throttles=throttles,
            late=late,
        )
        self._memo = (key, stats)
        return stats


_N = TypeVar("_N", int, float)


def _pick(pinned: _N | None, adaptive: _N) -> _N:
    return adaptive if pinned is None else pinned
