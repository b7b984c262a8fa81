"""Time-bucketed sliding windows and time-decayed means: the bounded-memory statistics of recent traffic.

Owns the ring of buckets, their running totals and latency quantiles; it does not own what the numbers mean
(the network monitor and the breaker decide that).
"""

from __future__ import annotations

import bisect
import math
from array import array
from collections.abc import Sequence
from typing import Any

WIDER = {"H": "I", "I": "Q"}   # the cells of whole counts, widened when one overflows


def _zeros(typecode: str, count: int) -> array[Any]:
    """`count` cells at 0 of `typecode` (doubles, or whole counts of any width)."""
    return array(typecode, [0]) * count


class SlidingWindow:
    """A vector of counters summed over the last `span` seconds, kept in buckets of `bucket` seconds.

    Adding is O(1), dropping a bucket O(the cells it filled); old buckets fall out lazily as time moves, so memory
    is at most `span / bucket` rows whatever the traffic. The rows are one array of doubles, allocated at the first
    add (an idle app's windows hold none: 1,000 configured apps held 23 MB of zeros) and reused as the window turns:
    a row made per bucket was a list the cyclic collector tracked for the window's span, and at 1,000 busy apps
    those lists were what full collections scanned (120 ms pauses, the p99).
    """

    def __init__(self, width: int, span: float = 30.0, bucket: float = 1.0, *, whole: bool = False) -> None:
        """`whole`: only whole numbers are ever added, kept in 2 bytes a cell instead of 8, widened to 4 the first time
        a cell would pass 65,535 (a latency histogram's counts: at 1,000 apps their windows were the largest block of
        memory that traffic made, 7 MB in 4-byte cells)."""
        if span <= 0 or bucket <= 0 or bucket > span:
            raise ValueError("need 0 < bucket <= span")
        self._bucket = bucket
        self._slots = max(1, math.ceil(span / bucket))
        self._width = width
        self._typecode = "H" if whole else "d"
        self._cells: array[Any] | None = None   # slot-major: slot s holds cells [s * width, (s + 1) * width)
        # 1 where a slot holds something: what `_marks` says too, but most slots a quiet window turns past are
        # empty, and this is the quick test of that
        self._filled = bytearray(self._slots)
        self._words = (width + 7) // 8   # bytes of a slot's mark: a bit for each of its cells that holds something
        self._blank = bytes(self._words)
        self._marks = bytearray(self._slots * self._words)
        self._totals = [0.0] * width
        self._epoch: int | None = None

    def add(self, now: float, index: int, amount: float = 1.0) -> None:
        epoch = int(now // self._bucket)
        if epoch != self._epoch:   # most adds land in the bucket of the one before: nothing to roll
            self._roll(now)
        cells = self._cells
        if cells is None:
            cells = self._cells = _zeros(self._typecode, self._slots * self._width)
        slot = epoch % self._slots
        cell = slot * self._width + index
        held = cells[cell]
        if not held:   # the bucket's first in this cell: marked, for `_drop`
            self._filled[slot] = 1
            self._marks[slot * self._words + (index >> 3)] |= 1 << (index & 7)
        try:
            cells[cell] = held + amount
        except OverflowError:   # a cell past what its width holds: widen them all, once
            cells = self._cells = array(WIDER[self._typecode], cells)
            self._typecode = cells.typecode
            cells[cell] = held + amount
        self._totals[index] += amount

    def totals(self, now: float) -> Sequence[float]:
        """The sums over the window ending at `now`."""
        if int(now // self._bucket) != self._epoch:
            self._roll(now)
        return tuple(self._totals)

    def clear(self) -> None:
        self._cells = None
        self._filled = bytearray(self._slots)
        self._marks = bytearray(self._slots * self._words)
        self._totals = [0.0] * self._width

    def _roll(self, now: float) -> None:
        epoch = int(now // self._bucket)
        if self._epoch is None or epoch - self._epoch >= self._slots:
            self.clear()
        elif epoch > self._epoch:
            for stale in range(self._epoch + 1, epoch + 1):
                self._drop(stale % self._slots)
        if self._epoch is None or epoch > self._epoch:
            self._epoch = epoch

    def _drop(self, slot: int) -> None:
        """A slot's counts out of the totals, and the slot blank again: only the cells it marked. A quiet upstream
        rolls its windows on most of its requests (1,000 apps, each called a few times a second), and a latency
        histogram's row is 55 cells, of which a bucket's few latencies fill a few."""
        cells = self._cells
        if not self._filled[slot] or cells is None:
            return
        at = slot * self._words
        marked = int.from_bytes(self._marks[at:at + self._words], "little")
        start, totals = slot * self._width, self._totals
        while marked:
            bit = marked & -marked
            index = bit.bit_length() - 1
            totals[index] -= cells[start + index]
            cells[start + index] = 0
            marked ^= bit
        self._marks[at:at + self._words] = self._blank
        self._filled[slot] = 0


def latency_bounds(low: float = 0.001, high: float = 120.0, factor: float = 1.25) -> tuple[float, ...]:
    """Log-spaced bucket upper bounds: a quantile read from them is within `factor` of the truth."""
    bounds = [low]
    while bounds[-1] < high:
        bounds.append(bounds[-1] * factor)
    return tuple(bounds)


DEFAULT_BOUNDS = latency_bounds()   # one tuple for every histogram (each made its own: 1.7 MB at 1,000 apps)


class LatencyHistogram:
    """Quantiles of latencies seen over a sliding window, from a fixed log-spaced histogram.

    A quantile is reported as the upper bound of its bucket: the conservative side for a timeout.
    """

    def __init__(self, span: float = 30.0, bucket: float = 1.0, bounds: Sequence[float] | None = None) -> None:
        self._bounds = tuple(bounds) if bounds else DEFAULT_BOUNDS
        self._window = SlidingWindow(len(self._bounds) + 1, span, bucket, whole=True)

    def record(self, now: float, seconds: float) -> None:
        self._window.add(now, bisect.bisect_left(self._bounds, seconds), 1)

    def quantile(self, now: float, q: float, at_least: int = 1) -> float | None:
        """The `q` quantile, or None with fewer than `at_least` latencies in the window."""
        counts = self._window.totals(now)
        total = sum(counts)
        if total <= 0 or round(total) < at_least:
            return None
        rank = q * total
        seen = 0.0
        for i, n in enumerate(counts):
            seen += n
            if seen >= rank and n > 0:
                return self._bounds[min(i, len(self._bounds) - 1)]
        return self._bounds[-1]


class DecayingMean:
    """A mean in which each sample's weight decays as exp(-age / tau).

    Weighting by elapsed time rather than by sample count makes the horizon the same at 1 and 1000
    requests per second, and a burst of samples at one instant still counts in full.
    """

    def __init__(self, tau: float) -> None:
        self._tau = tau
        self._weight = 0.0
        self._sum = 0.0
        self._last: float | None = None

    def update(self, now: float, value: float) -> None:
        """Decay what came before to `now` (a `now` earlier than the last one decays nothing), then add `value`."""
        last = self._last
        if last is None or now > last:
            if last is not None:
                factor = math.exp(-(now - last) / self._tau)
                self._weight *= factor
                self._sum *= factor
            self._last = now
        self._weight += 1.0
        self._sum += value

    @property
    def value(self) -> float | None:
        return self._sum / self._weight if self._weight > 0 else None


class DecayingRate:
    """Events per second, each event's weight decaying as exp(-age / tau): a rate estimate that needs
    no buckets and reads the same whether the events came evenly or in bursts of one per second.

    Within the first tau seconds it is corrected for the history it does not have yet (as Adam corrects its
    moments), so 30 events in the first second read as 30 per second, not as the 15 a two-second horizon implies.
    """

    def __init__(self, tau: float) -> None:
        self._tau = tau
        self._sum = 0.0
        self._last = 0.0
        self._first: float | None = None

    def add(self, now: float, count: float = 1.0) -> None:
        if self._first is None:
            self._first = now
        if now > self._last:
            self._sum = self._sum * math.exp((self._last - now) / self._tau) + count
            self._last = now
        else:
            self._sum += count

    def rate(self, now: float) -> float:
        if self._first is None:
            return 0.0
        seen = 1.0 - math.exp(-max(now - self._first, self._tau / 20) / self._tau)
        return self._decayed(now) / self._tau / seen

    def _decayed(self, now: float) -> float:
        return self._sum * math.exp(-max(0.0, now - self._last) / self._tau)
