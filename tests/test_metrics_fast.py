"""The lock-free hot-path metrics against prometheus_client's own: for the same events, /metrics must read the same,
sample for sample (names, labels, `le` bounds, values, `_created`), and misuse must fail as the library fails."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import LATENCY_BUCKETS, REQUEST_LABELS, FastCounter, FastGauge, FastHistogram, Metrics

# Amounts that probe the bucket edges: below the first bound, exactly on bounds, between them, beyond the last
# finite bound, infinity, zero and a negative duration (a clock step back).
AMOUNTS = (0.0, 0.001, 0.005, 0.0050001, 0.01, 0.3, 1.0, 2.5, 59.9, 60.0, 61.0, 1e9, math.inf, -0.5, 0.005)


def pair(fast: type, stock: type, *args: Any, **kwargs: Any) -> tuple[CollectorRegistry, Any, CollectorRegistry, Any]:
    fast_registry, stock_registry = CollectorRegistry(), CollectorRegistry()
    return (fast_registry, fast(*args, registry=fast_registry, **kwargs),
            stock_registry, stock(*args, registry=stock_registry, **kwargs))


def same_samples(fast_registry: CollectorRegistry, stock_registry: CollectorRegistry) -> None:
    """Every sample of ours equal (the process_* and python_* collectors read the live process, not our events);
    `_created` and exemplar times only to the second: the two were made moments apart."""
    fast = [(m.name, m.type, m.documentation, s) for m in fast_registry.collect() for s in m.samples if ours(m.name)]
    stock = [(m.name, m.type, m.documentation, s) for m in stock_registry.collect() for s in m.samples if ours(m.name)]
    assert [(n, t, d, s.name, s.labels) for n, t, d, s in fast] == [(n, t, d, s.name, s.labels) for n, t, d, s in stock]
    for (_, _, _, f), (_, _, _, s) in zip(fast, stock):
        if f.name.endswith("_created"):
            assert f.value == pytest.approx(s.value, abs=1.0)
        else:
            assert (f.value, f.timestamp) == (s.value, s.timestamp), f.name
        assert (f.exemplar is None) == (s.exemplar is None), f.name
        if f.exemplar is not None:
            assert (f.exemplar.labels, f.exemplar.value) == (s.exemplar.labels, s.exemplar.value)
            assert f.exemplar.timestamp == pytest.approx(s.exemplar.timestamp, abs=1.0)


def ours(name: str) -> bool:
    return name.startswith("imsidecar_")


def without_created(registry: CollectorRegistry) -> bytes:
    return b"\n".join(line for line in generate_latest(registry).splitlines() if b"_created" not in line)


def test_histogram_buckets_sum_and_count_match_the_library() -> None:
    fast_registry, fast, stock_registry, stock = pair(
        FastHistogram, Histogram, "imsidecar_x_seconds", "x.", ("app", "upstream"), buckets=LATENCY_BUCKETS)
    for i, amount in enumerate(AMOUNTS):
        labels = ("a", "feishu") if i % 3 else ("b", "dingtalk")
        fast.labels(*labels).observe(amount)
        stock.labels(*labels).observe(amount)
    same_samples(fast_registry, stock_registry)
    assert without_created(fast_registry) == without_created(stock_registry)
    assert fast_registry.get_sample_value(
        "imsidecar_x_seconds_bucket", {"app": "a", "upstream": "feishu", "le": "0.01"}) == 5.0   # 0.001, 0.005 twice, 0.01, -0.5


def test_histogram_exemplars_and_the_librarys_own_observe_path_match_the_library() -> None:
    """Exemplars go through the library's observe, which reaches the buckets as values (`_buckets[i].inc`)."""
    fast_registry, fast, stock_registry, stock = pair(
        FastHistogram, Histogram, "imsidecar_x_seconds", "x.", ("app",), buckets=LATENCY_BUCKETS)
    for histogram in (fast, stock):
        histogram.labels("a").observe(0.2, {"trace_id": "abc"})
        histogram.labels("a").observe(0.2)
        histogram.labels("a").observe(3.0, {"trace_id": "def"})
    same_samples(fast_registry, stock_registry)
    assert fast_registry.get_sample_value("imsidecar_x_seconds_count", {"app": "a"}) == 3.0


