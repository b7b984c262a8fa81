"""Feishu and Lark: tenant/app tokens, `Authorization: Bearer`, `{code, msg}` answers and their codes.

Owns every Feishu-specific rule the generic machinery needs. Lark differs in its domain (config's concern) and in
which apps it knows: an app of one brand does not exist on the other, which the token error then says plainly.
"""

from __future__ import annotations

import re
from typing import Mapping

from multidict import CIMultiDict

from proxy.outcome import Outcome, Verdict
from proxy.platforms.routes import shapes
from proxy.routing import RouteShapes
from proxy.platforms.base import (
    PLACEHOLDER, CardUpdate, KeySpot, LocalAnswer, Platform, TokenCall, TokenFetchError, TokenGrant, code_text, dump,
    load_json, number, parse_retry_after, verdict_for, verdict_for_status, SUCCESS,
)

TOKEN_PATHS = {
    "tenant": "/open-apis/auth/v3/tenant_access_token/internal",
    "app": "/open-apis/auth/v3/app_access_token/internal",
}
TOKEN_KINDS = {path: kind for kind, path in TOKEN_PATHS.items()}
PLACEHOLDERS = {"tenant": f"t-{PLACEHOLDER}", "app": f"a-{PLACEHOLDER}"}
PLACEHOLDER_KINDS: dict[str, str | None] = {**{v: k for k, v in PLACEHOLDERS.items()}, PLACEHOLDER: None}

# 99991663/99991665 tenant token invalid, 99991664 app token invalid, 99991671 malformed: refresh and replay once.
TOKEN_INVALID = frozenset({"99991663", "99991664", "99991665", "99991671"})
# 99991400 the API's frequency limit; 11232/11233/11247 message rate limits; 1254290 bitable "too many requests";
# 230020 "This operation triggers the frequency limit" (IM: e.g. more than 5 updates a second of one message).
THROTTLED = frozenset({"99991400", "11232", "11233", "11247", "1254290", "230020"})
# 99991403 "This month's API call quota has been exceeded" (HTTP 429): no wait inside a request's deadline helps.
QUOTA_EXHAUSTED = "99991403"
# Refused before anything was written: 1254291 bitable write conflict, 1254607 data not ready yet.
BUSY_NOT_PROCESSED = frozenset({"1254291", "1254607"})
# "Internal error, retry later" (1500, 1663, 1668, 10101, 40006), 2200/5000 internal (often under high rate),
# 1255040 bitable timeout, 18121 the same message is still being created: the request may have been applied.
BUSY_MAYBE_PROCESSED = frozenset({"1500", "1663", "1668", "10101", "40006", "2200", "5000", "1255040", "18121"})
# 10014 app secret invalid, 10015 app disabled / wrong secret, 10003 app_id invalid: no retry will fix them.
BAD_CREDENTIALS = frozenset({"10003", "10014", "10015"})
SUCCESS_PREFIX = b'{"code":0,'
# 10014 "app id not exists": the token endpoint does not know the app_id, as when a Lark app's credentials go to
# open.feishu.cn or the reverse. 1000040351 "Incorrect domain name": the same mistake, as the long-connection
# endpoint and some APIs say it.
APP_NOT_HERE = "app id not exist"
WRONG_DOMAIN = "1000040351"
BRANDS = {"feishu": ("Feishu", "open.feishu.cn"), "lark": ("Lark", "open.larksuite.com")}
# Routes that take an idempotency key, by route template (open.feishu.cn API reference, per route).
IDEMPOTENCY = {
    "/open-apis/im/v1/messages": KeySpot("body", "uuid"),                           # 1 h dedupe, ≤ 50 chars
    "/open-apis/im/v1/messages/:message_id/reply": KeySpot("body", "uuid"),
    "/open-apis/im/v1/messages/:message_id/forward": KeySpot("query", "uuid"),
    "/open-apis/im/v1/chats": KeySpot("query", "uuid"),                             # 10 h dedupe
    "/open-apis/bitable/v1/apps/:app_token/tables/:table_id/records": KeySpot("query", "client_token"),
    "/open-apis/bitable/v1/apps/:app_token/tables/:table_id/records/batch_create": KeySpot("query", "client_token"),
    "/open-apis/calendar/v4/calendars/:calendar_id/events": KeySpot("query", "idempotency_key"),
    "/open-apis/contact/v3/users": KeySpot("query", "client_token"),
    "/open-apis/docx/v1/documents/:document_id/blocks/:block_id/children": KeySpot("query", "client_token"),
}


