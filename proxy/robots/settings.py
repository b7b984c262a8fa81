"""The `robots:` config section: named DingTalk and Feishu/Lark group-robot targets, as frozen dataclasses.

Owns what that section means, read through the core's `configtree.Node` (already `${VAR}`-expanded); it does not
read the YAML file, sign, send or render. Secrets are the core's masked `proxy.secret.Secret`.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import tzinfo
from typing import Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from proxy.configtree import Node
from proxy.secret import Secret

Platform = Literal["dingtalk", "feishu"]
PLATFORMS: tuple[Platform, ...] = ("dingtalk", "feishu")
# `platform: lark` is a Feishu robot on Lark's domain: the same body, signature and codes.
CHOICES = ("dingtalk", "feishu", "lark")
NAME_PATTERN = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")

# Where a bare token goes; `base_url` replaces the scheme and host (another gateway, or a fake in tests).
DEFAULT_BASE_URL: dict[str, str] = {
    "dingtalk": "https://oapi.dingtalk.com",
    "feishu": "https://open.feishu.cn",
    "lark": "https://open.larksuite.com",
}
WEBHOOK_PATH: dict[Platform, str] = {
    "dingtalk": "/robot/send?access_token={token}",
    "feishu": "/open-apis/bot/v2/hook/{token}",
}

# The fields a template may use (string.Template `${name}`); render.py fills exactly these.
TITLE_FIELDS = frozenset({
    "status", "STATUS", "alertname", "firing", "resolved", "receiver", "group_labels", "title", "severity",
})
ALERT_FIELDS = frozenset({
    "status", "STATUS", "alertname", "severity", "summary", "description", "labels", "starts_at", "ends_at",
    "duration", "runbook_url", "generator_url", "silence_url", "dashboard_url", "panel_url", "value_string",
    "fingerprint", "links",
})
DEFAULT_DEADLINE = 30.0
# Alert times in messages: most groups reading them are in China. `timezone:` (robots-wide or per target) changes it.
DEFAULT_TIMEZONE = "Asia/Shanghai"


@dataclass(frozen=True, slots=True)
class Mentions:
    """Who an alert @-mentions: DingTalk atMobiles/atUserIds/isAtAll; Feishu open_ids (`user_ids`) or all."""

    mobiles: tuple[str, ...] = ()
    user_ids: tuple[str, ...] = ()
    all: bool = False


@dataclass(frozen=True, slots=True)
class Templates:
    """Overrides of the alert layout, as string.Template text over TITLE_FIELDS / ALERT_FIELDS."""

    title: str | None = None
    alert: str | None = None


@dataclass(frozen=True, slots=True)
class RobotTarget:
    name: str
    platform: Platform
    webhook: Secret             # the full URL: its access_token / hook token is as powerful as the secret
    secret: Secret | None = None
    keyword: str | None = None  # DingTalk/Feishu "keyword" security: the text must contain it (310000 / 19024)
    mentions: Mentions = Mentions()
    templates: Templates = Templates()
    timezone: tzinfo = ZoneInfo(DEFAULT_TIMEZONE)   # for the start and end times in alert messages


@dataclass(frozen=True, slots=True)
class RobotsSettings:
    targets: Mapping[str, RobotTarget] = field(default_factory=dict)
    deadline: float = DEFAULT_DEADLINE   # how long one request may queue and retry before we answer 503


# ----------------------------------------------------------------------------------------------------------------
# Parsing


def parse_robots(node: Node) -> RobotsSettings | None:
    """Read the `robots:` section, appending every problem (`robots.targets[1].colour: unknown key`) to the node's
    shared list. None when the section cannot be used; the caller raises on a non-empty list, as config.parse does."""
    before = len(node.problems)
    deadline = _deadline(node)
    zone = _timezone(node, ZoneInfo(DEFAULT_TIMEZONE))
    parsed = [_parse_target(item, zone) for item in node.children("targets")]
    targets = _by_name(node, parsed)
    node.finish()
    if None in parsed or len(node.problems) > before:
        return None
    return RobotsSettings(targets, deadline)


def _by_name(node: Node, parsed: list[RobotTarget | None]) -> dict[str, RobotTarget]:
    """Targets are addressed by name (`POST /robots/<name>`), so a name may be used once."""
    targets: dict[str, RobotTarget] = {}
    for i, target in enumerate(parsed):
        if target is not None and target.name in targets:
            node.problem(f"duplicate target name {target.name!r}", f"targets[{i}].name")
        elif target is not None:
            targets[target.name] = target
    return targets


def _deadline(node: Node) -> float:
    seconds = node.seconds("deadline", DEFAULT_DEADLINE)
    if seconds <= 0:
        node.problem("must be more than zero", "deadline")
        return DEFAULT_DEADLINE
    return seconds


def _timezone(node: Node, default: tzinfo) -> tzinfo:
    name = node.text("timezone")
    if name is None:
        return default
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        node.problem(f"unknown time zone {name[:64]!r}; use an IANA name such as {DEFAULT_TIMEZONE}", "timezone")
        return default


def _parse_target(node: Node, zone: tzinfo) -> RobotTarget | None:
    before = len(node.problems)
    name = node.text("name", required=True) or ""
    if name and not NAME_PATTERN.fullmatch(name):
        node.problem(f"{name!r} must match [a-z0-9-]+", "name")
    chosen = node.choice("platform", CHOICES)
    platform = _rules_of(chosen)
    webhook = _webhook(node, chosen)
    secret = node.secret("secret", required=False)
    keyword = node.text("keyword")
    mentions = _mentions(node.child("mention"), platform)
    templates = _templates(node.child("templates"))
    zone = _timezone(node, zone)
    node.finish()
    if len(node.problems) > before or platform is None or webhook is None:
        return None
    return RobotTarget(name, platform, webhook, secret, keyword, mentions, templates, zone)


def _rules_of(chosen: str) -> Platform | None:
    """Whose robot rules a target follows: Lark's robots are Feishu's, on another domain."""
    return "feishu" if chosen == "lark" else next((p for p in PLATFORMS if p == chosen), None)


def _webhook(node: Node, chosen: str) -> Secret | None:
    """Either a full `webhook` URL or a bare `token` (with an optional `base_url`), each inline or as `*_file`."""
    url = node.secret("webhook", required=False)
    token = node.secret("token", required=False)
    base_url = node.text("base_url")
    given = [key for key in ("webhook", "token") if node.has(key) or node.has(f"{key}_file")]
    if len(given) != 1:
        node.problem("give exactly one of webhook, webhook_file, token, token_file")
        return None
    if given == ["webhook"] and node.has("base_url"):
        node.problem("only used with token; put the host in webhook instead", "base_url")
    rules = _rules_of(chosen)
    if token is not None and rules is not None:
        base = (base_url or DEFAULT_BASE_URL[chosen]).rstrip("/")
        url = Secret(base + WEBHOOK_PATH[rules].format(token=token.reveal()))
    # Still None: already reported (an empty value, an unreadable file, an unknown platform).
    return _http_url(node, url) if url is not None else None


def _http_url(node: Node, url: Secret) -> Secret | None:
    parts = urlsplit(url.reveal())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # Say which key, never the value: the URL carries the robot's token.
        node.problem("the webhook is not an http(s) URL")
        return None
    return url


def _mentions(node: Node, platform: Platform | None) -> Mentions:
    mobiles = node.strings("mobiles")
    if mobiles and platform == "feishu":
        # Feishu custom bots mention by open_id (<at id=ou_...>) only; a phone number would silently do nothing.
        node.problem("Feishu robots mention by open_id; use user_ids", "mobiles")
    mentions = Mentions(mobiles, node.strings("user_ids"), node.flag("all", False))
    node.finish()
    return mentions


def _templates(node: Node) -> Templates:
    templates = Templates(_template(node, "title", TITLE_FIELDS), _template(node, "alert", ALERT_FIELDS))
    node.finish()
    return templates


def _template(node: Node, key: str, fields: frozenset[str]) -> str | None:
    text = node.text(key)
    if text is None:
        return None
    template = string.Template(text)
    if not template.is_valid():
        node.problem("not a valid template (a lone $? write $$ for a dollar sign)", key)
        return None
    unknown = sorted(set(template.get_identifiers()) - fields)
    if unknown:
        node.problem(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}", key)
        return None
    return text