def test_a_nan_observation_is_counted_in_no_bucket_as_the_library_does() -> None:
    fast_registry, fast, stock_registry, stock = pair(
        FastHistogram, Histogram, "imsidecar_x_seconds", "x.", ("app",), buckets=LATENCY_BUCKETS)
    for histogram in (fast, stock):
        histogram.labels("a").observe(0.2)
        histogram.labels("a").observe(math.nan)
    assert fast_registry.get_sample_value("imsidecar_x_seconds_count", {"app": "a"}) == 1.0
    assert math.isnan(fast_registry.get_sample_value("imsidecar_x_seconds_sum", {"app": "a"}))
    assert without_created(fast_registry) == without_created(stock_registry)


def test_counter_matches_the_library_with_float_amounts_and_exemplars() -> None:
    fast_registry, fast, stock_registry, stock = pair(FastCounter, Counter, "imsidecar_y", "y.", REQUEST_LABELS)
    labels = ("a", "feishu", "/open-apis/im/v1/messages", "POST", "2xx", "success")
    for counter in (fast, stock):
        child = counter.labels(*labels)
        child.inc()
        child.inc(2.5)
        child.inc(1, exemplar={"trace_id": "abc"})
        counter.labels("a", "feishu", "/other", "GET", "5xx", "timeout").inc()
    same_samples(fast_registry, stock_registry)
    assert fast_registry.get_sample_value("imsidecar_y_total", dict(zip(REQUEST_LABELS, labels))) == 4.5


def test_gauge_goes_up_and_down_and_sets_as_the_library() -> None:
    fast_registry, fast, stock_registry, stock = pair(FastGauge, Gauge, "imsidecar_z", "z.", ("app",))
    for gauge in (fast, stock):
        gauge.labels("a").inc()
        gauge.labels("a").inc()
        gauge.labels("a").dec()
        gauge.labels("b").inc(3)
        gauge.labels("b").dec(0.5)
        gauge.labels("c").set(7)
    same_samples(fast_registry, stock_registry)
    assert fast_registry.get_sample_value("imsidecar_z", {"app": "a"}) == 1.0


@pytest.mark.parametrize("fast, stock, call", [
    (FastCounter, Counter, lambda m: m.inc()),
    (FastCounter, Counter, lambda m: m.labels("a").inc(-1)),
    (FastGauge, Gauge, lambda m: m.inc()),
    (FastGauge, Gauge, lambda m: m.dec()),
    (FastHistogram, Histogram, lambda m: m.observe(1.0)),
])
def test_misuse_fails_with_the_libraries_error(fast: type, stock: type, call: Any) -> None:
    # A parent without label values, or a counter going down, is a bug the library reports; so must the fast kinds.
    _, fast_metric, _, stock_metric = pair(fast, stock, "imsidecar_w", "w.", ("app",))
    with pytest.raises(ValueError) as stock_error:
        call(stock_metric)
    with pytest.raises(ValueError, match=re.escape(str(stock_error.value))):
        call(fast_metric)


def stock_metrics(registry: CollectorRegistry) -> Metrics:
    """The factory as it was before the fast kinds: the same metrics, built from prometheus_client's own classes."""
    import proxy.metrics as module
    saved = module.FastCounter, module.FastGauge, module.FastHistogram
    module.FastCounter, module.FastGauge, module.FastHistogram = Counter, Gauge, Histogram   # type: ignore[misc]
    try:
        return Metrics(registry)
    finally:
        module.FastCounter, module.FastGauge, module.FastHistogram = saved


