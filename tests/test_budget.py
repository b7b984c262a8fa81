"""The retry budget in virtual time: a share of requests plus a floor, over a sliding window."""

from __future__ import annotations

from proxy.budget import RetryBudget
from proxy.clock import VirtualClock


async def test_retries_are_capped_at_the_ratio_plus_the_floor() -> None:
    clock = VirtualClock()
    budget = RetryBudget(clock, ratio=0.2, min_per_second=0.5, window=10)   # floor: 5 retries per window
    for _ in range(100):
        budget.record_request()
    spent = sum(budget.try_spend() for _ in range(100))
    assert spent == 20 + 5


async def test_retries_waiting_in_backoff_count_against_the_budget() -> None:
    clock = VirtualClock()
    budget = RetryBudget(clock, ratio=0.0, min_per_second=0.3, window=10)   # three retries in flight at most
    assert [budget.try_spend() for _ in range(4)] == [True, True, True, False]   # none has been sent yet


async def test_the_window_slides() -> None:
    clock = VirtualClock()
    budget = RetryBudget(clock, ratio=0.5, min_per_second=0, window=10)
    for _ in range(10):
        budget.record_request()
    assert sum(budget.try_spend() for _ in range(10)) == 5
    await clock.advance(11)
    assert not budget.try_spend()   # old requests no longer fund retries
    for _ in range(4):
        budget.record_request()
    assert sum(budget.try_spend() for _ in range(10)) == 2
