"""The admin listener: `/healthz` (alive, and on which event loop), `/readyz` (can serve, with token and platform
health), `/metrics`.

Owns these three answers only; what readiness means is proxy/readiness.py's, asked through the sidecar.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from proxy.readiness import ReadinessReport

Readiness = Callable[[bool], ReadinessReport]   # verbose -> the report


def admin_app(registry: CollectorRegistry, readiness: Readiness) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "event_loop": event_loop_name()})

    async def readyz(request: web.Request) -> web.Response:
        # ?verbose=0: the verdict and what it waits for, without each app's report (at 1,000 apps the report is
        # ~120 KB and ~20 ms of the sidecar's CPU; a kubelet reads only the status)
        report = readiness(request.query.get("verbose", "1").lower() not in ("0", "false", "no"))
        return web.json_response(report.body, status=200 if report.ready else 503)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


def event_loop_name() -> str:
    """Which event loop runs the process: uvloop or asyncio (the image check asserts uvloop)."""
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]
