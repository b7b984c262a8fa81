"""The sidecar's own failures, each knowing the HTTP status and code a client should see.

Owns the exception tree, the outcome class each error is counted under (proxy/metrics.py's classes), and the
translation of aiohttp/asyncio errors (at the upstream boundary, once); it does not own the error *shape*, which
belongs to each platform.

    SidecarError                      counted as sidecar_error unless said
    ├── NoRoute                  404  nothing configured under this path (no app: not counted)
    ├── ClientFault                   the client's doing, never held against the platform           client_error
    │   ├── RequestTooLarge      413  body over limits.max_request_bytes
    │   ├── BadRequest           400  a request target or header the sidecar will not forward
    │   ├── RequestTimeout       408  the body stalled (limits.body_timeout) or outran the deadline
    │   ├── ExpectationFailed    417  an `Expect` other than 100-continue
    │   └── ClientGone           499  the client disconnected before its answer was written
    ├── InternalError            500  a bug in the sidecar, answered in the platform's shape
    ├── ShuttingDown             503  the drain ended before the request could be sent or answered
    ├── TokenUnavailable         503  (raised by proxy.tokens, mapped here)
    ├── DeadlineExceeded         504  no answer within the request's deadline
    ├── Paused                        each says when to come back (Retry-After)
    │   ├── LocallyRateLimited   429  the sidecar's own limiter would wait past the deadline   throttled
    │   ├── QuotaReserved        429  bulk, past the month's reserve (proxy/saving/meter.py)      throttled
    │   └── CircuitOpen          503  the upstream is known to be down
    ├── OutcomeUnknown           502  an attempt may have been applied, and the last one says nothing about it
    ├── IdempotencyKeyInFlight   409  the same Idempotency-Key is still being executed
    ├── IdempotencyKeyReused     422  the same Idempotency-Key came with another request
    └── AttemptFailed            502  one attempt died at the network level (never reaches a client as is)
        ├── ConnectFailure            never reached the platform
        ├── AttemptTimeout            no answer within the per-try timeout
        │   └── ConnectTimeout        ...cut off while its connection was being made: not sent
        └── ConnectionReset           the connection broke mid-exchange
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import aiohttp

from proxy.metrics import CLIENT_ERROR, SIDECAR_ERROR, THROTTLED
from proxy.outcome import Outcome, Signal, Verdict
from proxy.platforms import base as codes


class SidecarError(Exception):
    status = 502
    code = codes.UPSTREAM_UNREACHABLE
    counted_as = SIDECAR_ERROR   # the outcome class of a request answered with this error
    retry_after: float | None = None


class NoRoute(SidecarError):
    status, code = 404, codes.NO_ROUTE


class ClientFault(SidecarError):
    """A fault of the client's (its body, its target, its patience): the platform and the network are not to blame."""

    counted_as = CLIENT_ERROR


class RequestTooLarge(ClientFault):
    status, code = 413, codes.TOO_LARGE


class BadRequest(ClientFault):
    status, code = 400, codes.BAD_REQUEST


class RequestTimeout(ClientFault):
    status, code = 408, codes.REQUEST_TIMEOUT


class ExpectationFailed(ClientFault):
    status, code = 417, codes.EXPECTATION_FAILED


class ClientGone(ClientFault):
    status, code = 499, codes.CLIENT_GONE   # nginx's "client closed request": nobody reads this answer


class InternalError(SidecarError):
    status, code = 500, codes.INTERNAL_ERROR


class ShuttingDown(SidecarError):
    status, code = 503, codes.SHUTTING_DOWN
    retry_after = 1.0


class TokenUnavailableError(SidecarError):
    status, code = 503, codes.TOKEN_UNAVAILABLE


class DeadlineExceeded(SidecarError):
    status, code = 504, codes.DEADLINE_EXCEEDED
    unsent = False   # it cut off an attempt before it was sent (its connection was being made): nothing applied


class QueuedPastDeadline(SidecarError):
    """The deadline came while an attempt waited for a free pooled connection: the sidecar's own queue, so it
    says nothing about the platform (not an attempt that failed), and the attempt was never sent."""
    status, code = 504, codes.DEADLINE_EXCEEDED


class Paused(SidecarError):
    """An error that tells the client when to come back (Retry-After)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LocallyRateLimited(Paused):
    status, code, counted_as = 429, codes.RATE_LIMITED, THROTTLED


class QuotaReserved(Paused):
    status, code, counted_as = 429, codes.QUOTA_RESERVED, THROTTLED


class CircuitOpen(Paused):
    status, code = 503, codes.CIRCUIT_OPEN


class OutcomeUnknown(SidecarError):
    """Never a status the platforms use for "not processed" (429, 503): the client must not resend blindly."""

    status, code = 502, codes.OUTCOME_UNKNOWN


class IdempotencyKeyInFlight(SidecarError):
    status, code = 409, codes.KEY_IN_FLIGHT
    retry_after = 1.0


class IdempotencyKeyReused(SidecarError):
    status, code = 422, codes.KEY_REUSED


class AttemptFailed(SidecarError):
    verdict: Verdict


class ConnectFailure(AttemptFailed):
    verdict = Verdict(Outcome.RETRYABLE, "connect_error", Signal.CONNECT_FAILURE, processed=False)


class AttemptTimeout(AttemptFailed):
    status, code = 504, codes.DEADLINE_EXCEEDED
    verdict = Verdict(Outcome.RETRYABLE, "timeout", Signal.TIMEOUT, processed=True)
    heard_out: asyncio.Task[Any] | None = None   # the attempt, going on to be heard out (proxy/upstream.py)


class ConnectTimeout(AttemptTimeout):
    """The per-try timeout (or the deadline) came while the attempt's new connection was being made (a slow TLS
    handshake): a timeout to the network monitor, which learns a longer one from it, but the platform had nothing
    of the request, so a write is retried and never said to be maybe applied."""

    verdict = Verdict(Outcome.RETRYABLE, "connect_timeout", Signal.TIMEOUT, processed=False)


class ConnectionReset(AttemptFailed):
    verdict = Verdict(Outcome.RETRYABLE, "reset", Signal.RESET, processed=True)


def translate(exc: BaseException) -> AttemptFailed:
    """One aiohttp/asyncio failure of an attempt, as the sidecar's own error (message without URL or query)."""
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        return ConnectFailure("could not connect to the egress proxy (egress.proxy)")
    if isinstance(exc, aiohttp.ClientHttpProxyError):   # the proxy refused the CONNECT: nothing reached the platform
        hint = ": check egress.username and egress.password" if exc.status in (401, 407) else ""
        return ConnectFailure(f"the egress proxy refused the tunnel with HTTP {exc.status}{hint}")
    if isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
        return ConnectFailure(f"could not connect to the platform ({type(exc).__name__})")
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return AttemptTimeout("the platform did not answer in time")
    return ConnectionReset(f"the connection to the platform broke ({type(exc).__name__})")


@functools.cache   # asked once per upstream at start-up (1,000 walks of the class tree at 1,000 apps)
def client_facing_kinds() -> tuple[str, ...]:
    """The X-Imsidecar-Error values a client of an app can get: every error but NoRoute and the two bases
    (asked after every module that defines one is imported: proxy.app imports them all)."""
    found: list[str] = []
    pending = list(SidecarError.__subclasses__())
    while pending:
        kind = pending.pop(0)
        pending.extend(kind.__subclasses__())
        if kind not in (NoRoute, AttemptFailed, ClientFault):
            found.append(kind.__name__)
    return tuple(sorted(found))


NETWORK_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)
