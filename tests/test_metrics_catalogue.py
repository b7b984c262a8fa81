"""docs/metrics.md against the code: every registered metric has a row with its exact type and labels, and no row
names a metric that is gone — so the catalogue cannot drift from what /metrics serves."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.metrics import MetricWrapperBase

from proxy.events.metrics import EventMetrics
from proxy.metrics import Metrics, SavingsMetrics
from proxy.robots.metrics import RobotMetrics

CATALOGUE = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"
ROW = re.compile(r"^\| `(imsidecar_\w+)` \| (\w+) \| ([^|]*) \|", re.MULTILINE)
STANDARD_COLLECTORS = (ProcessCollector, PlatformCollector, GCCollector)
SUFFIX = {"counter": "_total", "info": "_info"}   # the name a user queries, as the exposition writes it


def registered() -> dict[str, tuple[str, frozenset[str]]]:
    """Exposed metric name → (type, label names), for every metric of the four metric factories."""
    registry = CollectorRegistry()
    Metrics(registry)
    SavingsMetrics(registry)
    RobotMetrics(registry)
    EventMetrics(registry)
    found = {}
    for collector in list(registry._collector_to_names):   # the registry's own index of what it holds
        if isinstance(collector, STANDARD_COLLECTORS):
            continue   # process_* and python_*: prometheus_client's own, documented in prose
        assert isinstance(collector, MetricWrapperBase), collector
        labels = set(collector._labelnames)
        for family in collector.collect():   # an Info's label (version) exists only on its sample
            for sample in family.samples:
                labels |= set(sample.labels) - {"le"}
        kind = collector._type
        found[collector._name + SUFFIX.get(kind, "")] = (kind, frozenset(labels))
    return found


def documented() -> dict[str, tuple[str, frozenset[str]]]:
    rows = {}
    for name, kind, labels in ROW.findall(CATALOGUE.read_text()):
        assert name not in rows, f"{name} has two rows in docs/metrics.md"
        rows[name] = (kind, frozenset(re.findall(r"`(\w+)`", labels)))
    return rows


def test_every_registered_metric_has_a_row_with_its_type_and_labels() -> None:
    rows = documented()
    missing = sorted(set(registered()) - set(rows))
    assert not missing, f"add a row to docs/metrics.md for: {', '.join(missing)}"
    wrong = {name: (rows[name], spec) for name, spec in registered().items() if rows[name] != spec}
    assert not wrong, f"docs/metrics.md disagrees with the code (doc, code): {wrong}"


def test_no_row_names_a_metric_that_is_not_registered() -> None:
    stale = sorted(set(documented()) - set(registered()))
    assert not stale, f"docs/metrics.md documents metrics the code no longer has: {', '.join(stale)}"


def test_the_catalogue_parser_sees_the_tables() -> None:
    # A reformatted table must not make the two checks above pass vacuously.
    assert len(documented()) >= 40
