"""The retry budget of one upstream: retries may be at most a share of requests over a sliding window, plus a floor.

Owns counting; a retry is charged when it is decided, so retries still waiting in back-off count too (envoy#30205).
"""

from __future__ import annotations

from proxy.clock import Clock
from proxy.window import SlidingWindow

_REQUESTS, _RETRIES = 0, 1


class RetryBudget:
    def __init__(self, clock: Clock, *, ratio: float = 0.2, min_per_second: float = 3.0, window: float = 10.0) -> None:
        self.ratio, self.floor = ratio, min_per_second * window
        self._clock = clock
        self._counts = SlidingWindow(2, span=window, bucket=1.0)

    def record_request(self) -> None:
        self._counts.add(self._clock.now(), _REQUESTS)

    def try_spend(self, ratio: float | None = None) -> bool:
        """Charge one retry if the budget allows it; False means send the answer back as it is.

        `ratio` overrides the configured share for this decision (the network monitor's, while loss is random).
        """
        now = self._clock.now()
        requests, retries = self._counts.totals(now)
        share = self.ratio if ratio is None else ratio
        if retries >= share * requests + self.floor:
            return False
        self._counts.add(now, _RETRIES)
        return True
