"""The YAML config, parsed once at start-up into frozen dataclasses, with every problem named by its path.

Owns loading, `${VAR}` expansion, `*_file` secrets, loose units and validation; runtime code never sees a raw dict.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

import yaml

from proxy.breaker import BreakerSettings
from proxy.ratelimit import Quota
from proxy.readiness import ReadinessSettings, parse_readiness
from proxy.configtree import Address, Node, expand
from proxy.egress import EgressSettings, parse_egress
from proxy.events.settings import EventsSettings, parse_events
from proxy.exactly_once_config import OnceSettings, parse_idempotency
from proxy.robots.settings import RobotsSettings, parse_robots
from proxy.saving.settings import (
    CacheSettings, CardSettings, CoalesceSettings, PrioritySettings, QuotaSettings, check_accounts, parse_cache,
    parse_cards, parse_coalesce, parse_priority, parse_quota,
)
from proxy.secret import Secret
from proxy.store import StoreSettings, parse_store

PLATFORM_UPSTREAMS: dict[str, dict[str, str]] = {
    "feishu": {"open": "https://open.feishu.cn"},
    "lark": {"open": "https://open.larksuite.com"},
    "dingtalk": {"oapi": "https://oapi.dingtalk.com", "api": "https://api.dingtalk.com"},
}
CREDENTIAL_ID_KEY = {"feishu": "app_id", "lark": "app_id", "dingtalk": "app_key"}
TOKEN_KINDS = {"feishu": ("tenant", "app"), "lark": ("tenant", "app"), "dingtalk": ("app",)}
NAME_PATTERN = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")


class ConfigError(Exception):
    """Raised with every problem found, one `path: message` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    base_url: str


@dataclass(frozen=True, slots=True)
class Exposure:
    """Where applications reach one upstream of one app: a path prefix on a listener."""

    upstream: str
    prefix: str        # "" when the upstream has a port of its own
    listen: Address


@dataclass(frozen=True, slots=True)
class CodeOverrides:
    """Platform error codes an operator adds to the built-in tables (strings, as they appear in bodies)."""

    retryable: frozenset[str] = frozenset()
    throttled: frozenset[str] = frozenset()
    token_invalid: frozenset[str] = frozenset()
    permanent: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class RetrySettings:
    max_attempts: int = 3
    backoff: str = "exponential"           # exponential (full jitter) | fixed (always backoff_base: a rerun loop)
    backoff_base: float = 0.1
    backoff_cap: float = 2.0
    per_try_timeout: float = 10.0
    max_retry_after: float = 30.0          # longest platform-requested wait we honour
    budget_ratio: float = 0.2              # retries ≤ this share of requests over the window
    budget_min_per_second: float = 3.0     # ...plus this floor, so a quiet upstream can still retry
    budget_window: float = 10.0
    idempotent_routes: tuple[str, ...] = ()
    idempotency_keys: bool = True          # add the platform's idempotency key to POSTs that accept one
    adaptive: bool = True                  # derive timeout, back-off and attempts from the measured network
    pinned: frozenset[str] = frozenset()   # the parameters set in config, which adaptation leaves alone


@dataclass(frozen=True, slots=True)
class RateLimitSettings:
    """The sidecar's own quota per app and route template (None: the platform's documented default)."""

    enabled: bool = True
    default: Quota | None = None
    routes: Mapping[str, Quota] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AppConfig:
    name: str
    platform: str
    client_id: str
    client_secret: Secret
    token_kind: str
    upstreams: Mapping[str, Upstream]
    expose: tuple[Exposure, ...]
    retry: RetrySettings = RetrySettings()
    codes: CodeOverrides = CodeOverrides()
    breaker: BreakerSettings = BreakerSettings()
    ratelimit: RateLimitSettings = RateLimitSettings()
    # Spending less of the platform's quota (proxy/saving/settings.py).
    cache: CacheSettings = CacheSettings()
    coalesce: CoalesceSettings = CoalesceSettings()
    cards: CardSettings = CardSettings()
    priority: PrioritySettings = PrioritySettings()
    quota: QuotaSettings = QuotaSettings()


