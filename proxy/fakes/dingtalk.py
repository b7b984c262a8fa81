"""A fake DingTalk platform: one app token for both hosts, oapi errors inside HTTP 200, api `{code, message}` errors,
AI card streaming and card updates, and the organisation's monthly call allowance.

Owns DingTalk's observable behaviour for tests and the demo. Serve `oapi_app()` and `api_app()` on two ports.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import web

from proxy.clock import Clock, SystemClock
from proxy.fakes.faults import AFTER, Faults, SeenRequest, drop_connection, finishing, hang, recorder

TOKEN_LIFETIME = 7200
TOKEN_HEADER = "x-acs-dingtalk-access-token"
# Not counted against the monthly allowance (basic-interfaces-such-as-log-off-and-address-book): tokens, the
# address book (users, departments), among others.
UNMETERED = ("/gettoken", "/topapi/v2/user/", "/topapi/v2/department/", "/v1.0/oauth2/", "/v1.0/contact/")


@dataclass
class FakeDingTalk:
    apps: dict[str, str] = field(default_factory=lambda: {"ding_demo": "demo-secret-dingtalk"})
    users: dict[str, str] = field(default_factory=lambda: {"manager001": "Zhang San", "user002": "Li Si"})
    clock: Clock = field(default_factory=SystemClock)
    faults: Faults = field(default_factory=Faults)
    quota_per_second: int | None = None   # 20 QPS per app per API on the real platform
    tokens: dict[str, tuple[str, float]] = field(default_factory=dict)   # token → (app key, expires at)
    current: dict[str, str] = field(default_factory=dict)
    token_calls: int = 0
    token_delay: float = 0.0   # real seconds the token endpoint takes, to let cold-start callers pile up
    calls: list[tuple[str, bool]] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    notable: dict[str, list[dict[str, Any]]] = field(default_factory=dict)   # sheet -> inserted records
    client_tokens: set[str] = field(default_factory=set)
    throttled: int = 0
    requests: list[SeenRequest] = field(default_factory=list)   # everything that arrived, in order
    monthly_allowance: int | None = None   # the organisation's metered calls a month; None: unlimited
    metered_calls: int = 0
    cards: dict[str, dict[str, str]] = field(default_factory=dict)   # outTrackId → streamed variables as shown
    card_frames: dict[str, list[dict[str, Any]]] = field(default_factory=dict)   # outTrackId → updates, in order
    _seq: itertools.count = field(default_factory=lambda: itertools.count(1))
    _windows: dict[tuple[str, str, int], int] = field(default_factory=dict)

    # Tokens: the same token comes back while valid, and each call extends it (the internal-app rule).

    def issue(self, app_key: str) -> str:
        now = self.clock.wall()
        token = self.current.get(app_key)
        if token is None or token not in self.tokens or self.tokens[token][1] <= now:
            token = f"dt{next(self._seq):08d}{app_key}"
            self.current[app_key] = token
        self.tokens[token] = (app_key, now + TOKEN_LIFETIME)
        return token

    def revoke(self, app_key: str) -> None:
        for token, (key, _) in list(self.tokens.items()):
            if key == app_key:
                del self.tokens[token]

    def valid(self, token: str | None) -> bool:
        return bool(token) and token in self.tokens and self.clock.wall() < self.tokens[token][1]

    @property
    def expired_calls(self) -> list[tuple[str, bool]]:
        return [c for c in self.calls if not c[1]]

    # oapi.dingtalk.com -----------------------------------------------------------------------------------------

    def oapi_app(self) -> web.Application:
        app = finishing(web.Application(middlewares=[recorder(self.requests)]))
        app.router.add_get("/gettoken", self.oapi_gettoken)
        app.router.add_post("/topapi/v2/user/get", self.oapi_guarded(self.user_get))
        app.router.add_post("/topapi/message/corpconversation/asyncsend_v2", self.oapi_guarded(self.async_send))
        return app

    async def oapi_gettoken(self, request: web.Request) -> web.Response:
        self.token_calls += 1
        await asyncio.sleep(self.token_delay)
        key, secret = request.query.get("appkey"), request.query.get("appsecret")
        if self.apps.get(key or "") != secret:
            return errcode(40089, "不合法的corpid或corpsecret")
        return errcode(0, "ok", access_token=self.issue(key or ""), expires_in=TOKEN_LIFETIME)

    def oapi_guarded(self, handler):  # type: ignore[no-untyped-def]
        return self.guarded(handler, OAPI)

    def guarded(self, handler, host: HostRules):  # type: ignore[no-untyped-def]
        """Token check, faults and the per-app per-API quota, each answered the way `host` answers them."""
        async def wrapped(request: web.Request) -> web.StreamResponse:
            token = host.token(request)
            refused = host.check(self, token)
            self.calls.append((request.path, refused is None and token is not None))
            if refused is not None:
                return refused
            delay = self.faults.delay()   # as Feishu's fake: every guarded call takes this long, faulted or not
            if delay:
                await asyncio.sleep(delay)
            fault = self.faults.pick(request.path)
            if fault in ("throttle", "throttle_400") or self.over_quota(token or "", api_of(request)):
                self.throttled += 1
                return host.answers["throttle"]()
            if fault in ("unavailable", "busy"):
                return host.answers[fault]()
            if fault == "reset_before":
                return drop_connection(request)
            if fault == "hang":
                await hang(self.faults)
            if self.month_spent(request.path):
                return host.answers["month_spent"]()
            response = await handler(request)
            if fault in AFTER:
                return drop_connection(request) if fault == "reset_after" else host.answers[fault]()
            self.meter(request.path, response.status)
            return response
        return wrapped

    def month_spent(self, path: str) -> bool:
        return self.monthly_allowance is not None and metered(path) and self.metered_calls >= self.monthly_allowance

    def meter(self, path: str, status: int) -> None:
        """Counted: metered calls the platform served (QPS refusals and undelivered calls are not)."""
        if metered(path) and status < 400:
            self.metered_calls += 1

    async def user_get(self, request: web.Request) -> web.Response:
        body = await request.json()
        userid = body.get("userid")
        if userid not in self.users:
            return errcode(60121, "找不到该用户")
        return errcode(0, "ok", result={"userid": userid, "name": self.users[userid]}, request_id="fake")

    async def async_send(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.sent.append(body)
        return errcode(0, "ok", task_id=next(self._seq), request_id="fake")

    # api.dingtalk.com ------------------------------------------------------------------------------------------

    def api_app(self) -> web.Application:
        app = finishing(web.Application(middlewares=[recorder(self.requests)]))
        app.router.add_post("/v1.0/oauth2/accessToken", self.api_access_token)
        app.router.add_get("/v1.0/contact/users/{union_id}", self.api_guarded(self.contact_user))
        app.router.add_post("/v1.0/robot/oToMessages/batchSend", self.api_guarded(self.batch_send))
        app.router.add_post("/v1.0/notable/bases/{base_id}/sheets/{sheet}/records", self.api_guarded(self.insert_records))
        app.router.add_put("/v1.0/card/streaming", self.api_guarded(self.card_streaming))
        app.router.add_put("/v1.0/card/instances", self.api_guarded(self.card_update))
        return app

    async def api_access_token(self, request: web.Request) -> web.Response:
        self.token_calls += 1
        await asyncio.sleep(self.token_delay)
        try:
            body = await request.json()
        except ValueError:
            return api_error(400, "MissingBody", "请求体必须是JSON")
        key, secret = body.get("appKey"), body.get("appSecret")
        if self.apps.get(key or "") != secret:
            return api_error(400, "invalidClientIdOrSecret", "无效的clientId或者clientSecret")
        return web.json_response({"accessToken": self.issue(key), "expireIn": TOKEN_LIFETIME})

    def api_guarded(self, handler):  # type: ignore[no-untyped-def]
        return self.guarded(handler, API)

    async def contact_user(self, request: web.Request) -> web.Response:
        union_id = request.match_info["union_id"]
        if union_id == "me" or union_id in self.users:
            return web.json_response({"unionId": union_id, "nick": self.users.get(union_id, "Me")})
        return api_error(404, "user.notFound", "用户不存在")

    async def batch_send(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.sent.append(body)
        return web.json_response({"processQueryKey": f"pqk{next(self._seq)}", "invalidStaffIdList": []})

    async def insert_records(self, request: web.Request) -> web.Response:
        """Notable (AI table) record insert: a clientToken already used is refused with 409, as DingTalk does."""
        client_token = request.query.get("clientToken")
        if client_token and client_token in self.client_tokens:
            return api_error(409, "invalidRequest.duplicateClientToken", "clientToken重复")
        body = await request.json()
        created = [{"id": f"rec{next(self._seq)}", **r} for r in body.get("records", [])]
        self.notable.setdefault(request.match_info["sheet"], []).extend(created)
        if client_token:
            self.client_tokens.add(client_token)
        return web.json_response({"value": [{"id": r["id"]} for r in created]})

    async def card_streaming(self, request: web.Request) -> web.Response:
        """AI card streaming: `isFull` overwrites the variable, otherwise the content is appended to it."""
        body = await request.json()
        card, key, content = body.get("outTrackId"), body.get("key"), body.get("content")
        if not all(isinstance(v, str) for v in (card, key, content)) or not body.get("guid"):
            return api_error(400, "param.invalid", "参数错误")
        shown = self.cards.setdefault(card, {})
        shown[key] = content if body.get("isFull") is True else shown.get(key, "") + content
        self.card_frames.setdefault(card, []).append(body)
        return web.json_response({"success": True, "result": True})

    async def card_update(self, request: web.Request) -> web.Response:
        body = await request.json()
        card = body.get("outTrackId")
        if not isinstance(card, str):
            return api_error(400, "param.invalid", "参数错误")
        self.card_frames.setdefault(card, []).append(body)
        return web.json_response({"success": True, "result": True})

    def over_quota(self, token: str, path: str) -> bool:
        if self.quota_per_second is None:
            return False
        key = (self.tokens.get(token, (token, 0))[0], path, int(self.clock.wall()))
        self._windows[key] = self._windows.get(key, 0) + 1
        return self._windows[key] > self.quota_per_second


def api_of(request: web.Request) -> str:
    """The API a request calls (its route pattern, IDs left out): the 20 QPS limit is per app per API."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else request.path


