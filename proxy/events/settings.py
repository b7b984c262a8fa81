"""The `events:` config section: what the events subsystem needs to know, as frozen dataclasses.

Owns the shape, defaults and parsing of that section (from the core's already-expanded `Node`); not `Secret`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from proxy.configtree import Address, Node
from proxy.secret import Secret

__all__ = ["DeliverySettings", "DingTalkEvents", "EventApp", "EventsSettings", "FeishuEvents", "Mode", "Platform",
           "Secret", "StreamSettings", "parse_events"]


class Platform(enum.Enum):
    FEISHU = "feishu"
    DINGTALK = "dingtalk"


class Mode(enum.Enum):
    HTTP = "http"      # the sidecar is the public callback endpoint
    STREAM = "stream"  # the sidecar dials out: DingTalk Stream mode or Feishu long connection


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    """How verified events reach the application."""

    url: str                              # the application's local endpoint, e.g. http://127.0.0.1:8080/events
    queue_size: int = 1000                # events held in memory per app; beyond it the platform is not acked
    max_attempts: int = 8                 # POSTs per event before it is dropped (and counted)
    backoff_base: float = 0.2             # seconds; full-jitter exponential back-off between attempts
    backoff_cap: float = 30.0
    attempt_timeout: float = 10.0         # seconds for one POST to the application
    dedupe_ttl: float = 600.0             # seconds an event id is remembered (DingTalk Stream SDKs use 5 min)
    dedupe_max: int = 100_000             # remembered ids, so a flood cannot grow memory without bound


@dataclass(frozen=True, slots=True)
class FeishuEvents:
    """One Feishu/Lark app's event source."""

    app_id: str
    verification_token: Secret = field(default_factory=lambda: Secret(""))
    encrypt_key: Secret = field(default_factory=lambda: Secret(""))
    app_secret: Secret = field(default_factory=lambda: Secret(""))   # stream mode only
    domain: str = "https://open.feishu.cn"                          # stream mode: where /callback/ws/endpoint lives
    max_clock_skew: float = 300.0    # seconds; X-Lark-Request-Timestamp older or newer than this is rejected


@dataclass(frozen=True, slots=True)
class DingTalkEvents:
    """One DingTalk app's event source."""

    app_key: str                     # clientId; also the suffix of every decrypted HTTP callback (or corpId)
    token: Secret = field(default_factory=lambda: Secret(""))            # HTTP callback signature token
    aes_key: Secret = field(default_factory=lambda: Secret(""))          # 43-character EncodingAESKey
    owner_key: str = ""              # what callbacks end with if not the app key: corpId or suiteKey
    app_secret: Secret = field(default_factory=lambda: Secret(""))       # stream mode: clientSecret
    api: str = "https://api.dingtalk.com"                                # stream mode: connections/open host
    topics: tuple[str, ...] = ("/v1.0/im/bot/messages/get",)             # stream CALLBACK topics
    events: bool = True                                                  # stream: subscribe to EVENT "*"

    @property
    def expected_owner(self) -> str:
        return self.owner_key or self.app_key


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """Reconnect and keep-alive tuning for outbound long connections."""

    reconnect_base: float = 1.0      # seconds; the DingTalk SDKs back off 1 s → 60 s with jitter
    reconnect_cap: float = 60.0
    heartbeat: float = 30.0          # seconds between websocket pings from our side
    reassembly_ttl: float = 5.0      # seconds a partial Feishu split message is kept (the SDK keeps 5 s)


@dataclass(frozen=True, slots=True)
class EventApp:
    """One configured event source: a name (metric label, log key), its platform, mode and where events go."""

    name: str
    platform: Platform
    mode: Mode
    delivery: DeliverySettings
    feishu: FeishuEvents | None = None
    dingtalk: DingTalkEvents | None = None
    callback_path: str = ""          # HTTP mode: the path the platform POSTs to, e.g. /events/feishu-main
    stream: StreamSettings = field(default_factory=StreamSettings)

    def __post_init__(self) -> None:
        expected = self.feishu if self.platform is Platform.FEISHU else self.dingtalk
        if expected is None:
            raise ValueError(f"events app {self.name!r}: {self.platform.value} settings missing")
        if self.mode is Mode.HTTP and not self.callback_path.startswith("/"):
            raise ValueError(f"events app {self.name!r}: callback_path must start with '/'")


@dataclass(frozen=True, slots=True)
class EventsSettings:
    listen: Address | None       # the public listener for HTTP callbacks; None when every app uses a long connection
    apps: tuple[EventApp, ...]


