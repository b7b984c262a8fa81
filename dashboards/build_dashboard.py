"""Writes dashboards/imsidecar.json, the Grafana dashboard: RED first, then retries, tokens, resilience, limiter,
robots and events. Run `python dashboards/build_dashboard.py` after editing; a test fails when the JSON is stale.

Owns the panels and their PromQL; what each metric means is docs/metrics.md's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "imsidecar.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'app=~"$app"'
SEL_ROUTE = 'app=~"$app", route=~"$route"'
W = "$__rate_interval"

Panel = dict[str, Any]


def target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "range": True, "refId": ref}


def panel(title: str, description: str, queries: list[tuple[str, str]], unit: str = "short", kind: str = "timeseries",
          width: int = 8, **extra: Any) -> Panel:
    p: Panel = {
        "type": kind, "title": title, "description": description, "datasource": DS,
        "targets": [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(queries)],
        "fieldConfig": {"defaults": {"unit": unit, **extra.pop("defaults", {})}, "overrides": extra.pop("overrides", [])},
        "gridPos": {"h": 8, "w": width},
    }
    if kind == "timeseries":
        p["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}}
    p.update(extra)
    return p


def ratio(numerator: str, denominator: str, by: str) -> str:
    """numerator / denominator, reading 0 (not no data) while the numerator has no series yet."""
    return f"(sum by ({by}) ({numerator}) or sum by ({by}) ({denominator}) * 0) / sum by ({by}) ({denominator})"


def quantile(q: float, bucket: str, by: str) -> str:
    return f"histogram_quantile({q}, sum by ({by}, le) (rate({bucket}[{W}])))"


def thresholds(*steps: tuple[float | None, str]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"value": v, "color": c} for v, c in steps]}


def red() -> list[Panel]:
    requests = f"rate(imsidecar_requests_total{{{SEL_ROUTE}}}[{W}])"
    return [
        panel("Request rate: effective vs actual",
              "Effective: client requests answered. Actual: attempts sent to the platform. The gap is retries and "
              "token replays, the load the sidecar adds.",
              [(f"sum by (app) ({requests})", "{{app}} effective"),
               (f"sum by (app) (rate(imsidecar_upstream_attempts_total{{{SEL_ROUTE}}}[{W}]))", "{{app}} actual")],
              "reqps"),
        panel("Error ratio (5xx)", "Share of client requests answered 5xx, after retries. 4xx (the caller's) are in "
              "Requests by outcome.",
              [(ratio(f'rate(imsidecar_requests_total{{{SEL_ROUTE}, status_class="5xx"}}[{W}])', requests, "app"),
                "{{app}}")],
              "percentunit", defaults={"thresholds": thresholds((None, "green"), (0.05, "red")),
                                       "custom": {"thresholdsStyle": {"mode": "line"}}}),
        panel("Latency p50 / p95 / p99", "End-to-end time of client requests: limiter waits, attempts and back-offs.",
              [(quantile(q, f"imsidecar_request_duration_seconds_bucket{{{SEL_ROUTE}}}", "app"), f"{{{{app}}}} p{n}")
               for q, n in ((0.5, 50), (0.95, 95), (0.99, 99))], "s"),
        panel("Requests by outcome", "ok, platform_error (the platform's own answer, status >= 400), or the "
              "sidecar's own error kind (X-Imsidecar-Error).",
              [(f"sum by (outcome, status_class) ({requests})", "{{outcome}} {{status_class}}")], "reqps",
              defaults={"custom": {"stacking": {"mode": "normal"}, "fillOpacity": 30}}),
        panel("Attempt latency p99", "Time of one attempt to the platform, as the platform answers.",
              [(quantile(0.99, f"imsidecar_upstream_attempt_duration_seconds_bucket{{{SEL}}}", "app, upstream"),
                "{{app}}/{{upstream}} p99")], "s"),
        panel("In-flight requests", "Client requests being handled now.",
              [(f"sum by (app) (imsidecar_in_flight_requests{{{SEL}}})", "{{app}}")]),
    ]


def retries() -> list[Panel]:
    requests = f"rate(imsidecar_requests_total{{{SEL}}}[{W}])"
    return [
        panel("Retries by reason", "Retries sent, by why the previous attempt failed.",
              [(f"sum by (app, reason) (rate(imsidecar_retries_total{{{SEL}}}[{W}]))", "{{app}} {{reason}}")],
              "reqps"),
        panel("Retry ratio", "Retries per client request: what the retry budget caps (20% by default). "
              "Alerts: warning above 10%, critical above 25%.",
              [(ratio(f"rate(imsidecar_retries_total{{{SEL}}}[{W}])", requests, "app, upstream"),
                "{{app}}/{{upstream}}")],
              "percentunit", defaults={"thresholds": thresholds((None, "green"), (0.1, "orange"), (0.25, "red")),
                                       "custom": {"thresholdsStyle": {"mode": "line"}}}),
        panel("Budget exhausted and deadline exceeded", "Retries not sent: the retry budget was spent, or the "
              "request's deadline had no room for another attempt.",
              [(f"sum by (app, upstream) (rate(imsidecar_retry_budget_exhausted_total{{{SEL}}}[{W}]))",
                "{{app}}/{{upstream}} budget exhausted"),
               (f"sum by (app, upstream) (rate(imsidecar_deadline_exceeded_total{{{SEL}}}[{W}]))",
                "{{app}}/{{upstream}} deadline exceeded")], "reqps"),
        panel("Retries withheld", "Retryable failures not retried, by why: attempts, unsafe, body_too_large, "
              "retry_after_too_long, deadline, budget.",
              [(f"sum by (app, why) (rate(imsidecar_retries_withheld_total{{{SEL}}}[{W}]))", "{{app}} {{why}}")],
              "reqps"),
        panel("Attempts by outcome", "Every attempt to the platform, by its classification.",
              [(f"sum by (outcome, reason) (rate(imsidecar_upstream_attempts_total{{{SEL_ROUTE}}}[{W}]))",
                "{{outcome}} {{reason}}")], "reqps", defaults={"custom": {"stacking": {"mode": "normal"},
                                                                         "fillOpacity": 30}}),
        panel("Idempotency keys added", "client_token / uuid the sidecar added to POSTs, making them safe to retry.",
              [(f"sum by (app, route) (rate(imsidecar_idempotency_keys_added_total{{{SEL_ROUTE}}}[{W}]))",
                "{{app}} {{route}}")], "reqps"),
    ]


def tokens() -> list[Panel]:
    return [
        panel("Token refreshes", "Token fetches from the platform, by result: success, failure (transient), "
              "rejected (the platform refused the credentials).",
              [(f"sum by (app, kind, result) (increase(imsidecar_token_refreshes_total{{{SEL}}}[{W}]))",
                "{{app}} {{kind}} {{result}}")], "short", kind="timeseries",
              defaults={"custom": {"drawStyle": "bars"}}),
        panel("Token time to expiry", "Seconds until the held token expires (0: none). Alert under 5 minutes "
              "without a successful refresh.",
              [(f"min by (app, kind) (imsidecar_token_expiry_seconds{{{SEL}}})", "{{app}} {{kind}}")], "s",
              defaults={"min": 0, "thresholds": thresholds((None, "red"), (300, "orange"), (540, "green")),
                        "custom": {"thresholdsStyle": {"mode": "line"}}}),
        panel("Token replays and token endpoint answers", "Replays: requests sent again with a fresh token after "
              "the platform said the token was invalid. Answers: official SDKs' token calls answered from cache.",
              [(f"sum by (app) (rate(imsidecar_token_replays_total{{{SEL}}}[{W}]))", "{{app}} replays"),
               (f"sum by (app) (rate(imsidecar_token_endpoint_answers_total{{{SEL}}}[{W}]))",
                "{{app}} token endpoint answers")], "reqps"),
    ]


CIRCUIT_MAPPINGS = [{"type": "value", "options": {
    "0": {"text": "closed", "color": "green", "index": 0},
    "1": {"text": "half-open", "color": "yellow", "index": 1},
    "2": {"text": "open", "color": "red", "index": 2}}}]


def resilience() -> list[Panel]:
    def adaptive(name: str) -> str:
        return f"max by (app, upstream) (imsidecar_adaptive_{name}{{{SEL}}})"

    return [
        panel("Circuit state", "0 closed, 1 half-open, 2 open (the sidecar answers 503 CircuitOpen).",
              [(f"max by (app, upstream) (imsidecar_circuit_state{{{SEL}}})", "{{app}}/{{upstream}}")],
              kind="state-timeline", defaults={"mappings": CIRCUIT_MAPPINGS, "color": {"mode": "thresholds"},
                                               "thresholds": thresholds((None, "green"), (1, "yellow"), (2, "red"))},
              options={"showValue": "auto", "mergeValues": True, "rowHeight": 0.9}),
        panel("Circuit transitions", "State changes, by the state entered.",
              [(f"sum by (app, upstream, state) (increase(imsidecar_circuit_transitions_total{{{SEL}}}[{W}]))",
                "{{app}}/{{upstream}} to {{state}}")], defaults={"custom": {"drawStyle": "bars"}}),
        panel("Network state", "The network monitor's measured state per upstream (1 = current).",
              [(f"max by (app, upstream, state) (imsidecar_network_state{{{SEL}}})",
                "{{app}}/{{upstream}} {{state}}")], kind="state-timeline",
              defaults={"mappings": [{"type": "value", "options": {
                  "0": {"text": "-", "color": "transparent", "index": 0},
                  "1": {"text": "current", "color": "blue", "index": 1}}}]},
              options={"showValue": "never", "mergeValues": True, "rowHeight": 0.9}),
        panel("Adaptive per-try timeout and back-off", "Parameters in force, fixed from config or adapted to the "
              "measured network.",
              [(adaptive("per_try_timeout_seconds"), "{{app}}/{{upstream}} per-try timeout"),
               (adaptive("backoff_base_seconds"), "{{app}}/{{upstream}} back-off base"),
               (adaptive("backoff_cap_seconds"), "{{app}}/{{upstream}} back-off cap")], "s"),
        panel("Adaptive max attempts", "Attempts allowed per request in force.",
              [(adaptive("max_attempts"), "{{app}}/{{upstream}}")], "none"),
        panel("Measured latency", "What the monitor measured: smoothed attempt latency and p99 over its window.",
              [(adaptive("latency_ewma_seconds"), "{{app}}/{{upstream}} EWMA"),
               (adaptive("latency_p99_seconds"), "{{app}}/{{upstream}} p99")], "s"),
        panel("Measured loss and throttling", "Share of attempts lost (resets, timeouts, connect failures) and "
              "throttled by the platform, over the monitor's window.",
              [(adaptive("loss_ratio"), "{{app}}/{{upstream}} loss"),
               (adaptive("throttle_ratio"), "{{app}}/{{upstream}} throttled")], "percentunit", width=16),
    ]


def limiter() -> list[Panel]:
    waits = f"imsidecar_ratelimit_wait_seconds_bucket{{{SEL_ROUTE}}}"
    return [
        panel("Rate limiter waits", "Requests that went through the sidecar's own limiter, and their p99 wait.",
              [(f"sum by (app, route) (rate(imsidecar_ratelimit_wait_seconds_count{{{SEL_ROUTE}}}[{W}]))",
                "{{app}} {{route}}")], "reqps"),
        panel("Rate limiter wait p99", "How long requests queued for the limiter.",
              [(quantile(0.99, waits, "app, route"), "{{app}} {{route}}")], "s"),
        panel("Rate limiter rejections and allowed rate", "Rejections: answered 429 at once (the wait would overrun "
              "the deadline). Rate: requests per second allowed now.",
              [(f"sum by (app, route) (rate(imsidecar_ratelimit_rejections_total{{{SEL_ROUTE}}}[{W}]))",
                "{{app}} {{route}} rejected"),
               (f"max by (app, route) (imsidecar_ratelimit_rate{{{SEL_ROUTE}}})", "{{app}} {{route}} allowed")],
              "reqps"),
    ]


def robots() -> list[Panel]:
    return [
        panel("Robot messages by result", "Messages and alert notifications per robot target (not filtered by $app).",
              [(f"sum by (target, result) (rate(imsidecar_robot_messages_total[{W}]))", "{{target}} {{result}}")],
              "reqps"),
        panel("Robot delivery failure ratio", "Share not delivered. Alert above 10% for 5 minutes.",
              [(ratio(f'rate(imsidecar_robot_messages_total{{result!="delivered"}}[{W}])',
                      f"rate(imsidecar_robot_messages_total[{W}])", "target"), "{{target}}")], "percentunit"),
        panel("Robot delivery p95", "From request to final answer, waits and retries included.",
              [(quantile(0.95, "imsidecar_robot_delivery_seconds_bucket", "target"), "{{target}}")], "s"),
        panel("Robot rate-limit waits", "Sends that queued for the robot's limit (waited) or could not fit their "
              "deadline (rejected), and the p95 wait.",
              [(f"sum by (target, outcome) (rate(imsidecar_robot_ratelimit_waits_total[{W}]))",
                "{{target}} {{outcome}}"),
               (quantile(0.95, "imsidecar_robot_ratelimit_wait_seconds_bucket", "target"), "{{target}} p95 wait")],
              "short"),
        panel("Robot retries", "Sends tried again, by the reason the previous try failed.",
              [(f"sum by (target, reason) (rate(imsidecar_robot_retries_total[{W}]))", "{{target}} {{reason}}")],
              "reqps", width=16),
    ]


def events() -> list[Panel]:
    def per_app(metric: str, by: str = "app") -> str:
        return f"sum by ({by}) (rate(imsidecar_events_{metric}[{W}]))"

    return [
        panel("Events received and delivered", "Pushed by the platform (before dedupe) and accepted by the "
              "application. Events apps are named in the events: section, so not filtered by $app.",
              [(per_app("received_total", "app, channel"), "{{app}} received ({{channel}})"),
               (per_app("delivered_total"), "{{app}} delivered"),
               (per_app("duplicates_dropped_total"), "{{app}} duplicates dropped"),
               (per_app("delivery_retries_total"), "{{app}} delivery retries")], "reqps"),
        panel("Events rejected, dead-lettered and lost", "Rejected: refused before they were stored (the platform "
              "pushes them again). Dead-lettered: older than delivery.max_age or refused by the application; "
              "`imsidecar events dead-letters` lists them. Lost: only the memory backend at shutdown, or a bot "
              "message that could not be stored.",
              [(per_app("rejected_total", "app, reason"), "{{app}} rejected {{reason}}"),
               (per_app("dead_lettered_total", "app, reason"), "{{app}} dead-lettered {{reason}}"),
               (per_app("dropped_total", "app, reason"), "{{app}} lost {{reason}}")], "reqps"),
        panel("Events queue and connections", "Events waiting for delivery; long connections up; reconnects.",
              [("max by (app) (imsidecar_events_queue_depth)", "{{app}} queued"),
               ("max by (app) (imsidecar_events_connection_up)", "{{app}} connected"),
               (f"sum by (app) (increase(imsidecar_events_reconnects_total[{W}]))", "{{app}} reconnects")]),
        panel("Events delivery delay", "From the sidecar storing an event to the application accepting it (p50, "
              "p99), and the age of the oldest event still waiting: it grows while the application is down.",
              [(quantile(0.5, "imsidecar_events_delivery_delay_seconds_bucket", "app"), "{{app}} p50"),
               (quantile(0.99, "imsidecar_events_delivery_delay_seconds_bucket", "app"), "{{app}} p99"),
               ("max by (app) (imsidecar_events_queue_oldest_seconds)", "{{app}} oldest waiting")], "s"),
        panel("Events leases and card answers", "Which role of each app this replica set holds (deliver, "
              "connection: one replica each by default), and card callbacks answered in time, late or failed.",
              [("sum by (app, role) (imsidecar_events_lease_held)", "{{app}} {{role}} owners"),
               (per_app("card_answers_total", "app, outcome"), "{{app}} cards {{outcome}}")], width=16),
    ]


ROWS = [("Requests (RED)", red), ("Retries", retries), ("Tokens", tokens),
        ("Circuit breaker, network and adaptive parameters", resilience), ("Rate limiter", limiter),
        ("Robots", robots), ("Events", events)]


def layout() -> list[Panel]:
    """Rows top to bottom, panels left to right, wrapping at Grafana's 24 columns."""
    panels: list[Panel] = []
    y, next_id = 0, 1
    for title, build in ROWS:
        panels.append({"type": "row", "title": title, "collapsed": False, "id": next_id, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        next_id, y, x = next_id + 1, y + 1, 0
        for p in build():
            width = p["gridPos"]["w"]
            if x + width > 24:
                x, y = 0, y + 8
            p["gridPos"].update(x=x, y=y)
            p["id"] = next_id
            next_id, x = next_id + 1, x + width
            panels.append(p)
        y += 8
    return panels


def variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {"name": name, "label": label, "type": "query", "datasource": DS, "definition": query,
            "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
            "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "sort": 1, "regex": "",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "options": [], "hide": 0}


def dashboard() -> dict[str, Any]:
    return {
        "uid": "imsidecar", "title": "imsidecar", "tags": ["imsidecar", "feishu", "dingtalk"],
        "description": "imsidecar: effective vs actual rate, errors, latency, retries, tokens, circuit, network, "
                       "adaptive parameters, rate limiter, robots and events. Metrics: docs/metrics.md.",
        "schemaVersion": 39, "version": 1, "editable": True, "graphTooltip": 1, "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"}, "timepicker": {}, "timezone": "browser", "weekStart": "",
        "fiscalYearStartMonth": 0, "liveNow": False, "links": [],
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "includeAll": False, "multi": False, "options": [], "refresh": 1, "regex": ""},
            variable("app", "App", "label_values(imsidecar_requests_total, app)"),
            variable("route", "Route", 'label_values(imsidecar_requests_total{app=~"$app"}, route)'),
        ]},
        "panels": layout(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    sys.stdout.write(f"wrote {OUT}\n")
