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
    PLACEHOLDER, CODE_NAMES, SUCCESS, LocalAnswer, Platform, TokenCall, TokenFetchError, TokenGrant, code_text, dump,
    load_json, number, parse_retry_after, verdict_for, verdict_for_status, with_query_param,
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

    def error_body(self, upstream: str, code: int, message: str) -> bytes:
        if upstream == "api":
            return dump({"code": f"imsidecar.{CODE_NAMES.get(code, 'error')}", "message": message, "requestid": ""})
        return dump({"errcode": code, "errmsg": message})


def _api_reason(code: str, status: int) -> str:
    """A bounded label: known api codes by name, anything else by status."""
    known = API_TOKEN_INVALID | {"systemError", "system.busy", "systemBusy"}
    if code in known or API_THROTTLED.match(code):
        return f"code_{code}"
    return f"http_{status}" if status in (400, 401, 403, 404, 409, 429, 500, 502, 503, 504) else "http_other"