def test_a_request_sequence_through_the_hot_children_reads_as_with_the_library() -> None:
    fast_registry, stock_registry = CollectorRegistry(), CollectorRegistry()
    fast, stock = Metrics(fast_registry), stock_metrics(stock_registry)
    assert type(stock.requests) is Counter and type(fast.requests) is FastCounter   # the comparison is real
    route = "/open-apis/im/v1/messages"
    for m in (fast, stock):
        for i, elapsed in enumerate((0.004, 0.02, 0.3, 1.5, 45.0, 0.02)):
            in_flight = m.hot_in_flight("a")
            in_flight.inc()
            m.hot_attempts("a", "feishu", route, "throttled" if i == 2 else "ok", f"code_{i}").inc()
            m.hot_attempt_duration("a", "feishu").observe(elapsed / 2)
            if i == 2:
                m.capped_retries("a", "feishu", "code_99991400").inc()
            m.hot_requests("a", "feishu", route, "MADEUP" if i == 4 else "POST", "2xx", "success").inc()
            m.hot_request_duration("a", "feishu", route).observe(elapsed)
            if i != 5:
                in_flight.dec()   # one request still in flight at the scrape
    same_samples(fast_registry, stock_registry)
    assert fast_registry.get_sample_value("imsidecar_in_flight_requests", {"app": "a"}) == 1.0
    assert fast_registry.get_sample_value("imsidecar_requests_total", {
        "app": "a", "upstream": "feishu", "route": route, "method": "other", "status_class": "2xx", "outcome": "success"}) == 1.0
    families = {f.name for f in text_string_to_metric_families(generate_latest(fast_registry).decode())}
    assert {"imsidecar_requests", "imsidecar_request_duration_seconds", "imsidecar_in_flight_requests",
            "imsidecar_upstream_attempts", "imsidecar_upstream_attempt_duration_seconds", "imsidecar_retries"} <= families


def test_the_hot_children_stay_bounded_however_many_values_clients_make_up() -> None:
    m = Metrics(CollectorRegistry())
    for i in range(1000):
        m.hot_requests("a", "feishu", "/r", f"MADEUP{i}", "2xx", "success").inc()
        m.hot_attempts("a", "feishu", "/r", "permanent", f"code_{i}").inc()
    assert len(m.hot_requests._children) == 1   # every made-up method is `other`: one child, one key
    assert len(m.hot_attempts._children) == 101   # the first 100 reasons, then `other`
    assert m.registry.get_sample_value("imsidecar_requests_total", {
        "app": "a", "upstream": "feishu", "route": "/r", "method": "other", "status_class": "2xx",
        "outcome": "success"}) == 1000


@pytest.mark.parametrize("kind", ["ours", "fast"])
def test_prepared_series_read_as_children_built_at_zero_would(kind: str) -> None:
    from proxy.metrics import Counter as PreparedCounter

    ours_registry, stock_registry = CollectorRegistry(), CollectorRegistry()
    family = (PreparedCounter if kind == "ours" else FastCounter)(
        "imsidecar_test_withheld", "Withheld.", ("app", "why"), registry=ours_registry)
    stock = Counter("imsidecar_test_withheld", "Withheld.", ("app", "why"), registry=stock_registry)
    for why in ("unsafe", "deadline", "budget"):
        family.prepare("sales-bot", why)
        stock.labels("sales-bot", why)
    assert generate_latest(ours_registry) == generate_latest(stock_registry)
    family.labels("sales-bot", "deadline").inc(2)   # the first event: a real child, and only it reads 2
    stock.labels("sales-bot", "deadline").inc(2)
    assert sorted(generate_latest(ours_registry).splitlines()) == sorted(generate_latest(stock_registry).splitlines())
    assert generate_latest(ours_registry).count(b"why=\"deadline\"") == 1


@pytest.mark.parametrize("kind", ["ours", "fast"])
def test_series_prepared_each_read_as_those_prepared_one_by_one(kind: str) -> None:
    from proxy.metrics import Counter as PreparedCounter

    one_registry, each_registry = CollectorRegistry(), CollectorRegistry()
    cls = PreparedCounter if kind == "ours" else FastCounter
    one = cls("imsidecar_test_retries", "Retries.", ("app", "upstream", "reason"), registry=one_registry)
    each = cls("imsidecar_test_retries", "Retries.", ("app", "upstream", "reason"), registry=each_registry)
    reasons = ("http_503", "timeout", "reset")
    for app in ("a", "b"):
        for reason in reasons:
            one.prepare(app, "open", reason)
        each.prepare_each((app, "open"), reasons)
    each.prepare_each(("a", "open"), reasons)   # prepared twice: still one series each
    each.prepare("b", "open", "timeout")        # and prepared both ways: still one
    assert sorted(generate_latest(each_registry).splitlines()) == sorted(generate_latest(one_registry).splitlines())
    one.labels("b", "open", "reset").inc()
    each.labels("b", "open", "reset").inc()
    assert sorted(generate_latest(each_registry).splitlines()) == sorted(generate_latest(one_registry).splitlines())
    with pytest.raises(ValueError):
        each.prepare_each(("a",), reasons)


