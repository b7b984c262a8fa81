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
