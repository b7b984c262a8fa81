"""The shipped Prometheus rules: what dashboards/build_rules.py writes, valid for promtool, every alert unit-tested
firing and not firing, the retry and error alerts in the SRE workbook's four burn-rate tiers, and every alert
annotated with a summary, a description and an absolute runbook link to a section that exists."""

from __future__ import annotations

import re
import runpy
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "dashboards" / "prometheus" / "imsidecar-rules.yaml"
RULE_TESTS = ROOT / "dashboards" / "prometheus" / "imsidecar-rules.test.yaml"
RUNBOOK = ROOT / "docs" / "runbook.md"
BUILDER = runpy.run_path(str(ROOT / "dashboards" / "build_rules.py"))
# Alerts whose expression already looks over a window of minutes and that are meant to fire at its first sign:
# the burn-rate tiers (the short window is the debounce, as the workbook has them) and the breaker (an opening is
# a fact the transitions counter records, and the 5-minute window holds the alert through the outage).
WINDOWED = {"ImsidecarRetryRatioHigh", "ImsidecarErrorRatioHigh", "ImsidecarCircuitOpen"}


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = require_binary("promtool", package="prometheus")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120, cwd=RULES.parent)


def test_the_rules_file_is_what_the_generator_writes() -> None:
    current = RULES.read_text()
    rendered = BUILDER["render"](BUILDER["Choices"](), BUILDER["kept_groups"](current))
    assert current == rendered, "run `python dashboards/build_rules.py` and commit the rules"
    assert (ROOT / "dashboards" / "grafana" / "provisioning" / "alerting" / "imsidecar-retry-rate.yaml").read_text() \
        == BUILDER["grafana_alert"](BUILDER["Choices"]())


def test_groups_written_by_hand_below_the_marker_survive_regeneration() -> None:
    events = "  - name: imsidecar-events\n    rules:\n      - alert: X   # by hand\n        expr: vector(1)\n"
    first = BUILDER["render"](BUILDER["Choices"](), events)
    assert BUILDER["kept_groups"](first) == events
    assert yaml.safe_load(first)["groups"][-1]["name"] == "imsidecar-events"


def test_runbook_links_are_absolute_under_a_base_you_choose() -> None:
    for alert in alerts():
        assert alert["annotations"]["runbook_url"].startswith(BUILDER["RUNBOOK_BASE"] + "#"), alert["alert"]
    wiki = BUILDER["render"](BUILDER["Choices"](runbook_base="https://wiki.example.org/sre/imsidecar"))
    links = {r["annotations"]["runbook_url"] for g in yaml.safe_load(wiki)["groups"] for r in g["rules"] if "alert" in r}
    assert links and all(re.fullmatch(r"https://wiki\.example\.org/sre/imsidecar#imsidecar\w+", link) for link in links)


def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_both_firing_and_not_firing() -> None:
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test.get("alert_rule_test", [])]
    fires = {case["alertname"] for case in cases if case.get("exp_alerts")}
    stays_quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    names = {alert["alert"] for alert in alerts()}
    assert names - fires == set(), "alerts never tested firing"
    assert names - stays_quiet == set(), "alerts never tested staying quiet"
    # Each level of an alert is seen firing (each burn-rate tier, by its windows), not only the first.
    fired = {(case["alertname"], alert["exp_labels"]["severity"], alert["exp_labels"].get("long_window"))
             for case in cases for alert in case.get("exp_alerts") or []}
    assert {(a["alert"], a["labels"]["severity"], a["labels"].get("long_window")) for a in alerts()} <= fired


def test_every_alert_says_what_happened_and_links_its_runbook_section() -> None:
    anchors = {_anchor(heading) for heading in re.findall(r"^## (.+)$", RUNBOOK.read_text(), re.MULTILINE)}
    for alert in alerts():
        annotations, labels = alert["annotations"], alert["labels"]
        assert annotations.get("summary") and annotations.get("description"), alert["alert"]
        assert labels.get("severity") in ("warning", "critical"), alert["alert"]
        assert alert.get("for") or alert["alert"] in WINDOWED, f"{alert['alert']} has no `for:`: one bad scrape would page"
        _, _, anchor = annotations["runbook_url"].partition("#")
        assert anchor in anchors, f"{alert['alert']}: no runbook section #{anchor}"


def test_the_retry_and_error_alerts_are_the_workbooks_four_burn_rate_tiers() -> None:
    expected = [("1h", "5m", 14.4, "critical"), ("6h", "30m", 6.0, "critical"), ("1d", "2h", 3.0, "warning"),
                ("3d", "6h", 1.0, "warning")]
    for name in ("ImsidecarRetryRatioHigh", "ImsidecarErrorRatioHigh"):
        tiers = [a for a in alerts() if a["alert"] == name]
        found = []
        for tier in tiers:
            long, short = tier["labels"]["long_window"], tier["labels"]["short_window"]
            thresholds = {float(t) for t in re.findall(r":rate(?:\w+) > ([\d.]+)", tier["expr"])[:2]}
            assert f":rate{long} >" in tier["expr"] and f":rate{short} >" in tier["expr"], tier["expr"]
            assert len(thresholds) == 1 and "for" not in tier, tier["expr"]   # both windows over the same burn
            found.append((long, short, round(thresholds.pop() / 0.001, 6), tier["labels"]["severity"]))
        assert found == expected, name


def test_the_breaker_alert_reads_the_transitions_counter_and_a_window_not_an_instant() -> None:
    circuit = next(a for a in alerts() if a["alert"] == "ImsidecarCircuitOpen")
    assert "imsidecar_circuit_transitions_total" in circuit["expr"] and "max_over_time" in circuit["expr"]
    gauge = circuit["expr"].count("imsidecar_circuit_state")
    assert gauge == circuit["expr"].count("imsidecar_circuit_state[")   # over a window only, never one instant


def test_a_vanished_sidecar_is_noticed() -> None:
    absent = next(a for a in alerts() if a["alert"] == "ImsidecarAbsent")
    assert absent["expr"].strip() == 'absent(up{job="imsidecar"})'


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
