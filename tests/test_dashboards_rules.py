"""The shipped Prometheus rules: valid for promtool, every alert unit-tested firing and not firing, and every alert
annotated with a summary, a description and a runbook link to a section that exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "dashboards" / "prometheus" / "imsidecar-rules.yaml"
RULE_TESTS = ROOT / "dashboards" / "prometheus" / "imsidecar-rules.test.yaml"
RUNBOOK = ROOT / "docs" / "runbook.md"


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = require_binary("promtool", package="prometheus")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60, cwd=RULES.parent)


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
    # Each severity level of an alert is seen firing, not only the first.
    fired_levels = {(case["alertname"], alert["exp_labels"]["severity"])
                    for case in cases for alert in case.get("exp_alerts") or []}
    assert {(a["alert"], a["labels"]["severity"]) for a in alerts()} <= fired_levels


def test_every_alert_says_what_happened_and_links_its_runbook_section() -> None:
    anchors = {_anchor(heading) for heading in re.findall(r"^## (.+)$", RUNBOOK.read_text(), re.MULTILINE)}
    for alert in alerts():
        annotations, labels = alert["annotations"], alert["labels"]
        assert annotations.get("summary") and annotations.get("description"), alert["alert"]
        assert labels.get("severity") in ("warning", "critical"), alert["alert"]
        assert alert.get("for"), f"{alert['alert']} has no `for:`: one bad scrape would page"
        path, _, anchor = annotations["runbook_url"].partition("#")
        assert path == "docs/runbook.md" and anchor in anchors, f"{alert['alert']}: no runbook section #{anchor}"


def test_the_retry_ratio_alert_has_a_warning_and_a_critical_level() -> None:
    levels = {a["labels"]["severity"]: a for a in alerts() if a["alert"] == "ImsidecarRetryRatioHigh"}
    assert set(levels) == {"warning", "critical"}
    assert _duration(levels["warning"]["for"]) > _duration(levels["critical"]["for"])


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _duration(text: str) -> int:
    value, unit = int(text[:-1]), text[-1]
    return value * {"s": 1, "m": 60, "h": 3600}[unit]
