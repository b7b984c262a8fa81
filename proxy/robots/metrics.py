"""Prometheus metrics for robot deliveries: messages by target and result, latency, rate-limit waits, retries.

Owns metric names and label sets; it does not decide what happened (delivery and the handlers tell it).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

# Label values are bounded: target names come from config, results and reasons from fixed tables.
RESULTS = ("delivered", "refused", "unavailable", "rate_limited", "bad_message", "abandoned")   # abandoned: the caller left
DELIVERY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WAIT_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0)


class RobotMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages = Counter(
            "imsidecar_robot_messages", "Robot messages handled, by target and result.",
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
            "imsidecar_robot_retries", "Robot sends tried again, by the reason the previous try failed.",
            ["target", "reason"], registry=registry)

    def finished(self, target: str, result: str, seconds: float) -> None:
        self.messages.labels(target, result).inc()
        self.delivery.labels(target).observe(seconds)

    def waited(self, target: str, seconds: float) -> None:
        if seconds > 0:
            self.ratelimit_wait.labels(target).observe(seconds)
            self.ratelimit_waits.labels(target, "waited").inc()

    def rejected(self, target: str) -> None:
        self.ratelimit_waits.labels(target, "rejected").inc()

    def retried(self, target: str, reason: str) -> None:
        self.retries.labels(target, reason).inc()
