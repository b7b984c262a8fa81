"""The vocabulary every stage shares about one upstream attempt: what happened and what it means.

Platform modules produce a `Verdict`; the retry engine, network monitor and breaker consume it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Outcome(enum.Enum):
    """What the caller should do about an attempt."""

    # Members are singletons: hash them by identity (Enum's own __hash__ is a Python call, paid on every set or
    # dict lookup the hot path makes with a member).
    __hash__ = object.__hash__

    SUCCESS = "success"
    RETRYABLE = "retryable"          # transient: the network or a busy platform
    THROTTLED = "throttled"          # the platform refused for rate; wait, then retry
    TOKEN_INVALID = "token_invalid"  # refresh the token and replay once
    PERMANENT = "permanent"          # a retry cannot fix it: scope, IP list, quota, bad params


class Signal(enum.Enum):
    """What the attempt says about the network to the upstream, for the monitor and breaker."""

    __hash__ = object.__hash__   # as for Outcome

    OK = "ok"                            # the platform answered (even with an application error)
    CONNECT_FAILURE = "connect_failure"  # never reached the platform
    TIMEOUT = "timeout"
    RESET = "reset"                      # the connection broke mid-exchange
    SERVER_ERROR = "server_error"        # 5xx or a platform "internal error, retry later"
    THROTTLED = "throttled"


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    reason: str                  # short, bounded label: "http_503", "connect_error", "code_99991400"...
    signal: Signal
    processed: bool = True       # False when the platform certainly did not act on the request
    retry_after: float | None = None  # seconds the platform asked us to wait, if it said
    duplicate: bool = False      # the platform refused the key as already used: an earlier attempt applied it

    @property
    def safe_to_replay(self) -> bool:
        """A request the platform did not act on may be sent again, POST included."""
        return not self.processed
