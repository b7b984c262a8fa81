"""The `robots:` config section: named DingTalk and Feishu group-robot targets, as frozen dataclasses.

Owns parsing and validating that section (already `${VAR}`-expanded by the core loader); it does not read the
YAML file, sign, send or render. Secrets are the core's masked `proxy.secret.Secret`.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from proxy.secret import Secret
from proxy.units import UnitError, parse_seconds

Platform = Literal["dingtalk", "feishu"]
PLATFORMS: tuple[Platform, ...] = ("dingtalk", "feishu")
NAME_PATTERN = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")

# Where a bare token goes; `base_url` replaces the scheme and host (Lark: https://open.larksuite.com, tests: a fake).
DEFAULT_BASE_URL: dict[Platform, str] = {
    "dingtalk": "https://oapi.dingtalk.com",
    "feishu": "https://open.feishu.cn",
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
    "generator_url", "silence_url", "dashboard_url", "panel_url", "value_string", "fingerprint", "links",
})
DEFAULT_DEADLINE = 30.0


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


@dataclass(frozen=True, slots=True)
class RobotsSettings:
    targets: Mapping[str, RobotTarget] = field(default_factory=dict)
    deadline: float = DEFAULT_DEADLINE   # how long one request may queue and retry before we answer 503


class RobotConfigError(Exception):
    """Every problem found in the section, one `path: message` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# ----------------------------------------------------------------------------------------------------------------
# Parsing


def parse_robots(raw: Any, path: str = "robots") -> RobotsSettings:
    problems: list[str] = []
    section = _mapping(raw, path, problems)
    _unknown(section, {"deadline", "targets"}, path, problems)
    deadline = _seconds(section.get("deadline", DEFAULT_DEADLINE), f"{path}.deadline", problems)
    targets: dict[str, RobotTarget] = {}
    items = section.get("targets") or []
    if not isinstance(items, list):
        problems.append(f"{path}.targets: expected a list")
        items = []
    for i, item in enumerate(items):
        target = _parse_target(item, f"{path}.targets[{i}]", problems)
        if target is not None and target.name in targets:
            problems.append(f"{path}.targets[{i}].name: duplicate target name {target.name!r}")
        elif target is not None:
            targets[target.name] = target
    if problems:
        raise RobotConfigError(problems)
    return RobotsSettings(targets, deadline)


TARGET_KEYS = {
    "name", "platform", "webhook", "webhook_file", "token", "token_file", "base_url",
    "secret", "secret_file", "keyword", "mention", "templates",
}


def _parse_target(raw: Any, path: str, problems: list[str]) -> RobotTarget | None:
    node = _mapping(raw, path, problems)
    before = len(problems)
    _unknown(node, TARGET_KEYS, path, problems)
    name = _text(node, "name", path, problems, required=True) or ""
    if name and not NAME_PATTERN.fullmatch(name):
        problems.append(f"{path}.name: {name!r} must match [a-z0-9-]+")
    platform = node.get("platform")
    if platform not in PLATFORMS:
        problems.append(f"{path}.platform: {platform!r} is not one of {', '.join(PLATFORMS)}")
        return None
    webhook = _webhook(node, platform, path, problems)
    secret = _optional_secret(node, "secret", path, problems)
    keyword = _text(node, "keyword", path, problems)
    mentions = _mentions(node.get("mention"), platform, f"{path}.mention", problems)
    templates = _templates(node.get("templates"), f"{path}.templates", problems)
    if len(problems) > before or webhook is None:
        return None
    return RobotTarget(name, platform, webhook, secret, keyword, mentions, templates)


def _webhook(node: Mapping[str, Any], platform: Platform, path: str, problems: list[str]) -> Secret | None:
    """Either a full `webhook` URL or a bare `token` (with an optional `base_url`), each inline or as `*_file`."""
    url = _optional_secret(node, "webhook", path, problems)
    token = _optional_secret(node, "token", path, problems)
    if (url is None) == (token is None):
        problems.append(f"{path}: give exactly one of webhook, webhook_file, token, token_file")
        return None
    if token is not None:
        base = str(node.get("base_url") or DEFAULT_BASE_URL[platform]).rstrip("/")
        url = Secret(base + WEBHOOK_PATH[platform].format(token=token.reveal()))
    elif "base_url" in node:
        problems.append(f"{path}.base_url: only used with token; put the host in webhook instead")
    assert url is not None
    parts = urlsplit(url.reveal())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # Say which key, never the value: the URL carries the robot's token.
        problems.append(f"{path}: the webhook is not an http(s) URL")
        return None
    return url


