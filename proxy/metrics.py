"""Every Prometheus metric the sidecar exports, built by one factory on a given registry.

Owns names, labels, buckets, the outcome classes a finished request is counted under, and which series exist at
zero before their first event; the stages only call the children and say what happened.
"""

from __future__ import annotations

import time
from array import array
from bisect import bisect_left
from typing import Any, Callable, Iterable, Mapping, Sequence

from prometheus_client import (
    CollectorRegistry, Gauge, GCCollector, Histogram, Info, PlatformCollector, ProcessCollector,
    disable_created_metrics,
)
from prometheus_client import Counter as LibraryCounter
from prometheus_client.samples import Sample

from proxy import __version__
from proxy.outcome import Outcome, Signal, Verdict

# Every counter and histogram would also export a `<name>_created` series (47 of 307 on a typical sidecar) that
# no query of ours reads. The switch is prometheus_client's own and process-wide; the sidecar never wants them.
disable_created_metrics()

# Platform API latency: tens of ms on a warm path to tens of seconds for uploads and slow batch writes. Retries under
# faults put requests between 10 and 30 s (deadline 30 s), so that range gets buckets of its own: with only 10 and
# 30, a p95 of 10.9 s read as 21.7 s.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0, 12.5, 15.0, 20.0, 25.0, 30.0, 60.0)
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REQUEST_LABELS = ("app", "upstream", "route", "method", "status_class", "outcome")

# What a finished request means to its client, read from the platform's own classification of the final answer
# (a DingTalk `errcode` or Feishu `code` inside HTTP 200 is an error), or from the sidecar's own error.
SUCCESS = "success"
CLIENT_ERROR = "client_error"       # the caller's request or permissions: bad parameters, scope, a user token
THROTTLED = "throttled"             # rate limits that survived retries, the platform's or the sidecar's own
PLATFORM_ERROR = "platform_error"   # the platform failed: 5xx, "busy", internal errors inside HTTP 200
SIDECAR_ERROR = "sidecar_error"     # the sidecar answered itself: unreachable, deadline, circuit open, no token
OUTCOME_CLASSES = (SUCCESS, CLIENT_ERROR, THROTTLED, PLATFORM_ERROR, SIDECAR_ERROR)
_CLASS_OF = {Outcome.SUCCESS: SUCCESS, Outcome.THROTTLED: THROTTLED, Outcome.RETRYABLE: PLATFORM_ERROR,
             Outcome.PERMANENT: CLIENT_ERROR}

# Label values known before their first event, so each series exists at 0 and `increase()` sees the first one.
WITHHELD = ("attempts", "unsafe", "body_too_large", "retry_after_too_long", "deadline", "budget", "circuit_open")
CIRCUIT_STATES = ("closed", "half_open", "open")
TOKEN_RESULTS = ("success", "failure", "rejected")
APPLIED_OUTCOMES = ("applied", "not-applied", "unknown")        # X-Imsidecar-Outcome (proxy/history.py)
ONCE_RESULTS = ("executed", "replayed", "conflict", "mismatch", "heard_out", "amended")   # the exactly-once store


# RFC 9110's methods and PATCH. aiohttp's pure-Python HTTP parser (AIOHTTP_NO_EXTENSIONS, no C wheel) accepts any
# token as a method, so a client could otherwise mint a series per made-up method.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})
OTHER = "other"


class Capped:
    """One label's values when the sidecar does not choose them (the client's method, a platform's error code, a
    header from upstream): a known vocabulary plus the first `limit` others seen; anything beyond reads `other`."""

    def __init__(self, known: Iterable[str] = (), limit: int = 0) -> None:
        self._seen = set(known)
        self._room = len(self._seen) + limit

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self._room:
            return OTHER
        self._seen.add(value)
        return value


