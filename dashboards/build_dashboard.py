"""Writes dashboards/imsidecar.json, the Grafana dashboard, with Grafana's own grafana-foundation-sdk builders.

The first row answers the on-call's questions: is the sidecar healthy (targets up, version, uptime, memory), are
requests succeeding and retries high, how slow, are tokens and breakers fine, what is firing, which route; then
the detail rows: requests, retries, tokens, breaker and network, rate limiter, robots, events, the process.
Run `python dashboards/build_dashboard.py` after editing (needs the test extras); a test fails when the JSON is
stale. Owns the panels and their PromQL; what each metric means is docs/metrics.md's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as pb
from grafana_foundation_sdk.builders import stat, statetimeline, table, timeseries
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as pm

OUT = Path(__file__).resolve().parent / "imsidecar.json"
DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
PODS = 'instance=~"$instance"'
SEL = f'app=~"$app", {PODS}'
SEL_ROUTE = f'app=~"$app", route=~"$route", {PODS}'
W = "$__rate_interval"
ERRORS = 'outcome=~"throttled|platform_error|sidecar_error"'
JOB = f'job="imsidecar", {PODS}'

Query = tuple[str, str]   # (PromQL, legend)
Panel = Builder[dm.Panel]


def target(expr: str, legend: str, ref: str, instant: bool = False) -> pb.Dataquery:
    query = pb.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DS)
    if instant:
        return query.instant().format(pm.PromQueryFormat.TABLE)
    return query.range()


def steps(*pairs: tuple[float | None, str]) -> db.ThresholdsConfig:
    return db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(
        [dm.Threshold(value=value, color=colour) for value, colour in pairs])


def ratio(numerator: str, denominator: str, by: str) -> str:
    """numerator / denominator, reading 0 (not no data) while the numerator has no series yet."""
    return f"(sum by ({by}) ({numerator}) or sum by ({by}) ({denominator}) * 0) / sum by ({by}) ({denominator})"


def total_ratio(numerator: str, denominator: str) -> str:
    return f"(sum({numerator}) or sum({denominator}) * 0) / sum({denominator})"


def quantile(q: float, bucket: str, by: str) -> str:
    return f"histogram_quantile({q}, sum by ({by}) (rate({bucket}[{W}])))"


def with_queries(panel: Any, title: str, description: str, queries: Sequence[Query], unit: str, width: int,
                 height: int, instant: bool = False) -> Any:
    panel = panel.title(title).description(description).datasource(DS).unit(unit).span(width).height(height)
    for i, (expr, legend) in enumerate(queries):
        panel = panel.with_target(target(expr, legend, chr(ord("A") + i), instant))
    return panel


def series(title: str, description: str, queries: Sequence[Query], unit: str = "short", width: int = 8,
           stacked: bool = False, bars: bool = False, limits: db.ThresholdsConfig | None = None) -> Panel:
    panel = with_queries(timeseries.Panel(), title, description, queries, unit, width, 8).line_width(1)
    panel = panel.legend(cb.VizLegendOptions().display_mode(cm.LegendDisplayMode.LIST)
                         .placement(cm.LegendPlacement.BOTTOM).show_legend(True)) \
                 .tooltip(cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING))
    if stacked:
        panel = panel.stacking(cb.StackingConfig().mode(cm.StackingMode.NORMAL)).fill_opacity(30)
    if bars:
        panel = panel.draw_style(cm.GraphDrawStyle.BARS)
    if limits is not None:
        panel = panel.thresholds(limits).thresholds_style(
            cb.GraphThresholdsStyleConfig().mode(cm.GraphThresholdsStyleMode.LINE))
    return panel


def single(title: str, description: str, queries: Sequence[Query], unit: str, limits: db.ThresholdsConfig,
           width: int = 4, mappings: list[dm.ValueMapping] | None = None, text: bool = False) -> Panel:
    """A stat panel of the first row: one number, coloured by its thresholds."""
    panel = with_queries(stat.Panel(), title, description, queries, unit, width, 4)
    panel = panel.thresholds(limits).color_mode(cm.BigValueColorMode.BACKGROUND) \
                 .graph_mode(cm.BigValueGraphMode.NONE if text else cm.BigValueGraphMode.AREA) \
                 .text_mode(cm.BigValueTextMode.VALUE_AND_NAME if text else cm.BigValueTextMode.AUTO) \
                 .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    return panel.mappings(mappings) if mappings else panel


def timeline(title: str, description: str, queries: Sequence[Query], mappings: list[dm.ValueMapping],
             limits: db.ThresholdsConfig | None = None, show: cm.VisibilityMode = cm.VisibilityMode.AUTO) -> Panel:
    panel = with_queries(statetimeline.Panel(), title, description, queries, "short", 8, 8)
    panel = panel.mappings(mappings).show_value(show).merge_values(True).row_height(0.9).fill_opacity(70)
    if limits is not None:
        panel = panel.thresholds(limits).color_scheme(db.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS))
    return panel


def value_map(options: dict[str, tuple[str, str]]) -> list[dm.ValueMapping]:
    return [dm.ValueMap(options={k: dm.ValueMappingResult(text=text, color=colour, index=i)
                                 for i, (k, (text, colour)) in enumerate(options.items())})]


CIRCUIT = value_map({"0": ("closed", "green"), "1": ("half-open", "yellow"), "2": ("open", "red")})


# The first row: on call -------------------------------------------------------------------------------------------

def on_call() -> list[Panel]:
    requests = f"rate(imsidecar_requests_total{{{SEL_ROUTE}}}[{W}])"
    return [
        single("Success rate", "Requests answered with success among those that were not the caller's own mistake "
               "(client_error), after retries: what the error burn-rate alerts watch.",
               [(total_ratio(f'rate(imsidecar_requests_total{{{SEL_ROUTE}, outcome="success"}}[{W}])',
                             f'rate(imsidecar_requests_total{{{SEL_ROUTE}, outcome!="client_error"}}[{W}])'),
                 "success")], "percentunit", steps((None, "red"), (0.99, "orange"), (0.999, "green"))),
        single("Retry ratio", "Retries sent per client request. Pages when it burns the 0.1% budget 14.4x over 1 h "
               "and 5 min (1.44%); the retry budget stops retries at 20%.",
               [(total_ratio(f"rate(imsidecar_retries_total{{{SEL}}}[{W}])",
                             f"rate(imsidecar_requests_total{{{SEL}}}[{W}])"), "retries/request")],
               "percentunit", steps((None, "green"), (0.0144, "orange"), (0.2, "red"))),
        single("p99 latency", "End-to-end time of client requests, retries and waits included.",
               [(quantile(0.99, f"imsidecar_request_duration_seconds_bucket{{{SEL_ROUTE}}}", "le"), "p99")], "s",
               steps((None, "green"), (2, "orange"), (5, "red"))),
        single("Token time to expiry", "The soonest any app's token expires (0: none held). Refreshes keep it above "
               "9 minutes; under 5 without a refresh pages.",
               [(f"min(imsidecar_token_expiry_seconds{{{SEL}}})", "soonest")], "s",
               steps((None, "red"), (300, "orange"), (540, "green"))),
        single("Circuit breaker", "The worst breaker of the selected apps: closed, half-open (probing) or open "
               "(answering 503 CircuitOpen).",
               [(f"max(imsidecar_circuit_state{{{SEL}}})", "worst")], "none",
               steps((None, "green"), (1, "yellow"), (2, "red")), mappings=CIRCUIT),
        single("Firing alerts", "imsidecar alerts firing now (Prometheus's ALERTS); their start and end are marked "
               "on every graph.", [('count(ALERTS{alertstate="firing", alertname=~"Imsidecar.*"}) or vector(0)',
                                    "firing")], "none", steps((None, "green"), (1, "red"))),
        single("Sidecars up", "Targets of the scrape job that answered the last scrape, of all targets.",
               [(f"sum(up{{{JOB}}})", "up"), (f"count(up{{{JOB}}})", "targets")], "none",
               steps((None, "red"), (1, "green")), width=6, text=True),
        single("Version", "Versions running, with how many sidecars run each.",
               [(f"count by (version) (imsidecar_build_info{{{PODS}}})", "{{version}}")], "none",
               steps((None, "blue")), width=6, text=True),
        single("Uptime", "Time since the most recently (re)started sidecar started: a restart resets it.",
               [(f"min(time() - process_start_time_seconds{{{JOB}}})", "youngest")], "s",
               steps((None, "orange"), (600, "green")), width=6),
        single("Memory", "The largest resident memory of the selected sidecars (a sidecar is sized for about "
               "50 MB).", [(f"max(process_resident_memory_bytes{{{JOB}}})", "largest")], "bytes",
               steps((None, "green"), (200 * 2**20, "orange"), (400 * 2**20, "red")), width=6),
        top_routes(requests),
    ]


def top_routes(requests: str) -> Panel:
    errors = f"rate(imsidecar_requests_total{{{SEL_ROUTE}, {ERRORS}}}[{W}])"
    valid = f'rate(imsidecar_requests_total{{{SEL_ROUTE}, outcome!="client_error"}}[{W}])'
    queries = [(f"topk(10, sum by (app, route) ({requests}))", "req/s"),
               (ratio(errors, valid, "app, route"), "error ratio"),
               (quantile(0.99, f"imsidecar_request_duration_seconds_bucket{{{SEL_ROUTE}}}", "app, route, le"), "p99")]
    panel = with_queries(table.Panel(), "Top routes", "The ten busiest routes (templates, never IDs) with their error "
                         "ratio and p99 latency.", queries, "short", 24, 8, instant=True).filterable(True)
    organize = {"excludeByName": {"Time": True},
                "renameByName": {"Value #A": "requests/s", "Value #B": "error ratio", "Value #C": "p99 (s)"}}
    return panel.with_transformation(dm.DataTransformerConfig(id_val="merge", options={})) \
                .with_transformation(dm.DataTransformerConfig(id_val="organize", options=organize)) \
                .sort_by([cb.TableSortByFieldState().display_name("requests/s").desc(True)])


# Detail rows --------------------------------------------------------------------------------------------------

def requests_row() -> list[Panel]:
    requests = f"rate(imsidecar_requests_total{{{SEL_ROUTE}}}[{W}])"
    valid = f'rate(imsidecar_requests_total{{{SEL_ROUTE}, outcome!="client_error"}}[{W}])'
    return [
        series("Request rate: effective vs actual", "Effective: client requests answered. Actual: attempts sent to "
               "the platform. The gap is retries and token replays, the load the sidecar adds.",
               [(f"sum by (app) ({requests})", "{{app}} effective"),
                (f"sum by (app) (rate(imsidecar_upstream_attempts_total{{{SEL_ROUTE}}}[{W}]))", "{{app}} actual")],
               "reqps"),
        series("Error ratio", "Throttled, platform and sidecar errors among requests that were not the caller's "
               "mistake, after retries. A DingTalk errcode inside HTTP 200 is an error here.",
               [(ratio(f"rate(imsidecar_requests_total{{{SEL_ROUTE}, {ERRORS}}}[{W}])", valid, "app"), "{{app}}")],
               "percentunit", limits=steps((None, "green"), (0.0144, "red"))),
        series("Latency p50 / p95 / p99", "End-to-end time of client requests: limiter waits, attempts and back-offs.",
               [(quantile(q, f"imsidecar_request_duration_seconds_bucket{{{SEL_ROUTE}}}", "app, le"),
                 f"{{{{app}}}} p{n}") for q, n in ((0.5, 50), (0.95, 95), (0.99, 99))], "s"),
        series("Requests by outcome", "success, client_error (the caller's request or permissions), throttled, "
               "platform_error (the platform's own error answer, inside HTTP 200 too), sidecar_error (the sidecar "
               "answered itself).", [(f"sum by (outcome, status_class) ({requests})", "{{outcome}} {{status_class}}")],
               "reqps", stacked=True),
        series("Sidecar errors by kind", "The sidecar's own error answers, by X-Imsidecar-Error.",
               [(f"sum by (app, error) (rate(imsidecar_sidecar_errors_total{{{SEL}}}[{W}]))", "{{app}} {{error}}")],
               "reqps", stacked=True),
        series("Attempt latency p99", "Time of one attempt to the platform, as the platform answers.",
               [(quantile(0.99, f"imsidecar_upstream_attempt_duration_seconds_bucket{{{SEL}}}", "app, upstream, le"),
                 "{{app}}/{{upstream}} p99")], "s"),
        series("In-flight requests", "Client requests being handled now.",
               [(f"sum by (app) (imsidecar_in_flight_requests{{{SEL}}})", "{{app}}")], width=24),
    ]


def retries_row() -> list[Panel]:
    requests = f"rate(imsidecar_requests_total{{{SEL}}}[{W}])"
    return [
        series("Retries by reason", "Retries sent (counted when sent), by why the previous attempt failed.",
               [(f"sum by (app, reason) (rate(imsidecar_retries_total{{{SEL}}}[{W}]))", "{{app}} {{reason}}")],
               "reqps"),
        series("Retry ratio by upstream", "Retries per client request: what the retry budget caps (20% by "
               "default). The fast page fires above 1.44% over both 1 h and 5 min.",
               [(ratio(f"rate(imsidecar_retries_total{{{SEL}}}[{W}])", requests, "app, upstream"),
                 "{{app}}/{{upstream}}")], "percentunit",
               limits=steps((None, "green"), (0.0144, "orange"), (0.2, "red"))),
        series("Budget exhausted and deadline exceeded", "Retries not sent: the retry budget was spent, or the "
               "request's deadline had no room for another attempt.",
               [(f"sum by (app, upstream) (rate(imsidecar_retry_budget_exhausted_total{{{SEL}}}[{W}]))",
                 "{{app}}/{{upstream}} budget exhausted"),
                (f"sum by (app, upstream) (rate(imsidecar_deadline_exceeded_total{{{SEL}}}[{W}]))",
                 "{{app}}/{{upstream}} deadline exceeded")], "reqps"),
        series("Retries withheld", "Retryable failures not retried, by why: attempts, unsafe, body_too_large, "
               "retry_after_too_long, deadline, budget, circuit_open.",
               [(f"sum by (app, why) (rate(imsidecar_retries_withheld_total{{{SEL}}}[{W}]))", "{{app}} {{why}}")],
               "reqps"),
        series("Attempts by outcome", "Every attempt to the platform, by its classification.",
               [(f"sum by (outcome, reason) (rate(imsidecar_upstream_attempts_total{{{SEL_ROUTE}}}[{W}]))",
                 "{{outcome}} {{reason}}")], "reqps", stacked=True),
        series("Idempotency keys added", "client_token / uuid the sidecar added to POSTs, making them safe to retry.",
               [(f"sum by (app, route) (rate(imsidecar_idempotency_keys_added_total{{{SEL_ROUTE}}}[{W}]))",
                 "{{app}} {{route}}")], "reqps"),
    ]


def tokens_row() -> list[Panel]:
    return [
        series("Token refreshes", "Token fetches from the platform, by result: success, failure (transient), "
               "rejected (the platform refused the credentials).",
               [(f"sum by (app, kind, result) (increase(imsidecar_token_refreshes_total{{{SEL}}}[{W}]))",
                 "{{app}} {{kind}} {{result}}")], bars=True),
        series("Token time to expiry", "Seconds until the held token expires (0: none). Alert under 5 minutes "
               "without a successful refresh.",
               [(f"min by (app, kind) (imsidecar_token_expiry_seconds{{{SEL}}})", "{{app}} {{kind}}")], "s",
               limits=steps((None, "red"), (300, "orange"), (540, "green"))),
        series("Token replays and token endpoint answers", "Replays: requests sent again with a fresh token after "
               "the platform said the token was invalid. Answers: official SDKs' token calls answered from cache.",
               [(f"sum by (app) (rate(imsidecar_token_replays_total{{{SEL}}}[{W}]))", "{{app}} replays"),
                (f"sum by (app) (rate(imsidecar_token_endpoint_answers_total{{{SEL}}}[{W}]))",
                 "{{app}} token endpoint answers")], "reqps"),
    ]


def resilience_row() -> list[Panel]:
    def adaptive(name: str) -> str:
        return f"max by (app, upstream) (imsidecar_adaptive_{name}{{{SEL}}})"

    return [
        timeline("Circuit state", "0 closed, 1 half-open, 2 open (the sidecar answers 503 CircuitOpen).",
                 [(f"max by (app, upstream) (imsidecar_circuit_state{{{SEL}}})", "{{app}}/{{upstream}}")], CIRCUIT,
                 steps((None, "green"), (1, "yellow"), (2, "red"))),
        series("Circuit transitions", "State changes, by the state entered. The breaker alert fires on an opening and "
               "holds 5 minutes after the last.",
               [(f"sum by (app, upstream, state) (increase(imsidecar_circuit_transitions_total{{{SEL}}}[{W}]))",
                 "{{app}}/{{upstream}} to {{state}}")], bars=True),
        timeline("Network state", "The network monitor's measured state per upstream (1 = current).",
                 [(f"max by (app, upstream, state) (imsidecar_network_state{{{SEL}}})", "{{app}}/{{upstream}} {{state}}")],
                 value_map({"0": ("-", "transparent"), "1": ("current", "blue")}), show=cm.VisibilityMode.NEVER),
        series("Adaptive per-try timeout and back-off", "Parameters in force, fixed from config or adapted to the "
               "measured network.",
               [(adaptive("per_try_timeout_seconds"), "{{app}}/{{upstream}} per-try timeout"),
                (adaptive("backoff_base_seconds"), "{{app}}/{{upstream}} back-off base"),
                (adaptive("backoff_cap_seconds"), "{{app}}/{{upstream}} back-off cap")], "s"),
        series("Adaptive max attempts", "Attempts allowed per request in force.",
               [(adaptive("max_attempts"), "{{app}}/{{upstream}}")], "none"),
        series("Measured latency", "What the monitor measured: smoothed attempt latency and p99 over its window.",
               [(adaptive("latency_ewma_seconds"), "{{app}}/{{upstream}} EWMA"),
                (adaptive("latency_p99_seconds"), "{{app}}/{{upstream}} p99")], "s"),
        series("Measured loss and throttling", "Share of attempts lost (resets, timeouts, connect failures) and "
               "throttled by the platform, over the monitor's window.",
               [(adaptive("loss_ratio"), "{{app}}/{{upstream}} loss"),
                (adaptive("throttle_ratio"), "{{app}}/{{upstream}} throttled")], "percentunit", width=24),
    ]


def limiter_row() -> list[Panel]:
    waits = f"imsidecar_ratelimit_wait_seconds_bucket{{{SEL_ROUTE}}}"
    return [
        series("Rate limiter waits", "Requests that waited for the sidecar's own limiter.",
               [(f"sum by (app, route) (rate(imsidecar_ratelimit_wait_seconds_count{{{SEL_ROUTE}}}[{W}]))",
                 "{{app}} {{route}}")], "reqps"),
        series("Rate limiter wait p99", "How long requests queued for the limiter.",
               [(quantile(0.99, waits, "app, route, le"), "{{app}} {{route}}")], "s"),
        series("Rate limiter rejections and allowed rate", "Rejections: answered 429 at once (the wait would overrun "
               "the deadline). Rate: requests per second allowed now.",
               [(f"sum by (app, route) (rate(imsidecar_ratelimit_rejections_total{{{SEL_ROUTE}}}[{W}]))",
                 "{{app}} {{route}} rejected"),
                (f"max by (app, route) (imsidecar_ratelimit_rate{{{SEL_ROUTE}}})", "{{app}} {{route}} allowed")],
               "reqps"),
    ]


def robots_row() -> list[Panel]:
    robots = f"imsidecar_robot_messages_total{{{PODS}}}"
    return [
        series("Robot notifications by result", "Messages and alert notifications per robot target, each once; "
               "Alertmanager's re-sends of failed ones as resends (not filtered by $app).",
               [(f"sum by (target, result) (rate({robots}[{W}]))", "{{target}} {{result}}"),
                (f"sum by (target, result) (rate(imsidecar_robot_resends_total{{{PODS}}}[{W}]))",
                 "{{target}} resent: {{result}}")], "reqps"),
        series("Robot delivery failure ratio", "Share not delivered, re-sends that got through deducted. Alert above "
               "10% for 5 minutes.",
               [(f'clamp_min((sum by (target) (rate(imsidecar_robot_messages_total{{{PODS}, result!="delivered"}}[{W}]))'
                 f' - (sum by (target) (rate(imsidecar_robot_resends_total{{{PODS}, result="delivered"}}[{W}]))'
                 f" or sum by (target) (rate({robots}[{W}])) * 0)) / sum by (target) (rate({robots}[{W}])), 0)",
                 "{{target}}")], "percentunit"),
        series("Robot delivery p95", "From request to final answer, waits and retries included.",
               [(quantile(0.95, f"imsidecar_robot_delivery_seconds_bucket{{{PODS}}}", "target, le"), "{{target}}")],
               "s"),
        series("Robot rate-limit waits", "Sends that queued for the robot's limit (waited) or could not fit their "
               "deadline (rejected), and the p95 wait.",
               [(f"sum by (target, outcome) (rate(imsidecar_robot_ratelimit_waits_total{{{PODS}}}[{W}]))",
                 "{{target}} {{outcome}}"),
                (quantile(0.95, f"imsidecar_robot_ratelimit_wait_seconds_bucket{{{PODS}}}", "target, le"),
                 "{{target}} p95 wait")]),
        series("Robot retries", "Sends tried again (counted when sent), by the reason the previous try failed.",
               [(f"sum by (target, reason) (rate(imsidecar_robot_retries_total{{{PODS}}}[{W}]))",
                 "{{target}} {{reason}}")], "reqps", width=16),
    ]


def events_row() -> list[Panel]:
    def per_app(metric: str, by: str = "app") -> str:
        return f"sum by ({by}) (rate(imsidecar_events_{metric}{{{PODS}}}[{W}]))"

    return [
        series("Events received and delivered", "Pushed by the platform (before dedupe) and accepted by the "
               "application. Events apps are named in the events: section, so not filtered by $app.",
               [(per_app("received_total", "app, channel"), "{{app}} received ({{channel}})"),
                (per_app("delivered_total"), "{{app}} delivered"),
                (per_app("duplicates_dropped_total"), "{{app}} duplicates dropped"),
                (per_app("delivery_retries_total"), "{{app}} delivery retries")], "reqps"),
        series("Events rejected, dead-lettered and lost", "Rejected: refused before they were stored (the platform "
               "pushes them again). Dead-lettered: older than delivery.max_age or refused by the application; "
               "`imsidecar events dead-letters` lists them. Lost: only the memory backend at shutdown, or a bot "
               "message that could not be stored.",
               [(per_app("rejected_total", "app, reason"), "{{app}} rejected {{reason}}"),
                (per_app("dead_lettered_total", "app, reason"), "{{app}} dead-lettered {{reason}}"),
                (per_app("dropped_total", "app, reason"), "{{app}} lost {{reason}}")], "reqps"),
        series("Events queue and connections", "Events waiting for delivery; long connections up; reconnects.",
               [(f"max by (app) (imsidecar_events_queue_depth{{{PODS}}})", "{{app}} queued"),
                (f"max by (app) (imsidecar_events_connection_up{{{PODS}}})", "{{app}} connected"),
                (f"sum by (app) (increase(imsidecar_events_reconnects_total{{{PODS}}}[{W}]))", "{{app}} reconnects")]),
        series("Events delivery delay", "From the sidecar storing an event to the application accepting it (p50, "
               "p99), and the age of the oldest event still waiting: it grows while the application is down.",
               [(quantile(0.5, f"imsidecar_events_delivery_delay_seconds_bucket{{{PODS}}}", "app, le"), "{{app}} p50"),
                (quantile(0.99, f"imsidecar_events_delivery_delay_seconds_bucket{{{PODS}}}", "app, le"),
                 "{{app}} p99"),
                (f"max by (app) (imsidecar_events_queue_oldest_seconds{{{PODS}}})", "{{app}} oldest waiting")], "s"),
        series("Events leases and card answers", "How many replicas hold each role of each app (deliver, "
               "connection: one each by default), and card callbacks answered in time, late or failed.",
               [(f"sum by (app, role) (imsidecar_events_lease_held{{{PODS}}})", "{{app}} {{role}} owners"),
                (per_app("card_answers_total", "app, outcome"), "{{app}} cards {{outcome}}")], width=16),
    ]


def process_row() -> list[Panel]:
    return [
        series("CPU", "CPU time the sidecar process uses, in cores.",
               [(f"rate(process_cpu_seconds_total{{{JOB}}}[{W}])", "{{instance}}")], "none"),
        series("Memory and file descriptors", "Resident memory; open file descriptors (connections among them).",
               [(f"process_resident_memory_bytes{{{JOB}}}", "{{instance}} resident")], "bytes"),
        series("Open file descriptors and restarts", "Open fds of each sidecar, and how often it (re)started in the "
               "last hour.",
               [(f"process_open_fds{{{JOB}}}", "{{instance}} open fds"),
                (f"changes(process_start_time_seconds{{{JOB}}}[1h])", "{{instance}} restarts in 1h")]),
    ]


ROWS: list[tuple[str, Callable[[], list[Panel]]]] = [
    ("On call: is it healthy, are retries high, which app, route, pod", on_call), ("Requests", requests_row),
    ("Retries", retries_row), ("Tokens", tokens_row), ("Circuit breaker, network and adaptive parameters", resilience_row),
    ("Rate limiter", limiter_row), ("Robots", robots_row), ("Events", events_row), ("Sidecar process", process_row),
]


def variable(name: str, label: str, query: str) -> db.QueryVariable:
    return db.QueryVariable(name).label(label).datasource(DS).query(query).multi(True).include_all(True) \
             .all_value(".*").refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.ALPHABETICAL_ASC)


def dashboard() -> db.Dashboard:
    board = db.Dashboard("imsidecar").uid("imsidecar").tags(["imsidecar", "feishu", "dingtalk"]) \
        .description("imsidecar: the on-call row first (health, success, retries, latency, tokens, breakers, "
                     "alerts, top routes), then requests, retries, tokens, resilience, limiter, robots, events and "
                     "the process. Metrics: docs/metrics.md; alerts: docs/runbook.md.") \
        .editable().tooltip(dm.DashboardCursorSync.CROSSHAIR).refresh("30s").time("now-1h", "now").timezone("browser") \
        .with_variable(db.DatasourceVariable("datasource").label("Data source").type("prometheus")) \
        .with_variable(variable("instance", "Instance (pod)", "label_values(imsidecar_build_info, instance)")) \
        .with_variable(variable("app", "App", f"label_values(imsidecar_requests_total{{{PODS}}}, app)")) \
        .with_variable(variable("route", "Route", 'label_values(imsidecar_requests_total{app=~"$app"}, route)')) \
        .annotation(db.AnnotationQuery().name("Annotations & Alerts").built_in(1).type("dashboard").hide(True)
                    .datasource(dm.DataSourceRef(type_val="grafana", uid="-- Grafana --")).enable(True)
                    .icon_color("rgba(0, 211, 255, 1)")) \
        .annotation(db.AnnotationQuery().name("imsidecar alerts").datasource(DS).enable(True).icon_color("red")
                    .expr('ALERTS{alertstate="firing", alertname=~"Imsidecar.*"}'))
    next_id = 1
    for title, build in ROWS:   # expanded rows: the row, then its panels after it (the SDK lays them out)
        board = board.with_row(db.Row(title).id(next_id).collapsed(False))
        next_id += 1
        for panel in build():
            board = board.with_panel(panel.id(next_id))
            next_id += 1
    return board


def render() -> str:
    model = dashboard().build()
    return json.dumps(model, cls=JSONEncoder, indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    sys.stdout.write(f"wrote {OUT}\n")
