"""Recognising an alert notification sent again after it failed, so its failure is counted once, not once per try.

Owns the memory of notifications that failed (bounded, forgotten after an hour) and what makes two notifications the
same; it does not deliver, count or answer. Alertmanager retries a notification answered 5xx within one flush and
sends it again at each `group_interval` until one succeeds (alertmanager#2286, #2486); each try is the same
notification: same receiver, group, status and alerts.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

from proxy.clock import Clock
from proxy.robots.render import Notification


def notification_key(target: str, note: Notification) -> str:
    """What stays the same across Alertmanager's tries of one notification, and changes with its next one."""
    alerts = sorted((a.status, sorted(a.labels.items()), a.starts_at, a.ends_at) for a in note.alerts)
    identity = [target, note.receiver, note.status, sorted(note.group_labels.items()), alerts]
    return hashlib.sha256(json.dumps(identity, ensure_ascii=False).encode()).hexdigest()


class FailedNotifications:
    """Notifications whose last try failed, until they are delivered or an hour passes (at most `limit` of them)."""

    def __init__(self, clock: Clock, ttl: float = 3600.0, limit: int = 4096) -> None:
        self._clock, self._ttl, self._limit = clock, ttl, limit
        self._failed: OrderedDict[str, float] = OrderedDict()   # key → when it last failed

    def seen(self, key: str) -> bool:
        failed_at = self._failed.get(key)
        return failed_at is not None and self._clock.now() - failed_at < self._ttl

    def failed(self, key: str) -> None:
        self._failed.pop(key, None)
        self._failed[key] = self._clock.now()
        while len(self._failed) > self._limit:
            self._failed.popitem(last=False)

    def delivered(self, key: str) -> None:
        self._failed.pop(key, None)


__all__ = ["FailedNotifications", "notification_key"]