def parse_events(node: Node) -> EventsSettings | None:
    listen = node.address("listen", None) if node.has("listen") else None
    apps = tuple(_parse_app(item) for item in node.children("apps"))
    node.finish()
    names = [app.name for app in apps if app is not None]
    for name in {n for n in names if names.count(n) > 1}:
        node.problem(f"duplicate events app name {name!r}", "apps")
    paths = [app.callback_path for app in apps if app is not None and app.mode is Mode.HTTP]
    for path in {p for p in paths if paths.count(p) > 1}:
        node.problem(f"duplicate callback_path {path!r}", "apps")
    if paths and listen is None:
        node.problem("HTTP callbacks need a public listener: set events.listen (e.g. 0.0.0.0:8090)", "listen")
    if any(app is None for app in apps):
        return None
    return EventsSettings(listen, apps)  # type: ignore[arg-type]


def _parse_app(node: Node) -> EventApp | None:
    name = node.text("name", required=True) or ""
    platform = node.choice("platform", ("feishu", "lark", "dingtalk"))
    mode = node.choice("mode", ("http", "stream"), "http")
    delivery = _parse_delivery(node)
    callback_path = node.text("callback_path", f"/events/{name}") or ""
    if mode == "http" and not callback_path.startswith("/"):
        node.problem(f"{callback_path!r} must start with /", "callback_path")
    stream = _parse_stream(node.child("stream"))
    feishu = _parse_feishu(node, mode, platform) if platform in ("feishu", "lark") else None
    dingtalk = _parse_dingtalk(node, mode) if platform == "dingtalk" else None
    node.finish()
    if delivery is None or not platform or not mode or (feishu is None and dingtalk is None):
        return None
    kind = Platform.DINGTALK if platform == "dingtalk" else Platform.FEISHU
    return EventApp(name, kind, Mode(mode), delivery, feishu, dingtalk, callback_path, stream)


def _parse_delivery(node: Node) -> DeliverySettings | None:
    url = node.text("deliver_to", required=True)
    tuning = node.child("delivery")
    d = DeliverySettings(url="")
    settings = DeliverySettings(
        url=url or "",
        queue_size=int(tuning.number("queue_size", d.queue_size, minimum=1)),
        max_attempts=int(tuning.number("max_attempts", d.max_attempts, minimum=1)),
        backoff_base=tuning.seconds("backoff_base", d.backoff_base),
        backoff_cap=tuning.seconds("backoff_cap", d.backoff_cap),
        attempt_timeout=tuning.seconds("attempt_timeout", d.attempt_timeout),
        dedupe_ttl=tuning.seconds("dedupe_ttl", d.dedupe_ttl),
        dedupe_max=int(tuning.number("dedupe_max", d.dedupe_max, minimum=1)),
    )
    tuning.finish()
    if url and not url.startswith(("http://", "https://")):
        node.problem(f"{url!r} is not an http(s) URL", "deliver_to")
    return settings if url else None


def _parse_stream(node: Node) -> StreamSettings:
    d = StreamSettings()
    settings = StreamSettings(
        reconnect_base=node.seconds("reconnect_base", d.reconnect_base),
        reconnect_cap=node.seconds("reconnect_cap", d.reconnect_cap),
        heartbeat=node.seconds("heartbeat", d.heartbeat),
        reassembly_ttl=node.seconds("reassembly_ttl", d.reassembly_ttl),
    )
    node.finish()
    return settings


def _parse_feishu(node: Node, mode: str, platform: str) -> FeishuEvents | None:
    app_id = node.text("app_id", required=True)
    default_domain = "https://open.larksuite.com" if platform == "lark" else "https://open.feishu.cn"
    if mode == "stream":
        secret = node.secret("app_secret")
        settings = FeishuEvents(app_id or "", app_secret=secret or Secret(""),
                                domain=node.text("domain", default_domain) or default_domain)
        return settings if app_id and secret else None
    token = node.secret("verification_token")
    encrypt_key = node.secret("encrypt_key") if (node.has("encrypt_key") or node.has("encrypt_key_file")) else None
    skew = node.seconds("max_clock_skew", FeishuEvents("").max_clock_skew)
    if not (app_id and token):
        return None
    return FeishuEvents(app_id, token, encrypt_key or Secret(""), max_clock_skew=skew)


def _parse_dingtalk(node: Node, mode: str) -> DingTalkEvents | None:
    app_key = node.text("app_key", required=True)
    if mode == "stream":
        secret = node.secret("app_secret")
        api = node.text("api", "https://api.dingtalk.com") or "https://api.dingtalk.com"
        topics = node.strings("topics") if node.has("topics") else DingTalkEvents("").topics
        settings = DingTalkEvents(app_key or "", app_secret=secret or Secret(""), api=api, topics=topics,
                                  events=node.flag("subscribe_events", True))
        return settings if app_key and secret else None
    token, aes_key = node.secret("token"), node.secret("aes_key")
    if aes_key is not None and len(aes_key.reveal()) != 43:
        node.problem("must be the 43-character EncodingAESKey", "aes_key")
        return None
    owner = node.text("owner_key", "") or ""
    if not (app_key and token and aes_key):
        return None
    return DingTalkEvents(app_key, token, aes_key, owner_key=owner)