@dataclass(frozen=True, slots=True)
class TokenSettings:
    refresh_margin: float = 600.0   # refresh this long before expiry (the platforms' own guides say 10 min)
    refresh_jitter: float = 60.0    # spread replicas' refreshes apart
    fetch_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class Limits:
    max_request_bytes: int = 100 * 1024 * 1024
    replay_buffer_bytes: int = 4 * 1024 * 1024   # bitable batches of 1,000 records reach hundreds of KB
    deadline: float = 30.0
    connect_timeout: float = 3.0
    drain_timeout: float = 15.0           # SIGTERM to exit, everything included (Kubernetes allows 30 s by default)
    # What a slow or idle client may hold. On loopback a healthy client sends its headers and body at once, so
    # these only ever bite a stuck or hostile one (nginx uses 60 s and 75 s over the internet).
    header_timeout: float = 10.0          # from a request's first byte to the end of its headers
    body_timeout: float = 10.0            # the longest quiet gap while a request body arrives
    keepalive_timeout: float = 75.0       # an idle keep-alive connection is closed after this (nginx's default)
    max_connections: int = 1024           # per listener; past it the idlest connection is closed, or the new one
    # Connections the kernel holds for each listener until it accepts them (capped by net.core.somaxconn). A burst
    # past it waits for SYN retries (~1 s, 3 s); proxy/accept.py takes every queued connection per readiness, so a
    # deeper one costs only the memory of what it lets in. 128 is aiohttp's; with 4,096, bench.scale's 4,096 row
    # measured within the run-to-run spread of 128's, so the default stayed.
    backlog: int = 128


@dataclass(frozen=True, slots=True)
class LogSettings:
    format: str = "text"   # text | json
    access_log: bool = True
    level: str = "INFO"


@dataclass(frozen=True, slots=True)
class Config:
    listen: Address
    admin_listen: Address
    apps: tuple[AppConfig, ...]
    tokens: TokenSettings = TokenSettings()
    limits: Limits = Limits()
    logging: LogSettings = LogSettings()
    events: EventsSettings | None = None
    robots: RobotsSettings | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # sections owned by other modules (none at present)
    store: StoreSettings = StoreSettings()                  # memory unless `store: {backend: redis, ...}`
    egress: EgressSettings = EgressSettings()               # direct unless `egress: {proxy: ...}` or trust_env
    readiness: ReadinessSettings = ReadinessSettings()      # what /readyz waits for
    idempotency: OnceSettings = OnceSettings()              # the sidecar's own exactly-once store (Idempotency-Key)

    def listeners(self) -> list[Address]:
        seen = dict.fromkeys([self.listen] + [e.listen for app in self.apps for e in app.expose])
        return list(seen)


# ----------------------------------------------------------------------------------------------------------------
# Loading


SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)   # libyaml's, when PyYAML has it: 10x faster, same rules


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x})"]) from exc
    return loads(text, env)


