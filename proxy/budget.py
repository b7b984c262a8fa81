"""The retry budget of one upstream: retries may be at most a share of requests over a sliding window, plus a floor.

Owns counting; a retry is charged when it is decided, so retries still waiting in back-off count too (envoy#30205).
"""

from __future__ import annotations

from collections import deque

from proxy.clock import Clock


class SlidingCount:
    """Events over the last `window` seconds, in one-second buckets: O(1) to add, bounded memory."""

    def __init__(self, clock: Clock, window: float) -> None:
        self._clock, self._window = clock, window
        self._buckets: deque[list[float]] = deque()   # [second, count]
        self._total = 0.0

    def add(self, amount: float = 1.0) -> None:
        second = int(self._clock.now())
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += amount
        else:
            self._buckets.append([second, amount])
        self._total += amount

    def total(self) -> float:
        horizon = self._clock.now() - self._window
        while self._buckets and self._buckets[0][0] < horizon:
            self._total -= self._buckets.popleft()[1]
        return self._total


class RetryBudget:
    def __init__(self, clock: Clock, *, ratio: float = 0.2, min_per_second: float = 3.0, window: float = 10.0) -> None:
        self.ratio, self.floor = ratio, min_per_second * window
        self._requests = SlidingCount(clock, window)
        self._retries = SlidingCount(clock, window)

    def record_request(self) -> None:
        self._requests.add()

    def try_spend(self, ratio: float | None = None) -> bool:
        """Charge one retry if the budget allows it; False means send the answer back as it is.

        `ratio` overrides the configured share for this decision (the network monitor's, while loss is random).
        """
        share = self.ratio if ratio is None else ratio
        if self._retries.total() >= share * self._requests.total() + self.floor:
            return False
        self._retries.add()
        return True

    @property
    def spent_ratio(self) -> float:
        requests = self._requests.total()
        return self._retries.total() / requests if requests else 0.0
