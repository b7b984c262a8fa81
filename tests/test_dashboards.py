"""The Grafana dashboard and provisioning files: fresh from their generator (Grafana's grafana-foundation-sdk), loaded
by that SDK as they are, the on-call row first, filtered by the datasource/instance/app/route variables, every
query valid PromQL over metrics that exist, and provisioning that agrees with itself (datasource uid, folder, the
Grafana alert against the Prometheus rule it copies)."""

from __future__ import annotations

import json
import re
import runpy
import subprocess
from pathlib import Path
from typing import Any, Iterator

import yaml
from grafana_foundation_sdk.cog import plugins
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard, Panel, RowPanel

from tests.conftest import require_binary
from tests.test_metrics_catalogue import registered

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "dashboards" / "imsidecar.json"
GENERATOR = ROOT / "dashboards" / "build_dashboard.py"
PROVISIONING = ROOT / "dashboards" / "grafana" / "provisioning"
GRAFANA_ALERT = PROVISIONING / "alerting" / "imsidecar-retry-rate.yaml"
RULES = ROOT / "dashboards" / "prometheus" / "imsidecar-rules.yaml"

# What Grafana puts in place of the template variables when every instance, app and route is selected (allValue
# `.*`); the rate window is Grafana's own minimum for a 1 s scrape interval (4 × scrape interval), as the e2e test
# scrapes.
VARIABLES = {"$instance": ".*", "$app": ".*", "$route": ".*", "$__rate_interval": "4s"}
# Series that are not the sidecar's metrics but Prometheus's own (target health, firing alerts) and
# prometheus_client's process collector.
OTHER_SERIES = {"up", "ALERTS", "process_start_time_seconds", "process_resident_memory_bytes",
                "process_cpu_seconds_total", "process_open_fds"}


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    return [p for p in load_dashboard()["panels"] if p["type"] != "row"]


def panel_queries() -> Iterator[tuple[str, str]]:
    """(panel title / refId, PromQL as written) for every query of every panel."""
    for p in panels():
        for t in p["targets"]:
            yield f"{p['title']} / {t['refId']}", t["expr"]


