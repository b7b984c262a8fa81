"""The admin listener: `/healthz` (alive), `/readyz` (every app holds a token, or why not), `/metrics`.

Owns these three answers only; what readiness means is asked of the sidecar.
"""

from __future__ import annotations

from typing import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

Readiness = Callable[[], dict[str, str]]   # app name → "ok" or the reason it is not ready


def admin_app(registry: CollectorRegistry, readiness: Readiness) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        apps = readiness()
        ready = all(state == "ok" for state in apps.values())
        return web.json_response({"ready": ready, "apps": apps}, status=200 if ready else 503)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
