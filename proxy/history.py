"""What the attempts of one request said, and the honest final answer that follows from it.

Owns whether a request may have been applied (`Applied`, sent as X-Imsidecar-Outcome) and which answer the client
gets: the platform's last real answer, never an earlier attempt's in place of an unknown outcome, and never a
"not processed" status once an attempt may have been applied. Deciding about retries is proxy/retry.py's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NoReturn

from proxy.errors import AttemptFailed, AttemptTimeout, DeadlineExceeded, OutcomeUnknown
from proxy.outcome import Outcome, Verdict
from proxy.upstream import Answer

READS = frozenset({"GET", "HEAD", "OPTIONS"})   # nothing to apply: their answers never say "unknown"


class Applied(enum.Enum):
    """What the client may assume happened at the platform (the X-Imsidecar-Outcome header)."""

    APPLIED = "applied"          # the platform said it did it (or that an earlier attempt with this key did)
    NOT_APPLIED = "not-applied"  # no attempt can have acted: sending the same request again is safe
    UNKNOWN = "unknown"          # an attempt may have acted; rerun only with the same key (X-Imsidecar-Idempotency-Key)


@dataclass(slots=True)
class Tried:
    """One attempt's result: the platform's answer, or the network failure that stood for it."""

    answer: Answer | None
    verdict: Verdict
    failure: AttemptFailed | None = None


@dataclass(slots=True)
class History:
    write: bool                             # False for reads: they cannot have been applied
    last: Tried | None = None
    last_answer: Answer | None = None       # the last answer read whole (a streamed one is never held back)
    maybe_applied: list[str] = field(default_factory=list)   # reasons of attempts that may have acted
    counted: int = 0                        # attempts that count against max_attempts (not throttles, not tokens)
    throttled: int = 0                      # ...and the throttled ones, which have an allowance of their own
    timeouts: int = 0

    def add(self, tried: Tried) -> None:
        self.last = tried
        if tried.answer is not None and tried.answer.stream is None:
            self.last_answer = tried.answer
        verdict = tried.verdict
        if self.write and verdict.outcome is Outcome.RETRYABLE and verdict.processed:
            self.maybe_applied.append(verdict.reason)
        if verdict.outcome is Outcome.THROTTLED:
            self.throttled += 1
        elif verdict.outcome is not Outcome.TOKEN_INVALID:
            self.counted += 1

    def applied(self) -> Applied:
        last = self.last
        if last is not None and (last.verdict.outcome is Outcome.SUCCESS or last.verdict.duplicate):
            return Applied.APPLIED
        return Applied.UNKNOWN if self.maybe_applied else Applied.NOT_APPLIED

    @property
    def retry_safe(self) -> bool:
        """The final answer says the platform did not act (429, 503, a refused token...): the same request may be
        sent again as it is. A platform's own answer that it refused the request (a bad parameter) is not that."""
        last = self.last
        if last is None:
            return True
        return self.applied() is Applied.NOT_APPLIED and not last.verdict.processed

    def final(self, now: float, deadline: float) -> Answer:
        """The answer for the client, or the sidecar's error standing for it (raised)."""
        last = self.last
        assert last is not None
        if last.answer is not None:
            if last.verdict.processed or not self.maybe_applied or self.applied() is Applied.APPLIED:
                return last.answer
            raise self.unknown(f"the last attempt was refused ({last.verdict.reason})")
        if not self.maybe_applied:
            if self.last_answer is not None:
                return self.last_answer   # the platform's last real answer: nothing was applied
            raise_failure(last.failure)
        if not last.verdict.processed:
            raise self.unknown(f"the last attempt failed before reaching the platform ({last.verdict.reason})")
        if isinstance(last.failure, AttemptTimeout) and now >= deadline - 0.001:
            raise DeadlineExceeded("the request's deadline passed with no answer from the platform") from last.failure
        raise_failure(last.failure)

    def unknown(self, why: str) -> OutcomeUnknown:
        earlier = ", ".join(dict.fromkeys(self.maybe_applied))
        return OutcomeUnknown(f"an earlier attempt may have been applied ({earlier}) and {why}; send it again only "
                              f"with the same idempotency key")


def raise_failure(failure: AttemptFailed | None) -> NoReturn:
    assert failure is not None
    raise failure
