"""The `events:` config section: what the events subsystem needs to know, as frozen dataclasses.

Owns the shape, defaults and parsing of that section (from the core's already-expanded `Node`); not `Secret`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from proxy.configtree import Address, Node
from proxy.secret import Secret

__all__ = ["CardSettings", "DeliverySettings", "DingTalkEvents", "EventApp", "EventsSettings", "FeishuEvents", "Mode",
           "Platform", "QueueSettings", "Secret", "StreamSettings", "parse_events"]


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
    queue_size: int | None = None         # events waiting per app; beyond it the platform is not acked (None: the
                                          # backend's default, 1000 in memory, 100000 in the journal or Redis)
    max_age: float = 86_400.0             # seconds; delivery is retried until the event is this old, then dead-lettered
    backoff_base: float = 0.2             # seconds; full-jitter exponential back-off between attempts
    backoff_cap: float = 30.0
    attempt_timeout: float = 10.0         # seconds for one POST to the application
    dedupe_ttl: float = 43_200.0          # seconds an event key is remembered: 12 h, past Feishu's last re-push (~7 h)
    dedupe_max: int = 100_000             # keys remembered by the memory backend, so a flood cannot grow memory
    handover_after: int = 3               # failed attempts in a row before this replica hands its leases over
    handover_cooldown: float = 30.0       # seconds it then stays out, so a replica with a working app takes over

    def limit(self, default: int) -> int:
        return self.queue_size if self.queue_size is not None else default


# Feishu pushes an undelivered event again after 15 s, 5 min, 1 h and 6 h: dedupe must outlive all of them.
MIN_DEDUPE_TTL = 8 * 3600.0


@dataclass(frozen=True, slots=True)
class CardSettings:
    """Card callbacks: relayed to the application, whose answer goes back to the platform within `deadline`."""

    url: str                              # where card callbacks are POSTed (default: the app's deliver_to)
    deadline: float = 2.5                 # seconds; Feishu and DingTalk show the user an error after about 3 s
    late_toast: str = "The application did not answer in time. Please try again."   # Feishu only


# lark-oapi's dispatcher answers these two with the handler's result (its _callback_processor_map); all else is an event.
FEISHU_CARD_TYPES = ("card.action.trigger", "url.preview.get")
DINGTALK_CARD_TOPIC = "/v1.0/card/instances/callback"   # dingtalk-stream's CallbackHandler.TOPIC_CARD_CALLBACK


@dataclass(frozen=True, slots=True)
class FeishuEvents:
    """One Feishu/Lark app's event source."""

    app_id: str
    verification_token: Secret = field(default_factory=lambda: Secret(""))
    encrypt_key: Secret = field(default_factory=lambda: Secret(""))
    app_secret: Secret = field(default_factory=lambda: Secret(""))   # stream mode only
    domain: str = "https://open.feishu.cn"                          # stream mode: where /callback/ws/endpoint lives
    max_clock_skew: float = 300.0    # seconds; X-Lark-Request-Timestamp older or newer than this is rejected
    card_types: tuple[str, ...] = FEISHU_CARD_TYPES                  # callbacks answered inline, not queued


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
    card_topics: tuple[str, ...] = (DINGTALK_CARD_TOPIC,)                # stream CALLBACK topics answered inline

    @property
    def expected_owner(self) -> str:
        return self.owner_key or self.app_key


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """Reconnect and keep-alive tuning for outbound long connections."""

    reconnect_base: float = 1.0      # seconds; the DingTalk SDKs back off 1 s → 60 s with jitter
    reconnect_cap: float = 60.0
    heartbeat: float = 30.0          # seconds between DingTalk websocket pings from our side; silence for twice
                                     # this (or twice Feishu's PingInterval) reconnects
    reassembly_ttl: float = 5.0      # seconds a partial Feishu split message is kept (the SDK keeps 5 s)
    endpoint_timeout: float = 5.0    # seconds for connections/open, /callback/ws/endpoint and the websocket handshake
    connections: int = 1             # replicas holding this app's connection at once (leases; dedupe is shared)


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
    cards: CardSettings | None = None   # None: card callbacks go to the delivery URL with the default deadline

    @property
    def card(self) -> CardSettings:
        return self.cards or CardSettings(self.delivery.url)

    def __post_init__(self) -> None:
        expected = self.feishu if self.platform is Platform.FEISHU else self.dingtalk
        if expected is None:
            raise ValueError(f"events app {self.name!r}: {self.platform.value} settings missing")
        if self.mode is Mode.HTTP and not self.callback_path.startswith("/"):
            raise ValueError(f"events app {self.name!r}: callback_path must start with '/'")