class Feishu(Platform):
    name = "feishu"
    token_upstream = "open"

    def token_call(self, kind: str) -> TokenCall:
        body = {"app_id": self.app.client_id, "app_secret": self.app.client_secret.reveal()}
        return TokenCall("POST", TOKEN_PATHS[kind], body)

    def parse_token(self, kind: str, status: int, body: bytes) -> TokenGrant:
        answer = load_json(body)
        if answer is None:
            raise TokenFetchError(f"token endpoint answered HTTP {status} without JSON", permanent=False)
        code = code_text(answer.get("code"))
        if code != "0":
            msg = str(answer.get("msg", ""))[:200]
            if code == WRONG_DOMAIN or (code == "10014" and APP_NOT_HERE in msg.lower()):
                raise TokenFetchError(self._wrong_brand(code, msg), permanent=True)
            if code in BAD_CREDENTIALS:
                raise TokenFetchError(f"app_id or app_secret rejected (code {code}: {msg})", permanent=True)
            raise TokenFetchError(f"token endpoint answered code {code}: {msg}", permanent=status < 500 and status != 429)
        value = answer.get(f"{kind}_access_token")
        if not isinstance(value, str) or not value:
            raise TokenFetchError("token endpoint answered code 0 without a token", permanent=False)
        return TokenGrant(value, number(answer.get("expire")))

    def _wrong_brand(self, code: str, msg: str) -> str:
        here, _ = BRANDS.get(self.app.platform, BRANDS["feishu"])
        other = "feishu" if self.app.platform == "lark" else "lark"
        name, domain = BRANDS[other]
        return (f"app_id {self.app.client_id} is not an app of {here} (code {code}: {msg}); "
                f"if it was created on {name} ({domain}), set platform: {other}")

    def token_kind(self, upstream: str, headers: CIMultiDict[str]) -> str | None:
        """The sidecar's token unless the caller sent one of its own: any Authorization that is not empty and not
        the placeholder (a user's u- token, a JWT user_access_token, an app token it holds) passes through
        untouched, since replacing it would run a user's call with the app's rights."""
        scheme, _, credentials = headers.get("Authorization", "").strip().partition(" ")
        credentials = credentials.strip()
        if not scheme or (scheme.lower() == "bearer" and not credentials):
            return self.app.token_kind
        if scheme.lower() == "bearer" and credentials in PLACEHOLDER_KINDS:
            return PLACEHOLDER_KINDS[credentials] or self.app.token_kind
        return None

    def attach_token(self, upstream: str, headers: CIMultiDict[str], query: str, token: str) -> str:
        headers["Authorization"] = f"Bearer {token}"
        return query

    def token_endpoint(self, upstream: str, method: str, path: str) -> str | None:
        return TOKEN_KINDS.get(path)

    def token_endpoint_answer(self, kind: str, expires_in: float) -> LocalAnswer:
        answer: dict[str, object] = {"code": 0, "msg": "ok", "expire": int(expires_in)}
        answer["tenant_access_token"] = PLACEHOLDERS["tenant"]
        if kind == "app":
            answer["app_access_token"] = PLACEHOLDERS["app"]
        return LocalAnswer(200, dump(answer))

    def classify(self, upstream: str, status: int, headers: Mapping[str, str], body: bytes | None) -> Verdict:
        if status == 200 and body is not None and body.startswith(SUCCESS_PREFIX):
            return SUCCESS   # the common case, without parsing the body
        retry_after = _reset_after(headers)
        answer = load_json(body)
        code = code_text(answer.get("code")) if answer else None
        if code is None:
            return verdict_for_status(status, retry_after)
        if code == "0" and status < 300:
            return SUCCESS
        return self._classify_code(code, status, retry_after)

    def _classify_code(self, code: str, status: int, retry_after: float | None) -> Verdict:
        reason = f"code_{code}"
        outcome = self.override(code)
        if outcome is not None:
            return verdict_for(outcome, reason, retry_after=retry_after)
        if code in TOKEN_INVALID:
            return verdict_for(Outcome.TOKEN_INVALID, reason)
        if code == QUOTA_EXHAUSTED:
            return verdict_for(Outcome.PERMANENT, reason)
        if code in THROTTLED or status == 429:
            return verdict_for(Outcome.THROTTLED, reason, retry_after=retry_after)
        if code in BUSY_NOT_PROCESSED:
            return verdict_for(Outcome.RETRYABLE, reason, processed=False)
        if code in BUSY_MAYBE_PROCESSED:
            return verdict_for(Outcome.RETRYABLE, reason)
        if status >= 500:
            return verdict_for_status(status, retry_after)
        return verdict_for(Outcome.PERMANENT, reason)

    def error_body(self, upstream: str, code: int, message: str) -> bytes:
        return dump({"code": code, "msg": message})

    def routes(self, upstream: str) -> RouteShapes:
        return shapes("feishu")   # lark-oapi's templates; Lark's are the same

    def idempotency_spot(self, upstream: str, route: str) -> KeySpot | None:
        return IDEMPOTENCY.get(route)

    def retry_reasons(self, upstream: str) -> tuple[str, ...]:
        retried = THROTTLED | BUSY_NOT_PROCESSED | BUSY_MAYBE_PROCESSED
        return super().retry_reasons(upstream) + tuple(f"code_{code}" for code in sorted(retried))

    # Quota saving: the route tables below -------------------------------------------------------------------------

    def user_token(self, upstream: str, headers: CIMultiDict[str]) -> str | None:
        """The caller's own token, whenever token_kind says it is one (a JWT user_access_token included)."""
        return headers.get("Authorization") if self.token_kind(upstream, headers) is None else None

    def cached_reads(self, upstream: str) -> Mapping[str, float]:
        return CACHED_READS

    def post_reads(self, upstream: str) -> frozenset[str]:
        return POST_READS

    def card_update(self, upstream: str, method: str, path: str, body: bytes | None) -> CardUpdate | None:
        if method == "GET" or not path.startswith(CARD_PREFIXES):
            return None   # most requests: no pattern to try
        for pattern, methods, merge in CARD_ROUTES:
            found = pattern.match(path)
            if found and method in methods:
                card, element = found.group(1), found.groupdict().get("element")
                return CardUpdate(card, merge.format(element=element) if merge else None)
        return None

    def metered(self, upstream: str, template: str) -> bool:
        return not template.startswith(UNMETERED_PREFIXES)

    def quota_exhausted(self, status: int, body: bytes | None) -> bool:
        answer = load_json(body) if status >= 400 else None
        return answer is not None and code_text(answer.get("code")) == QUOTA_EXHAUSTED

    def bulk_routes(self, upstream: str) -> frozenset[str]:
        return BULK_ROUTES


