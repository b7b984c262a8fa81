"""What `/readyz` means: this sidecar can serve (config loaded, listeners up, each app's first token attempt made).

Owns the verdict, the `readiness:` section and the report's shape. Token and platform health are reported in it,
never gating: a Feishu outage longer than a token's life must not take every replica of the application out of
its Service. `readiness.wait_for_tokens` brings back a token gate, at start-up only. It does not fetch tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from proxy.configtree import Node


@dataclass(frozen=True, slots=True)
class ReadinessSettings:
    # Not ready until every app has held a token once; after that, never unready for want of one.
    wait_for_tokens: bool = False


def parse_readiness(node: Node) -> ReadinessSettings:
    settings = ReadinessSettings(wait_for_tokens=node.flag("wait_for_tokens", False))
    node.finish()
    return settings


@dataclass(frozen=True, slots=True)
class AppHealth:
    """One app as /readyz reports it: its token, and each upstream's breaker and measured network state."""

    token: str                    # "ok", or why there is none ("fetching", the platform's refusal...)
    attempted: bool               # the start-up token attempt has finished, whatever its result
    expires_in: float             # seconds left on the held token (0: none)
    upstreams: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    @property
    def has_token(self) -> bool:
        return self.token == "ok"

    def as_json(self) -> dict[str, Any]:
        return {"token": self.token, "token_expires_in": round(self.expires_in), "upstreams": dict(self.upstreams)}


@dataclass(frozen=True, slots=True)
class ReadinessReport:
    ready: bool
    body: Mapping[str, Any]


class Readiness:
    """Judges readiness from what the sidecar reports; remembers that the start-up token gate, if asked for, passed."""

    def __init__(self, settings: ReadinessSettings) -> None:
        self._gate_open = not settings.wait_for_tokens

    @property
    def gate_open(self) -> bool:
        """No token gate (the default), or it has passed: from now on only apps whose first attempt is still out
        can make the sidecar unready, besides its listeners."""
        return self._gate_open

    def judge(self, listening: bool, apps: Mapping[str, AppHealth], verbose: bool = True) -> ReadinessReport:
        """The verdict, what it waits for and (`verbose`) each app's report."""
        waiting = self._waiting(listening, apps)
        body: dict[str, Any] = {"ready": not waiting, "waiting_for": waiting}
        if verbose:
            body["apps"] = {name: health.as_json() for name, health in apps.items()}
        return ReadinessReport(not waiting, body)

    def _waiting(self, listening: bool, apps: Mapping[str, AppHealth]) -> list[str]:
        waiting = [] if listening else ["listeners"]
        waiting += [f"first token attempt: {name}" for name, health in apps.items() if not health.attempted]
        if not self._gate_open:
            self._gate_open = all(health.has_token for health in apps.values())
            waiting += [f"a token (readiness.wait_for_tokens): {name}"
                        for name, health in apps.items() if not self._gate_open and not health.has_token]
        return waiting


__all__ = ["AppHealth", "Readiness", "ReadinessReport", "ReadinessSettings", "parse_readiness"]
