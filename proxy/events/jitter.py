"""Capped exponential back-off with full jitter, driven by an injected random source.

Owns the delay arithmetic only; callers sleep on their own Clock, so tests never wait.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    base: float
    cap: float

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Delay before retry number `attempt` (1-based): uniform in [0, min(cap, base·2^(attempt−1))].

        Full jitter, as in Envoy and the AWS SDKs, so many sidecars restarted together do not retry in step.
        """
        ceiling = min(self.cap, self.base * (2 ** max(0, attempt - 1)))
        return rng.uniform(0.0, ceiling)
