"""Where cached platform answers live: in this process, bounded by entries and bytes (least recently used goes
first), or in the shared store so every replica reads what one fetched.

Owns entries, their size, their encoding for the shared store and falling back to memory while it is away; what
is cached and for how long is proxy/saving/cache.py's.
"""

from __future__ import annotations

import base64
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.store import SharedValues, ValuesUnavailable
from proxy.upstream import HOP_BY_HOP, Answer

ENTRY_OVERHEAD = 256   # bytes an entry costs beyond its body and headers, roughly (objects, dict slot)
DROPPED_HEADERS = HOP_BY_HOP | {"set-cookie", "date", "age"}   # not the answer's content, or set afresh


@dataclass(frozen=True, slots=True)
class Entry:
    """One platform answer as it came (body still encoded the way the platform sent it)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    stored_at: float   # wall time: replicas compare ages
    ttl: float

    @classmethod
    def of(cls, answer: Answer, now: float, ttl: float) -> Entry:
        assert answer.body is not None
        headers = tuple((k, v) for k, v in answer.headers.items() if k.lower() not in DROPPED_HEADERS)
        return cls(answer.status, headers, answer.body, now, ttl)

    def age(self, now: float) -> float:
        return max(0.0, now - self.stored_at)

    @property
    def size(self) -> int:
        return len(self.body) + sum(len(k) + len(v) for k, v in self.headers) + ENTRY_OVERHEAD

    def answer(self) -> Answer:
        return Answer(self.status, CIMultiDictProxy(CIMultiDict(self.headers)), self.body)

    def encode(self) -> str:
        return json.dumps({"status": self.status, "headers": self.headers, "stored_at": self.stored_at,
                           "ttl": self.ttl, "body": base64.b64encode(self.body).decode()}, separators=(",", ":"))

    @classmethod
    def decode(cls, text: str) -> Entry | None:
        try:
            raw = json.loads(text)
            headers = tuple((str(k), str(v)) for k, v in raw["headers"])
            return cls(int(raw["status"]), headers, base64.b64decode(raw["body"]), float(raw["stored_at"]),
                       float(raw["ttl"]))
        except (ValueError, KeyError, TypeError):
            return None   # not ours, or from an incompatible version: a miss


class Entries(Protocol):
    async def get(self, key: str) -> Entry | None: ...
    async def put(self, key: str, entry: Entry, keep: float) -> None:
        """Hold `entry` for `keep` seconds at most (its TTL plus the stale-if-error bound)."""

    @property
    def count(self) -> int: ...
    @property
    def bytes(self) -> int: ...


class MemoryEntries:
    """Least recently used first out, past `max_entries` or `max_bytes`; expired entries are dropped when met."""

    def __init__(self, max_entries: int, max_bytes: int, wall: Callable[[], float]) -> None:
        self._max_entries, self._max_bytes, self._wall = max_entries, max_bytes, wall
        self._entries: OrderedDict[str, tuple[Entry, float]] = OrderedDict()   # key → (entry, drop at)
        self._bytes = 0

    async def get(self, key: str) -> Entry | None:
        held = self._entries.get(key)
        if held is None:
            return None
        if held[1] <= self._wall():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return held[0]

    async def put(self, key: str, entry: Entry, keep: float) -> None:
        if key in self._entries:
            self._drop(key)
        if entry.size > self._max_bytes:
            return
        self._entries[key] = (entry, self._wall() + keep)
        self._bytes += entry.size
        while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        entry, _ = self._entries.pop(key)
        self._bytes -= entry.size

    @property
    def count(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes


class SharedEntries:
    """Entries in the shared store, one copy for all replicas; while it is away, this replica's memory serves."""

    def __init__(self, values: SharedValues, local: MemoryEntries) -> None:
        self._values, self._local = values, local

    async def get(self, key: str) -> Entry | None:
        try:
            text = await self._values.get(f"cache:{key}")
        except ValuesUnavailable:
            return await self._local.get(key)
        return None if text is None else Entry.decode(text)

    async def put(self, key: str, entry: Entry, keep: float) -> None:
        try:
            await self._values.put(f"cache:{key}", entry.encode(), keep)
        except ValuesUnavailable:
            await self._local.put(key, entry, keep)

    @property
    def count(self) -> int:
        return self._local.count   # what this replica holds itself (only while the store was away)

    @property
    def bytes(self) -> int:
        return self._local.bytes


__all__ = ["Entries", "Entry", "MemoryEntries", "SharedEntries"]