def test_preparing_with_the_wrong_label_count_fails_as_labels_would() -> None:
    from proxy.metrics import Counter as PreparedCounter

    family = PreparedCounter("imsidecar_test_prepared", "Prepared.", ("app", "why"), registry=CollectorRegistry())
    with pytest.raises(ValueError):
        family.prepare("sales-bot")


def test_scraped_gauges_read_as_children_with_a_function_would() -> None:
    from proxy.metrics import ScrapedGauge

    ours_registry, stock_registry = CollectorRegistry(), CollectorRegistry()
    ours = ScrapedGauge("imsidecar_test_state", "State.", ("app", "upstream"), registry=ours_registry)
    stock = Gauge("imsidecar_test_state", "State.", ("app", "upstream"), registry=stock_registry)
    state = {"open": 0.0, "api": 1}
    for upstream in state:
        ours.read(lambda u=upstream: state[u], "sales-bot", upstream)
        stock.labels("sales-bot", upstream).set_function(lambda u=upstream: state[u])
    state["open"] = 2.0   # read when scraped, not when registered
    assert generate_latest(ours_registry) == generate_latest(stock_registry)
    with pytest.raises(ValueError):
        ours.read(lambda: 0.0, "sales-bot")


def test_gauges_sharing_a_table_read_as_one_read_per_gauge_and_source_would() -> None:
    from proxy.metrics import ScrapedGauge

    table_registry, one_registry = CollectorRegistry(), CollectorRegistry()
    names = ("timeout", "attempts")
    shared: dict[tuple[str, ...], Any] = {}
    sources = {("sales-bot", "open"): {"timeout": 2.0, "attempts": 3}, ("ops", "api"): {"timeout": 0.5, "attempts": 1}}
    for name in names:
        ScrapedGauge(f"imsidecar_test_{name}", "Adaptive.", ("app", "upstream"),
                     registry=table_registry).read_table(shared, name)
        one = ScrapedGauge(f"imsidecar_test_{name}", "Adaptive.", ("app", "upstream"), registry=one_registry)
        for values, source in sources.items():
            one.read(lambda n=name, src=source: src[n], *values)
    for values, source in sources.items():
        shared[values] = source.__getitem__   # one entry per source, read by both gauges
    sources[("ops", "api")]["timeout"] = 4.0   # read when scraped, not when registered
    assert generate_latest(table_registry) == generate_latest(one_registry)
    assert table_registry.get_sample_value("imsidecar_test_timeout", {"app": "ops", "upstream": "api"}) == 4.0


def test_scraped_gauges_read_each_as_one_read_per_value_would() -> None:
    from proxy.metrics import ScrapedGauge

    each_registry, one_registry = CollectorRegistry(), CollectorRegistry()
    each = ScrapedGauge("imsidecar_test_state", "State.", ("app", "upstream", "state"), registry=each_registry)
    one = ScrapedGauge("imsidecar_test_state", "State.", ("app", "upstream", "state"), registry=one_registry)
    current = {"open": "healthy"}
    states = ("healthy", "lossy", "down")
    each.read_each(("sales-bot", "open"), states, lambda name: float(current["open"] == name))
    for name in states:
        one.read(lambda n=name: float(current["open"] == n), "sales-bot", "open", name)
    current["open"] = "lossy"   # read when scraped, not when registered
    assert generate_latest(each_registry) == generate_latest(one_registry)
    assert each_registry.get_sample_value("imsidecar_test_state", {"app": "sales-bot", "upstream": "open",
                                                                     "state": "lossy"}) == 1.0
    with pytest.raises(ValueError):
        each.read_each(("sales-bot",), states, lambda name: 0.0)