def metered(path: str) -> bool:
    return not path.startswith(UNMETERED)


def errcode(code: int, message: str, **fields: Any) -> web.Response:
    body = json.dumps({"errcode": code, "errmsg": message, **fields}, ensure_ascii=False)
    return web.Response(text=body, content_type="application/json")


def api_error(status: int, code: str, message: str) -> web.Response:
    body = json.dumps({"code": code, "message": message, "requestid": "FAKE-REQUEST-ID"}, ensure_ascii=False)
    return web.Response(status=status, text=body, content_type="application/json",
                        headers={"x-acs-request-id": "FAKE-REQUEST-ID"})


@dataclass(frozen=True)
class HostRules:
    """How one DingTalk host reads the token and answers each refusal and fault."""

    token: Callable[[web.Request], str | None]
    check: Callable[[FakeDingTalk, str | None], web.Response | None]   # None: the token is good
    answers: dict[str, Callable[[], web.Response]]


def _oapi_check(fake: FakeDingTalk, token: str | None) -> web.Response | None:
    if not token:
        return errcode(41001, "缺少access_token参数")
    return None if fake.valid(token) else errcode(40014, "不合法的access_token")


def _api_check(fake: FakeDingTalk, token: str | None) -> web.Response | None:
    if fake.valid(token) or (token or "").startswith("user-"):
        return None
    return api_error(401, "InvalidAuthentication", "不合法的access_token")


