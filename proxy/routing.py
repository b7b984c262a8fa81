"""Which app and upstream a request is for, from the listener it arrived on and its path prefix.

Owns prefix matching and route templates (bounded metric labels); it never forwards to a host not configured.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Generic, Iterable, TypeVar

from proxy.config import Address

T = TypeVar("T")

# A path segment is an ID when it is long and carries several digits (not `asyncsend_v2`, `oauth2`), or has
# characters words do not (tokens, UUIDs).
_ID_SEGMENT = re.compile(r"^(?=(?:\D*\d){3})[\w.-]{6,}$|^[\w-]*[^\w/-][\w.-]*$|^\d+$")
# After a collection name, anything but a lower-case verb (`batch_create`, `search`) is an ID (`bascnAbCdEf`).
_VERB = re.compile(r"^[a-z_]+$")
_VERSION = re.compile(r"^v\d+(\.\d+)?$")
# The name an ID gets after the collection it belongs to (Feishu and DingTalk REST paths).
_ID_NAMES = {
    "apps": ":app_token", "tables": ":table_id", "records": ":record_id", "views": ":view_id", "fields": ":field_id",
    "messages": ":message_id", "chats": ":chat_id", "users": ":user_id", "departments": ":department_id",
    "files": ":file_key", "images": ":image_key", "documents": ":document_id", "blocks": ":block_id",
    "spreadsheets": ":spreadsheet_token", "calendars": ":calendar_id", "events": ":event_id", "tasks": ":task_id",
}
OTHER_ROUTE = "other"


@dataclass(frozen=True, slots=True)
class Match(Generic[T]):
    target: T
    prefix: str
    path: str   # the rest of the path, sent to the upstream; always starts with "/"


@dataclass
class Router(Generic[T]):
    """Longest-prefix match per listener; a prefix matches only on a segment boundary."""

    _tables: dict[Address, list[tuple[str, T]]] = field(default_factory=dict)

    def add(self, listen: Address, prefix: str, target: T) -> None:
        table = self._tables.setdefault(listen, [])
        table.append((prefix, target))
        table.sort(key=lambda entry: len(entry[0]), reverse=True)

    def resolve(self, listen: Address, path: str) -> Match[T] | None:
        for prefix, target in self._tables.get(listen, ()):
            if path == prefix or path.startswith(prefix + "/") or prefix == "":
                return Match(target, prefix, path[len(prefix):] or "/")
        return None

    def prefixes(self, listen: Address) -> list[str]:
        return [prefix or "/" for prefix, _ in self._tables.get(listen, ())]


def route_template(path: str) -> str:
    """`/open-apis/bitable/v1/apps/bascnX/tables/tblY/records/batch_create` →
    `/open-apis/bitable/v1/apps/:app_token/tables/:table_id/records/batch_create`."""
    segments = path.split("/")
    for i, segment in enumerate(segments):
        if not segment or _VERSION.match(segment):
            continue
        after_collection = i > 0 and segments[i - 1] in _ID_NAMES
        if _ID_SEGMENT.match(segment) or (after_collection and not _VERB.match(segment)):
            segments[i] = _ID_NAMES.get(segments[i - 1], ":id") if i else ":id"
    return "/".join(segments)


class RouteLabels:
    """Route templates as metric label values, capped per app so no traffic can grow the series count."""

    def __init__(self, limit: int = 200, known: Iterable[str] = (), paths: int = 4096) -> None:
        self._limit = limit
        self._seen: dict[str, str] = {t: t for t in known}
        self._templates: dict[str, str] = {}   # path → template: the same paths come back again and again
        self._paths = paths

    def template(self, path: str) -> str:
        template = self._templates.get(path)
        if template is None:
            if len(self._templates) >= self._paths:
                self._templates.clear()   # bounded: a flood of distinct IDs only costs the regexes again
            template = self._templates[path] = route_template(path)
        return template

    def label(self, template: str) -> str:
        if template in self._seen:
            return template
        if len(self._seen) >= self._limit:
            return OTHER_ROUTE
        self._seen[template] = template
        return template
