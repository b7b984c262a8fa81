import gc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.window import DecayingMean, DecayingRate, LatencyHistogram, SlidingWindow


def test_counts_fall_out_of_the_window_as_time_passes():
    window = SlidingWindow(width=2, span=30.0, bucket=1.0)
    window.add(0.5, 0)
    window.add(10.2, 1, 3.0)
    assert window.totals(10.5) == (1.0, 3.0)
    assert window.totals(30.9) == (0.0, 3.0)  # the bucket of t=0.5 has left the last 30 s
    assert window.totals(100.0) == (0.0, 0.0)


def test_a_long_silence_clears_the_window_at_once():
    window = SlidingWindow(width=1, span=5.0, bucket=1.0)
    for t in range(5):
        window.add(float(t), 0)
    assert window.totals(4.0) == (5.0,)
    assert window.totals(1_000_000.0) == (0.0,)


def test_quantiles_are_within_a_bucket_of_the_truth_and_never_below_it():
    histogram = LatencyHistogram(span=30.0)
    for i in range(1, 101):
        histogram.record(1.0, i / 1000)  # 1 ms .. 100 ms, uniformly
    p50, p99 = histogram.quantile(1.0, 0.5), histogram.quantile(1.0, 0.99)
    assert p50 is not None and 0.050 <= p50 <= 0.050 * 1.25
    assert p99 is not None and 0.099 <= p99 <= 0.099 * 1.25
    assert histogram.quantile(40.0, 0.5) is None


def test_decaying_mean_forgets_old_samples_by_time_not_by_count():
    mean = DecayingMean(tau=5.0)
    for _ in range(1000):
        mean.update(0.0, 0.05)
    mean.update(50.0, 1.0)  # ten horizons later the thousand old samples weigh less than one new one
    assert mean.value is not None and mean.value > 0.8


def test_decaying_rate_reads_a_bursty_and_an_even_stream_alike():
    even, bursty = DecayingRate(tau=2.0), DecayingRate(tau=2.0)
    for tick in range(600):  # one minute of 20/s, evenly or as 20 at the top of each second
        even.add(tick / 10, 2)
        if tick % 10 == 0:
            bursty.add(tick / 10, 20)
    assert even.rate(60.0) == pytest.approx(20, rel=0.1)
    assert bursty.rate(60.0) == pytest.approx(20, rel=0.25)
    assert even.rate(70.0) < 0.2  # and forgets a stream that stopped


def test_an_idle_window_holds_no_cells_and_buckets_fall_out_as_time_moves() -> None:
    window = SlidingWindow(3, span=10.0, bucket=1.0)
    assert window._cells is None   # an idle window holds nothing
    window.add(0.5, 0)
    window.add(3.5, 2, 2.0)
    assert sum(window._filled) == 2 and tuple(window.totals(4.0)) == (1.0, 0.0, 2.0)
    assert tuple(window.totals(10.7)) == (0.0, 0.0, 2.0) and sum(window._filled) == 1   # bucket 0 fell out
    assert tuple(window.totals(30.0)) == (0.0, 0.0, 0.0) and window._cells is None      # all of it did


def test_a_turning_window_makes_no_objects_for_the_cyclic_collector() -> None:
    """Rows made per bucket were lists that lived for the window's span: at 1,000 busy apps, what full
    collections scanned. Adding across hundreds of buckets now makes no tracked object after the first add."""
    window = SlidingWindow(57, span=30.0, bucket=1.0)
    window.add(0.0, 0)
    gc.disable()
    try:
        before = len(gc.get_objects())
        for tick in range(3000):
            window.add(tick / 10, tick % 57, 0.5)
        assert len(gc.get_objects()) - before <= 2
    finally:
        gc.enable()
    assert sum(window.totals(299.95)) == pytest.approx(0.5 * 300)   # the last 30 s: 300 adds of 0.5


def test_a_whole_number_window_counts_like_a_float_one_in_a_quarter_of_the_memory() -> None:
    floats, whole = SlidingWindow(4, span=10.0, bucket=1.0), SlidingWindow(4, span=10.0, bucket=1.0, whole=True)
    for tick in range(200):
        floats.add(tick / 7, tick % 4, 1)
        whole.add(tick / 7, tick % 4, 1)
        assert whole.totals(tick / 7) == floats.totals(tick / 7)
    assert whole._cells is not None and floats._cells is not None
    assert whole._cells.itemsize * 4 == floats._cells.itemsize


def test_a_whole_number_cell_past_two_bytes_widens_the_window_and_loses_nothing() -> None:
    window = SlidingWindow(3, span=4.0, bucket=1.0, whole=True)
    window.add(0.5, 1, 65_535)
    window.add(0.5, 2, 7)
    window.add(1.5, 1, 3)
    window.add(0.6, 1, 1)   # the cell holding 65,535 passes what 2 bytes hold
    assert window.totals(1.5) == (0.0, 65_539.0, 7.0)
    assert window._cells is not None and window._cells.itemsize == 4
    window.add(2.5, 1, 2**32)   # and past 4 bytes
    assert window.totals(3.9) == (0.0, 65_539.0 + 2**32, 7.0)
    assert window.totals(4.5) == (0.0, 3.0 + 2**32, 0.0)   # the first second's cells fell out, exactly
    window.add(60.0, 2, 5)   # a long silence cleared it: the next add makes cells of the width it had reached
    assert window.totals(60.0) == (0.0, 0.0, 5.0) and window._cells is not None and window._cells.itemsize == 8


@settings(max_examples=200, deadline=None)
@given(whole=st.booleans(), width=st.sampled_from([5, 8, 9, 57]),   # a bucket's mark: one byte, or several
       steps=st.lists(st.tuples(st.floats(0, 12), st.integers(0, 56), st.integers(1, 40_000)), max_size=60))
def test_totals_are_the_sum_of_what_was_added_in_the_buckets_still_in_the_window(
        whole: bool, width: int, steps: list[tuple[float, int, int]]) -> None:
    window, now, added = SlidingWindow(width, span=10.0, bucket=2.0, whole=whole), 0.0, []
    for advance, drawn, amount in steps:
        now, value, index = now + advance, amount if whole else amount / 7, drawn % width
        epoch = int(now // 2.0)
        window.add(now, index, value)
        added.append((epoch, index, value))
        expected = [sum(a for e, i, a in added if i == column and epoch - 5 < e <= epoch) for column in range(width)]
        assert window.totals(now) == pytest.approx(expected, abs=1e-6)
