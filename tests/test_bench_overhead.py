"""bench.overhead after the README's plain install: without uvloop it says so and measures what it can."""

from __future__ import annotations

import importlib.util

import pytest

from bench import overhead


def test_without_uvloop_the_uvloop_row_is_left_out_with_a_reason(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else real(name, *a))
    assert overhead.naive_proxies(1, 2) == [("naive aiohttp", 1, [])]
    assert "uvloop is not installed (pip install '.[fast]')" in capsys.readouterr().err


def test_with_uvloop_both_naive_rows_are_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert [name for name, _, _ in overhead.naive_proxies(1, 2)] == ["naive aiohttp", "naive aiohttp + uvloop"]


def row(name: str, rps32: float, p50_c1: float = 0.3, cpu: float | None = 3.0) -> overhead.Row:
    return overhead.Row(name, overhead.Result(1000, p50_c1, 1.0, 5000), overhead.Result(rps32, 5.0, 9.0, 20000), cpu,
                        50.0)


def test_targets_are_judged_against_the_naive_proxy_on_uvloop() -> None:
    rows = {r.name: r for r in [row("direct", 80_000, p50_c1=0.02, cpu=None), row(overhead.NAIVE_UV, 4000, cpu=3.0),
                                row(overhead.SIDECAR, 4200, p50_c1=0.40, cpu=2.9),
                                row(overhead.LOGGED, 3000, cpu=4.0)]}
    lines = overhead.targets(rows)
    assert lines[0].startswith("MET") and "1.05x" in lines[0]
    assert lines[1].startswith("MET") and "2.90 s" in lines[1]
    assert lines[2].startswith("MISSED") and "0.38 ms" in lines[2]
    assert lines[3].startswith("MISSED") and "0.75x" in lines[3] and "≥ 0.85x" in lines[3]


def test_without_the_uvloop_row_the_targets_are_not_judged() -> None:
    rows = {r.name: r for r in [row("direct", 80_000), row(overhead.SIDECAR, 4200)]}
    assert overhead.targets(rows) == [
        "targets: not judged, the naive proxy on uvloop was not measured (pip install '.[fast]')"]