class _Value:
    """A sample's value without prometheus_client's per-value lock (`MutexValue`): the sidecar updates and scrapes
    its metrics on one event-loop thread, so nothing races. Not for multiprocess mode, which the sidecar never uses."""

    __slots__ = ("value", "exemplar")

    def __init__(self) -> None:
        self.value = 0.0
        self.exemplar: Any = None

    def inc(self, amount: float) -> None:
        self.value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self.value = value

    def get(self) -> float:
        return self.value

    def set_exemplar(self, exemplar: Any) -> None:
        self.exemplar = exemplar

    def get_exemplar(self) -> Any:
        return self.exemplar


def _check_count(labelnames: tuple[str, ...], values: tuple[str, ...], more: int = 0) -> None:
    """As `labels()` refuses the wrong number of label values: `values`, and `more` to come, must fill `labelnames`."""
    if len(values) + more != len(labelnames):
        extra = f" and {more} more" if more else ""
        raise ValueError(f"{labelnames} needs {len(labelnames)} values, got {values!r}{extra}")


class ZeroSeries:
    """A counter family that exports series at 0 for label values `prepare`d up front, with no child for each.

    A child costs ~1.5 KB and ~50 µs to build; with ~90 prepared series per app, 1,000 apps held 65 MB and spent
    seconds of start-up on series most of which never count anything. A prepared series is rendered as the child
    `labels()` would build at 0 renders (`_total`, no exemplar), until its first event builds the real child.
    """

    _labelnames: tuple[str, ...]
    _metrics: dict[Sequence[str], Any]

    def prepare(self, *values: str) -> None:
        _check_count(self._labelnames, values)
        self.__dict__.setdefault("_zero", {})[tuple(map(str, values))] = None   # a dict: ordered, as children are

    def prepare_each(self, head: tuple[str, ...], lasts: tuple[str, ...]) -> None:
        """`prepare(*head, last)` for each of `lasts`, held as one entry that shares `lasts` (26 retry reasons of
        each of 1,000 apps were 26,000 tuples of their own; pass the same tuple for every app)."""
        _check_count(self._labelnames, head, more=1)
        self.__dict__.setdefault("_zero_each", {})[(head, lasts)] = None

    def _multi_samples(self) -> Iterable[Sample]:
        yield from super()._multi_samples()   # type: ignore[misc]
        single = self.__dict__.get("_zero", {})
        for values in single:
            if values not in self._metrics:
                yield Sample("_total", dict(zip(self._labelnames, values)), 0.0, None, None)
        for head, lasts in self.__dict__.get("_zero_each", ()):
            for last in lasts:
                values = (*head, last)
                if values not in self._metrics and values not in single:
                    yield Sample("_total", dict(zip(self._labelnames, values)), 0.0, None, None)


class Counter(ZeroSeries, LibraryCounter):
    """prometheus_client's Counter, with series prepared at zero."""


class ScrapedGauge(Gauge):
    """A gauge family whose series each read a function at scrape time, registered by label values with no child
    each (a child with `set_function` renders the same sample, at ~1.5 KB a series)."""

    _labelnames: tuple[str, ...]
    _metrics: dict[Sequence[str], Any]

    def read(self, function: Callable[[], float], *values: str) -> None:
        _check_count(self._labelnames, values)
        self.__dict__.setdefault("_read", {})[tuple(map(str, values))] = function

    def read_each(self, head: tuple[str, ...], lasts: tuple[str, ...], function: Callable[[str], float]) -> None:
        """`read(lambda: function(last), *head, last)` for each of `lasts`, held as one entry (share `lasts`)."""
        _check_count(self._labelnames, head, more=1)
        self.__dict__.setdefault("_read_each", {})[(head, lasts)] = function

    def read_table(self, table: Mapping[tuple[str, ...], Callable[[str], float]], key: str) -> None:
        """A series for each entry of `table` (label values -> reader) at `reader(key)`: several gauges over the
        same sources share one table, an entry per source instead of one per gauge and source."""
        self.__dict__["_table"] = (table, key)

    def _multi_samples(self) -> Iterable[Sample]:
        yield from super()._multi_samples()
        table, key = self.__dict__.get("_table", ({}, ""))
        for values, reader in table.items():
            if values not in self._metrics:
                yield Sample("", dict(zip(self._labelnames, values)), float(reader(key)), None, None)
        for values, function in self.__dict__.get("_read", {}).items():
            if values not in self._metrics:
                yield Sample("", dict(zip(self._labelnames, values)), float(function()), None, None)
        for (head, lasts), each in self.__dict__.get("_read_each", {}).items():
            for last in lasts:
                values = (*head, last)
                if values not in self._metrics:
                    yield Sample("", dict(zip(self._labelnames, values)), float(each(last)), None, None)


