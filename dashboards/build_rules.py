"""Writes dashboards/prometheus/imsidecar-rules.yaml and its Grafana-managed copy of the fast retry page.

Run `python dashboards/build_rules.py [--runbook-base URL] [--retry-objective 0.999] [--error-objective 0.999]`, then
`python deploy/kubernetes/sync_prometheusrule.py`; a test fails when the committed files are not what the defaults
write. Owns the rules' PromQL, windows, thresholds and wording; what each alert asks of the on-call is
docs/runbook.md's. Groups after the END_OF_GENERATED line of the rules file are kept as they are (rules of other
subsystems, such as events, written by hand).

The retry and error alerts are multi-window, multi-burn-rate alerts as in the Google SRE workbook ("Alerting on
SLOs", table 5-8 and its Sloth/Pyrra descendants): each tier fires while the budget burns faster than its rate over
a long window AND a short one (the short window makes it resolve minutes after the burn stops), no `for:` needed.
With the default 99.9% objectives (a budget of 0.1% retries per request), a sustained 20% retry ratio burns 200x:
the 1h/5m page fires after 1 h x 14.4 / 200 = 4.3 minutes; 2% burns 20x and pages after 43 minutes.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent
RULES = ROOT / "prometheus" / "imsidecar-rules.yaml"
GRAFANA_ALERT = ROOT / "grafana" / "provisioning" / "alerting" / "imsidecar-retry-rate.yaml"
END_OF_GENERATED = "  # END_OF_GENERATED: groups below this line are kept by build_rules.py as they are."
# Where docs/runbook.md is published for your on-call: every alert links `<base>#<alertname in lower case>`.
# Like the image registry in deploy/, set it to your own (a wiki page, the repository's file view).
RUNBOOK_BASE = "https://runbooks.example.com/imsidecar/runbook.md"
TRAFFIC_FLOOR = 0.1   # requests/s over the long window; below it one retry of a quiet app is not a burn
WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")


@dataclass(frozen=True)
class Tier:
    long: str
    short: str
    burn: float
    severity: str
    means: str


# The workbook's four tiers: 2% of a 30-day budget in 1 h or 5% in 6 h page; 10% in 1 d or 3 d open a ticket.
TIERS = (
    Tier("1h", "5m", 14.4, "critical", "fast burn"),
    Tier("6h", "30m", 6.0, "critical", "sustained burn"),
    Tier("1d", "2h", 3.0, "warning", "slow burn"),
    Tier("3d", "6h", 1.0, "warning", "steady burn"),
)


@dataclass(frozen=True)
class Choices:
    runbook_base: str = RUNBOOK_BASE
    retry_objective: float = 0.999
    error_objective: float = 0.999

    def runbook(self, alert: str) -> str:
        return f"{self.runbook_base}#{alert.lower()}"


def by(expr: str, labels: str = "app, upstream") -> str:
    return f"sum by ({labels}) ({expr})"


def ratio(numerator: str, denominator: str, labels: str = "app, upstream") -> str:
    """numerator / denominator, reading 0 (not nothing) while the numerator has no series yet."""
    return f"(\n  {by(numerator, labels)}\n  or {by(denominator, labels)} * 0\n)\n  / {by(denominator, labels)}\n"


# Recording rules -------------------------------------------------------------------------------------------------

ERRORS = 'imsidecar_requests_total{outcome=~"throttled|platform_error|sidecar_error"}'
VALID = 'imsidecar_requests_total{outcome!="client_error"}'


def window_rules(w: str) -> list[dict[str, str]]:
    """The rates and ratios of one window, for the burn-rate tiers and the dashboard."""
    return [
        {"record": f"app_upstream:imsidecar_requests:rate{w}", "expr": by(f"rate(imsidecar_requests_total[{w}])")},
        {"record": f"app_upstream:imsidecar_retries:rate{w}", "expr": by(f"rate(imsidecar_retries_total[{w}])")},
        {"record": f"app_upstream:imsidecar_retry_ratio:rate{w}",
         "expr": ratio(f"rate(imsidecar_retries_total[{w}])", f"rate(imsidecar_requests_total[{w}])")},
        {"record": f"app_upstream:imsidecar_error_ratio:rate{w}",
         "expr": ratio(f"rate({ERRORS}[{w}])", f"rate({VALID}[{w}])")},
    ]


def recording() -> list[tuple[str, dict[str, str]]]:
    rules: list[tuple[str, dict[str, str]]] = [
        ("Effective (what clients asked for) and actual (what the platform received) request rates.",
         {"record": "app_upstream:imsidecar_upstream_attempts:rate5m",
          "expr": by("rate(imsidecar_upstream_attempts_total[5m])")}),
        ("", {"record": "app_upstream:imsidecar_attempts_per_request:rate5m",
              "expr": f"{by('rate(imsidecar_upstream_attempts_total[5m])')}\n  / {by('rate(imsidecar_requests_total[5m])')}\n"}),
        ("", {"record": "app_upstream:imsidecar_request_duration_seconds:p99_5m",
              "expr": "histogram_quantile(0.99, sum by (app, upstream, le) "
                      "(rate(imsidecar_request_duration_seconds_bucket[5m])))"}),
        ("", {"record": "app_upstream:imsidecar_retry_budget_exhausted:rate5m",
              "expr": by("rate(imsidecar_retry_budget_exhausted_total[5m])")}),
        ("Notifications not delivered: failures less those a re-send recovered (Alertmanager retries 5xx).",
         {"record": "target:imsidecar_robot_failure_ratio:rate5m", "expr": ROBOT_FAILURE_RATIO}),
    ]
    for i, w in enumerate(WINDOWS):
        note = ("Per window: request and retry rates, retries per request (the quantity the retry budget caps), and "
                "the error ratio: throttled, platform and sidecar errors among requests that were not the "
                "caller's own mistake (client_error).") if i == 0 else ""
        rules += [(note if j == 0 else "", rule) for j, rule in enumerate(window_rules(w))]
    return rules


ROBOT_FAILURE_RATIO = """clamp_min(
  (
    sum by (target) (rate(imsidecar_robot_messages_total{result!="delivered"}[5m]))
    - (sum by (target) (rate(imsidecar_robot_resends_total{result="delivered"}[5m]))
       or sum by (target) (rate(imsidecar_robot_messages_total[5m])) * 0)
  )
    / sum by (target) (rate(imsidecar_robot_messages_total[5m])),
  0
)
"""


# Alerts ----------------------------------------------------------------------------------------------------------

def burn_alert(name: str, ratio_rule: str, objective: float, tier: Tier, what: str, c: Choices) -> dict[str, Any]:
    threshold = round(tier.burn * (1 - objective), 6)
    expr = (f"app_upstream:{ratio_rule}:rate{tier.long} > {threshold:g}\n"
            f"  and on (app, upstream) app_upstream:{ratio_rule}:rate{tier.short} > {threshold:g}\n"
            f"  and on (app, upstream) app_upstream:imsidecar_requests:rate{tier.long} > {TRAFFIC_FLOOR:g}\n")
    budget = f"{(1 - objective) * 100:g}%"
    return {
        "alert": name, "expr": expr,
        "labels": {"severity": tier.severity, "long_window": tier.long, "short_window": tier.short},
        "annotations": {
            "summary": f"imsidecar {{{{ $labels.app }}}}/{{{{ $labels.upstream }}}}: {what} at {{{{ $value | "
                       f"humanizePercentage }}}} over {tier.long} ({tier.means})",
            "description": f"{what.capitalize()} of app {{{{ $labels.app }}}} to {{{{ $labels.upstream }}}} is "
                           f"{{{{ $value | humanizePercentage }}}} over the last {tier.long} and still above "
                           f"{threshold * 100:g}% over the last {tier.short}: {tier.burn:g}x the {budget} budget.",
            "runbook_url": c.runbook(name),
        },
    }


def alerts(c: Choices) -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    for i, tier in enumerate(TIERS):
        note = ("Retries per request burning the retry budget (1 - retry objective): each tier over a long and a short "
                "window, the workbook's way. Pages within 5 minutes at 20%, within an hour above 1.44%.") if i == 0 else ""
        found.append((note, burn_alert("ImsidecarRetryRatioHigh", "imsidecar_retry_ratio", c.retry_objective, tier,
                                       "retries per request", c)))
    for i, tier in enumerate(TIERS):
        note = "Requests that failed after retries (throttled, platform or sidecar error), the same way." if i == 0 else ""
        found.append((note, burn_alert("ImsidecarErrorRatioHigh", "imsidecar_error_ratio", c.error_objective, tier,
                                       "the error ratio", c)))
    return found + [(note, {**rule, "annotations": {**rule["annotations"], "runbook_url": c.runbook(rule["alert"])}})
                    for note, rule in OTHER_ALERTS]


def alert(name: str, expr: str, severity: str, summary: str, description: str, for_: str | None) -> dict[str, Any]:
    rule: dict[str, Any] = {"alert": name, "expr": expr}
    if for_:
        rule["for"] = for_
    rule["labels"] = {"severity": severity}
    rule["annotations"] = {"summary": summary, "description": description}
    return rule


OTHER_ALERTS: list[tuple[str, dict[str, Any]]] = [
    ("Retries the budget refused, for 5 minutes: clients see failures a retry could have fixed.",
     alert("ImsidecarRetryBudgetExhausted", "app_upstream:imsidecar_retry_budget_exhausted:rate5m > 0\n", "warning",
           "imsidecar {{ $labels.app }}/{{ $labels.upstream }}: retry budget exhausted",
           "{{ $value | humanize }} retries per second to {{ $labels.upstream }} for app {{ $labels.app }} were not "
           "sent because the retry budget was spent; clients got failures a retry might have fixed.", "5m")),
    ("One outage, one alert: the breaker opened within the last 5 minutes (a scrape saw it open, or the transitions "
     "counter moved between scrapes). Open and half-open alternate every few seconds while probes fail; a gauge "
     "tested instant by instant fired 4-6 times per outage.",
     alert("ImsidecarCircuitOpen",
           "max by (app, upstream) (max_over_time(imsidecar_circuit_state[5m])) == 2\n"
           "  or sum by (app, upstream) (increase(imsidecar_circuit_transitions_total{state=\"open\"}[5m])) > 0\n",
           "critical", "imsidecar {{ $labels.app }}/{{ $labels.upstream }}: circuit open",
           "The circuit breaker for {{ $labels.upstream }} of app {{ $labels.app }} opened in the last 5 minutes: "
           "the sidecar answers 503 (CircuitOpen) without calling the platform, and probes it every few seconds. "
           "This alert resolves 5 minutes after the last re-opening.", None)),
    ("Refreshes fail and none succeeded: the token will expire once the held one runs out.",
     alert("ImsidecarTokenRefreshFailing",
           'sum by (app, kind) (increase(imsidecar_token_refreshes_total{result!="success"}[10m])) > 0\n'
           '  unless on (app, kind) sum by (app, kind) (increase(imsidecar_token_refreshes_total{result="success"}'
           '[10m])) > 0\n', "warning", "imsidecar {{ $labels.app }}: {{ $labels.kind }} token refresh failing",
           "Every {{ $labels.kind }} token fetch for app {{ $labels.app }} in the last 10 minutes failed "
           "({{ $value | humanize }} failures). A `rejected` result means the platform refused the credentials.",
           "5m")),
    ("Healthy tokens never fall below ~9 minutes (refresh_margin 10m); under 5 with no successful refresh means "
     "requests will soon fail with 503 TokenUnavailable.",
     alert("ImsidecarTokenExpiringWithoutRefresh",
           "min by (app, kind) (imsidecar_token_expiry_seconds) < 300\n"
           '  unless on (app, kind) sum by (app, kind) (increase(imsidecar_token_refreshes_total{result="success"}'
           '[10m])) > 0\n', "critical",
           "imsidecar {{ $labels.app }}: {{ $labels.kind }} token expires in {{ $value | humanizeDuration }}",
           "The {{ $labels.kind }} token of app {{ $labels.app }} expires in {{ $value | humanizeDuration }} (0: none "
           "held) and no refresh succeeded in the last 10 minutes.", "1m")),
    ("",
     alert("ImsidecarLatencyHigh", "app_upstream:imsidecar_request_duration_seconds:p99_5m > 5\n", "warning",
           "imsidecar {{ $labels.app }}/{{ $labels.upstream }}: p99 latency {{ $value | humanizeDuration }}",
           "The 99th percentile end-to-end time of requests to {{ $labels.upstream }} for app {{ $labels.app }} is "
           "{{ $value | humanizeDuration }} (warning above 5 s for 10 minutes), waits and retries included.", "10m")),
    ("A sidecar Prometheus knows but cannot scrape.",
     alert("ImsidecarDown", 'up{job="imsidecar"} == 0\n', "critical", "imsidecar {{ $labels.instance }} is down",
           "Prometheus has not been able to scrape the sidecar at {{ $labels.instance }} for a minute; the "
           "applications in that pod cannot reach the platforms.", "1m")),
    ("No sidecar at all: every target of the job is gone (pods deleted, the PodMonitor no longer selects them, a "
     "renamed job). ImsidecarDown cannot fire for targets Prometheus no longer has.",
     alert("ImsidecarAbsent", 'absent(up{job="imsidecar"})\n', "critical",
           "imsidecar: no sidecar is being scraped",
           "Prometheus has had no target in job imsidecar for 5 minutes, so none of the other imsidecar alerts can "
           "fire. Check that the pods run and that the PodMonitor (or scrape config) still selects them.", "5m")),
    ("Notifications lost, not re-sends: a notification Alertmanager re-sent and got through counts as recovered.",
     alert("ImsidecarRobotDeliveryFailing",
           "target:imsidecar_robot_failure_ratio:rate5m > 0.1\n"
           "  and on (target) sum by (target) (rate(imsidecar_robot_messages_total[5m])) > 0\n", "warning",
           "imsidecar robot {{ $labels.target }}: {{ $value | humanizePercentage }} of notifications not delivered",
           "{{ $value | humanizePercentage }} of the messages and alert notifications for robot target "
           "{{ $labels.target }} over the last 5 minutes were not delivered, re-sends that got through deducted "
           "(warning above 10% for 5 minutes).", "5m")),
]


# The platforms' monthly call allowances (docs/quota.md): a group of its own, per quota account, not per app.
QUOTA_ALERTS: list[tuple[str, dict[str, Any]]] = [
    ("At this month's pace the allowance runs out before the month does. A month's first hours are a guess at its "
     "pace (the projection measures at least an hour), hence an hour of `for`.",
     alert("ImsidecarQuotaProjectedOverAllowance",
           "max by (account) (imsidecar_quota_projected_calls)\n"
           "  > max by (account) (imsidecar_quota_allowance_calls > 0)\n", "warning",
           "imsidecar quota {{ $labels.account }}: on course for {{ $value | humanize }} calls this month, over its "
           "allowance",
           "At this month's pace so far account {{ $labels.account }} makes {{ $value | humanize }} metered calls by "
           "the end of the month (Asia/Shanghai), more than its configured allowance. Past the allowance the platform "
           "refuses metered calls until the 1st (Feishu 99991403, DingTalk 90020).", "60m")),
    ("Nine tenths of the month's allowance used (Feishu warns at 90% too).",
     alert("ImsidecarQuotaNearlySpent",
           "max by (account) (imsidecar_quota_used_calls)\n"
           "  / max by (account) (imsidecar_quota_allowance_calls > 0) >= 0.9\n", "critical",
           "imsidecar quota {{ $labels.account }}: {{ $value | humanizePercentage }} of the month's allowance used",
           "Account {{ $labels.account }} has used {{ $value | humanizePercentage }} of its monthly allowance of "
           "metered calls (critical from 90% for 5 minutes). When it is spent the platform refuses metered calls "
           "until the month turns (Asia/Shanghai).", "5m")),
]


def quota_alerts(c: Choices) -> list[tuple[str, dict[str, Any]]]:
    return [(note, {**rule, "annotations": {**rule["annotations"], "runbook_url": c.runbook(rule["alert"])}})
            for note, rule in QUOTA_ALERTS]


# Writing ---------------------------------------------------------------------------------------------------------

class _Literal(str):
    """A multi-line string written as a YAML block (`|`), as a person writes PromQL."""


def _represent(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(str, _represent)


def rule_text(note: str, rule: dict[str, Any]) -> str:
    body = yaml.dump([rule], Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=4096)
    lines = [f"      {line}" if line else line for line in body.rstrip("\n").split("\n")]
    comments = [f"      # {part}" for part in _wrap(note)] if note else []
    return "\n".join([*comments, *lines]) + "\n"


def _wrap(text: str, width: int = 110) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line]


HEADER = """\
# Prometheus rules for imsidecar, written by dashboards/build_rules.py (edit that, not this; hand-written groups of
# other subsystems go below END_OF_GENERATED). Load with `rule_files: [imsidecar-rules.yaml]`; unit tests:
# `promtool test rules imsidecar-rules.test.yaml`. The scrape job is expected to be `imsidecar`.
# Objectives: retries {retry:g}% of requests, errors {error:g}% of requests; runbook: {base}
groups:
"""


def render(c: Choices, kept: str = "") -> str:
    text = HEADER.format(retry=(1 - c.retry_objective) * 100, error=(1 - c.error_objective) * 100,
                         base=c.runbook_base)
    text += "  - name: imsidecar-recording\n    rules:\n" + "".join(rule_text(n, r) for n, r in recording())
    text += "\n  - name: imsidecar-alerts\n    rules:\n" + "".join(rule_text(n, r) for n, r in alerts(c))
    text += "\n  - name: imsidecar-quota\n    rules:\n" + "".join(rule_text(n, r) for n, r in quota_alerts(c))
    return text + "\n" + END_OF_GENERATED + "\n" + kept


def kept_groups(current: str) -> str:
    """What follows END_OF_GENERATED in the file as it is (other subsystems' groups), verbatim."""
    _, marker, rest = current.partition(END_OF_GENERATED + "\n")
    return rest if marker else ""


# The Grafana-managed copy of the fast page, for teams that alert in Grafana: the same PromQL without recording rules.

def grafana_alert(c: Choices) -> str:
    tier = TIERS[0]
    threshold = round(tier.burn * (1 - c.retry_objective), 6)
    retry = lambda w: ratio(f"rate(imsidecar_retries_total[{w}])", f"rate(imsidecar_requests_total[{w}])")  # noqa: E731
    expr = (f"({retry(tier.long).strip()}) > {threshold:g}\nand on (app, upstream) ({retry(tier.short).strip()}) > "
            f"{threshold:g}\nand on (app, upstream) {by(f'rate(imsidecar_requests_total[{tier.long}])')} > "
            f"{TRAFFIC_FLOOR:g}")
    return GRAFANA_TEMPLATE.format(expr=_indent(expr, 16), threshold=f"{threshold:g}", long=tier.long,
                                   short=tier.short, runbook=c.runbook("ImsidecarRetryRatioHigh"))


def _indent(text: str, spaces: int) -> str:
    return "\n".join(" " * spaces + line for line in text.split("\n"))


GRAFANA_TEMPLATE = """\
# ImsidecarRetryRatioHigh's fast-burn page ({long}/{short}) as a Grafana-managed alert rule, for teams that alert in
# Grafana rather than Prometheus. Written by dashboards/build_rules.py with the same expression and threshold as
# dashboards/prometheus/imsidecar-rules.yaml, in full so it needs no recording rule. File-provisioned, apiVersion 1.
apiVersion: 1
groups:
  - orgId: 1
    name: imsidecar
    folder: imsidecar
    interval: 1m
    rules:
      - uid: imsidecar-retry-ratio-high
        title: ImsidecarRetryRatioHigh
        condition: C
        data:
          - refId: A
            relativeTimeRange:
              from: 600
              to: 0
            datasourceUid: imsidecar-prometheus
            model:
              refId: A
              instant: true
              range: false
              intervalMs: 1000
              maxDataPoints: 43200
              # The {long} retry ratio where it and the {short} one are above the threshold (and traffic above
              # the floor): a series here is a burn.
              expr: >-
{expr}
          - refId: B
            datasourceUid: __expr__
            model:
              refId: B
              type: reduce
              expression: A
              reducer: last
              settings:
                mode: dropNN
          - refId: C
            datasourceUid: __expr__
            model:
              refId: C
              type: threshold
              expression: B
              conditions:
                - evaluator:
                    type: gt
                    params: [{threshold}]
        for: 0s
        noDataState: OK
        execErrState: Error
        isPaused: false
        labels:
          severity: critical
          long_window: {long}
          short_window: {short}
        annotations:
          summary: "imsidecar {{{{ $labels.app }}}}/{{{{ $labels.upstream }}}}: retries per request at {{{{ humanizePercentage $values.B.Value }}}} over {long}"
          description: >-
            The sidecar sent {{{{ humanizePercentage $values.B.Value }}}} retries per client request to
            {{{{ $labels.upstream }}}} for app {{{{ $labels.app }}}} over the last {long}, and above {threshold} over
            the last {short}: the retry budget burns fast.
          runbook_url: {runbook}
          __dashboardUid__: imsidecar
          __panelId__: "3"
"""


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runbook-base", default=RUNBOOK_BASE, help="absolute URL of the published runbook")
    parser.add_argument("--retry-objective", type=float, default=0.999)
    parser.add_argument("--error-objective", type=float, default=0.999)
    args = parser.parse_args(argv)
    if not args.runbook_base.startswith(("https://", "http://")):
        parser.error("--runbook-base must be an absolute http(s) URL")
    c = Choices(args.runbook_base.rstrip("#"), args.retry_objective, args.error_objective)
    RULES.write_text(render(c, kept_groups(RULES.read_text() if RULES.exists() else "")))
    GRAFANA_ALERT.write_text(grafana_alert(c))
    print(f"wrote {RULES.relative_to(ROOT.parent)} and {GRAFANA_ALERT.relative_to(ROOT.parent)}")


if __name__ == "__main__":
    main(sys.argv[1:])
