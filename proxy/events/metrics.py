"""Prometheus instruments for the events subsystem (prefix `imsidecar_events_`), built on a given registry.

Owns metric names and label sets; it does not decide when anything is counted. Labels are config-bounded:
the app name from config, a channel, a fixed reason vocabulary — never an event id, URL or token.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

# The fixed vocabulary of `reason` labels, so a dashboard can list them and cardinality stays bounded.
REJECT_REASONS = (
    "bad_signature", "stale_timestamp", "bad_token", "undecryptable", "unknown_app", "bad_request", "queue_full",
)
DROP_REASONS = ("app_rejected", "attempts_exhausted", "shutdown")


class EventMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        p = "imsidecar_events_"
        self.received = Counter(p + "received", "Events received from a platform, before dedupe.",
                                ["app", "channel"], registry=registry)
        self.delivered = Counter(p + "delivered", "Events the application accepted (2xx).", ["app"], registry=registry)
        self.retried = Counter(p + "delivery_retries", "Repeated POSTs of an event to the application.",
                               ["app"], registry=registry)
        self.duplicates = Counter(p + "duplicates_dropped", "Redelivered events recognised and not delivered again.",
                                  ["app"], registry=registry)
        self.rejected = Counter(p + "rejected", "Platform pushes refused before delivery.", ["app", "reason"],
                                registry=registry)
        self.dropped = Counter(p + "dropped", "Accepted events given up on after delivery failed.", ["app", "reason"],
                               registry=registry)
        self.queue_depth = Gauge(p + "queue_depth", "Events waiting for delivery.", ["app"], registry=registry)
        self.connected = Gauge(p + "connection_up", "1 while the long connection is open.", ["app"],
                               registry=registry)
        self.reconnects = Counter(p + "reconnects", "Long connections re-opened after a drop.", ["app"],
                                  registry=registry)

    def reject(self, app: str, reason: str) -> None:
        assert reason in REJECT_REASONS, reason
        self.rejected.labels(app, reason).inc()