# The three lock-free kinds below replace only how a child holds and updates its values: prometheus_client still
# builds the children (`labels()`), validates names and labels, and renders every sample (`_child_samples`), so
# what /metrics serves is the library's own output. They are for the metrics the forwarding path touches on
# every request, where the locks and the linear bucket scan were ~12% of the sidecar's Python time.

class FastCounter(Counter):   # lock-free, and with series prepared at zero
    def _metric_init(self) -> None:
        self._value = _Value()   # type: ignore[assignment]
        self._created = time.time()

    def inc(self, amount: float = 1, exemplar: dict[str, str] | None = None) -> None:
        if amount < 0 or exemplar:   # the library's own checks and errors, off the common path
            super().inc(amount, exemplar)
            return
        try:
            self._value.value += amount   # type: ignore[attr-defined]
        except AttributeError:   # a parent without label values has no value: the library says so
            super().inc(amount)


class FastGauge(Gauge):
    def _metric_init(self) -> None:
        self._value = _Value()   # type: ignore[assignment]

    def inc(self, amount: float = 1) -> None:
        try:
            self._value.value += amount   # type: ignore[attr-defined]
        except AttributeError:   # as for FastCounter
            super().inc(amount)

    def dec(self, amount: float = 1) -> None:
        try:
            self._value.value -= amount   # type: ignore[attr-defined]
        except AttributeError:
            super().dec(amount)


class _Buckets:
    """A histogram child's bucket counts in one array of doubles, read by the library as its list of values
    (`_buckets[i].get()`, `.inc()`, exemplars): 19 value objects a child were 54k objects at 1,000 apps, a fifth of
    what the cyclic collector scanned. A `_Cell` view is made only when the library asks (scrapes, exemplars)."""

    __slots__ = ("counts", "exemplars")

    def __init__(self, size: int) -> None:
        self.counts = array("d", bytes(8 * size))
        self.exemplars: dict[int, Any] = {}

    def __getitem__(self, index: int) -> _Cell:
        return _Cell(self, index)

    def __len__(self) -> int:
        return len(self.counts)


class _Cell:
    __slots__ = ("_of", "_index")

    def __init__(self, of: _Buckets, index: int) -> None:
        self._of, self._index = of, index

    def inc(self, amount: float) -> None:
        self._of.counts[self._index] += amount

    def get(self) -> float:
        return self._of.counts[self._index]

    def set_exemplar(self, exemplar: Any) -> None:
        self._of.exemplars[self._index] = exemplar

    def get_exemplar(self) -> Any:
        return self._of.exemplars.get(self._index)


class FastHistogram(Histogram):
    def _metric_init(self) -> None:
        self._created = time.time()
        self._sum = _Value()   # type: ignore[assignment]
        self._buckets = _Buckets(len(self._upper_bounds))   # type: ignore[assignment]

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        if exemplar or amount != amount:   # NaN falls in no bucket in the library; keep that, off the common path
            super().observe(amount, exemplar)
            return
        try:
            self._sum.value += amount   # type: ignore[attr-defined]
        except AttributeError:   # as for FastCounter
            super().observe(amount)
        # The first bucket whose upper bound is >= amount, as the library's `amount <= bound` scan finds it.
        self._buckets.counts[bisect_left(self._upper_bounds, amount)] += 1   # type: ignore[attr-defined]


