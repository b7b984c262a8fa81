"""Prometheus metrics for robot deliveries: messages by target and result, latency, rate-limit waits, retries.

Owns metric names, label sets and the series that exist at zero before their first event; it does not decide what
happened (delivery and the handlers tell it).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram

from proxy.robots.settings import RobotTarget

# Label values are bounded: target names come from config, results and reasons from fixed tables.
RESULTS = ("delivered", "refused", "unavailable", "rate_limited", "bad_message", "abandoned")   # abandoned: the caller left
DELIVERY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WAIT_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0)


class RobotMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages = Counter(
            "imsidecar_robot_messages", "Robot messages and alert notifications, each counted once, by the result "
            "of its first delivery.", ["target", "result"], registry=registry)
        self.resends = Counter(
            "imsidecar_robot_resends", "Alert notifications sent again after they failed (Alertmanager's retries), "
            "by result; delivered: a failure counted in imsidecar_robot_messages_total was recovered.",
            ["target", "result"], registry=registry)
        self.delivery = Histogram(
            "imsidecar_robot_delivery_seconds", "Time from request to final answer, waits and retries included.",
            ["target"], buckets=DELIVERY_BUCKETS, registry=registry)
        self.ratelimit_wait = Histogram(
            "imsidecar_robot_ratelimit_wait_seconds", "Time a send queued for the robot's rate limit.",
            ["target"], buckets=WAIT_BUCKETS, registry=registry)
        self.ratelimit_waits = Counter(
            "imsidecar_robot_ratelimit_waits", "Sends that had to queue (waited) or could not fit the deadline "
            "(rejected).", ["target", "outcome"], registry=registry)
        self.retries = Counter(
            "imsidecar_robot_retries", "Robot sends tried again (counted when sent), by the reason the previous try "
            "failed.", ["target", "reason"], registry=registry)

    def prepare(self, targets: Iterable[RobotTarget], retry_reasons: Iterable[str]) -> None:
        """Every series whose labels are known up front, at 0, so the first failure shows in `increase()`."""
        reasons = tuple(retry_reasons)
        for target in targets:
            for result in RESULTS:
                self.messages.labels(target.name, result)
                self.resends.labels(target.name, result)
            for outcome in ("waited", "rejected"):
                self.ratelimit_waits.labels(target.name, outcome)
            for reason in reasons:
                self.retries.labels(target.name, reason)

    def finished(self, target: str, result: str, seconds: float, resend: bool = False) -> None:
        (self.resends if resend else self.messages).labels(target, result).inc()
        self.delivery.labels(target).observe(seconds)

    def waited(self, target: str, seconds: float) -> None:
        if seconds > 0:
            self.ratelimit_wait.labels(target).observe(seconds)
            self.ratelimit_waits.labels(target, "waited").inc()

    def rejected(self, target: str) -> None:
        self.ratelimit_waits.labels(target, "rejected").inc()

    def retried(self, target: str, reason: str) -> None:
        self.retries.labels(target, reason).inc()
