"""HTTP entry points for robots: `POST /robots/<name>` (a native message) and `POST /alerts/<name>` (an alert payload).

Owns the RobotService that the handlers call and the mapping from outcomes to HTTP answers in the platform's shape;
it does not sign, rate-limit, retry or render (delivery, limiter and render do).
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections.abc import Callable
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.clock import Clock
from proxy.robots.delivery import Delivery, DeliveryPolicy, Receipt
from proxy.robots.errors import BadMessage, RateLimited, RobotError, Unavailable, UnknownTarget
from proxy.robots.limiter import Limiters
from proxy.robots.metrics import RobotMetrics
from proxy.robots.platforms import PLATFORMS, RETRY_REASONS, Message
from proxy.robots.render import parse_notification, render
from proxy.robots.resends import FailedNotifications, notification_key
from proxy.robots.settings import RobotsSettings, RobotTarget

log = logging.getLogger("imsidecar.robots")

T = TypeVar("T")
ROBOT_ROUTE = "/robots/{name}"
ALERT_ROUTE = "/alerts/{name}"


class RobotService:
    """Looks up a target, shapes the message for it and delivers it within the configured deadline."""

    def __init__(self, settings: RobotsSettings, delivery: Delivery, clock: Clock, metrics: RobotMetrics) -> None:
        self._settings, self._delivery, self._clock, self._metrics = settings, delivery, clock, metrics
        self._failed = FailedNotifications(clock)
        metrics.prepare(settings.targets.values(), RETRY_REASONS)

    @classmethod
    def create(cls, settings: RobotsSettings, session: aiohttp.ClientSession, clock: Clock,
               registry: CollectorRegistry, *, policy: DeliveryPolicy | None = None,
               rand: Callable[[], float] = random.random) -> RobotService:
        metrics = RobotMetrics(registry)
        delivery = Delivery(session, clock, Limiters(clock, rand), metrics, policy or DeliveryPolicy(), rand)
        return cls(settings, delivery, clock, metrics)

    def target(self, name: str) -> RobotTarget:
        try:
            return self._settings.targets[name]
        except KeyError:
            raise UnknownTarget(f"no robot target named {name[:64]!r} is configured") from None

    async def post_message(self, target: RobotTarget, message: Any) -> Receipt:
        """A body in the platform's own robot format; the sidecar adds keyword, timestamp and sign."""
        return await self._deliver(target, lambda: PLATFORMS[target.platform].validate(message))

    async def post_alerts(self, target: RobotTarget, payload: Any) -> Receipt:
        """An Alertmanager or Grafana webhook payload, rendered as one message for the target. A notification that
        failed and comes again (Alertmanager retries 5xx) is counted as a re-send, so its failure counts once."""
        note = self._shape(target, lambda: parse_notification(payload))
        key = notification_key(target.name, note)
        try:
            receipt = await self._deliver(target, lambda: render(note, target), resend=self._failed.seen(key))
        except RobotError:
            self._failed.failed(key)
            raise
        self._failed.delivered(key)
        return receipt

    async def _deliver(self, target: RobotTarget, shape: Callable[[], Message], resend: bool = False) -> Receipt:
        message = self._shape(target, shape)
        if target.keyword:
            message = PLATFORMS[target.platform].with_keyword(message, target.keyword)
        return await self._delivery.send(target, message, self._clock.now() + self._settings.deadline, resend)

    def _shape(self, target: RobotTarget, shape: Callable[[], T]) -> T:
        """`shape()`, counting a malformed message (the caller's fault, never retried) under bad_message."""
        try:
            return shape()
        except BadMessage:
            self._metrics.finished(target.name, "bad_message", 0.0)
            raise


def add_robot_routes(app: web.Application, service: RobotService) -> None:
    """Mount the robot and alert-bridge endpoints on an aiohttp Application."""
    async def handle(request: web.Request) -> web.Response:
        return await answer(service, request, request.match_info["name"])

    app.router.add_post(ROBOT_ROUTE, handle)
    app.router.add_post(ALERT_ROUTE, handle)


PATH = re.compile(r"/(robots|alerts)/([^/]+)")


async def dispatch(service: RobotService, request: web.BaseRequest) -> web.Response | None:
    """For a low-level `web.Server` handler: the answer if the path is ours, else None (the request goes on)."""
    if PATH.fullmatch(request.path) is None:
        return None
    if request.method != "POST":
        raise web.HTTPMethodNotAllowed(request.method, ["POST"])
    return await answer(service, request, request.path.rsplit("/", 1)[1])


async def answer(service: RobotService, request: web.BaseRequest, name: str) -> web.Response:
    alerts = request.path.startswith("/alerts/")
    target: RobotTarget | None = None
    try:
        target = service.target(name)
        body = await _json(request)
        await (service.post_alerts if alerts else service.post_message)(target, body)
    except RobotError as exc:
        # Alertmanager retries 5xx but gives up on any 4xx, 429 included (alertmanager#2457, PR #2145);
        # an application posting a message is better told 429.
        return _error(exc, target, rate_limited_status=503 if alerts else 429)
    return web.json_response(PLATFORMS[target.platform].ok_body())


async def _json(request: web.BaseRequest) -> Any:
    try:
        return await request.json()
    except ValueError as exc:  # json.JSONDecodeError, or undecodable bytes
        raise BadMessage("the request body is not valid JSON") from exc


def _error(exc: RobotError, target: RobotTarget | None, rate_limited_status: int) -> web.Response:
    status = rate_limited_status if isinstance(exc, RateLimited) else exc.status
    name = target.name if target else "-"
    log.warning("robot %s: %s (HTTP %d)", name, exc.message, status)
    if target is None:
        # No target, no platform: answer in both shapes so either SDK can read it.
        body: Message = {"code": exc.code, "msg": exc.message, "errcode": exc.code, "errmsg": exc.message}
    else:
        body = PLATFORMS[target.platform].error_body(exc.code, exc.message)
    headers = {}
    if isinstance(exc, Unavailable) and exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return web.json_response(body, status=status, headers=headers)

