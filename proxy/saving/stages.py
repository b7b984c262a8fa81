"""The quota-saving stages of one sidecar, built once from config: what the pipeline calls, in one bundle.

Owns building them (on the store's shared values when there is Redis) and their start and stop; each stage's
rules are its own module's, and their order is the pipeline's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from prometheus_client import CollectorRegistry, Counter

from proxy.clock import Clock
from proxy.config import AppConfig
from proxy.guard import Guard, GuardedFamily, GuardedLookup
from proxy.metrics import SavingsMetrics
from proxy.saving.cache import ReadCache
from proxy.saving.cards import CardMerger
from proxy.saving.coalesce import Coalescer
from proxy.saving.lanes import PriorityLanes
from proxy.saving.meter import QuotaMeter
from proxy.saving.reads import ReadRoutes
from proxy.saving.settings import LANES
from proxy.store import SharedValues


@dataclass(eq=False)
class SavingStages:
    metrics: SavingsMetrics
    lanes: PriorityLanes
    cache: ReadCache
    coalescer: Coalescer
    cards: CardMerger
    meter: QuotaMeter

    @classmethod
    def build(cls, apps: Sequence[AppConfig], values: SharedValues | None, clock: Clock,
              registry: CollectorRegistry, guard: Guard | None = None) -> SavingStages:
        """Each stage only saves calls: an unexpected exception inside one is reported to `guard` (logged once,
        counted in imsidecar_stage_failures_total) and the request goes on as if the stage were not there."""
        metrics = SavingsMetrics(registry)
        guard = guard or Guard(Counter("imsidecar_stage_failures", "", ("stage",), registry=CollectorRegistry()))
        for app in apps:
            metrics.prepare_app(app.name, LANES)
        for name in SavingsMetrics.HOT_CHILDREN:   # a failing metric update is the metrics' failure, not the stage's
            setattr(metrics, name, GuardedLookup(getattr(metrics, name), guard))
        for name in SavingsMetrics.REQUEST_FAMILIES:
            setattr(metrics, name, GuardedFamily(getattr(metrics, name), guard))
        reads = ReadRoutes({app.name: app.cache for app in apps})
        return cls(
            metrics,
            PriorityLanes({app.name: app.priority for app in apps}, metrics, guard),
            ReadCache({app.name: app.cache for app in apps}, reads, values, clock, metrics, guard),
            Coalescer({app.name: app.coalesce for app in apps}, reads, metrics, guard),
            CardMerger({app.name: app.cards for app in apps}, clock, metrics, guard),
            QuotaMeter({app.name: app.quota for app in apps}, values, clock, metrics, guard),
        )

    async def start(self) -> None:
        await self.meter.start()

    async def stop(self) -> None:
        await self.meter.stop()


__all__ = ["SavingStages"]
