"""bench.regression's decision, without load: the median round's CPU-per-request ratio against baseline × 1.2."""

from __future__ import annotations

import json
from pathlib import Path

from bench.regression import BASELINE, Cost, judge, ratio, read_baseline


def rounds(*ratios: float) -> list[tuple[Cost, Cost]]:
    """Rounds where the naive proxy spends 200 µs per request and imsidecar `r` times that."""
    return [(Cost(cpu_s=0.2 * r, requests=1000), Cost(cpu_s=0.2, requests=1000)) for r in ratios]


def test_ratio_is_cpu_per_request_of_imsidecar_over_the_naive_proxys() -> None:
    assert ratio(Cost(3.0, 10_000), Cost(2.0, 20_000)) == 3.0


def test_a_ratio_up_to_twenty_percent_over_the_baseline_passes() -> None:
    verdict = judge(rounds(1.7, 1.8, 2.16), baseline=1.8)
    assert verdict.passed and verdict.ratio == 1.8
    assert judge(rounds(2.16), baseline=1.8).passed


def test_more_than_twenty_percent_over_the_baseline_fails_and_says_so() -> None:
    verdict = judge(rounds(2.2, 2.3, 1.5), baseline=1.8)
    assert not verdict.passed
    assert verdict.line() == ("REGRESSION: imsidecar / naive CPU per request 2.200, baseline 1.800, "
                              "fails above 2.160 (+20%)")


def test_one_disturbed_round_does_not_decide() -> None:
    assert judge(rounds(1.8, 9.0, 1.7), baseline=1.8).passed
    assert not judge(rounds(2.5, 2.6, 1.0), baseline=1.8).passed


def test_a_side_that_served_nothing_or_no_rounds_fails() -> None:
    assert not judge([(Cost(1.0, 0), Cost(1.0, 1000))], baseline=1.8).passed
    assert not judge([(Cost(1.0, 1000), Cost(0.0, 0))], baseline=1.8).passed
    assert not judge([], baseline=1.8).passed


def test_the_committed_baseline_is_read(tmp_path: Path) -> None:
    assert read_baseline(BASELINE) > 0
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps({"ratio": 1.25, "measured": "..."}))
    assert read_baseline(path) == 1.25
