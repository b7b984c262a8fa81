"""DingTalk: one access token for both hosts, `errcode` answers on oapi and `{code, message}` answers on api.

Owns every DingTalk-specific rule the generic machinery needs.
"""

from __future__ import annotations

import re
from typing import Mapping

from multidict import CIMultiDict

from proxy.outcome import Outcome, Signal, Verdict
from proxy.platforms.routes import shapes
from proxy.routing import RouteShapes
from proxy.platforms.base import (
    PLACEHOLDER, CODE_NAMES, SUCCESS, CardUpdate, KeySpot, LocalAnswer, Platform, TokenCall, TokenFetchError, TokenGrant,
    code_text, dump, load_json, number, parse_retry_after, verdict_for, verdict_for_status, with_query_param,
)

TOKEN_HEADER = "x-acs-dingtalk-access-token"
OAPI_TOKEN_PATH = "/gettoken"
API_TOKEN_PATH = "/v1.0/oauth2/accessToken"
API_CORP_TOKEN = re.compile(r"^/v1\.0/oauth2/[^/]+/token$")

# oapi errcodes (HTTP 200 bodies)
TOKEN_INVALID = frozenset({"33001", "40001", "40014", "42001"})   # token invalid or expired: refresh and replay once
THROTTLED = frozenset({"45009", "90018", "90002"})               # 90018 per-app per-API QPS, 90002 per-API global QPS
# 90001, 90003-90014, 90017: temporary bans for minutes. Waiting inside one request's deadline cannot lift them.
BANNED = frozenset({"90001", "90017", *(str(c) for c in range(90003, 90015))})
BUSY_NOT_PROCESSED = frozenset({"-1", "88"})   # -1 system busy; 88 with an empty sub_code is an auth time-out
# api codes ({code, message} with a 4xx/5xx status)
API_TOKEN_INVALID = frozenset({"InvalidAuthentication", "Unauthorized"})
API_THROTTLED = re.compile(r"^Forbidden\.AccessDenied\.(Qps|Qpm)Limit|^system\.?[bB]usy$|^systemBusy$")
BAD_CREDENTIALS = frozenset({"invalidClientIdOrSecret", "40089", "40096"})
# 409: the clientToken was already used, so an earlier request (or attempt) with it was applied.
DUPLICATE_KEY = "invalidRequest.duplicateClientToken"
# Routes that take an idempotency key. The api SDK (alibabacloud-dingtalk) has `clientToken` in the query of the
# notable (AI table) record insert; no app API route in it carries `msgUuid` (a field of the custom group robot
# webhook, which proxy/robots/ sends). Matched on the path's shape, whether its IDs are templated or not.
IDEMPOTENCY = (
    (re.compile(r"^/v1\.0/notable/bases/[^/]+/sheets/[^/]+/records$"), KeySpot("query", "clientToken")),
)
# The retried reasons known up front (for metric series at 0): what the classification below names them.
OAPI_RETRIED = THROTTLED | BUSY_NOT_PROCESSED | {"15"}
API_RETRY_REASONS = ("ip_ban", "code_systemError", "code_system.busy", "code_systemBusy", *(
    f"code_Forbidden.AccessDenied.{c}" for c in ("QpsLimitForAppkeyAndApi", "QpmLimitForAppkeyAndApi", "QpsLimitForApi")))


