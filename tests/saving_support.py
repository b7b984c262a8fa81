"""Shared set-up for the quota-saving stage tests: an app's real config and platform rules, and exchanges for it,
without a sidecar around them (the stages are tested against their own interfaces)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Awaitable, Callable

from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry, Counter

from proxy import config
from proxy.guard import Guard
from proxy.metrics import SavingsMetrics
from proxy.intake import RequestBody
from proxy.pipeline import Exchange
from proxy.platforms import platform_for
from proxy.upstream import Answer

FEISHU_APP = "{name: bot, platform: feishu, app_id: cli_x, app_secret: s}"
DING_APP = "{name: ding, platform: dingtalk, app_key: ding_x, app_secret: s}"


def app_config(app: str = FEISHU_APP, sections: str = "") -> Any:
    """One app's config: `sections` is YAML flow-mapping content added to the app (`cache: {}, cards: {...}`)."""
    text = app[:-1] + (", " + sections if sections else "") + "}"
    return config.loads(f"apps: [{text}]", env={}).apps[0]


def binding(app: Any, upstream: str | None = None) -> Any:
    """What the stages read of a binding: the app, its platform's rules and the upstream."""
    return SimpleNamespace(app=app, platform=platform_for(app), upstream=upstream or next(iter(app.upstreams)))


def exchange(bound: Any, method: str, path: str, query: str = "", headers: dict[str, str] | None = None,
             token_kind: str | None = "tenant") -> Exchange:
    template = bound.platform.route_template(bound.upstream, path)
    return Exchange(bound, method, path, query, CIMultiDict(headers or {}), template, template, 0.0, 30.0, token_kind)


def body(data: Any = None) -> RequestBody:
    if data is None:
        return RequestBody(None, length=0)
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return RequestBody(raw, length=len(raw))


def json_answer(payload: dict[str, Any], status: int = 200, **headers: str) -> Answer:
    return Answer(status, CIMultiDictProxy(CIMultiDict({"Content-Type": "application/json", **headers})),
                  json.dumps(payload).encode())


def savings_metrics() -> tuple[SavingsMetrics, CollectorRegistry]:
    registry = CollectorRegistry()
    return SavingsMetrics(registry), registry


def guard(registry: CollectorRegistry | None = None) -> Guard:
    """A stage guard counting into `imsidecar_stage_failures_total` of `registry`."""
    counter = Counter("imsidecar_stage_failures", "Stage failures.", ("stage",), registry=registry or CollectorRegistry())
    return Guard(counter)


@dataclass
class FakeCall:
    """The next stage of the pipeline, as a stage sees it: records what reached it and answers in the script's way."""

    answer: Callable[[Exchange, RequestBody], Answer] = lambda e, b: json_answer({"code": 0, "msg": "ok"})
    delay: Callable[[], Awaitable[None]] | None = None
    seen: list[tuple[Exchange, RequestBody]] = field(default_factory=list)

    async def __call__(self, exchange: Exchange, body: RequestBody) -> Answer:
        self.seen.append((exchange, body))
        if self.delay is not None:
            await self.delay()
        else:
            await asyncio.sleep(0)
        return self.answer(exchange, body)

    @property
    def calls(self) -> int:
        return len(self.seen)