def loads(text: str, env: Mapping[str, str] | None = None) -> Config:
    try:
        raw = yaml.load(text, Loader=SAFE_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "<yaml>"
        raise ConfigError([f"{where}: {getattr(exc, 'problem', None) or exc}"]) from exc
    return parse(raw if raw is not None else {}, os.environ if env is None else env)


def parse(raw: Any, env: Mapping[str, str]) -> Config:
    problems: list[str] = []
    node = Node(expand(raw, env, "", problems), "", problems)
    config = _parse_config(node, env)
    if problems:
        raise ConfigError(problems)
    assert config is not None
    return config


# ----------------------------------------------------------------------------------------------------------------
# Sections

# Sections parsed by the modules that own them; kept raw here and validated there.
EXTRA_SECTIONS: tuple[str, ...] = ()
RESERVED_PREFIXES = ("/robots", "/alerts")   # the robot and alert-bridge endpoints on the main listener


def _parse_config(root: Node, env: Mapping[str, str]) -> Config | None:
    listen = root.address("listen", "127.0.0.1:8080")
    admin = root.address("admin_listen", "0.0.0.0:9464")
    tokens = _parse_tokens(root.child("tokens"))
    limits = _parse_limits(root.child("limits"))
    logging_ = _parse_logging(root.child("logging"))
    default_retry = _parse_retry(root.child("retry"), RetrySettings())
    apps = tuple(_parse_app(n, listen, default_retry) for n in root.children("apps"))
    events = parse_events(root.child("events")) if root.has("events") else None
    robots = parse_robots(root.child("robots")) if root.has("robots") else None
    store = parse_store(root.child("store")) if root.has("store") else StoreSettings()
    egress = parse_egress(root.child("egress"), env) if root.has("egress") else EgressSettings()
    readiness = parse_readiness(root.child("readiness"))
    idempotency = parse_idempotency(root.child("idempotency")) if root.has("idempotency") else OnceSettings()
    extra = {key: root.get(key) for key in EXTRA_SECTIONS if root.has(key)}
    root.finish()
    if not apps and not extra and events is None and robots is None:
        root.problem("at least one app is required", "apps")
    _check_unique(root, apps, listen, admin)
    check_accounts(root, [(f"apps[{i}].quota", app.quota) for i, app in enumerate(apps) if app is not None])
    if events is not None and events.listen is not None and events.listen.port in {a.port for a in (listen, admin) if a}:
        root.problem(f"port {events.listen.port} is already the sidecar's listen or admin port", "events.listen")
    if events is not None and events.queue.backend == "redis" and store is not None and not store.shared:
        root.problem("redis needs the connection from `store: {backend: redis, url: ...}`", "events.queue.backend")
    if listen is None or admin is None or store is None or any(a is None for a in apps):
        return None
    return Config(listen, admin, apps, tokens, limits, logging_, events, robots, extra, store,  # type: ignore[arg-type]
                  egress, readiness, idempotency)


def _parse_app(node: Node, listen: Address | None, default_retry: RetrySettings) -> AppConfig | None:
    name = node.text("name", required=True) or ""
    if name and not NAME_PATTERN.fullmatch(name):
        node.problem(f"{name!r} must match [a-z0-9-]+", "name")
    platform = node.choice("platform", tuple(PLATFORM_UPSTREAMS))
    if platform not in PLATFORM_UPSTREAMS:
        return None
    id_key = CREDENTIAL_ID_KEY[platform]
    client_id = node.text(id_key, required=True)
    secret = node.secret("app_secret")
    kinds = TOKEN_KINDS[platform]
    token_kind = node.choice("token", kinds, kinds[0]) if node.has("token") else kinds[0]
    upstreams = _parse_upstreams(node.child("upstreams"), platform)
    expose = _parse_expose(node, name, upstreams, listen)
    retry = _parse_retry(node.child("retry"), default_retry)
    codes = _parse_codes(node.child("codes"))
    breaker = _parse_breaker(node.child("breaker"))
    ratelimit = _parse_ratelimit(node.child("ratelimit"))
    cache = parse_cache(node.child("cache")) if node.has("cache") else CacheSettings()
    saving = (parse_coalesce(node.child("coalesce")), parse_cards(node.child("cards")),
              parse_priority(node.child("priority")), parse_quota(node.child("quota"), name))
    node.finish()
    if not (client_id and secret and listen):
        return None
    return AppConfig(name, platform, client_id, secret, token_kind, upstreams, expose, retry, codes, breaker, ratelimit,
                     cache, *saving)


def _parse_upstreams(node: Node, platform: str) -> dict[str, Upstream]:
    defaults = PLATFORM_UPSTREAMS[platform]
    result = {name: Upstream(name, url) for name, url in defaults.items()}
    for name in node.value:
        if name not in defaults:
            node.problem(f"unknown upstream (this platform has {', '.join(defaults)})", name)
            continue
        override = node.child(name)
        url = _url(override, "base_url", defaults[name])
        override.finish()
        result[name] = Upstream(name, url)
        node.read.add(name)
    return result


def _parse_expose(node: Node, name: str, upstreams: Mapping[str, Upstream], listen: Address | None) -> tuple[Exposure, ...]:
    if not node.has("expose"):
        if listen is None:
            return ()
        if len(upstreams) == 1:
            return (Exposure(next(iter(upstreams)), f"/{name}", listen),)
        return tuple(Exposure(up, f"/{name}/{up}", listen) for up in upstreams)
    result = []
    for item in node.children("expose"):
        upstream = item.choice("upstream", tuple(upstreams))
        own = item.address("listen", None) if item.has("listen") else None
        prefix = item.text("prefix", "") or ""
        item.finish()
        if prefix and (not prefix.startswith("/") or prefix.endswith("/")):
            item.problem(f"{prefix!r} must start with / and not end with /", "prefix")
        if not prefix and own is None:
            item.problem("give a prefix, a listen address of its own, or both")
        target = own or listen
        if target is not None:
            result.append(Exposure(upstream, prefix, target))
    return tuple(result)


ADAPTIVE_KEYS = ("per_try_timeout", "backoff_base", "backoff_cap", "max_attempts", "budget_ratio")


def _parse_retry(node: Node, base: RetrySettings) -> RetrySettings:
    settings = RetrySettings(
        max_attempts=int(node.number("max_attempts", base.max_attempts, minimum=1)),
        backoff=node.choice("backoff", ("exponential", "fixed"), base.backoff),
        backoff_base=node.seconds("backoff_base", base.backoff_base),
        backoff_cap=node.seconds("backoff_cap", base.backoff_cap),
        per_try_timeout=node.seconds("per_try_timeout", base.per_try_timeout),
        max_retry_after=node.seconds("max_retry_after", base.max_retry_after),
        budget_ratio=node.number("budget_ratio", base.budget_ratio),
        budget_min_per_second=node.number("budget_min_per_second", base.budget_min_per_second),
        budget_window=node.seconds("budget_window", base.budget_window),
        idempotent_routes=node.strings("idempotent_routes") if node.has("idempotent_routes") else base.idempotent_routes,
        idempotency_keys=node.flag("idempotency_keys", base.idempotency_keys),
        adaptive=node.flag("adaptive", base.adaptive),
        pinned=base.pinned | {key for key in ADAPTIVE_KEYS if node.has(key)},
    )
    node.finish()
    return settings


def _parse_breaker(node: Node) -> BreakerSettings:
    d = BreakerSettings()
    settings = BreakerSettings(
        failure_ratio=node.number("failure_ratio", d.failure_ratio),
        min_volume=int(node.number("min_volume", d.min_volume, minimum=1)),
        connect_failures=int(node.number("connect_failures", d.connect_failures, minimum=1)),
        open_for=node.seconds("open_for", d.open_for),
        probes=int(node.number("probes", d.probes, minimum=1)),
        window=node.seconds("window", d.window),
    )
    node.finish()
    return settings


def _parse_ratelimit(node: Node) -> RateLimitSettings:
    enabled = node.flag("enabled", True)
    default = _quota(node) if node.has("per_second") or node.has("per_minute") else None
    routes: dict[str, Quota] = {}
    table = node.child("routes")
    for route in list(table.value):
        if not str(route).startswith("/"):
            table.problem("a route template starts with /", str(route))
        entry = table.child(str(route))
        quota = _quota(entry)
        entry.finish()
        if quota is not None:
            routes[str(route)] = quota
    node.finish()
    return RateLimitSettings(enabled, default, routes)


def _quota(node: Node) -> Quota | None:
    per_second = node.number("per_second", 0.0) if node.has("per_second") else None
    per_minute = node.number("per_minute", 0.0) if node.has("per_minute") else None
    if per_second is None and per_minute is None:
        node.problem("give per_second, per_minute or both")
        return None
    if any(v is not None and v <= 0 for v in (per_second, per_minute)):
        node.problem("a quota must be positive (leave it out for no limit)")
        return None
    return Quota(per_second, per_minute)


def _parse_codes(node: Node) -> CodeOverrides:
    codes = CodeOverrides(*(frozenset(node.strings(k)) for k in ("retryable", "throttled", "token_invalid", "permanent")))
    node.finish()
    return codes


# Feishu hands out a new tenant/app token only once the current one has under 30 minutes left; a refresh earlier
# than that gets the same token back, and the held one expires anyway.
FEISHU_NEW_TOKEN_BELOW = 1800.0


def _parse_tokens(node: Node) -> TokenSettings:
    d = TokenSettings()
    settings = TokenSettings(
        refresh_margin=node.seconds("refresh_margin", d.refresh_margin),
        refresh_jitter=node.seconds("refresh_jitter", d.refresh_jitter),
        fetch_timeout=node.seconds("fetch_timeout", d.fetch_timeout),
    )
    node.finish()
    if settings.refresh_margin >= FEISHU_NEW_TOKEN_BELOW:
        node.problem("must be under 30m: Feishu and Lark give a new token only when the held one has less than "
                     "30 minutes left, so an earlier refresh gets the same token back", "refresh_margin")
    return settings


def _parse_limits(node: Node) -> Limits:
    d = Limits()
    max_request = node.bytes("max_request_bytes", d.max_request_bytes)
    limits = Limits(
        max_request_bytes=max_request,
        replay_buffer_bytes=node.bytes("replay_buffer_bytes", min(d.replay_buffer_bytes, max_request)),
        deadline=node.seconds("deadline", d.deadline),
        connect_timeout=node.seconds("connect_timeout", d.connect_timeout),
        drain_timeout=node.seconds("drain_timeout", d.drain_timeout),
        header_timeout=node.seconds("header_timeout", d.header_timeout),
        body_timeout=node.seconds("body_timeout", d.body_timeout),
        keepalive_timeout=node.seconds("keepalive_timeout", d.keepalive_timeout),
        max_connections=int(node.number("max_connections", d.max_connections, minimum=1)),
        backlog=int(node.number("backlog", d.backlog, minimum=1)),
    )
    node.finish()
    if limits.deadline <= 0:
        node.problem("must be more than zero (every request would fail at once)", "deadline")
    if limits.replay_buffer_bytes > limits.max_request_bytes:
        node.problem(f"is larger than max_request_bytes ({limits.max_request_bytes} bytes): a body that fits the "
                     "buffer is already refused as too large", "replay_buffer_bytes")
    return limits


def _parse_logging(node: Node) -> LogSettings:
    d = LogSettings()
    settings = LogSettings(
        format=node.choice("format", ("text", "json"), d.format),
        access_log=node.flag("access_log", d.access_log),
        level=node.choice("level", ("DEBUG", "INFO", "WARNING", "ERROR"), d.level),
    )
    node.finish()
    return settings


def _url(node: Node, key: str, default: str) -> str:
    url = node.text(key, default) or default
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        node.problem(f"{url!r} is not an http(s) base URL without query", key)
    return url.rstrip("/")


def _check_unique(root: Node, apps: tuple[AppConfig | None, ...], listen: Address | None, admin: Address | None) -> None:
    names: set[str] = set()
    routes: dict[tuple[Address, str], str] = {}
    for i, app in enumerate(apps):
        if app is None:
            continue
        if app.name in names:
            root.problem(f"duplicate app name {app.name!r}", f"apps[{i}].name")
        names.add(app.name)
        for exposure in app.expose:
            where = (exposure.listen, exposure.prefix)
            if exposure.listen == listen and exposure.prefix in RESERVED_PREFIXES:
                root.problem(f"{exposure.prefix} is reserved for the robot endpoints", f"apps[{i}].expose")
            if where in routes:
                root.problem(f"{exposure.listen}{exposure.prefix or ' (whole port)'} is already used by {routes[where]}", f"apps[{i}].expose")
            routes[where] = app.name
            if admin is not None and exposure.listen.port == admin.port:
                root.problem(f"port {admin.port} is the admin port", f"apps[{i}].expose")
    whole_ports = {a for (a, p) in routes if p == ""}
    for address, prefix in routes:
        if prefix and address in whole_ports:
            root.problem(f"{address} is given whole to one upstream and cannot also carry {prefix}", "apps")
    if listen is not None and admin is not None and listen.port == admin.port:
        root.problem(f"listen and admin_listen share port {listen.port}", "admin_listen")
