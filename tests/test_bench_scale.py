"""bench.scale's verdicts and wrk parsing, without load."""

from __future__ import annotations

from bench.scale import Startup, Step, flat, startup_verdict, wrk_errors


def steps(*rows: tuple[float, float]) -> list[Step]:
    return [Step(f"row {i}", rps, 10.0, rss, 0) for i, (rps, rss) in enumerate(rows)]


def test_flat_within_ten_percent_and_fifty_megabytes_is_met() -> None:
    lines = flat(steps((2000, 55.0), (1850, 70.0), (1900, 104.9)))
    assert lines[0].startswith("MET") and "7.5% below highest 2,000" in lines[0]
    assert lines[1].startswith("MET") and "+49.9 MB" in lines[1]


def test_a_row_past_either_bound_is_missed() -> None:
    lines = flat(steps((2000, 55.0), (1790, 106.0)))
    assert lines[0].startswith("MISSED") and lines[1].startswith("MISSED")


def test_start_up_is_judged_on_spawn_to_readyz() -> None:
    rows = steps((2000, 55.0), (1000, 130.0))
    rows[-1].startup = Startup(config_s=0.3, listening_s=0.9, ready_s=1.2)
    assert startup_verdict(rows).startswith("MISSED") and "1.200 s from spawn to /readyz" in startup_verdict(rows)
    rows[-1].startup = Startup(config_s=0.3, listening_s=0.8, ready_s=0.95)
    assert startup_verdict(rows).startswith("MET")


def test_wrk_errors_count_socket_errors_and_non_2xx_answers() -> None:
    out = "  Socket errors: connect 3, read 2, write 0, timeout 5\n  Non-2xx or 3xx responses: 7\n"
    assert wrk_errors(out) == 17
    assert wrk_errors("Requests/sec: 100\n") == 0