class Children:
    """A metric's children by label values, for the hot path: `.labels()` validates and locks on every call.

    Bounded like the labels themselves: values come from configuration, a capped route template, or pass a `Capped`
    (by label position) before they key the cache, so neither the series nor this dict can grow without bound. Values
    a `Capped` let through as they are key the dict directly, so the common lookup is one dict read.
    """

    def __init__(self, metric: Counter | Gauge | Histogram, bounds: Mapping[int, Capped] | None = None) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}
        self._bounds = tuple((bounds or {}).items())

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        return child if child is not None else self._miss(values)

    def _miss(self, values: tuple[str, ...]) -> Any:
        bounded = self.bounded(values)
        child = self._children.get(bounded)
        if child is None:
            child = self._children[bounded] = self._child(bounded)
        return child

    def bounded(self, values: tuple[str, ...]) -> tuple[str, ...]:
        """The label values the child for `values` has, once each `Capped` had its say."""
        if not self._bounds:
            return values
        bounded = list(values)
        for position, capped in self._bounds:
            bounded[position] = capped(bounded[position])
        return tuple(bounded)

    def _child(self, values: tuple[str, ...]) -> Any:
        return self._metric.labels(*values)


def outcome_class(verdict: Verdict, sidecar_token: bool) -> str:
    """The class of a request the platform answered, from that answer's verdict. A token the platform refused is
    the caller's when the caller sent it (a user token), the platform's when it refused the sidecar's fresh one."""
    if verdict.outcome is Outcome.TOKEN_INVALID:
        return PLATFORM_ERROR if sidecar_token else CLIENT_ERROR
    if verdict.signal is Signal.THROTTLED:   # DingTalk's temporary bans (901xx) are permanent for one request
        return THROTTLED
    return _CLASS_OF[verdict.outcome]


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._interned: dict[tuple[str, ...], tuple[str, ...]] = {}
        r = self.registry
        Info("imsidecar_build", "Version of the running sidecar.", registry=r).info({"version": __version__})
        # The sidecar process itself: process_* (CPU, memory, fds, start time: restarts), python_info, python_gc_*.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        # What clients saw ("effective") ...
        self.requests = FastCounter(
            "imsidecar_requests", "Client requests answered, by final status class and outcome class "
            "(success, client_error, throttled, platform_error, sidecar_error).", REQUEST_LABELS, registry=r)
        self.sidecar_errors = Counter(
            "imsidecar_sidecar_errors", "Requests the sidecar answered with an error of its own, by kind "
            "(the X-Imsidecar-Error header).", ("app", "upstream", "error"), registry=r)
        self.request_duration = FastHistogram(
            "imsidecar_request_duration_seconds", "End-to-end time of a client request, retries and waits included.",
            ("app", "upstream", "route"), buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = FastGauge("imsidecar_in_flight_requests", "Client requests being handled.", ("app",), registry=r)
        # ... and what the platform saw ("actual").
        self.attempts = FastCounter(
            "imsidecar_upstream_attempts", "Attempts sent to the platform, by classified result.",
            ("app", "upstream", "route", "outcome", "reason"), registry=r)
        self.attempt_duration = FastHistogram(
            "imsidecar_upstream_attempt_duration_seconds", "Time of one attempt to the platform.",
            ("app", "upstream"), buckets=LATENCY_BUCKETS, registry=r)
        # Retries.
        self.retries = FastCounter("imsidecar_retries", "Retries sent, by reason.", ("app", "upstream", "reason"), registry=r)
        self.retry_budget_exhausted = Counter(
            "imsidecar_retry_budget_exhausted", "Retries not sent because the retry budget was spent.",
            ("app", "upstream"), registry=r)
        self.deadline_exceeded = Counter(
            "imsidecar_deadline_exceeded", "Requests whose overall deadline ran out.", ("app", "upstream"), registry=r)
        self.idempotency_keys = Counter(
            "imsidecar_idempotency_keys_added", "Idempotency keys the sidecar added to POSTs.", ("app", "route"), registry=r)
        self.not_retried = Counter(
            "imsidecar_retries_withheld", "Retryable failures not retried, by why (unsafe, body_too_large, ...).",
            ("app", "upstream", "why"), registry=r)
        # Tokens.
        self.token_refreshes = Counter(
            "imsidecar_token_refreshes", "Token fetches from the platform, by result (success, failure, rejected).",
            ("app", "kind", "result"), registry=r)
        self.token_expiry = ScrapedGauge(
            "imsidecar_token_expiry_seconds", "Seconds until the held token expires (0 when none).",
            ("app", "kind"), registry=r)
        self.token_replays = Counter(
            "imsidecar_token_replays", "Requests replayed after the platform said the token was invalid.",
            ("app",), registry=r)
        # Circuit breaker, network state and the adaptive parameters (per app and upstream).
        self.circuit_state = ScrapedGauge(
            "imsidecar_circuit_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            ("app", "upstream"), registry=r)
        self.circuit_transitions = Counter(
            "imsidecar_circuit_transitions", "Circuit breaker state changes, by the state entered.",
            ("app", "upstream", "state"), registry=r)
        self.network_state = ScrapedGauge(
            "imsidecar_network_state", "1 for the measured network state of the upstream, 0 for the others.",
            ("app", "upstream", "state"), registry=r)
        self.adaptive = {
            name: ScrapedGauge(f"imsidecar_adaptive_{name}", help_text, ("app", "upstream"), registry=r)
            for name, help_text in (
                ("per_try_timeout_seconds", "Per-try timeout in force."),
                ("backoff_base_seconds", "Back-off base in force."),
                ("backoff_cap_seconds", "Back-off cap in force."),
                ("max_attempts", "Attempts allowed per request in force."),
                ("latency_ewma_seconds", "Smoothed attempt latency measured."),
                ("latency_p99_seconds", "99th percentile attempt latency over the window."),
                ("loss_ratio", "Share of attempts lost to resets, timeouts and connect failures over the window."),
                ("throttle_ratio", "Share of attempts throttled by the platform over the window."),
            )
        }
        # One reader per app and upstream for all of the adaptive gauges (`read_adaptive`): a reader per gauge was
        # 16 objects and 16 label tuples per upstream, ~2.7 MB at 1,000 apps.
        self._adaptive_readers: dict[tuple[str, ...], Callable[[str], float]] = {}
        for name, gauge in self.adaptive.items():
            gauge.read_table(self._adaptive_readers, name)
        # Client-side rate limiting (per app and route template).
        self.ratelimit_wait = Histogram(
            "imsidecar_ratelimit_wait_seconds", "Time requests waited for the sidecar's own rate limiter.",
            ("app", "route"), buckets=WAIT_BUCKETS, registry=r)
        self.ratelimit_rejections = Counter(
            "imsidecar_ratelimit_rejections", "Requests answered 429 at once: the wait would overrun their deadline.",
            ("app", "route"), registry=r)
        self.ratelimit_rate = ScrapedGauge(
            "imsidecar_ratelimit_rate", "Requests per second the limiter allows now (lowered after throttling).",
            ("app", "route"), registry=r)
        # The children the forwarding path touches on every request. method: the client's, capped.
        self.hot_requests = Children(self.requests, {3: Capped(METHODS)})
        self.hot_request_duration = Children(self.request_duration)
        self.hot_in_flight = Children(self.in_flight)
        self.hot_attempts = Children(self.attempts, {4: Capped(limit=100)})   # reason: `code_<n>` from the platform's body
        self.hot_attempt_duration = Children(self.attempt_duration)
        self.capped_retries = Children(self.retries, {2: Capped(limit=100)})   # reason, as for attempts
        # What went wrong on the sidecar's side of the wire without being a request's answer (proxy/guard.py,
        # proxy/listener.py): a stage that failed open, a connection closed for the client's misbehaviour.
        self.stage_failures = Counter(
            "imsidecar_stage_failures", "Unexpected exceptions inside a stage; the request went on without it.",
            ("stage",), registry=r)
        self.client_faults = Counter(
            "imsidecar_client_faults", "Client faults met before a request reached an app, by kind (malformed, "
            "header_timeout, bad_target, over_capacity, idle_closed).", ("listen", "kind"), registry=r)
        self.local_answers = Counter(
            "imsidecar_token_endpoint_answers", "Calls to the platform's token endpoints answered by the sidecar.",
            ("app",), registry=r)
        self._exactly_once(r)

    def _exactly_once(self, r: CollectorRegistry) -> None:
        """Honest final answers, keys the client sends, late answers and the sidecar's own exactly-once store."""
        self.request_outcomes = FastCounter(
            "imsidecar_request_outcomes",
            "Requests sent to the platform at least once, by what their final answer says was done "
            "(applied, not-applied, unknown: the X-Imsidecar-Outcome header).", ("app", "upstream", "outcome"),
            registry=r)
        self.hot_outcomes = Children(self.request_outcomes)
        self.idempotency_mapped = Counter(
            "imsidecar_idempotency_keys_mapped",
            "Idempotency-Key headers from clients put in place as the platform's own key.", ("app", "route"),
            registry=r)
        self.late_answers = Counter(
            "imsidecar_upstream_late_answers",
            "Attempts cut off by their per-try timeout whose answer arrived afterwards (the platform is slow, not "
            "gone).", ("app", "upstream"), registry=r)
        self.once_requests = Counter(
            "imsidecar_idempotency_store_requests",
            "Requests carrying Idempotency-Key, by what the sidecar's exactly-once store did: executed, replayed "
            "(a stored answer), conflict (409: still in flight), mismatch (422: another request with that key), "
            "heard_out (executed ones whose client left before the answer: they went on, and the answer was kept), "
            "amended (executed ones kept as unknown after a timeout, whose late answer then replaced that outcome).",
            ("app", "result"), registry=r)
        self.once_entries = Gauge(
            "imsidecar_idempotency_store_entries", "Keys held by this process's exactly-once store (memory).",
            registry=r)
        self.once_bytes = Gauge(
            "imsidecar_idempotency_store_bytes", "Bytes of stored answers held by this process's exactly-once store.",
            registry=r)

    # Series at zero before their first event -----------------------------------------------------------------

    def read_adaptive(self, reader: Callable[[str], float], app: str, upstream: str) -> None:
        """Every `imsidecar_adaptive_<name>` series of (app, upstream) at `reader(<name>)`, read at scrape time."""
        self._adaptive_readers[(str(app), str(upstream))] = reader

    def prepare_upstream(self, app: str, upstream: str, retry_reasons: Iterable[str], errors: Iterable[str]) -> None:
        """Every counter of one (app, upstream) whose label values are known up front, at 0."""
        head = (app, upstream)
        reasons = self._shared(tuple(self.capped_retries.bounded((app, upstream, r))[2] for r in retry_reasons))
        self.retries.prepare_each(head, reasons)
        self.not_retried.prepare_each(head, WITHHELD)
        self.circuit_transitions.prepare_each(head, CIRCUIT_STATES)
        self.sidecar_errors.prepare_each(head, self._shared(tuple(errors)))
        self.retry_budget_exhausted.prepare(app, upstream)
        self.deadline_exceeded.prepare(app, upstream)
        self.request_outcomes.prepare_each(head, APPLIED_OUTCOMES)
        self.late_answers.prepare(app, upstream)

    def _shared(self, values: tuple[str, ...]) -> tuple[str, ...]:
        """One tuple for every app with the same values (they are the platform's, not the app's)."""
        return self._interned.setdefault(values, values)

    def prepare_app(self, app: str) -> None:
        self.token_replays.prepare(app)
        self.local_answers.prepare(app)
        self.once_requests.prepare_each((app,), ONCE_RESULTS)

    def prepare_token(self, app: str, kind: str) -> None:
        for result in TOKEN_RESULTS:
            self.token_refreshes.prepare(app, kind, result)

# ----------------------------------------------------------------------------------------------------------------
# Spending less of the platform's quota (proxy/saving/): a block of its own, built by the app beside `Metrics`.

class SavingsMetrics:
    """What the read cache, coalescing, card merging, priority lanes and the monthly quota meter did."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.cache_lookups = FastCounter(
            "imsidecar_cache_lookups", "Reads of cached routes, by result: hit (fresh, no platform call), miss, "
            "bypass (Cache-Control: no-cache), stale (the platform failed; an older answer stood in).",
            ("app", "route", "result"), registry=r)
        self.cache_entries = Gauge("imsidecar_cache_entries", "Answers held in this replica's read cache.",
                                   ("app",), registry=r)
        self.cache_bytes = Gauge("imsidecar_cache_bytes", "Bytes of answers held in this replica's read cache.",
                                 ("app",), registry=r)
        self.coalesced = Counter(
            "imsidecar_coalesced_requests", "Requests answered without a platform call of their own: a read that "
            "shared an identical one's call (read), a card update replaced by a newer one (card).",
            ("app", "route", "kind"), registry=r)
        self.lane_requests = FastCounter("imsidecar_priority_requests", "Requests by priority lane.", ("app", "lane"),
                                     registry=r)
        self.lane_wait = FastHistogram(
            "imsidecar_priority_wait_seconds", "Time requests waited for a send slot, standing aside included, by lane.",
            ("app", "lane"), buckets=WAIT_BUCKETS, registry=r)
        self.preemptions = Counter(
            "imsidecar_priority_preemptions", "Waits of bulk requests cut short so an interactive request went first.",
            ("app",), registry=r)
        self.aged = Counter(
            "imsidecar_priority_aged", "Bulk requests that stood aside for max_bulk_wait and then took their turn.",
            ("app",), registry=r)
        self.quota_used = Gauge("imsidecar_quota_used_calls", "Metered calls this calendar month (Asia/Shanghai), "
                                "as counted by the sidecar (all replicas, with a shared store).", ("account",), registry=r)
        self.quota_allowance = Gauge("imsidecar_quota_allowance_calls", "The configured monthly allowance "
                                     "(0 when none is configured).", ("account",), registry=r)
        self.quota_projected = Gauge("imsidecar_quota_projected_calls", "Metered calls projected to the end of the "
                                     "month at this month's pace so far.", ("account",), registry=r)
        self.quota_counted = FastCounter("imsidecar_quota_metered_calls", "Metered calls this replica counted.",
                                     ("account",), registry=r)
        self.quota_refusals = Counter("imsidecar_quota_refusals", "Bulk calls refused locally past the reserve "
                                      "threshold.", ("account",), registry=r)
        self.quota_exhausted = Counter("imsidecar_quota_exhausted_answers", "Platform answers saying the month's "
                                       "allowance is spent (Feishu 99991403, DingTalk 90020 / ApiCountLimitForOrg).",
                                       ("account",), registry=r)
        # The children touched per request or attempt (labels bounded by config, the capped route and fixed words).
        self.hot_cache_lookups = Children(self.cache_lookups)
        self.hot_lane_requests = Children(self.lane_requests)
        self.hot_lane_wait = Children(self.lane_wait)
        self.hot_quota_counted = Children(self.quota_counted)

    # What the saving stages update per request or attempt: put behind the stage guard (proxy/guard.py) by the app.
    HOT_CHILDREN = ("hot_cache_lookups", "hot_lane_requests", "hot_lane_wait", "hot_quota_counted")
    REQUEST_FAMILIES = ("coalesced", "preemptions", "aged", "quota_refusals", "quota_exhausted")

    def prepare_app(self, app: str, lanes: Iterable[str]) -> None:
        """One app's counters whose label values are known up front, at 0."""
        self.preemptions.prepare(app)
        self.aged.prepare(app)
        for lane in lanes:
            self.lane_requests.prepare(app, lane)

    def prepare_account(self, account: str) -> None:
        for counter in (self.quota_counted, self.quota_refusals, self.quota_exhausted):
            counter.prepare(account)
