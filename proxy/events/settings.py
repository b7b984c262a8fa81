"""What the events subsystem needs to know, as frozen dataclasses the config loader fills in once at start-up.

Owns the shape and defaults of event settings; it does not parse YAML (config does) nor define `Secret`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from proxy.secret import Secret

__all__ = ["DeliverySettings", "DingTalkEvents", "EventApp", "FeishuEvents", "Mode", "Platform", "Secret",
           "StreamSettings"]


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