def substitute(expr: str, variables: dict[str, str] | None = None) -> str:
    for name, value in sorted((variables or VARIABLES).items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a template variable is left: {expr}"
    return expr


def grafana_alert() -> dict[str, Any]:
    return yaml.safe_load(GRAFANA_ALERT.read_text())["groups"][0]["rules"][0]


def grafana_alert_query() -> str:
    return next(d["model"]["expr"] for d in grafana_alert()["data"] if d["refId"] == "A")


def test_the_json_is_what_the_generator_writes() -> None:
    render = runpy.run_path(str(GENERATOR))["render"]
    assert DASHBOARD.read_text() == render(), "run `python dashboards/build_dashboard.py` and commit the JSON"


def test_grafanas_sdk_loads_the_dashboard_as_it_is() -> None:
    plugins.register_default_plugins()
    model = Dashboard.from_json(load_dashboard())
    assert json.loads(json.dumps(model, cls=JSONEncoder)) == load_dashboard()
    assert model.uid == "imsidecar" and model.schema_version >= 39
    assert all(isinstance(p, (Panel, RowPanel)) for p in model.panels or [])


def test_grafana_can_import_it_with_its_variables() -> None:
    d = load_dashboard()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert list(variables) == ["datasource", "instance", "app", "route"]
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("instance", "app", "route"):
        assert variables[name]["includeAll"] and variables[name]["multi"] and variables[name]["allValue"] == ".*"
    assert "$app" in variables["route"]["query"]   # routes of the selected apps only
    for p in panels():
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert all(t["datasource"] == p["datasource"] for t in p["targets"]), p["title"]
    alerts = [a for a in d["annotations"]["list"] if a.get("expr")]
    assert alerts and "ALERTS" in alerts[0]["expr"]   # firing alerts marked on every graph


def test_the_on_call_row_comes_first_and_nothing_overlaps() -> None:
    everything = load_dashboard()["panels"]
    assert everything[0]["type"] == "row" and everything[0]["title"].startswith("On call")
    first_row = everything[1:everything.index(next(p for p in everything[1:] if p["type"] == "row"))]
    stats = [p["title"] for p in first_row if p["type"] == "stat"]
    assert stats[:6] == ["Success rate", "Retry ratio", "p99 latency", "Token time to expiry", "Circuit breaker",
                         "Firing alerts"]
    assert {"Sidecars up", "Version", "Uptime", "Memory"} <= set(stats)
    assert any(p["type"] == "table" and p["title"] == "Top routes" for p in first_row)
    ids = [p["id"] for p in everything]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in everything:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine


def test_every_query_of_a_sidecar_series_follows_the_instance_variable() -> None:
    for where, expr in panel_queries():
        if "ALERTS" not in expr:
            assert expr.count('instance=~"$instance"') == len(re.findall(r"\b(?:imsidecar_\w+|process_\w+|up)\{", expr)), where


def test_queries_filter_by_app_and_route_where_the_metric_has_those_labels() -> None:
    """$route applies where every metric of the query has a route label; a ratio whose numerator has none (retries)
    must not filter its denominator by route either, or the ratio would be wrong."""
    labels = {name: spec[1] for name, spec in registered().items()}
    for where, expr in panel_queries():
        own = [labels[base_name(metric)] for metric in metrics_in(expr)]
        if all("app" in o for o in own) and "imsidecar_events_" not in expr:
            assert expr.count('app=~"$app"') == len(re.findall(r"\bimsidecar_\w+", expr)), f"{where}: not by $app"
        routed = bool(own) and all("route" in o for o in own)
        assert ('route=~"$route"' in expr) == routed, f"{where}: $route filter is {'missing' if routed else 'wrong'}"


def test_every_query_names_metrics_the_sidecar_exports() -> None:
    known = set(registered())
    for where, expr in [*panel_queries(), ("grafana alert", grafana_alert_query())]:
        names = metrics_in(expr)
        others = set(re.findall(r"\b(" + "|".join(OTHER_SERIES) + r")\b", expr))
        assert names or others, where
        assert {base_name(n) for n in names} <= known, f"{where}: unknown metric in {expr}"


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query (variables substituted) as a recording rule; no Prometheus needed."""
    queries = [*panel_queries(), ("grafana alert", grafana_alert_query())]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query:{i}", "expr": substitute(expr)} for i, (_, expr) in enumerate(queries)]}]}
    (tmp_path / "queries.yaml").write_text(yaml.safe_dump(rules))
    binary = require_binary("promtool", package="prometheus")
    result = subprocess.run([binary, "check", "rules", str(tmp_path / "queries.yaml")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_provisioning_agrees_with_itself() -> None:
    datasource = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())["datasources"][0]
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "imsidecar.yaml").read_text())["providers"][0]
    assert datasource["type"] == "prometheus" and datasource["uid"] == "imsidecar-prometheus"
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
    alert = grafana_alert()
    assert alert["condition"] == "C"
    sources = {d["refId"]: d["datasourceUid"] for d in alert["data"]}
    assert sources == {"A": datasource["uid"], "B": "__expr__", "C": "__expr__"}
    panel = next(p for p in panels() if str(p["id"]) == alert["annotations"]["__panelId__"])
    assert panel["title"] == "Retry ratio" and alert["annotations"]["__dashboardUid__"] == load_dashboard()["uid"]


def test_the_grafana_alert_fires_where_the_prometheus_fast_page_does() -> None:
    page = next(r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
                if r.get("alert") == "ImsidecarRetryRatioHigh" and r["labels"]["long_window"] == "1h")
    threshold = float(re.search(r"> ([\d.]+)", page["expr"]).group(1))
    alert = grafana_alert()
    condition = next(d for d in alert["data"] if d["refId"] == "C")["model"]["conditions"][0]["evaluator"]
    assert condition == {"type": "gt", "params": [threshold]}
    query = grafana_alert_query()
    assert "[1h]" in query and "[5m]" in query and query.count(f"> {threshold:g}") == 2
    assert alert["labels"] == {k: page["labels"][k] for k in ("severity", "long_window", "short_window")}
    assert alert["annotations"]["runbook_url"] == page["annotations"]["runbook_url"]


def metrics_in(expr: str) -> set[str]:
    return set(re.findall(r"\b(imsidecar_\w+)", expr))


def base_name(sample: str) -> str:
    """The exposed family name of a sample name: `_bucket`, `_count`, `_sum` belong to a histogram."""
    return re.sub(r"_(bucket|count|sum)$", "", sample)