# oapi: errors inside HTTP 200 (errcode), a gateway's HTML page when the backend is away.
OAPI = HostRules(
    token=lambda request: request.query.get("access_token"),
    check=_oapi_check,
    answers={
        "unavailable": lambda: web.Response(status=502, text="<html><body>502 Bad Gateway</body></html>",
                                            content_type="text/html"),
        "throttle": lambda: errcode(90018, "当前企业调用该接口的QPS超过了上限，请稍后重试"),
        "busy": lambda: errcode(-1, "系统繁忙"),
        "error_after": lambda: web.Response(status=500, text="error"),
        "gateway_after": lambda: web.Response(status=504, text="<html><body>504 Gateway Time-out</body></html>",
                                              content_type="text/html"),
        "month_spent": lambda: errcode(90020, "您的企业本月api调用量已超过限制,调用量:10001次,额度:10000次,"
                                              "请登录开发者后台-资源管理-查看用量明细"),
    },
)
# api: `{code, message}` with a 4xx/5xx status.
API = HostRules(
    token=lambda request: request.headers.get(TOKEN_HEADER),
    check=_api_check,
    answers={
        "unavailable": lambda: api_error(503, "ServiceUnavailable", "服务暂不可用"),
        "throttle": lambda: api_error(403, "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi", "调用频率超过限制"),
        "busy": lambda: api_error(429, "system.busy", "系统繁忙"),
        "error_after": lambda: api_error(500, "systemError", "系统错误"),
        "gateway_after": lambda: api_error(504, "ServiceTimeout", "服务超时"),
        "month_spent": lambda: api_error(403, "Forbidden.AccessDenied.ApiCountLimitForOrg", "企业本月API调用量已超过限制"),
    },
)