class DingTalk(Platform):
    name = "dingtalk"
    token_upstream = "api"

    def token_call(self, kind: str) -> TokenCall:
        body = {"appKey": self.app.client_id, "appSecret": self.app.client_secret.reveal()}
        return TokenCall("POST", API_TOKEN_PATH, body)

    def parse_token(self, kind: str, status: int, body: bytes) -> TokenGrant:
        answer = load_json(body) or {}
        token = answer.get("accessToken")
        if status == 200 and isinstance(token, str) and token:
            return TokenGrant(token, number(answer.get("expireIn")))
        code = str(answer.get("code", f"HTTP {status}"))
        message = str(answer.get("message", ""))[:200]
        if code in BAD_CREDENTIALS:
            raise TokenFetchError(f"app_key or app_secret rejected ({code}: {message})", permanent=True)
        permanent = 400 <= status < 500 and status != 429 and not API_THROTTLED.match(code)
        raise TokenFetchError(f"token endpoint answered {code}: {message}", permanent=permanent)

    def token_kind(self, upstream: str, headers: CIMultiDict[str]) -> str | None:
        sent = headers.get(TOKEN_HEADER)
        if upstream == "api" and sent and sent != PLACEHOLDER:
            return None   # a user access token the application obtained itself: pass it through
        return "app"

    def attach_token(self, upstream: str, headers: CIMultiDict[str], query: str, token: str) -> str:
        if upstream == "api":
            headers[TOKEN_HEADER] = token   # the raw value, not JSON-quoted
            return query
        return with_query_param(query, "access_token", token)

    def token_endpoint(self, upstream: str, method: str, path: str) -> str | None:
        if upstream == "oapi" and path == OAPI_TOKEN_PATH:
            return "app"
        if upstream == "api" and method == "POST" and (path == API_TOKEN_PATH or API_CORP_TOKEN.match(path)):
            return "app"
        return None

    def token_endpoint_answer(self, kind: str, expires_in: float) -> LocalAnswer:
        seconds = int(expires_in)
        return LocalAnswer(200, dump({
            "errcode": 0, "errmsg": "ok", "access_token": PLACEHOLDER, "expires_in": seconds,
            "accessToken": PLACEHOLDER, "expireIn": seconds,
        }))

    def classify(self, upstream: str, status: int, headers: Mapping[str, str], body: bytes | None) -> Verdict:
        retry_after = parse_retry_after(headers.get("Retry-After"))
        answer = load_json(body)
        if answer is None:
            return verdict_for_status(status, retry_after)
        if "errcode" in answer:
            return self._classify_oapi(answer, status, retry_after)
        if status < 300:
            return SUCCESS
        if answer.get("status") == 1111:   # the per-IP flood ban: {"status":1111,"wait":5,...}
            return verdict_for(Outcome.THROTTLED, "ip_ban", retry_after=number(answer.get("wait")) or retry_after)
        return self._classify_api(code_text(answer.get("code")) or "", status, retry_after)

    def _classify_oapi(self, answer: Mapping[str, object], status: int, retry_after: float | None) -> Verdict:
        code = code_text(answer.get("errcode")) or ""
        reason = f"code_{code}"
        overridden = self.override(code)
        if overridden is not None:
            return verdict_for(overridden, reason, retry_after=retry_after)
        if code == "0":
            return SUCCESS if status < 300 else verdict_for_status(status, retry_after)
        if code in TOKEN_INVALID:
            return verdict_for(Outcome.TOKEN_INVALID, reason)
        if code == "90018":   # per-app per-API QPS: the platform's rule is to wait one second
            return verdict_for(Outcome.THROTTLED, reason, retry_after=max(1.0, retry_after or 0.0))
        if code in THROTTLED:
            return verdict_for(Outcome.THROTTLED, reason, retry_after=retry_after)
        if code in BANNED:
            return verdict_for(Outcome.PERMANENT, reason, signal=Signal.THROTTLED)
        if code in BUSY_NOT_PROCESSED and not (code == "88" and answer.get("sub_code")):
            return verdict_for(Outcome.RETRYABLE, reason, processed=False)
        if code == "15" and "timeout" in str(answer.get("sub_code", "")):
            return verdict_for(Outcome.RETRYABLE, reason)   # isp.top-remote-connection-timeout: may have run
        return verdict_for(Outcome.PERMANENT, reason)

    def _classify_api(self, code: str, status: int, retry_after: float | None) -> Verdict:
        reason = _api_reason(code, status)
        overridden = self.override(code)
        if overridden is not None:
            return verdict_for(overridden, reason, retry_after=retry_after)
        if status == 401 or code in API_TOKEN_INVALID:
            return verdict_for(Outcome.TOKEN_INVALID, reason)
        if code == DUPLICATE_KEY:
            return Verdict(Outcome.PERMANENT, reason, Signal.OK, processed=True, duplicate=True)
        if status == 429 or API_THROTTLED.match(code):
            wait = retry_after if retry_after is not None else (1.0 if "Qps" in code else None)
            return verdict_for(Outcome.THROTTLED, reason, retry_after=wait)
        if status >= 500:
            verdict = verdict_for_status(status, retry_after)
            return Verdict(verdict.outcome, reason, verdict.signal, verdict.processed, verdict.retry_after)
        return verdict_for(Outcome.PERMANENT, reason)

    def routes(self, upstream: str) -> RouteShapes:
        return shapes("dingtalk_api" if upstream == "api" else "dingtalk_oapi")

    def retry_reasons(self, upstream: str) -> tuple[str, ...]:
        own = API_RETRY_REASONS if upstream == "api" else tuple(f"code_{c}" for c in sorted(OAPI_RETRIED))
        return super().retry_reasons(upstream) + own

    def idempotency_spot(self, upstream: str, route: str) -> KeySpot | None:
        if upstream != "api":
            return None
        return next((spot for shape, spot in IDEMPOTENCY if shape.match(route)), None)

    # Quota saving: the route tables below -------------------------------------------------------------------------

    def user_token(self, upstream: str, headers: CIMultiDict[str]) -> str | None:
        sent = headers.get(TOKEN_HEADER)
        return sent if upstream == "api" and sent and sent != PLACEHOLDER else None

    def cached_reads(self, upstream: str) -> Mapping[str, float]:
        return CACHED_READS.get(upstream, {})

    def post_reads(self, upstream: str) -> frozenset[str]:
        return POST_READS if upstream == "oapi" else frozenset()

    def card_update(self, upstream: str, method: str, path: str, body: bytes | None) -> CardUpdate | None:
        if upstream != "api" or method != "PUT" or path not in CARD_ROUTES:
            return None
        update = load_json(body)
        card = update.get("outTrackId") if update else None
        if update is None or not isinstance(card, str) or not card:
            return None
        return CARD_ROUTES[path](card, update)

    def metered(self, upstream: str, template: str) -> bool:
        return not template.startswith(UNMETERED_PREFIXES[upstream])

    def quota_exhausted(self, status: int, body: bytes | None) -> bool:
        answer = load_json(body)
        if answer is None:
            return False
        return code_text(answer.get("errcode")) == "90020" or answer.get("code") == ORG_QUOTA_EXHAUSTED

    def error_body(self, upstream: str, code: int, message: str) -> bytes:
        if upstream == "api":
            return dump({"code": f"imsidecar.{CODE_NAMES.get(code, 'error')}", "message": message, "requestid": ""})
        return dump({"errcode": code, "errmsg": message})


