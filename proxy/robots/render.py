"""Alertmanager (webhook v4) and Grafana webhook payloads → a DingTalk markdown message or a Feishu card.

Owns payload parsing, the default layouts, template fields, mentions in the text and the size cap with "+N more";
it does not sign, send or rate-limit.

Template fields (string.Template, `${name}`), overridable per target under `templates:`:
  title  — status, STATUS, alertname, firing, resolved, receiver, group_labels, title, severity
  alert  — status, STATUS, alertname, severity, summary, description, labels, starts_at, ends_at, duration,
           runbook_url, generator_url, silence_url, dashboard_url, panel_url, value_string, fingerprint, links
Missing values render as empty strings; `links` is the ready-made list of the URLs present (the runbook first).
Times are written in the target's time zone (`timezone`, default Asia/Shanghai), with their UTC offset.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any

from proxy.robots.errors import BadMessage
from proxy.robots.platforms import PLATFORMS, Message
from proxy.robots.settings import ALERT_FIELDS, TITLE_FIELDS, Mentions, RobotTarget

FIELD_LIMIT = 1000     # characters of one label/annotation value; a stack trace in a summary stays readable
SIZE_MARGIN = 1024     # bytes kept free for timestamp/sign, mentions, "+N more" and JSON overhead
URL_FIELDS = (("runbook_url", "Runbook"), ("generator_url", "Source"), ("silence_url", "Silence"),
              ("dashboard_url", "Dashboard"), ("panel_url", "Panel"))

DEFAULT_TITLE = "[${STATUS}${firing_suffix}] ${alertname}"


@dataclass(frozen=True, slots=True)
class Alert:
    status: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    starts_at: str
    ends_at: str
    generator_url: str = ""
    fingerprint: str = ""
    silence_url: str = ""       # Grafana extras from here on
    dashboard_url: str = ""
    panel_url: str = ""
    value_string: str = ""

    @property
    def runbook_url(self) -> str:
        return self.annotations.get("runbook_url", "")


@dataclass(frozen=True, slots=True)
class Notification:
    status: str
    receiver: str
    group_labels: Mapping[str, str]
    common_labels: Mapping[str, str]
    alerts: tuple[Alert, ...]
    title: str = ""             # Grafana
    truncated_alerts: int = 0   # Grafana: alerts it left out of the payload


# ----------------------------------------------------------------------------------------------------------------
# Parsing


def parse_notification(payload: Any) -> Notification:
    """Validate the parts we use; Alertmanager says version "4", Grafana "1", and we accept either."""
    if not isinstance(payload, dict):
        raise BadMessage("an alert notification is a JSON object")
    alerts = payload.get("alerts")
    if not isinstance(alerts, list) or not alerts:
        raise BadMessage("alerts: expected a non-empty list")
    parsed = tuple(_alert(a, i) for i, a in enumerate(alerts))
    return Notification(
        status=_status(payload.get("status", parsed[0].status), "status"),
        receiver=_str(payload.get("receiver")),
        group_labels=_labels(payload.get("groupLabels"), "groupLabels"),
        common_labels=_labels(payload.get("commonLabels"), "commonLabels"),
        alerts=parsed,
        title=_str(payload.get("title")),
        truncated_alerts=_count(payload.get("truncatedAlerts")),
    )


def _alert(raw: Any, i: int) -> Alert:
    if not isinstance(raw, dict):
        raise BadMessage(f"alerts[{i}]: expected an object")
    return Alert(
        status=_status(raw.get("status"), f"alerts[{i}].status"),
        labels=_labels(raw.get("labels"), f"alerts[{i}].labels"),
        annotations=_labels(raw.get("annotations"), f"alerts[{i}].annotations"),
        starts_at=_time(raw.get("startsAt")),
        ends_at=_time(raw.get("endsAt")),
        generator_url=_str(raw.get("generatorURL")),
        fingerprint=_str(raw.get("fingerprint")),
        silence_url=_str(raw.get("silenceURL")),
        dashboard_url=_str(raw.get("dashboardURL")),
        panel_url=_str(raw.get("panelURL")),
        value_string=_str(raw.get("valueString")),
    )


def _status(value: Any, where: str) -> str:
    if value not in ("firing", "resolved"):
        raise BadMessage(f"{where}: expected firing or resolved, got {str(value)[:40]!r}")
    return str(value)


def _labels(value: Any, where: str) -> Mapping[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadMessage(f"{where}: expected an object of strings")
    return {str(k): _str(v) for k, v in value.items()}


def _str(value: Any) -> str:
    return "" if value is None else str(value)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


FRACTION = re.compile(r"\.\d+")


def _time(value: Any) -> str:
    """RFC 3339 as sent (Alertmanager writes nanoseconds); the zero time (an alert still firing) → ""."""
    text = _str(value)
    return "" if text.startswith("0001-01-01") else text


def _moment(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(FRACTION.sub("", text, count=1)) if text else None
    except ValueError:
        return None


def local_time(text: str, zone: tzinfo) -> str:
    """ "2024-05-01T10:00:00Z" in Asia/Shanghai → "2024-05-01 18:00:00 UTC+08:00"; unreadable text as it came."""
    moment = _moment(text)
    if moment is None:
        return text[:40]
    here = moment.astimezone(zone)
    offset = here.strftime("%z")
    return here.strftime("%Y-%m-%d %H:%M:%S") + f" UTC{offset[:3]}:{offset[3:]}"


def duration(starts_at: str, ends_at: str) -> str:
    """How long an alert fired, for resolved ones: "1h 5m", "12m 3s", "40s"."""
    start, end = _moment(starts_at), _moment(ends_at)
    if start is None or end is None or end < start:
        return ""
    seconds = int((end - start).total_seconds())
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else "",
             f"{seconds}s" if seconds and not hours else ""]   # seconds do not matter after an hour
    return " ".join(p for p in parts if p) or "0s"


# ----------------------------------------------------------------------------------------------------------------
# Fields


def title_fields(note: Notification) -> dict[str, str]:
    firing = sum(1 for a in note.alerts if a.status == "firing") + (
        note.truncated_alerts if note.status == "firing" else 0)
    first = note.alerts[0]
    fields = {
        "status": note.status,
        "STATUS": note.status.upper(),
        "alertname": note.group_labels.get("alertname") or note.common_labels.get("alertname")
        or first.labels.get("alertname", "alert"),
        "firing": str(firing),
        "resolved": str(sum(1 for a in note.alerts if a.status == "resolved")),
        "receiver": note.receiver,
        "group_labels": _pairs(note.group_labels),
        "title": note.title,
        "severity": note.common_labels.get("severity", first.labels.get("severity", "")),
    }
    assert set(fields) == TITLE_FIELDS
    return fields


def alert_fields(alert: Alert, link: Any, zone: tzinfo) -> dict[str, str]:
    notes = alert.annotations
    shown = {k: v for k, v in alert.labels.items() if k not in ("alertname", "severity")}
    fields = {
        "status": alert.status,
        "STATUS": alert.status.upper(),
        "alertname": alert.labels.get("alertname", "alert"),
        "severity": alert.labels.get("severity", "unknown"),
        "summary": _clip(notes.get("summary") or notes.get("message") or notes.get("description") or ""),
        "description": _clip(notes.get("description", "")),
        "labels": _clip(_pairs(shown)),
        "starts_at": local_time(alert.starts_at, zone) if alert.starts_at else "",
        "ends_at": local_time(alert.ends_at, zone) if alert.ends_at else "",
        "duration": duration(alert.starts_at, alert.ends_at),
        "runbook_url": alert.runbook_url,
        "generator_url": alert.generator_url,
        "silence_url": alert.silence_url,
        "dashboard_url": alert.dashboard_url,
        "panel_url": alert.panel_url,
        "value_string": _clip(alert.value_string),
        "fingerprint": alert.fingerprint,
        "links": " | ".join(link(name, getattr(alert, key)) for key, name in URL_FIELDS if getattr(alert, key)),
    }
    assert set(fields) == ALERT_FIELDS
    return fields


def _pairs(labels: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _clip(text: str, limit: int = FIELD_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def markdown_link(name: str, url: str) -> str:
    return f"[{name}]({url})"


def _title(note: Notification, target: RobotTarget) -> str:
    fields = title_fields(note)
    if target.templates.title:
        return string.Template(target.templates.title).safe_substitute(fields)
    if note.title:  # Grafana already wrote one, e.g. "[FIRING:1] HighLatency (api)"
        return note.title
    suffix = f":{fields['firing']}" if note.status == "firing" else ""
    return string.Template(DEFAULT_TITLE).safe_substitute(fields, firing_suffix=suffix)


def _blocks(note: Notification, target: RobotTarget) -> list[str]:
    """One block per alert, firing first; a section heading where the status changes."""
    custom = string.Template(target.templates.alert) if target.templates.alert else None
    ordered = sorted(note.alerts, key=lambda a: a.status != "firing")
    blocks, status = [], ""
    for alert in ordered:
        fields = alert_fields(alert, markdown_link, target.timezone)
        text = custom.safe_substitute(fields).strip() if custom else default_block(fields, target.platform)
        if alert.status != status:
            status = alert.status
            count = sum(1 for a in ordered if a.status == status)
            text = f"**{status.capitalize()} ({count})**\n\n{text}"
        blocks.append(text)
    return blocks


def default_block(f: dict[str, str], platform: str) -> str:
    """What happened, what it means (the description, when it says more than the summary), when, where, links."""
    quote = "> " if platform == "dingtalk" else ""
    lasted = f" (after {f['duration']})" if f["duration"] else ""
    times = [f"- Started: {f['starts_at']}" if f["starts_at"] else "",
             f"- Ended: {f['ends_at']}{lasted}" if f["ends_at"] else "",
             f"- Labels: {f['labels']}" if f["labels"] else ""]
    paragraphs = [f"**{f['alertname']}** · {f['severity']} · {f['STATUS']}",
                  f"{quote}{f['summary']}" if f["summary"] else "",
                  f["description"] if f["description"] != f["summary"] else "",
                  "\n".join(t for t in times if t), f["links"]]
    # DingTalk markdown needs a blank line between paragraphs; a Feishu card's markdown takes single breaks.
    return ("\n\n" if platform == "dingtalk" else "\n").join(p for p in paragraphs if p)


def fit(blocks: list[str], budget: int, hidden: int = 0) -> list[str]:
    """As many blocks as fit in `budget` encoded bytes, then "+N more" for the rest (and for `hidden`)."""
    kept: list[str] = []
    used = 0
    for i, block in enumerate(blocks):
        size = len(json.dumps(block, ensure_ascii=False).encode()) + 16  # separators, element wrapper
        if used + size > budget:
            if not kept:  # never send an empty message: cut the one block down instead
                kept.append(_clip(block, max(200, budget // 4)))
                i += 1
            return kept + [f"+{len(blocks) - i + hidden} more"]
        kept.append(block)
        used += size
    return kept + ([f"+{hidden} more"] if hidden else [])


# ----------------------------------------------------------------------------------------------------------------
# Messages


def render(note: Notification, target: RobotTarget) -> Message:
    title = _clip(_title(note, target), 200)
    budget = PLATFORMS[target.platform].max_bytes - SIZE_MARGIN - len(title.encode())
    blocks = fit(_blocks(note, target), budget, note.truncated_alerts)
    if target.platform == "dingtalk":
        return dingtalk_markdown(title, blocks, target.mentions)
    return feishu_card(title, blocks, note.status, target.mentions)


def dingtalk_markdown(title: str, blocks: list[str], mentions: Mentions) -> Message:
    """DingTalk only notifies a mentioned person when `@mobile` / `@userId` also appears in the text
    (timonwong/prometheus-webhook-dingtalk#85), so the mentions are written into it as well as into `at`."""
    text = f"### {title}\n\n" + "\n\n---\n\n".join(blocks)
    ats = [f"@{who}" for who in (*mentions.mobiles, *mentions.user_ids)]
    if ats:
        text += "\n\n" + " ".join(ats)
    at = {"atMobiles": list(mentions.mobiles), "atUserIds": list(mentions.user_ids), "isAtAll": mentions.all}
    return {"msgtype": "markdown", "markdown": {"title": title, "text": text}, "at": at}


def feishu_card(title: str, blocks: list[str], status: str, mentions: Mentions) -> Message:
    elements: list[dict[str, Any]] = []
    for block in blocks:
        if elements:
            elements.append({"tag": "hr"})
        elements.append({"tag": "markdown", "content": block})
    ats = [f"<at id={who}></at>" for who in mentions.user_ids] + (["<at id=all></at>"] if mentions.all else [])
    if ats:
        elements.append({"tag": "markdown", "content": " ".join(ats)})
    header = {"title": {"tag": "plain_text", "content": title},
              "template": "red" if status == "firing" else "green"}
    return {"msg_type": "interactive",
            "card": {"config": {"wide_screen_mode": True}, "header": header, "elements": elements}}
