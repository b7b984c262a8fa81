"""The per-app config sections of the quota-saving stages: `cache`, `coalesce`, `cards`, `priority` and `quota`.

Owns their shape, defaults and parsing (one parse function per section, from the core's expanded `Node`), and the
check that apps sharing a quota account agree on it; what each setting does belongs to its stage's module. Kept
apart from the stages because proxy/config.py imports this and the stages import the platforms, which import config.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from proxy.configtree import Node
from proxy.units import UnitError, parse_seconds

INTERACTIVE, BULK = "interactive", "bulk"
LANES = (INTERACTIVE, BULK)
ACCOUNT_PATTERN = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")


@dataclass(frozen=True, slots=True)
class CachedRoute:
    ttl: float           # seconds an answer is served without asking the platform
    post: bool = False   # a POST that only reads: its body is part of what makes two reads the same


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """The read cache: off unless the app has a `cache:` section (which brings the platform's curated routes)."""

    enabled: bool = False
    defaults: bool = True                                          # the platform's curated read-mostly routes
    routes: Mapping[str, CachedRoute] = field(default_factory=dict)   # template → TTL; a TTL of 0 turns one off
    stale_if_error: float = 300.0          # past its TTL, an answer may still stand in this long for a failed call
    max_entries: int = 10_000
    max_bytes: int = 32 * 1024 * 1024
    max_entry_bytes: int = 256 * 1024      # larger answers (exports, file lists) are not cached


@dataclass(frozen=True, slots=True)
class CoalesceSettings:
    enabled: bool = True   # identical concurrent reads share one platform call


@dataclass(frozen=True, slots=True)
class CardSettings:
    enabled: bool = True
    interval: float = 0.5   # at most one update per card this often; updates closer together are merged


@dataclass(frozen=True, slots=True)
class PrioritySettings:
    default: str = INTERACTIVE
    routes: Mapping[str, str] = field(default_factory=dict)   # template → lane, over the platform's bulk routes
    max_bulk_wait: float = 5.0   # a bulk request stands aside for interactive ones at most this long
    bulk_share: float = 1.0      # bulk is paced to this share of a route's sustained rate (below 1: kept free)


@dataclass(frozen=True, slots=True)
class QuotaSettings:
    """The monthly quota meter of one app's account (a Feishu tenant's or a DingTalk organisation's calls)."""

    account: str = ""                 # apps of one tenant / organisation share one allowance: give them one name
    allowance: int | None = None      # metered calls a calendar month (Asia/Shanghai); None: unknown (or unlimited)
    reserve: int = 0                  # calls kept for interactive traffic at the end of the allowance
    refuse_bulk: bool = False         # past allowance − reserve, refuse bulk metered calls locally
    state_dir: str | None = None      # where the count survives restarts when the store is not Redis

    @property
    def threshold(self) -> int | None:
        """The count from which bulk calls are refused, when refusing is on."""
        return self.allowance - self.reserve if self.refuse_bulk and self.allowance is not None else None


def parse_cache(node: Node) -> CacheSettings:
    d = CacheSettings()
    settings = CacheSettings(
        enabled=node.flag("enabled", True), defaults=node.flag("defaults", True), routes=_cached_routes(node),
        stale_if_error=node.seconds("stale_if_error", d.stale_if_error),
        max_entries=int(node.number("max_entries", d.max_entries, minimum=1)),
        max_bytes=node.bytes("max_bytes", d.max_bytes), max_entry_bytes=node.bytes("max_entry_bytes", d.max_entry_bytes),
    )
    node.finish()
    return settings


def _cached_routes(node: Node) -> dict[str, CachedRoute]:
    table = node.child("routes")
    routes: dict[str, CachedRoute] = {}
    for template in list(table.value):
        route = _cached_route(table, str(template))
        if route is not None:
            routes[str(template)] = route
    table.finish()
    return routes


def _cached_route(table: Node, template: str) -> CachedRoute | None:
    table.read.add(template)
    if not template.startswith("/"):
        table.problem("a route template starts with /", template)
        return None
    value = table.value[template]
    if not isinstance(value, dict):
        try:
            return CachedRoute(parse_seconds(value))
        except UnitError as exc:
            table.problem(f"{exc} (or {{ttl: ..., post: true}})", template)
            return None
    entry = table.child(template)
    route = CachedRoute(entry.seconds("ttl", 0.0), entry.flag("post", False))
    entry.finish()
    return route


def parse_coalesce(node: Node) -> CoalesceSettings:
    settings = CoalesceSettings(node.flag("enabled", True))
    node.finish()
    return settings


def parse_cards(node: Node) -> CardSettings:
    default = CardSettings().interval
    interval = node.seconds("interval", default)
    if interval <= 0:
        node.problem("must be longer than 0 (or set enabled: false)", "interval")
        interval = default
    settings = CardSettings(node.flag("enabled", True), interval)
    node.finish()
    return settings


def parse_priority(node: Node) -> PrioritySettings:
    default = node.choice("default", LANES, INTERACTIVE) or INTERACTIVE
    table = node.child("routes")
    routes = {str(t): table.choice(str(t), LANES) for t in list(table.value)}
    for template in routes:
        if not template.startswith("/"):
            table.problem("a route template starts with /", template)
    table.finish()
    d = PrioritySettings()
    share = node.number("bulk_share", d.bulk_share)
    if not 0 < share <= 1:
        node.problem(f"expected a share in (0, 1], got {share!r}", "bulk_share")
        share = d.bulk_share
    settings = PrioritySettings(default, {t: lane for t, lane in routes.items() if lane},
                                node.seconds("max_bulk_wait", d.max_bulk_wait), share)
    node.finish()
    return settings


def parse_quota(node: Node, app: str) -> QuotaSettings:
    account = node.text("account", app) or app
    if node.has("account") and not ACCOUNT_PATTERN.fullmatch(account):   # the app's name is checked as a name
        node.problem(f"{account!r} must match [a-z0-9-]+", "account")
    allowance = _allowance(node)
    settings = QuotaSettings(account, allowance, _reserve(node, allowance), node.flag("refuse_bulk", False),
                             node.text("state_dir"))
    if settings.refuse_bulk and allowance is None:
        node.problem("refusing bulk calls needs an allowance to count down from", "refuse_bulk")
    if settings.state_dir is not None and not Path(settings.state_dir).is_dir():
        node.problem(f"{settings.state_dir} is not a directory", "state_dir")
    node.finish()
    return settings


def _allowance(node: Node) -> int | None:
    if not node.has("allowance"):
        return None
    value = node.number("allowance", 0, minimum=1)
    if value != int(value):
        node.problem(f"expected a whole number of calls, got {value!r}", "allowance")
    return int(value) or None


def _reserve(node: Node, allowance: int | None) -> int:
    """`reserve: 500` (calls) or `reserve: 10%` (of the allowance), below the allowance."""
    raw = node.get("reserve", 0)
    if isinstance(raw, str) and raw.strip().endswith("%"):
        try:
            share = float(raw.strip()[:-1]) / 100
        except ValueError:
            share = -1.0
        if not 0 <= share < 1 or allowance is None:
            node.problem(f"{raw!r}: a share needs an allowance and must be under 100%", "reserve")
            return 0
        return round(allowance * share)
    calls = node.number("reserve", 0)
    if allowance is not None and calls >= allowance:
        node.problem(f"must be less than the allowance ({allowance})", "reserve")
        return 0
    return int(calls)


def check_accounts(node: Node, quotas: Sequence[tuple[str, QuotaSettings]]) -> None:
    """Apps sharing an account count one allowance: they must say the same about it."""
    first: dict[str, tuple[str, QuotaSettings]] = {}
    for path, quota in quotas:
        seen = first.setdefault(quota.account, (path, quota))
        if seen[1] != quota:
            node.problem(f"account {quota.account!r} is set differently at {seen[0]}: apps sharing an account "
                         "must give it the same allowance, reserve, refuse_bulk and state_dir", path)


__all__ = ["BULK", "INTERACTIVE", "LANES", "CacheSettings", "CachedRoute", "CardSettings", "CoalesceSettings",
           "PrioritySettings", "QuotaSettings", "check_accounts", "parse_cache", "parse_cards", "parse_coalesce",
           "parse_priority", "parse_quota"]