@dataclass(frozen=True, slots=True)
class QueueSettings:
    """Where events wait for delivery, their dedupe keys and dead letters."""

    backend: str = ""                     # redis | journal | memory; "" = redis with `store: redis`, else journal
    path: str = "/var/lib/imsidecar/events.db"   # journal: a file on a mounted volume (deploy/kubernetes mounts it)
    dead_letter_max: int = 10_000         # per app; the oldest are trimmed beyond it
    poll_interval: float = 0.25           # seconds between looks for events another process queued
    lease_ttl: float = 10.0               # redis: a crashed owner's leases pass to another replica after this


@dataclass(frozen=True, slots=True)
class EventsSettings:
    listen: Address | None       # the public listener for HTTP callbacks; None when every app uses a long connection
    apps: tuple[EventApp, ...]
    queue: QueueSettings = field(default_factory=QueueSettings)


def parse_events(node: Node) -> EventsSettings | None:
    listen = node.address("listen", None) if node.has("listen") else None
    apps = tuple(_parse_app(item) for item in node.children("apps"))
    queue = _parse_queue(node.child("queue"))
    node.finish()
    names = [app.name for app in apps if app is not None]
    for name in {n for n in names if names.count(n) > 1}:
        node.problem(f"duplicate events app name {name!r}", "apps")
    paths = [app.callback_path for app in apps if app is not None and app.mode is Mode.HTTP]
    for path in {p for p in paths if paths.count(p) > 1}:
        node.problem(f"duplicate callback_path {path!r}", "apps")
    if paths and listen is None:
        node.problem("HTTP callbacks need a public listener: set events.listen (e.g. 0.0.0.0:8090)", "listen")
    if any(app is None for app in apps) or queue is None:
        return None
    return EventsSettings(listen, apps, queue)  # type: ignore[arg-type]


def _parse_queue(node: Node) -> QueueSettings | None:
    d = QueueSettings()
    backend = node.choice("backend", ("redis", "journal", "memory"), "") if node.has("backend") else ""
    path = node.text("path", d.path) or d.path
    settings = QueueSettings(backend, path, int(node.number("dead_letter_max", d.dead_letter_max, minimum=1)),
                             node.positive_seconds("poll_interval", d.poll_interval),
                             node.positive_seconds("lease_ttl", d.lease_ttl))
    if node.has("path") and backend not in ("", "journal"):
        node.problem(f"only with the journal backend, not {backend}", "path")
    node.finish()
    return None if node.has("backend") and not backend else settings


def _parse_app(node: Node) -> EventApp | None:
    name = node.text("name", required=True) or ""
    platform = node.choice("platform", ("feishu", "lark", "dingtalk"))
    mode = node.choice("mode", ("http", "stream"), "http")
    delivery = _parse_delivery(node)
    cards = _parse_cards(node.child("cards"), delivery) if node.has("cards") else None
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
    return EventApp(name, kind, Mode(mode), delivery, feishu, dingtalk, callback_path, stream, cards)


def _parse_delivery(node: Node) -> DeliverySettings | None:
    url = _url(node, "deliver_to", required=True)
    tuning = node.child("delivery")
    for gone, instead in (("max_attempts", "max_age"),):
        if tuning.has(gone):
            tuning.get(gone)
            tuning.problem(f"replaced by {instead}: delivery is retried until the event is older than it", gone)
    d = DeliverySettings(url="")
    settings = DeliverySettings(
        url=url or "",
        queue_size=int(tuning.number("queue_size", 1, minimum=1)) if tuning.has("queue_size") else None,
        max_age=tuning.positive_seconds("max_age", d.max_age),
        backoff_base=tuning.seconds("backoff_base", d.backoff_base),
        backoff_cap=tuning.seconds("backoff_cap", d.backoff_cap),
        attempt_timeout=tuning.positive_seconds("attempt_timeout", d.attempt_timeout),
        dedupe_ttl=_dedupe_ttl(tuning, d.dedupe_ttl),
        dedupe_max=int(tuning.number("dedupe_max", d.dedupe_max, minimum=1)),
        handover_after=int(tuning.number("handover_after", d.handover_after, minimum=1)),
        handover_cooldown=tuning.positive_seconds("handover_cooldown", d.handover_cooldown),
    )
    tuning.finish()
    return settings if url else None


