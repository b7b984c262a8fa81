"""Per-upstream circuit breaker: stops sending to an upstream that is failing, and probes it back in.

Owns the closed/open/half-open state and the failure accounting behind it; it does not answer clients
(the pipeline turns a refusal into a 503 in the platform's shape, with `retry_after()` as Retry-After).
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from proxy.clock import Clock
from proxy.outcome import Signal, Verdict
from proxy.window import SlidingWindow


class BreakerState(enum.Enum):
    __hash__ = object.__hash__   # as proxy/outcome.py's enums: members hashed by identity
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    window: float = 30.0             # seconds over which the failure ratio is measured
    bucket: float = 1.0
    failure_ratio: float = 0.5       # resilience4j's default share, held with 99% confidence (below)
    min_volume: int = 20             # attempts in the window before the ratio may open the circuit
    connect_failures: int = 5        # consecutive connect failures open it at any volume: nothing is listening
    silent_timeouts: int = 3         # timeouts with no answer of any kind in between (a late one included)...
    silence: float = 1.0             # ...for this long since the first of them: a blackhole, open it
    open_for: float = 3.0            # short, so a platform that comes back is probed within seconds
    jitter: float = 0.2              # ± share of open_for, so many sidecars do not probe in lockstep
    probes: int = 3                  # requests admitted at once while half-open
    probe_lease: float = 30.0        # a claimed probe that never reports is presumed lost after this
    busy_retry_after: float = 1.0    # Retry-After to give while every probe slot is taken


# Only what says the upstream itself is failing. A platform error inside an answer (Signal.OK) and a
# throttle are the upstream working as designed; counting them would cut off a healthy platform.
_FAILURES = frozenset({Signal.CONNECT_FAILURE, Signal.TIMEOUT, Signal.RESET, Signal.SERVER_ERROR})
_ANSWERED = frozenset({Signal.OK, Signal.SERVER_ERROR, Signal.THROTTLED})   # the platform said something
_FAILED, _PASSED, _LATE = 0, 1, 2   # _LATE: timeouts answered after all, which were not failures of the upstream
# The ratio trips when the failure share is above failure_ratio with 99% confidence (the Wilson bound): random loss
# that retries overcome (40% of attempts) must not cut everyone off because 11 of 20 attempts happened to fail,
# while a platform failing everything still opens it at min_volume.
CONFIDENCE_Z = 2.326

TransitionHook = Callable[[BreakerState, BreakerState], None]


class CircuitBreaker:
    """Closed: count. Open: refuse until a jittered period passes. Half-open: admit a few probes; the first
    result decides (success closes, failure re-opens)."""

    def __init__(
        self,
        clock: Clock,
        settings: BreakerSettings = BreakerSettings(),
        *,
        on_transition: TransitionHook | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._clock = clock
        self._settings = settings
        self._on_transition = on_transition
        self._rng = rng
        self._window = SlidingWindow(3, settings.window, settings.bucket)
        self._connect_run = 0
        self._silent_timeouts = 0
        self._silent_since = math.inf   # when the first timeout since the last answer happened
        self._last_answer = -math.inf
        self._state = BreakerState.CLOSED
        self._open_until = 0.0
        # claim times of probes in flight, oldest first: a few at most (`probes`), so a list (an empty deque is
        # ~600 bytes, one per app and upstream)
        self._claims: list[float] = []

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN:   # only an open circuit moves with time alone
            self._maybe_half_open()
        return self._state

    def allow(self) -> bool:
        """May a request go upstream now? While half-open a True claims one probe slot."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN or not self._probe_slot_free():
            return False
        self._claims.append(self._clock.now())
        return True

    def release_probe(self) -> None:
        """Give back a probe slot claimed by `allow()` whose request never reached the upstream."""
        if self._claims:
            del self._claims[0]

    def record(self, verdict: Verdict) -> None:
        failed = verdict.signal in _FAILURES
        state = self.state
        if state is BreakerState.CLOSED:
            self._count(verdict.signal, failed)
        elif state is BreakerState.HALF_OPEN:
            self.release_probe()
            if failed:
                self._open()
            else:
                self._close()
        # While open, late answers to requests sent before it opened change nothing.

    def record_late(self) -> None:
        """A timed-out attempt was answered after its cut-off: the upstream is slow, not failing."""
        if self.state is BreakerState.CLOSED:
            self._window.add(self._clock.now(), _LATE)
            self._heard(self._clock.now())

    def retry_after(self) -> float:
        """Seconds a refused client should wait before trying again (0 when requests are admitted)."""
        state = self.state
        if state is BreakerState.OPEN:
            return max(0.0, self._open_until - self._clock.now())
        if state is BreakerState.HALF_OPEN and not self._probe_slot_free():
            return self._settings.busy_retry_after
        return 0.0

    # -- closed: accounting -------------------------------------------------------------------------

    def _count(self, signal: Signal, failed: bool) -> None:
        now = self._clock.now()
        self._window.add(now, _FAILED if failed else _PASSED)
        self._connect_run = self._connect_run + 1 if signal is Signal.CONNECT_FAILURE else 0
        if signal is Signal.TIMEOUT:
            self._silent_timeouts += 1
            self._silent_since = min(self._silent_since, now)
        elif signal in _ANSWERED:
            self._heard(now)
        # Only a failure can trip the circuit, so a success skips the ratio (it is on every request's path).
        if failed and (self._connect_run >= self._settings.connect_failures or self._blackholed(now)
                       or self._ratio_tripped()):
            self._open()

    def _heard(self, now: float) -> None:
        self._silent_timeouts = 0
        self._silent_since = math.inf
        self._last_answer = max(self._last_answer, now)

    def _blackholed(self, now: float) -> bool:
        """Timeouts and no answer of any kind for `silence` seconds after the first of them (a slow platform's late
        answers arrive in that time; a blackhole's never do): nothing is coming back, so do not wait for volume."""
        s = self._settings
        quiet_since = max(self._silent_since, self._last_answer)
        return self._silent_timeouts >= s.silent_timeouts and now - quiet_since >= s.silence

    def _ratio_tripped(self) -> bool:
        failed, passed, late = self._window.totals(self._clock.now())
        volume = failed + passed
        failed = max(0.0, failed - late)
        return volume >= self._settings.min_volume and _lower_bound(failed, volume) >= self._settings.failure_ratio

    # -- transitions --------------------------------------------------------------------------------

    def _open(self) -> None:
        s = self._settings
        spread = 1.0 + s.jitter * (2.0 * self._rng() - 1.0)
        self._open_until = self._clock.now() + s.open_for * spread
        self._claims.clear()
        self._move(BreakerState.OPEN)

    def _close(self) -> None:
        # A fresh start: the failures that opened the circuit must not re-open it on the next hiccup.
        self._window.clear()
        self._connect_run = 0
        self._heard(self._clock.now())
        self._claims.clear()
        self._move(BreakerState.CLOSED)

    def _maybe_half_open(self) -> None:
        if self._state is BreakerState.OPEN and self._clock.now() >= self._open_until:
            self._move(BreakerState.HALF_OPEN)

    def _probe_slot_free(self) -> bool:
        expired = self._clock.now() - self._settings.probe_lease
        while self._claims and self._claims[0] <= expired:
            del self._claims[0]
        return len(self._claims) < self._settings.probes

    def _move(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        if self._on_transition is not None and old is not new:
            self._on_transition(old, new)


def _lower_bound(failed: float, volume: float) -> float:
    """The Wilson score lower bound of the failure share: what the window shows beyond reasonable doubt."""
    p, z2 = failed / volume, CONFIDENCE_Z ** 2
    spread = CONFIDENCE_Z * math.sqrt(p * (1 - p) / volume + z2 / (4 * volume * volume))
    return max(0.0, (p + z2 / (2 * volume) - spread) / (1 + z2 / volume))
