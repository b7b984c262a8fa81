"""What the generic machinery asks of a platform: tokens, attaching them, reading answers, and error shapes.

Owns the interface and helpers every platform shares; the Feishu and DingTalk specifics live in their own modules.
"""

from __future__ import annotations

import email.utils
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import quote

from multidict import CIMultiDict

from proxy import codec
from proxy.config import AppConfig, CodeOverrides
from proxy.outcome import Outcome, Signal, Verdict
from proxy.routing import RouteShapes

# Sidecar error codes, in every platform's error shape. Chosen far from both platforms' ranges.
NO_ROUTE = 9_990_404
TOO_LARGE = 9_990_413
RATE_LIMITED = 9_990_429
UPSTREAM_UNREACHABLE = 9_990_502
TOKEN_UNAVAILABLE = 9_990_503
CIRCUIT_OPEN = 9_990_513
DEADLINE_EXCEEDED = 9_990_504
BAD_REQUEST = 9_990_400
REQUEST_TIMEOUT = 9_990_408
EXPECTATION_FAILED = 9_990_417
CLIENT_GONE = 9_990_499
INTERNAL_ERROR = 9_990_500
SHUTTING_DOWN = 9_990_515
OUTCOME_UNKNOWN = 9_990_512
KEY_IN_FLIGHT = 9_990_409
KEY_REUSED = 9_990_422
QUOTA_RESERVED = 9_990_430
CODE_NAMES = {
    NO_ROUTE: "noRoute", TOO_LARGE: "requestTooLarge", RATE_LIMITED: "rateLimited",
    UPSTREAM_UNREACHABLE: "upstreamUnreachable", TOKEN_UNAVAILABLE: "tokenUnavailable",
    CIRCUIT_OPEN: "circuitOpen", DEADLINE_EXCEEDED: "deadlineExceeded", BAD_REQUEST: "badRequest",
    REQUEST_TIMEOUT: "requestTimeout", EXPECTATION_FAILED: "expectationFailed", CLIENT_GONE: "clientGone",
    INTERNAL_ERROR: "internalError", SHUTTING_DOWN: "shuttingDown",
    OUTCOME_UNKNOWN: "outcomeUnknown", KEY_IN_FLIGHT: "idempotencyKeyInFlight", KEY_REUSED: "idempotencyKeyReused",
    QUOTA_RESERVED: "quotaReserved",
}

PLACEHOLDER = "imsidecar-managed"   # what the sidecar hands out instead of a real token


@dataclass(frozen=True, slots=True)
class TokenCall:
    """The HTTP call that fetches a token: sent to the platform's token upstream."""

    method: str
    path: str
    json: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class TokenGrant:
    value: str
    expires_in: float   # seconds, as the platform said (sanitised by the token source)


class TokenFetchError(Exception):
    """The platform refused or failed to give a token. The message names the cause and never the secret."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True, slots=True)
class KeySpot:
    """Where one route takes its idempotency key: a query parameter or a top-level JSON body field."""

    where: str   # "query" | "body"
    name: str


@dataclass(frozen=True, slots=True)
class CardUpdate:
    """A request that changes a card (or card message) the platform renders: updates of one card are sent in order.

    Two updates with the same `merge_key` leave the card as the later one alone would (each replaces that part of
    the card whole), so the earlier can be skipped; None means it can never be skipped (append, partial updates).
    """

    card: str
    merge_key: str | None
    final: bool = False   # the card's last frame (DingTalk isFinalize / isError): never replaced by a later one


@dataclass(frozen=True, slots=True)
class LocalAnswer:
    """An answer the sidecar gives itself, without calling the platform."""

    status: int
    body: bytes
    content_type: str = "application/json; charset=utf-8"


class Platform(ABC):
    """One platform's rules. Instances are per app, since codes can be extended per app in config."""

    name: str
    token_upstream: str

    def __init__(self, app: AppConfig) -> None:
        self.app = app
        self.codes = app.codes

    @abstractmethod
    def token_call(self, kind: str) -> TokenCall: ...

    @abstractmethod
    def parse_token(self, kind: str, status: int, body: bytes) -> TokenGrant:
        """Read a token answer, or raise TokenFetchError saying plainly what is wrong."""

    @abstractmethod
    def token_kind(self, upstream: str, headers: CIMultiDict[str]) -> str | None:
        """The kind of token this request needs, or None when the application sent a user token of its own."""

    @abstractmethod
    def attach_token(self, upstream: str, headers: CIMultiDict[str], query: str, token: str) -> str:
        """Put the token where the platform expects it; returns the (possibly changed) query string."""

    @abstractmethod
    def token_endpoint(self, upstream: str, method: str, path: str) -> str | None:
        """The token kind when the application calls the platform's own token endpoint (answered locally)."""

    @abstractmethod
    def token_endpoint_answer(self, kind: str, expires_in: float) -> LocalAnswer: ...

    @abstractmethod
    def classify(self, upstream: str, status: int, headers: Mapping[str, str], body: bytes | None) -> Verdict: ...

    @abstractmethod
    def error_body(self, upstream: str, code: int, message: str) -> bytes:
        """A sidecar error in this platform's own shape."""

    @abstractmethod
    def routes(self, upstream: str) -> RouteShapes:
        """The route templates of one of this platform's upstreams."""

    def route_template(self, upstream: str, path: str) -> str:
        """The path with its IDs replaced by the template's names: a bounded metric label, never an ID."""
        return self.routes(upstream).template(path)

    def idempotency_spot(self, upstream: str, route: str) -> KeySpot | None:
        """Where this route takes an idempotency key, if it takes one."""
        return None

    def retry_reasons(self, upstream: str) -> tuple[str, ...]:
        """Every `reason` a retry to `upstream` can carry that is known before it happens (metric series at 0)."""
        added = self.codes.retryable | self.codes.throttled
        return GENERIC_RETRY_REASONS + tuple(f"code_{code}" for code in sorted(added))

    # What the quota-saving stages (proxy/saving/) ask; each platform answers from route tables of its own ---------

    def user_token(self, upstream: str, headers: CIMultiDict[str]) -> str | None:
        """The user's own token when the application sent one (the sidecar then passes it through)."""
        return None

    def cached_reads(self, upstream: str) -> Mapping[str, float]:
        """Read-mostly route templates worth caching, with a TTL in seconds: the curated defaults."""
        return {}

    def post_reads(self, upstream: str) -> frozenset[str]:
        """Route templates that read although they are POSTs (the body says what): safe to share and cache."""
        return frozenset()

    def card_update(self, upstream: str, method: str, path: str, body: bytes | None) -> CardUpdate | None:
        """The card this request updates, if it is a card update."""
        return None

    def metered(self, upstream: str, template: str) -> bool:
        """Whether a successful call of this route counts against the platform's monthly allowance."""
        return False

    def counted(self, status: int, verdict: Verdict) -> bool:
        """Whether an answer the platform gave counts as a call against the monthly allowance."""
        return status < 400 and verdict.outcome is not Outcome.THROTTLED

    def quota_exhausted(self, status: int, body: bytes | None) -> bool:
        """The platform says this month's allowance is spent (its metered APIs now refuse)."""
        return False

    def bulk_routes(self, upstream: str) -> frozenset[str]:
        """Route templates that are bulk by nature (batch writes): their default priority lane."""
        return frozenset()

    # Shared helpers ------------------------------------------------------------------------------------------

    def override(self, code: str) -> Outcome | None:
        """Codes the operator added in config win over the built-in tables."""
        return lookup_override(self.codes, code)