# ----------------------------------------------------------------------------------------------------------------
# Route tables for the quota-saving stages (docs/quota.md has the sources).

# Read-mostly routes, cached when an app turns the cache on. Contact reads are not metered on Feishu but are
# rate-limited per app, and every incoming message tends to look up the same few people; bot info never changes,
# so a once-a-minute health probe (43,200 calls a month) costs 6 an hour.
CACHED_READS: Mapping[str, float] = {
    "/open-apis/contact/v3/users/:user_id": 60.0,
    "/open-apis/contact/v3/users/batch": 60.0,
    "/open-apis/contact/v3/departments/:department_id": 60.0,
    "/open-apis/im/v1/chats/:chat_id": 60.0,
    "/open-apis/bot/v3/info": 600.0,
}
POST_READS = frozenset({"/open-apis/contact/v3/users/batch_get_id"})   # IDs by email or mobile, in the body
# Card updates. PATCH im/v1/messages/:message_id replaces the card message's whole content (5 updates/s per
# message, 230020 beyond); cardkit's card PUT replaces the whole card, element PUT one element, and element
# content PUT takes the element's full text (the client types out the difference). Element PATCH (some
# attributes), element create/delete, settings and batch_update change parts: kept in order, never skipped.
# Every cardkit operation on one card carries a `sequence` that must grow, so one order per card.
_CARD = r"^/open-apis/cardkit/v1/cards/([^/]+)"
CARD_PREFIXES = ("/open-apis/im/v1/messages/", "/open-apis/cardkit/v1/cards/")
CARD_ROUTES: tuple[tuple[re.Pattern[str], frozenset[str], str | None], ...] = (
    (re.compile(r"^/open-apis/im/v1/messages/([^/]+)$"), frozenset({"PATCH"}), "message"),
    (re.compile(_CARD + r"$"), frozenset({"PUT"}), "card"),
    (re.compile(_CARD + r"/elements/(?P<element>[^/]+)/content$"), frozenset({"PUT"}), "content:{element}"),
    (re.compile(_CARD + r"/elements/(?P<element>[^/]+)$"), frozenset({"PUT"}), "element:{element}"),
    (re.compile(_CARD + r"/elements/(?P<element>[^/]+)$"), frozenset({"PATCH", "DELETE"}), None),
    (re.compile(_CARD + r"/(elements|settings|batch_update)$"), frozenset({"POST", "PATCH"}), None),
)
# Not counted against the Basic plan's monthly allowance ("custom-app-api-call-limit"): authentication and
# authorisation, event subscription, contacts, Feishu People (ehr, corehr), hiring, performance, access control,
# the app engine, the AI APIs and aily. Everything else is, when it succeeds (4xx/5xx answers are not counted).
UNMETERED_PREFIXES = tuple(f"/open-apis/{business}/" for business in (
    "auth", "authen", "passport", "event", "contact", "ehr", "corehr", "hire", "performance", "acs", "apaas",
    "optical_char_recognition", "speech_to_text", "translation", "document_ai", "aily",
))
# Batch writes are bulk by nature: the priority lane they get unless the request or the config says otherwise.
BULK_ROUTES = frozenset({
    "/open-apis/bitable/v1/apps/:app_token/tables/:table_id/records/batch_create",
    "/open-apis/bitable/v1/apps/:app_token/tables/:table_id/records/batch_update",
    "/open-apis/bitable/v1/apps/:app_token/tables/:table_id/records/batch_delete",
})


def _reset_after(headers: Mapping[str, str]) -> float | None:
    """x-ogw-ratelimit-reset is the number of seconds until the API's window resets."""
    return parse_retry_after(headers.get("x-ogw-ratelimit-reset")) or parse_retry_after(headers.get("Retry-After"))
