"""Fake DingTalk and Feishu group-robot endpoints (aiohttp apps) that judge requests the way the platforms do.

Owns signature and timestamp checks (±1 h), keywords, rate limits (DingTalk's 10-minute penalty), size limits and the
real error codes inside HTTP 200; it does not model anything else of the platforms. For tests only.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from proxy.clock import Clock
from proxy.robots.signing import dingtalk_sign, feishu_sign, signatures_match

SKEW = 3600.0  # both platforms refuse a timestamp more than an hour from their clock
DROP = "drop"  # a scripted answer that closes the connection without a response


@dataclass
class Received:
    body: dict[str, Any]
    query: dict[str, str]
    at: float  # the fake's clock.now()


@dataclass
class RobotLog:
    accepted: list[Received] = field(default_factory=list)
    refused: list[tuple[int, str]] = field(default_factory=list)  # (platform code, message)
    script: deque[Any] = field(default_factory=deque)  # canned answers served before judging: (status, body) or DROP

    def answer_next(self, *answers: Any) -> None:
        self.script.extend(answers)


def texts(value: Any) -> str:
    """Every string in a message body, for keyword checks (the platforms look across the content)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return "\n".join(texts(v) for k, v in value.items() if k not in ("at", "timestamp", "sign"))
    if isinstance(value, list):
        return "\n".join(texts(v) for v in value)
    return ""


class RateWindow:
    def __init__(self, limit: int, period: float) -> None:
        self.limit, self.period = limit, period
        self.times: deque[float] = deque()

    def full(self, now: float) -> bool:
        while self.times and self.times[0] <= now - self.period:
            self.times.popleft()
        return len(self.times) >= self.limit

    def add(self, now: float) -> None:
        self.times.append(now)


async def scripted(log: RobotLog, request: web.Request) -> web.StreamResponse | None:
    if not log.script:
        return None
    answer = log.script.popleft()
    if answer == DROP:
        assert request.transport is not None
        request.transport.close()
        raise ConnectionResetError("fake robot dropped the connection")
    status, body = answer
    return web.json_response(body, status=status)


class FakeDingTalkRobot:
    """POST /robot/send?access_token=…[&timestamp=&sign=]; 20 messages a minute, then 410100 for 10 minutes."""

    def __init__(self, clock: Clock, *, token: str = "dt-token", secret: str | None = None,
                 keyword: str | None = None, per_minute: int = 20, penalty: float = 600.0,
                 max_bytes: int = 20000) -> None:
        self.clock, self.token, self.secret, self.keyword = clock, token, secret, keyword
        self.window, self.penalty, self.max_bytes = RateWindow(per_minute, 60.0), penalty, max_bytes
        self.throttled_until = float("-inf")
        self.log = RobotLog()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/robot/send", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        canned = await scripted(self.log, request)
        if canned is not None:
            return canned
        raw = await request.read()
        code, message = self.judge(request.query, raw)
        if code:
            self.log.refused.append((code, message))
            return web.json_response({"errcode": code, "errmsg": message})
        self.log.accepted.append(Received(json.loads(raw), dict(request.query), self.clock.now()))
        return web.json_response({"errcode": 0, "errmsg": "ok"})

    def judge(self, query: Any, raw: bytes) -> tuple[int, str]:
        if "access_token" not in query:
            return 400101, "access_token is blank"
        if query["access_token"] != self.token:
            return 300001, "token is not exist"
        problem = self.check_sign(query)
        if problem:
            return 310000, problem
        if len(raw) > self.max_bytes:
            return 460101, "message too long, exceed 20000 bytes"
        now = self.clock.now()
        if now < self.throttled_until:
            return 410100, "send too fast, exceed 20 times per minute"
        if self.window.full(now):
            # The 21st message in a minute throttles the robot for 10 minutes.
            self.throttled_until = now + self.penalty
            return 410100, "send too fast, exceed 20 times per minute"
        try:
            body = json.loads(raw)
        except ValueError:
            return 40035, "invalid json"
        if self.keyword and self.keyword not in texts(body):
            return 310000, "keywords not in content"
        self.window.add(now)
        return 0, ""

    def check_sign(self, query: Any) -> str:
        if self.secret is None:
            return ""
        timestamp, sign = query.get("timestamp", ""), query.get("sign", "")
        if not timestamp.isdigit() or not sign:
            return "sign not match, more: timestamp and sign are required"
        if abs(int(timestamp) / 1000 - self.clock.wall()) > SKEW:
            return "invalid timestamp"
        # aiohttp has already URL-decoded the query, as DingTalk does.
        if not signatures_match(dingtalk_sign(self.secret, int(timestamp)), sign):
            return "sign not match"
        return ""


class FakeFeishuRobot:
    """POST /open-apis/bot/v2/hook/<token> with timestamp+sign in the body; 5 a second and 100 a minute."""

    def __init__(self, clock: Clock, *, token: str = "fs-token", secret: str | None = None,
                 keyword: str | None = None, per_second: int = 5, per_minute: int = 100,
                 max_bytes: int = 20 * 1024) -> None:
        self.clock, self.token, self.secret, self.keyword = clock, token, secret, keyword
        self.windows = (RateWindow(per_second, 1.0), RateWindow(per_minute, 60.0))
        self.max_bytes = max_bytes
        self.log = RobotLog()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/open-apis/bot/v2/hook/{token}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        canned = await scripted(self.log, request)
        if canned is not None:
            return canned
        raw = await request.read()
        status, code, message = self.judge(request.match_info["token"], raw)
        if code:
            self.log.refused.append((code, message))
            return web.json_response({"code": code, "msg": message, "data": {}}, status=status)
        self.log.accepted.append(Received(json.loads(raw), {}, self.clock.now()))
        return web.json_response({"StatusCode": 0, "StatusMessage": "success", "code": 0, "data": {},
                                  "msg": "success"})

    def judge(self, token: str, raw: bytes) -> tuple[int, int, str]:
        if token != self.token:
            return 200, 19001, "param invalid: incoming webhook access token invalid"
        if len(raw) > self.max_bytes:
            return 400, 9499, "Bad Request"  # the exact code for an oversized body is not documented
        try:
            body = json.loads(raw)
        except ValueError:
            return 400, 9499, "Bad Request"
        if not self.signed_correctly(body):
            return 200, 19021, "sign match fail or timestamp is not within one hour from current time"
        now = self.clock.now()
        if any(w.full(now) for w in self.windows):
            return 400, 9499, "too many request"  # as seen in ccfos/nightingale#1437
        if self.keyword and self.keyword not in texts(body):
            return 200, 19024, "Key Words Not Found"
        for window in self.windows:
            window.add(now)
        return 200, 0, ""

    def signed_correctly(self, body: dict[str, Any]) -> bool:
        if self.secret is None:
            return True
        timestamp, sign = str(body.get("timestamp", "")), str(body.get("sign", ""))
        if not timestamp.isdigit() or abs(int(timestamp) - self.clock.wall()) > SKEW:
            return False
        return signatures_match(feishu_sign(self.secret, int(timestamp)), sign)
