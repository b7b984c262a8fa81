"""Every Prometheus metric the sidecar exports, built by one factory on a given registry.

Owns names, labels and buckets (label values bounded by configuration); the stages only call the children.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from proxy import __version__

# Platform API latency: a few ms on a warm path to tens of seconds for uploads and slow batch writes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REQUEST_LABELS = ("app", "upstream", "route", "method", "status_class", "outcome")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        Info("imsidecar_build", "Version of the running sidecar.", registry=r).info({"version": __version__})
        # What clients saw ("effective") ...
        self.requests = Counter(
            "imsidecar_requests", "Client requests answered, by final status class and outcome.", REQUEST_LABELS, registry=r)
        self.request_duration = Histogram(
            "imsidecar_request_duration_seconds", "End-to-end time of a client request, retries and waits included.",
            ("app", "upstream", "route"), buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("imsidecar_in_flight_requests", "Client requests being handled.", ("app",), registry=r)
        # ... and what the platform saw ("actual").
        self.attempts = Counter(
            "imsidecar_upstream_attempts", "Attempts sent to the platform, by classified result.",
            ("app", "upstream", "route", "outcome", "reason"), registry=r)
        self.attempt_duration = Histogram(
            "imsidecar_upstream_attempt_duration_seconds", "Time of one attempt to the platform.",
            ("app", "upstream"), buckets=LATENCY_BUCKETS, registry=r)
        # Retries.
        self.retries = Counter("imsidecar_retries", "Retries sent, by reason.", ("app", "upstream", "reason"), registry=r)
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
        self.token_expiry = Gauge(
            "imsidecar_token_expiry_seconds", "Seconds until the held token expires (0 when none).",
            ("app", "kind"), registry=r)
        self.token_replays = Counter(
            "imsidecar_token_replays", "Requests replayed after the platform said the token was invalid.",
            ("app",), registry=r)
        self.local_answers = Counter(
            "imsidecar_token_endpoint_answers", "Calls to the platform's token endpoints answered by the sidecar.",
            ("app",), registry=r)