def _optional_secret(node: Mapping[str, Any], key: str, path: str, problems: list[str]) -> Secret | None:
    """`key` inline (usually `${VAR}`) or `key_file` (a mounted Kubernetes Secret); at most one."""
    file_key = f"{key}_file"
    if key in node and file_key in node:
        problems.append(f"{path}: give {key} or {file_key}, not both")
        return None
    if file_key in node:
        return _secret_file(node[file_key], f"{path}.{file_key}", problems)
    value = node.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        problems.append(f"{path}.{key}: expected a non-empty string")
        return None
    return Secret(value)


def _secret_file(location: Any, path: str, problems: list[str]) -> Secret | None:
    if not isinstance(location, str) or not location:
        problems.append(f"{path}: expected a file path")
        return None
    try:
        value = Path(location).read_text(encoding="utf-8").strip()
    except OSError as exc:
        problems.append(f"{path}: cannot read {location}: {exc.strerror}")
        return None
    if not value:
        problems.append(f"{path}: {location} is empty")
        return None
    return Secret(value)


def _mentions(raw: Any, platform: Platform, path: str, problems: list[str]) -> Mentions:
    if raw is None:
        return Mentions()
    node = _mapping(raw, path, problems)
    _unknown(node, {"mobiles", "user_ids", "all"}, path, problems)
    mobiles = _strings(node, "mobiles", path, problems)
    if mobiles and platform == "feishu":
        # Feishu custom bots mention by open_id (<at id=ou_...>) only; a phone number would silently do nothing.
        problems.append(f"{path}.mobiles: Feishu robots mention by open_id; use user_ids")
    everyone = node.get("all", False)
    if not isinstance(everyone, bool):
        problems.append(f"{path}.all: expected true or false")
        everyone = False
    return Mentions(mobiles, _strings(node, "user_ids", path, problems), everyone)


def _templates(raw: Any, path: str, problems: list[str]) -> Templates:
    if raw is None:
        return Templates()
    node = _mapping(raw, path, problems)
    _unknown(node, {"title", "alert"}, path, problems)
    title = _template(node, "title", TITLE_FIELDS, path, problems)
    alert = _template(node, "alert", ALERT_FIELDS, path, problems)
    return Templates(title, alert)


def _template(node: Mapping[str, Any], key: str, fields: frozenset[str], path: str, problems: list[str]) -> str | None:
    text = _text(node, key, path, problems)
    if text is None:
        return None
    template = string.Template(text)
    if not template.is_valid():
        problems.append(f"{path}.{key}: not a valid template (a lone $? write $$ for a dollar sign)")
        return None
    unknown = sorted(set(template.get_identifiers()) - fields)
    if unknown:
        problems.append(f"{path}.{key}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
        return None
    return text


def _mapping(raw: Any, path: str, problems: list[str]) -> Mapping[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(f"{path}: expected a mapping, got {type(raw).__name__}")
        return {}
    return raw


def _unknown(node: Mapping[str, Any], known: set[str], path: str, problems: list[str]) -> None:
    problems.extend(f"{path}.{key}: unknown key" for key in node if key not in known)


def _text(node: Mapping[str, Any], key: str, path: str, problems: list[str], *, required: bool = False) -> str | None:
    value = node.get(key)
    if value is None or value == "":
        if required:
            problems.append(f"{path}.{key}: is required")
        return None
    if not isinstance(value, str):
        problems.append(f"{path}.{key}: expected a string, got {type(value).__name__}")
        return None
    return value


def _strings(node: Mapping[str, Any], key: str, path: str, problems: list[str]) -> tuple[str, ...]:
    value = node.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        problems.append(f"{path}.{key}: expected a list of strings")
        return ()
    return tuple(str(v) for v in value)


def _seconds(value: Any, path: str, problems: list[str]) -> float:
    try:
        seconds = parse_seconds(value)
    except UnitError as exc:
        problems.append(f"{path}: {exc}")
        return DEFAULT_DEADLINE
    if seconds <= 0:
        problems.append(f"{path}: must be more than zero")
        return DEFAULT_DEADLINE
    return seconds
