"""A fake Feishu open platform: tenant/app tokens with the real expiry rule, messages, bitable records, contact and
bot reads, card updates with their per-message and per-card limits, and the Basic plan's monthly call allowance.

Owns Feishu's observable behaviour for tests and the demo; it checks every token it is sent, at its own clock's time.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from proxy.clock import Clock, SystemClock
from proxy.fakes.faults import AFTER, Faults, SeenRequest, drop_connection, finishing, hang, recorder

TOKEN_LIFETIME = 7200
NEW_TOKEN_BELOW = 1800   # Feishu hands out a new token only when the current one has < 30 min left
MESSAGE_UUID_TTL = 3600  # im/v1/messages: "持有相同 uuid 的请求 1 小时内至多成功发送一条消息"
MESSAGE_UPDATES_PER_SECOND = 5   # PATCH im/v1/messages/:message_id: "单条消息更新频控为 5 QPS" (230020 beyond)
CARD_OPERATIONS_PER_SECOND = 10  # cardkit: at most 10 operations a second on one card entity
# Not counted against the monthly allowance (custom-app-api-call-limit): authentication and contacts, among others.
UNMETERED = ("/open-apis/auth/", "/open-apis/authen/", "/open-apis/contact/")


@dataclass
class IssuedToken:
    app_id: str
    kind: str
    expires_at: float


@dataclass
class FakeFeishu:
    apps: dict[str, str] = field(default_factory=lambda: {"cli_demo": "demo-secret-feishu"})
    clock: Clock = field(default_factory=SystemClock)
    faults: Faults = field(default_factory=Faults)
    token_faults: Faults = field(default_factory=Faults)   # the token endpoint's own (an outage of the platform)
    quota_per_second: int | None = None          # per app per API, like the platform's frequency control
    tokens: dict[str, IssuedToken] = field(default_factory=dict)
    current: dict[tuple[str, str], str] = field(default_factory=dict)
    token_calls: int = 0
    token_delay: float = 0.0   # real seconds the token endpoint takes, to let cold-start callers pile up
    calls: list[tuple[str, str, bool]] = field(default_factory=list)   # (path, token kind seen, token valid)
    messages: list[dict[str, Any]] = field(default_factory=list)
    message_uuids: dict[str, tuple[str, float]] = field(default_factory=dict)   # uuid -> (message id, sent at)
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    client_tokens: dict[str, Any] = field(default_factory=dict)
    throttled: int = 0
    requests: list[SeenRequest] = field(default_factory=list)   # everything that arrived, in order
    users: dict[str, str] = field(default_factory=lambda: {"ou_7d8a6e6df7621556": "Zhang San", "ou_8e9b7f7ea8732667": "Li Si"})
    monthly_allowance: int | None = None   # the Basic plan's 10,000 calls a month; None: an unlimited plan
    metered_calls: int = 0                 # successful calls of metered APIs, as the platform counts them
    card_updates: dict[str, list[Any]] = field(default_factory=dict)   # message or card id → what it showed, in order
    card_sequences: dict[str, int] = field(default_factory=dict)
    card_throttled: int = 0                # card updates refused for the per-message or per-card limit
    _seq: itertools.count = field(default_factory=lambda: itertools.count(1))
    _windows: dict[tuple[str, str, int], int] = field(default_factory=dict)

    # Tokens ----------------------------------------------------------------------------------------------------

    def issue(self, app_id: str, kind: str) -> tuple[str, int]:
        now = self.clock.wall()
        held = self.current.get((app_id, kind))
        if held and self.tokens.get(held) and self.tokens[held].expires_at - now >= NEW_TOKEN_BELOW:
            return held, int(self.tokens[held].expires_at - now)
        token = f"{kind[0]}-{app_id}-{next(self._seq):06d}"
        self.tokens[token] = IssuedToken(app_id, kind, now + TOKEN_LIFETIME)
        self.current[(app_id, kind)] = token
        return token, TOKEN_LIFETIME

    def revoke(self, app_id: str) -> None:
        """Every token of the app stops working, as after a secret reset."""
        for token, issued in list(self.tokens.items()):
            if issued.app_id == app_id:
                del self.tokens[token]

    def valid(self, token: str) -> bool:
        issued = self.tokens.get(token)
        return issued is not None and self.clock.wall() < issued.expires_at

    @property
    def expired_calls(self) -> list[tuple[str, str, bool]]:
        return [c for c in self.calls if not c[2]]

    # App -------------------------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = finishing(web.Application(client_max_size=64 * 1024**2, middlewares=[recorder(self.requests)]))
        r = app.router
        r.add_post("/open-apis/auth/v3/tenant_access_token/internal", self.token_endpoint("tenant"))
        r.add_post("/open-apis/auth/v3/app_access_token/internal", self.token_endpoint("app"))
        r.add_post("/open-apis/im/v1/messages", self.guarded(self.send_message))
        r.add_post("/open-apis/im/v1/messages/{message_id}/reply", self.guarded(self.send_message))
        r.add_get("/open-apis/im/v1/messages/{message_id}", self.guarded(self.get_message))
        r.add_post("/open-apis/bitable/v1/apps/{app_token}/tables/{table_id}/records/batch_create",
                   self.guarded(self.batch_create))
        r.add_get("/open-apis/bitable/v1/apps/{app_token}/tables/{table_id}/records", self.guarded(self.list_records))
        r.add_post("/open-apis/im/v1/files", self.guarded(self.upload_file))
        r.add_get("/open-apis/im/v1/files/{file_key}", self.guarded(self.download_file))
        r.add_get("/open-apis/contact/v3/users/{user_id}", self.guarded(self.get_user))
        r.add_get("/open-apis/bot/v3/info", self.guarded(self.bot_info))
        r.add_patch("/open-apis/im/v1/messages/{message_id}", self.guarded(self.update_message))
        r.add_post("/open-apis/cardkit/v1/cards", self.guarded(self.create_card))
        r.add_put("/open-apis/cardkit/v1/cards/{card_id}/elements/{element_id}/content",
                  self.guarded(self.stream_content))
        r.add_patch("/open-apis/cardkit/v1/cards/{card_id}/settings", self.guarded(self.card_settings))
        r.add_get("/open-apis/contact/v3/departments/{department_id}", self.guarded(self.get_department))
        return app

    def token_endpoint(self, kind: str):  # type: ignore[no-untyped-def]
        async def handler(request: web.Request) -> web.StreamResponse:
            self.token_calls += 1
            await asyncio.sleep(self.token_delay)
            early = await self.fault_before(request, self.token_faults.pick(request.path))
            if early is not None:
                return early
            body = await request.json()
            app_id, secret = body.get("app_id"), body.get("app_secret")
            if not isinstance(app_id, str) or not app_id.startswith("cli_") or not isinstance(secret, str):
                return answer(10003, "invalid param")
            if app_id not in self.apps:   # a well-formed id of no app here (a Lark app sent to Feishu, the reverse)
                return answer(10014, "app id not exists")
            if self.apps[app_id] != secret:
                return answer(10014, "app secret invalid")
            token, expire = self.issue(app_id, "tenant")
            result: dict[str, Any] = {"tenant_access_token": token, "expire": expire}
            if kind == "app":
                app_token, expire = self.issue(app_id, "app")
                result.update(app_access_token=app_token, expire=expire)
            return answer(0, "ok", **result)
        return handler

    def guarded(self, handler):  # type: ignore[no-untyped-def]
        """Token check, faults, frequency control, then the API itself (and faults after it acted)."""
        async def wrapped(request: web.Request) -> web.StreamResponse:
            auth = request.headers.get("Authorization", "")
            token = auth.removeprefix("Bearer ")
            if not token:
                return answer(99991661, "Missing access token for authorization.", status=400)
            user = token.startswith("u-") or is_jwt(token)   # user_access_token: u-..., or a JWT (newer apps)
            ok = self.valid(token) or user
            self.calls.append((request.path, "u" if user else token[:1], ok))
            if not ok:
                return answer(99991663, "Invalid access token for authorization.", status=400)
            delay = self.faults.delay()
            if delay:
                await asyncio.sleep(delay)
            fault = self.faults.pick(request.path)
            early = await self.fault_before(request, fault)
            if early is not None:
                return early
            limited = self.rate_limit(token, api_of(request))
            if limited is not None:
                return limited
            if self.month_spent(request.path):
                return answer(99991403, "This month's API call quota has been exceeded", status=429)
            response = await handler(request)
            if fault in AFTER:
                return after_fault(request, fault)
            self.meter(request.path, response.status)
            return response
        return wrapped

    def month_spent(self, path: str) -> bool:
        return self.monthly_allowance is not None and metered(path) and self.metered_calls >= self.monthly_allowance

    def meter(self, path: str, status: int) -> None:
        """Counted: successful calls of metered APIs ("calls failing with 4xx/5xx do not count")."""
        if metered(path) and status < 400:
            self.metered_calls += 1

    async def fault_before(self, request: web.Request, fault: str | None) -> web.StreamResponse | None:
        if fault == "unavailable":
            return web.Response(status=503, text="<html><body>503 Service Temporarily Unavailable</body></html>",
                                content_type="text/html")
        if fault in ("throttle", "throttle_400"):
            self.throttled += 1
            return answer(99991400, "request trigger frequency limit", status=429 if fault == "throttle" else 400,
                          headers={"x-ogw-ratelimit-limit": "50", "x-ogw-ratelimit-reset": "1"})
        if fault == "busy":
            return answer(1254607, "Data not ready, please try again later")
        if fault == "reset_before":
            return drop_connection(request)
        if fault == "hang":
            await hang(self.faults)
        return None

    def rate_limit(self, token: str, path: str) -> web.Response | None:
        if self.quota_per_second is None:
            return None
        issued = self.tokens.get(token)
        key = (issued.app_id if issued else token, path, int(self.clock.wall()))
        self._windows[key] = self._windows.get(key, 0) + 1
        if self._windows[key] <= self.quota_per_second:
            return None
        self.throttled += 1
        return answer(99991400, "request trigger frequency limit", status=429, headers={
            "x-ogw-ratelimit-limit": str(self.quota_per_second), "x-ogw-ratelimit-reset": "1"})

    # APIs ------------------------------------------------------------------------------------------------------

    async def send_message(self, request: web.Request) -> web.Response:
        body = await request.json()
        uuid = body.get("uuid")
        seen = self.message_uuids.get(uuid) if uuid else None
        if seen and self.clock.wall() - seen[1] < MESSAGE_UUID_TTL:   # the same uuid within an hour: the same message
            return answer(0, "success", data={"message_id": seen[0]})
        if "msg_type" not in body or "content" not in body:
            return answer(230001, "Your request contains an invalid request parameter.", status=400)
        message_id = f"om_{next(self._seq):08d}"
        self.messages.append({"message_id": message_id, **body})
        if uuid:
            self.message_uuids[uuid] = (message_id, self.clock.wall())
        return answer(0, "success", data={"message_id": message_id, "msg_type": body["msg_type"]})

    async def get_message(self, request: web.Request) -> web.Response:
        wanted = request.match_info["message_id"]
        items = [m for m in self.messages if m["message_id"] == wanted]
        if not items:
            return answer(230002, "message not found", status=400)
        return answer(0, "success", data={"items": items})

    async def batch_create(self, request: web.Request) -> web.Response:
        client_token = request.query.get("client_token")
        if client_token and client_token in self.client_tokens:
            return answer(0, "success", data=self.client_tokens[client_token])
        body = await request.json()
        records = body.get("records") or []
        if not 0 < len(records) <= 1000:
            return answer(1254104, "records must hold 1 to 1000 items", status=400)
        table = self.records.setdefault(request.match_info["table_id"], [])
        created = [{"record_id": f"rec{next(self._seq):08d}", "fields": r.get("fields", {})} for r in records]
        table.extend(created)
        data = {"records": created}
        if client_token:
            self.client_tokens[client_token] = data
        return answer(0, "success", data=data)

    async def list_records(self, request: web.Request) -> web.Response:
        table = self.records.get(request.match_info["table_id"], [])
        return answer(0, "success", data={"items": table[:500], "total": len(table), "has_more": len(table) > 500})

    async def get_user(self, request: web.Request) -> web.Response:
        user_id = request.match_info["user_id"]
        if user_id not in self.users:
            return answer(99992402, "field validation failed", status=400)
        return answer(0, "success", data={"user": {"open_id": user_id, "name": self.users[user_id]}})

    async def bot_info(self, request: web.Request) -> web.Response:
        return answer(0, "ok", bot={"activate_status": 2, "app_name": "fake bot", "open_id": "ou_bot0000001"})

    async def update_message(self, request: web.Request) -> web.Response:
        """PATCH a card message: the whole content is replaced; 5 updates a second per message at most."""
        message_id = request.match_info["message_id"]
        if self.over(("message", message_id), MESSAGE_UPDATES_PER_SECOND):
            self.card_throttled += 1
            return answer(230020, "This operation triggers the frequency limit.", status=400)
        content = (await request.json()).get("content")
        if not isinstance(content, str):
            return answer(230001, "Your request contains an invalid request parameter.", status=400)
        self.card_updates.setdefault(message_id, []).append(content)
        return answer(0, "success", data={})

    async def create_card(self, request: web.Request) -> web.Response:
        card_id = f"{next(self._seq) + 7355439197428236000}"
        self.card_updates[card_id] = []
        return answer(0, "success", data={"card_id": card_id})

    async def stream_content(self, request: web.Request) -> web.Response:
        """PUT an element's full text (the client types out what is new)."""
        return await self.card_operation(request, lambda body: body.get("content"))

    async def card_settings(self, request: web.Request) -> web.Response:
        """PATCH the card's settings: `{"config": {"streaming_mode": false}}` ends its streaming."""
        return await self.card_operation(request, lambda body: {"settings": body.get("settings")})

    async def card_operation(self, request: web.Request, shown: Any) -> web.Response:
        """Every cardkit operation on a card: `sequence` must grow; 10 operations a second per card at most."""
        card_id = request.match_info["card_id"]
        if card_id not in self.card_updates:
            return answer(200740, "The card entity does not exist", status=400)
        if self.over(("card", card_id), CARD_OPERATIONS_PER_SECOND):
            self.card_throttled += 1
            return answer(99991400, "request trigger frequency limit", status=429,
                          headers={"x-ogw-ratelimit-limit": str(CARD_OPERATIONS_PER_SECOND), "x-ogw-ratelimit-reset": "1"})
        body = await request.json()
        sequence = body.get("sequence")
        if not isinstance(sequence, int) or sequence <= self.card_sequences.get(card_id, 0):
            return answer(300317, "The sequence number for operating on the card did not increment consecutively",
                          status=400)
        self.card_sequences[card_id] = sequence
        self.card_updates[card_id].append(shown(body))
        return answer(0, "success", data={})

    async def get_department(self, request: web.Request) -> web.Response:
        department = request.match_info["department_id"]
        return answer(0, "success", data={"department": {"department_id": department, "name": f"dept {department}"}})

    def over(self, what: tuple[str, str], per_second: int) -> bool:
        key = (what[0], what[1], int(self.clock.wall()))
        self._windows[key] = self._windows.get(key, 0) + 1
        return self._windows[key] > per_second

    async def upload_file(self, request: web.Request) -> web.Response:
        size = 0
        async for chunk in request.content.iter_chunked(65536):
            size += len(chunk)
        return answer(0, "success", data={"file_key": f"file_{size}", "size": size})

    async def download_file(self, request: web.Request) -> web.StreamResponse:
        size = int(request.match_info["file_key"].removeprefix("file_") or 0)
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = size
        await response.prepare(request)
        block = b"x" * 65536
        for start in range(0, size, len(block)):
            await response.write(block[: min(len(block), size - start)])
        await response.write_eof()
        return response


def after_fault(request: web.Request, fault: str) -> web.StreamResponse:
    """The write is done; what the client sees is a reset, a 500 with Feishu's internal error, or a gateway's 504."""
    if fault == "reset_after":
        return drop_connection(request)
    if fault == "gateway_after":
        return web.Response(status=504, text="<html><body>504 Gateway Time-out</body></html>", content_type="text/html")
    return answer(1500, "internal error", status=500)


def is_jwt(token: str) -> bool:
    parts = token.split(".")
    return len(parts) == 3 and token.startswith("eyJ") and all(parts)


def api_of(request: web.Request) -> str:
    """The API a request calls (its route pattern, IDs left out): frequency limits count per app per API."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else request.path


def metered(path: str) -> bool:
    return not path.startswith(UNMETERED)


def answer(code: int, msg: str, *, status: int = 200, headers: dict[str, str] | None = None, **fields: Any) -> web.Response:
    body = json.dumps({"code": code, "msg": msg, **fields}, separators=(",", ":"))
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)