def _url(node: Node, key: str, default: str | None = None, *, required: bool = False) -> str | None:
    url = node.text(key, default, required=required)
    if url and not url.startswith(("http://", "https://")):
        node.problem(f"{url!r} is not an http(s) URL", key)
    return url


def _dedupe_ttl(node: Node, default: float) -> float:
    ttl = node.seconds("dedupe_ttl", default)
    if ttl < MIN_DEDUPE_TTL:
        node.problem("must be at least 8h: Feishu pushes an unanswered event again after 15 s, 5 min, 1 h and 6 h",
                     "dedupe_ttl")
        return default
    return ttl


def _parse_cards(node: Node, delivery: DeliverySettings | None) -> CardSettings | None:
    default_url = delivery.url if delivery else ""
    d = CardSettings("")
    settings = CardSettings(_url(node, "deliver_to", default_url) or default_url,
                            node.positive_seconds("deadline", d.deadline), node.text("late_toast", d.late_toast) or "")
    if settings.deadline >= 3:
        node.problem("must be under 3s: the platforms show the user an error after about 3 s", "deadline")
    node.finish()
    return settings


def _parse_stream(node: Node) -> StreamSettings:
    d = StreamSettings()
    settings = StreamSettings(
        reconnect_base=node.seconds("reconnect_base", d.reconnect_base),
        reconnect_cap=node.seconds("reconnect_cap", d.reconnect_cap),
        heartbeat=node.positive_seconds("heartbeat", d.heartbeat),
        reassembly_ttl=node.seconds("reassembly_ttl", d.reassembly_ttl),
        endpoint_timeout=node.positive_seconds("endpoint_timeout", d.endpoint_timeout),
        connections=int(node.number("connections", d.connections, minimum=1)),
    )
    node.finish()
    return settings


def _parse_feishu(node: Node, mode: str, platform: str) -> FeishuEvents | None:
    app_id = node.text("app_id", required=True)
    default_domain = "https://open.larksuite.com" if platform == "lark" else "https://open.feishu.cn"
    card_types = node.strings("card_types") if node.has("card_types") else FEISHU_CARD_TYPES
    if mode == "stream":
        secret = node.secret("app_secret")
        settings = FeishuEvents(app_id or "", app_secret=secret or Secret(""),
                                domain=node.text("domain", default_domain) or default_domain, card_types=card_types)
        return settings if app_id and secret else None
    token = node.secret("verification_token")
    encrypt_key = node.secret("encrypt_key") if (node.has("encrypt_key") or node.has("encrypt_key_file")) else None
    skew = node.seconds("max_clock_skew", FeishuEvents("").max_clock_skew)
    if not (app_id and token):
        return None
    return FeishuEvents(app_id, token, encrypt_key or Secret(""), max_clock_skew=skew, card_types=card_types)


def _parse_dingtalk(node: Node, mode: str) -> DingTalkEvents | None:
    app_key = node.text("app_key", required=True)
    if mode == "stream":
        return _parse_dingtalk_stream(node, app_key)
    token, aes_key = node.secret("token"), node.secret("aes_key")
    if aes_key is not None and len(aes_key.reveal()) != 43:
        node.problem("must be the 43-character EncodingAESKey", "aes_key")
        return None
    owner = node.text("owner_key", "") or ""
    if not (app_key and token and aes_key):
        return None
    return DingTalkEvents(app_key, token, aes_key, owner_key=owner)


def _parse_dingtalk_stream(node: Node, app_key: str | None) -> DingTalkEvents | None:
    d = DingTalkEvents("")
    secret = node.secret("app_secret")
    api = node.text("api", d.api) or d.api
    topics = node.strings("topics") if node.has("topics") else d.topics
    card_topics = node.strings("card_topics") if node.has("card_topics") else d.card_topics
    for topic in set(topics) & set(card_topics):
        node.problem(f"{topic!r} is in both topics (queued) and card_topics (answered inline)", "card_topics")
    settings = DingTalkEvents(app_key or "", app_secret=secret or Secret(""), api=api, topics=topics,
                              events=node.flag("subscribe_events", True), card_topics=card_topics)
    return settings if app_key and secret else None
