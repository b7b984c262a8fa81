"""The attempt loop: send, classify, and decide whether to send again.

Owns the decision to repeat an attempt; sending is the pipeline's, classification the platform's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable

from multidict import CIMultiDict

from proxy.clock import Clock
from proxy.errors import AttemptFailed
from proxy.metrics import Metrics
from proxy.outcome import Outcome, Verdict
from proxy.upstream import Answer

if TYPE_CHECKING:
    from proxy.pipeline import Exchange, RequestBody


@dataclass(slots=True)
class Attempt:
    """What varies between attempts of one request."""

    number: int
    timeout: float
    extra_headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    query: str | None = None     # set when an idempotency key goes into the query
    body: bytes | None = None    # set when an idempotency key goes into the body
    token: str | None = None
    token_kind: str | None = None


Send = Callable[["Exchange", "RequestBody", Attempt], Awaitable[Answer]]


class RetryEngine:
    def __init__(self, clock: Clock, metrics: Metrics) -> None:
        self.clock, self.metrics = clock, metrics

    async def run(self, exchange: Exchange, body: RequestBody, send: Send) -> Answer:
        b = exchange.binding
        attempt = Attempt(1, self.timeout(exchange))
        replayed = False
        while True:
            exchange.attempts += 1
            answer, verdict, failure = await self.attempt(exchange, body, attempt, send)
            # 99991663 / 40001 and friends: the platform refused the token without acting; refresh and replay once.
            if verdict.outcome is Outcome.TOKEN_INVALID and attempt.token and not replayed and body.replayable:
                b.tokens.source(attempt.token_kind or b.app.token_kind).invalidate(attempt.token)
                self.metrics.token_replays.labels(b.app.name).inc()
                exchange.retry_reasons.append("token_invalid")
                replayed = True
                if answer is not None:
                    answer.release()
                continue
            if failure is not None:
                raise failure
            assert answer is not None
            return answer

    async def attempt(self, exchange: Exchange, body: RequestBody, attempt: Attempt,
                      send: Send) -> tuple[Answer | None, Verdict, AttemptFailed | None]:
        b = exchange.binding
        started = self.clock.now()
        try:
            answer = await send(exchange, body, attempt)
        except AttemptFailed as exc:
            answer, verdict, failure = None, exc.verdict, exc
        else:
            verdict = b.platform.classify(b.upstream, answer.status, answer.headers, answer.plain_body())
            failure = None
        self.metrics.attempt_duration.labels(b.app.name, b.upstream).observe(self.clock.now() - started)
        self.metrics.attempts.labels(b.app.name, b.upstream, exchange.route, verdict.outcome.value, verdict.reason).inc()
        return answer, verdict, failure

    def timeout(self, exchange: Exchange) -> float:
        remaining = exchange.deadline - self.clock.now()
        return max(0.001, min(exchange.binding.app.retry.per_try_timeout, remaining))
