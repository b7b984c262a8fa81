"""Which app and upstream a request is for, from the listener it arrived on and its path prefix.

Owns prefix matching and route templates (bounded metric labels, never an ID); it never forwards to a host not
configured. Which templates an upstream has is its platform's (proxy/platforms/routes/).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, Iterable, TypeVar

from proxy.config import Address

T = TypeVar("T")

OTHER_ROUTE = "other"


@dataclass(frozen=True, slots=True)
class Match(Generic[T]):
    target: T
    prefix: str
    path: str   # the rest of the path, sent to the upstream; always starts with "/"


@dataclass
class _Table(Generic[T]):
    """One listener's prefixes: by prefix for the lookup, and the distinct lengths, longest first, to try."""

    targets: dict[str, T] = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list)


@dataclass
class Router(Generic[T]):
    """Longest-prefix match per listener; a prefix matches only on a segment boundary.

    A lookup costs one dict read per distinct prefix length (a few), however many apps share the listener.
    """

    _tables: dict[Address, _Table[T]] = field(default_factory=dict)

    def add(self, listen: Address, prefix: str, target: T) -> None:
        table = self._tables.setdefault(listen, _Table())
        table.targets.setdefault(prefix, target)
        table.lengths = sorted({*table.lengths, len(prefix)}, reverse=True)

    def resolve(self, listen: Address, path: str) -> Match[T] | None:
        table = self._tables.get(listen)
        if table is None:
            return None
        for length in table.lengths:
            target = table.targets.get(path[:length]) if _on_boundary(path, length) else None
            if target is not None:
                return Match(target, path[:length], path[length:] or "/")
        return None

    def prefixes(self, listen: Address) -> list[str]:
        table = self._tables.get(listen)
        return [prefix or "/" for prefix in sorted(table.targets, key=len, reverse=True)] if table else []

    def targets(self, listen: Address) -> list[T]:
        """Every target bound on `listen`."""
        table = self._tables.get(listen)
        return list(table.targets.values()) if table else []


def _on_boundary(path: str, length: int) -> bool:
    """Whether a prefix `length` long would end on a segment boundary of `path` (`/ding` is none of `/dingx/y`)."""
    return length == 0 or len(path) == length or (len(path) > length and path[length] == "/")


ID = ":id"   # a segment no template or vocabulary knows, in a path no template matches


@dataclass(eq=False, slots=True)
class _Node:
    literals: dict[str, _Node] = field(default_factory=dict)
    params: dict[str, _Node] = field(default_factory=dict)   # `:name` → the rest, for each name used here
    template: str | None = None


class RouteShapes:
    """One upstream's route templates (`/open-apis/im/v1/messages/:message_id/reply`), as a trie of segments.

    A path a template matches gets that template, literal segments preferred over `:params`. Any other path (an API
    newer than the table, a typo) keeps only segments some template spells out and reads `:id` for the rest: a
    segment is kept because the platform names it, never because it looks like a word (`zhangsan` does).
    """

    def __init__(self, templates: Iterable[str], cache: int = 4096) -> None:
        self._root = _Node()
        self._words: set[str] = set()
        for template in templates:
            self._add(template)
        self._cache: dict[str, str] = {}   # path → template: the same paths come back again and again
        self._cache_size = cache

    @classmethod
    def parse(cls, text: str) -> RouteShapes:
        """One template a line; `#` starts a comment line."""
        return cls(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))

    def _add(self, template: str) -> None:
        node = self._root
        for segment in template.split("/")[1:]:
            if segment.startswith(":"):
                node = node.params.setdefault(segment, _Node())
            else:
                self._words.add(segment)
                node = node.literals.setdefault(segment, _Node())
        node.template = template

    def templates(self) -> list[str]:
        """Every template this table holds."""
        found, pending = [], [self._root]
        while pending:
            node = pending.pop()
            if node.template is not None:
                found.append(node.template)
            pending.extend([*node.literals.values(), *node.params.values()])
        return found

    def template(self, path: str) -> str:
        found = self._cache.get(path)
        if found is None:
            if len(self._cache) >= self._cache_size:
                self._cache.clear()   # bounded: a flood of distinct IDs only costs the matching again
            found = self._cache[path] = self._match(path)
        return found

    def _match(self, path: str) -> str:
        segments = path.split("/")[1:]
        matched = _walk(self._root, segments)
        if matched is not None:
            return matched
        return "/" + "/".join(s if s in self._words or not s else ID for s in segments)


def _walk(node: _Node, segments: list[str]) -> str | None:
    if not segments:
        return node.template
    head, rest = segments[0], segments[1:]
    literal = node.literals.get(head)
    if literal is not None:
        found = _walk(literal, rest)
        if found is not None:
            return found
    if head:
        for child in node.params.values():
            found = _walk(child, rest)
            if found is not None:
                return found
    return None


class RouteLabels:
    """Route templates as metric label values, capped per app so no traffic can grow the series count."""

    def __init__(self, limit: int = 200, known: Iterable[str] = ()) -> None:
        self._limit = limit
        self._seen: dict[str, str] = {t: t for t in known}

    def label(self, template: str) -> str:
        if template in self._seen:
            return template
        if len(self._seen) >= self._limit:
            return OTHER_ROUTE
        self._seen[template] = template
        return template