def lookup_override(codes: CodeOverrides, code: str) -> Outcome | None:
    for outcome, table in (
        (Outcome.TOKEN_INVALID, codes.token_invalid),
        (Outcome.THROTTLED, codes.throttled),
        (Outcome.RETRYABLE, codes.retryable),
        (Outcome.PERMANENT, codes.permanent),
    ):
        if code in table:
            return outcome
    return None


SUCCESS = Verdict(Outcome.SUCCESS, "ok", Signal.OK)   # the common answer, built once
# The reasons of retried verdicts on every platform: proxy/errors.py's network failures, then verdict_for_status.
GENERIC_RETRY_REASONS = ("connect_error", "timeout", "reset", "http_429", "http_500", "http_502", "http_503",
                         "http_504", "http_5xx")
_DEFAULT_SIGNAL = {Outcome.THROTTLED: Signal.THROTTLED, Outcome.RETRYABLE: Signal.SERVER_ERROR}


def verdict_for(outcome: Outcome, reason: str, *, processed: bool = True, retry_after: float | None = None,
                signal: Signal | None = None) -> Verdict:
    default_signal = _DEFAULT_SIGNAL.get(outcome, Signal.OK)
    if outcome in (Outcome.THROTTLED, Outcome.TOKEN_INVALID):
        processed = False   # refused before acting: always safe to send again
    return Verdict(outcome, reason, signal or default_signal, processed, retry_after)


def verdict_for_status(status: int, retry_after: float | None) -> Verdict:
    """Classify by HTTP status alone: an answer with no platform code (an HTML page from a gateway)."""
    if status < 300:
        return SUCCESS
    if status == 429:
        return verdict_for(Outcome.THROTTLED, "http_429", retry_after=retry_after)
    if status == 503:
        # 503 means the server did not take the request on: safe to send again, POST included.
        return verdict_for(Outcome.RETRYABLE, "http_503", processed=False, retry_after=retry_after)
    if status >= 500:
        return verdict_for(Outcome.RETRYABLE, f"http_{status}" if status in (500, 502, 504) else "http_5xx")
    return verdict_for(Outcome.PERMANENT, "http_4xx")


def load_json(body: bytes | None) -> dict[str, Any] | None:
    if not body:
        return None
    try:
        value = codec.loads(body)
    except ValueError:   # UnicodeDecodeError is one
        return None
    return value if isinstance(value, dict) else None


def dump(payload: Mapping[str, Any]) -> bytes:
    return codec.dumps_bytes(payload)


def parse_retry_after(value: str | None, now_wall: float | None = None) -> float | None:
    """`Retry-After` as seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if now_wall is None:
        import time

        now_wall = time.time()
    return max(0.0, when.timestamp() - now_wall)


def with_query_param(query: str, name: str, value: str) -> str:
    """`query` with every `name=` pair replaced by one carrying `value`; the other pairs stay byte for byte."""
    kept = [pair for pair in query.split("&") if pair and pair.split("=", 1)[0] != name]
    kept.append(f"{name}={quote(value, safe='')}")
    return "&".join(kept)


def number(value: object) -> float:
    """A numeric field of a platform's answer (`expire`, `expireIn`, `wait`), or 0 when absent or not a number."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def code_text(value: Any) -> str | None:
    """Platform codes arrive as ints or strings ("0" on some DingTalk APIs); compare them as text."""
    if value is None or isinstance(value, bool):
        return None
    return str(value).strip()
