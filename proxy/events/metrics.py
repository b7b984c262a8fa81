"""Prometheus instruments for the events subsystem (prefix `imsidecar_events_`), built on a given registry.

Owns metric names and label sets; it does not decide when anything is counted. Labels are config-bounded:
the app name from config, a channel, a fixed reason vocabulary — never an event id, URL or token.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# The fixed vocabulary of `reason` labels, so a dashboard can list them and cardinality stays bounded.
REJECT_REASONS = (
    "bad_signature", "stale_timestamp", "bad_token", "undecryptable", "unknown_app", "bad_request", "queue_full",
    "store_unavailable",
)
# Lost: only what the chosen backend cannot keep (memory at shutdown) or a fire-and-forget push never stored.
DROP_REASONS = ("shutdown", "unstored")
DEAD_REASONS = ("expired", "app_rejected")
CARD_OUTCOMES = ("answered", "late", "failed")
ROLES = ("deliver", "connection")
HANDOVER_REASONS = ("shutdown", "unhealthy", "lost")
# Seconds from the sidecar taking an event to the application's 2xx: milliseconds normally, hours when it was down.
DELAY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 21600, 86400)
CARD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 2.5, 3, 5)


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
        self.dropped = Counter(p + "dropped", "Accepted events lost: the memory backend at shutdown, or a push the "
                               "platform never repeats that could not be stored.", ["app", "reason"],
                               registry=registry)
        self.dead_lettered = Counter(p + "dead_lettered", "Events moved to the dead-letter store.", ["app", "reason"],
                                     registry=registry)
        self.queue_depth = Gauge(p + "queue_depth", "Events waiting for delivery.", ["app"], registry=registry)
        self.oldest = Gauge(p + "queue_oldest_seconds", "Age of the event at the head of the queue (0 when empty).",
                            ["app"], registry=registry)
        self.delay = Histogram(p + "delivery_delay_seconds", "From the sidecar taking an event to the application "
                               "accepting it.", ["app"], buckets=DELAY_BUCKETS, registry=registry)
        self.connected = Gauge(p + "connection_up", "1 while the long connection is open.", ["app"],
                               registry=registry)
        self.reconnects = Counter(p + "reconnects", "Long connections re-opened after a drop.", ["app"],
                                  registry=registry)
        self.owner = Gauge(p + "lease_held", "1 while this replica holds the app's lease for the role.",
                           ["app", "role"], registry=registry)
        self.handovers = Counter(p + "lease_handovers", "Leases this replica gave up or lost.",
                                 ["app", "role", "reason"], registry=registry)
        self.cards = Counter(p + "card_answers", "Card callbacks answered inline, by outcome.", ["app", "outcome"],
                             registry=registry)
        self.card_seconds = Histogram(p + "card_answer_seconds", "How long the application took to answer a card "
                                      "callback (up to the deadline).", ["app"], buckets=CARD_BUCKETS,
                                      registry=registry)

    def declare_lane(self, app: str) -> None:
        """Create an app's series at 0, so rate() and alerts see "none yet" rather than nothing at all."""
        for counter in (self.delivered, self.retried, self.duplicates):
            counter.labels(app)
        for reason in DEAD_REASONS:
            self.dead_lettered.labels(app, reason)
        for reason in DROP_REASONS:
            self.dropped.labels(app, reason)
        for outcome in CARD_OUTCOMES:
            self.cards.labels(app, outcome)
        self.queue_depth.labels(app)

    def declare_lease(self, app: str, role: str) -> None:
        self.owner.labels(app, role).set(0)
        for reason in HANDOVER_REASONS:
            self.handovers.labels(app, role, reason)

    def reject(self, app: str, reason: str) -> None:
        assert reason in REJECT_REASONS, reason
        self.rejected.labels(app, reason).inc()