def _api_reason(code: str, status: int) -> str:
    """A bounded label: known api codes by name, anything else by status."""
    known = API_TOKEN_INVALID | {"systemError", "system.busy", "systemBusy", DUPLICATE_KEY}
    if code in known or API_THROTTLED.match(code):
        return f"code_{code}"
    return f"http_{status}" if status in (400, 401, 403, 404, 409, 429, 500, 502, 503, 504) else "http_other"


# ----------------------------------------------------------------------------------------------------------------
# Route tables for the quota-saving stages (docs/quota.md has the sources).

# Read-mostly routes, cached when an app turns the cache on. The old oapi reads are POSTs whose body names what
# is read, so their body is part of what makes two reads the same.
CACHED_READS: Mapping[str, Mapping[str, float]] = {
    "oapi": {"/topapi/v2/user/get": 60.0, "/topapi/v2/department/get": 60.0, "/topapi/user/getbyunionid": 60.0},
    "api": {"/v1.0/contact/users/:union_id": 60.0},   # `me` too: its key holds the user token's digest
}
POST_READS = frozenset({"/topapi/v2/user/get", "/topapi/v2/department/get", "/topapi/v2/department/listsub",
                        "/topapi/user/getbyunionid"})


def _streaming(card: str, update: Mapping[str, object]) -> CardUpdate:
    """PUT /v1.0/card/streaming: `isFull` true overwrites the variable `key`, false appends to it (never merged);
    `isFinalize` / `isError` is the card's last frame."""
    final = update.get("isFinalize") is True or update.get("isError") is True
    merge = f"streaming:{update.get('key')}" if update.get("isFull") is True else None
    return CardUpdate(card, merge, final)


def _card_data(options_key: str):  # type: ignore[no-untyped-def]
    """PUT /v1.0/card/instances and /v1.0/im/interactiveCards replace the card data they carry unless
    `updateCardDataByKey` / `updatePrivateDataByKey` say "by key" (a partial update, never merged). Two updates
    replace the same state only when they carry the same fields."""
    def update(card: str, body: Mapping[str, object]) -> CardUpdate:
        options = body.get(options_key)
        by_key = isinstance(options, dict) and any(options.get(k) is True for k in BY_KEY_OPTIONS)
        fields = ",".join(sorted(k for k in body if k not in CARD_BOOKKEEPING))
        return CardUpdate(card, None if by_key else f"data:{fields}")
    return update


BY_KEY_OPTIONS = ("updateCardDataByKey", "updatePrivateDataByKey")
CARD_BOOKKEEPING = frozenset({"outTrackId", "guid", "userIdType", "robotCode"})
CARD_ROUTES = {
    "/v1.0/card/streaming": _streaming,
    "/v1.0/card/instances": _card_data("cardUpdateOptions"),
    "/v1.0/im/interactiveCards": _card_data("cardOptions"),
}
# Not counted against the organisation's monthly allowance ("basic-interfaces-such-as-log-off-and-address-book"):
# access tokens and tickets, log-in (免登) identity, the address book (users, departments, roles, external
# contacts) and smart HR. Calls refused for QPS or never delivered are not counted either.
UNMETERED_PREFIXES: Mapping[str, tuple[str, ...]] = {
    "oapi": ("/gettoken", "/get_jsapi_ticket", "/sso/", "/sns/", "/user/", "/department/", "/role/",
             "/topapi/user/", "/topapi/v2/user/", "/topapi/department/", "/topapi/v2/department/", "/topapi/role/",
             "/topapi/extcontact/", "/topapi/smartwork/hrm/"),
    "api": ("/v1.0/oauth2/", "/v1.0/contact/", "/v1.0/hrm/"),
}
ORG_QUOTA_EXHAUSTED = "Forbidden.AccessDenied.ApiCountLimitForOrg"   # api; oapi says errcode 90020
