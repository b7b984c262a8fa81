"""Idempotency keys: the client's own (`Idempotency-Key`, or the platform's field), or one added when it sent none.

Owns reading the client's key, mapping it to the platform's key for a route, and putting that key in place without
touching anything else of the request: a query pair replaced or appended, a JSON field inserted as text after the
body was validated, never re-serialised. A body that cannot be validated as plain JSON (too deep, a number no
platform can read, not an object) goes out unchanged and unkeyed. Which routes take which key is each platform's
table of `KeySpot`s; executing a key at most once where the platform has none is proxy/exactly_once.py's.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Mapping
from urllib.parse import quote, unquote

from proxy.platforms.base import KeySpot

HEADER = "Idempotency-Key"          # draft-ietf-httpapi-idempotency-key-header: an sf-string
ECHO_HEADER = "X-Imsidecar-Idempotency-Key"   # on the answer: the key to send back as Idempotency-Key in a rerun
MAX_KEY_LENGTH = 255
# Keys from the client map to the platform's key deterministically, so a rerun with the same key maps the same way
# on any replica. Feishu's client_token and idempotency_key are documented as UUIDs (uuidv4 for bitable).
NAMESPACE = uuid.UUID("5c0f7c3e-5a55-4d38-9b3e-6f0f3f1d1a8e")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z:/=]+")
_WHITESPACE = " \t\n\r"


class KeyProblem(ValueError):
    """The client's key is malformed, or disagrees with the key already in its request; the message says which."""


@dataclass(frozen=True, slots=True)
class Keyed:
    """The request as it will be sent on every attempt, and the key it carries (client's or ours), if any."""

    query: str
    body: bytes | None
    key: str | None      # what the client may send back as Idempotency-Key to rerun exactly this request
    added: bool          # the sidecar put a key in place (a new one, or the client's Idempotency-Key mapped in)

    @property
    def has_key(self) -> bool:
        return self.key is not None


def client_key(headers: Mapping[str, str]) -> str | None:
    """The client's `Idempotency-Key`: an sf-string (`"..."`), or leniently a bare token; None when absent."""
    raw = headers.get(HEADER)
    if raw is None:
        return None
    value = _sf_string(raw.strip())
    if not value:
        raise KeyProblem(f"{HEADER} must be a non-empty string of at most {MAX_KEY_LENGTH} characters")
    return value


def _sf_string(raw: str) -> str | None:
    if not raw.startswith('"'):
        return raw if _TOKEN.fullmatch(raw) and len(raw) <= MAX_KEY_LENGTH else None
    if len(raw) < 2 or not raw.endswith('"'):
        return None
    text = re.sub(r'\\(["\\])', r"\1", raw[1:-1])
    bad = re.search(r'(?<!\\)"|\\(?!["\\])', raw[1:-1])
    if bad or not all(0x20 <= ord(c) < 0x7F for c in text) or len(text) > MAX_KEY_LENGTH:
        return None
    return text


def platform_key(key: str) -> str:
    """The client's key as the platform takes it: itself when it is a UUID, else a UUID derived from it."""
    try:
        return str(uuid.UUID(key))
    except ValueError:
        return str(uuid.uuid5(NAMESPACE, key))


def apply_key(spot: KeySpot | None, query: str, body: bytes | None, *, add: bool, client: str | None = None,
              new_key: Callable[[], str] = lambda: str(uuid.uuid4())) -> Keyed:
    """Put the one key every attempt carries in place: the client's Idempotency-Key (mapped), else the key the
    client already wrote in the request, else (when `add`) a new one. Empty values are replaced, never doubled."""
    if spot is None:
        return Keyed(query, body, None, False)
    place = _QueryPlace(query, body) if spot.where == "query" else _BodyPlace.of(query, body)
    if place is None:
        return Keyed(query, body, None, False)   # not a body we can key faithfully: as it is, and not retried
    try:
        present = place.present(spot.name)
    except _NotKeyable:
        return Keyed(query, body, None, False)
    if client is not None:
        return _with_client_key(place, spot, query, body, present, client)
    if present:
        return Keyed(query, body, present, False)
    if not add:
        return Keyed(query, body, None, False)
    key = new_key()
    return place.keyed(spot.name, key, key)


def _with_client_key(place: _QueryPlace | _BodyPlace, spot: KeySpot, query: str, body: bytes | None,
                     present: str | None, client: str) -> Keyed:
    mapped = platform_key(client)
    if present and present not in (client, mapped):
        raise KeyProblem(f"{HEADER} and the request's own {spot.name} disagree; send one key")
    if present:
        return Keyed(query, body, client, False)
    return place.keyed(spot.name, mapped, client)


class _QueryPlace:
    def __init__(self, query: str, body: bytes | None) -> None:
        self.body = body
        self.pairs = [pair for pair in query.split("&") if pair]

    def present(self, name: str) -> str | None:
        for pair in self.pairs:
            key, _, value = pair.partition("=")
            if unquote(key) == name and unquote(value):
                return unquote(value)
        return None

    def keyed(self, name: str, value: str, echo: str) -> Keyed:
        """Every empty `name=` pair dropped (the platform might read the empty one), one with `value` added."""
        kept = [pair for pair in self.pairs if unquote(pair.partition("=")[0]) != name]
        kept.append(f"{quote(name, safe='')}={quote(value, safe='')}")
        return Keyed("&".join(kept), self.body, echo, True)


@dataclass(frozen=True, slots=True)
class _Member:
    name: str
    start: int          # where the member's value begins in the text
    end: int
    value: Any


class _BodyPlace:
    """A top-level JSON object, validated, with where each member's value sits in the text."""

    def __init__(self, query: str, text: str, opening: int, members: list[_Member]) -> None:
        self.query, self.text, self.opening, self.members = query, text, opening, members

    @classmethod
    def of(cls, query: str, body: bytes | None) -> _BodyPlace | None:
        if not body:
            return None
        try:
            text = body.decode("utf-8")
            opening, members = _scan_object(text)
        except (ValueError, RecursionError):   # not JSON, 5,000 levels deep, 1e400, NaN, a 5,000-digit number...
            return None
        names = [m.name for m in members]
        return cls(query, text, opening, members) if len(names) == len(set(names)) else None   # duplicates

    def member(self, name: str) -> _Member | None:
        return next((m for m in self.members if m.name == name), None)

    def present(self, name: str) -> str | None:
        member = self.member(name)
        if member is None or member.value in ("", None):
            return None
        if not isinstance(member.value, str):
            raise _NotKeyable()
        return member.value

    def keyed(self, name: str, value: str, echo: str) -> Keyed:
        literal = json.dumps(value, ensure_ascii=False)
        member = self.member(name)
        if member is not None:   # an empty "" or null: its value replaced in place
            text = self.text[:member.start] + literal + self.text[member.end:]
        else:                    # inserted first, so nothing after the opening brace moves but by its length
            after = self.opening + 1
            field = json.dumps(name, ensure_ascii=False) + ":" + literal + ("," if self.members else "")
            text = self.text[:after] + field + self.text[after:]
        return Keyed(self.query, text.encode("utf-8"), echo, True)


class _NotKeyable(ValueError):
    """The key field holds something other than a string: leave the request as the client wrote it."""


def _strict_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a number any platform can read")
    return value


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_float=_strict_float, parse_constant=_no_constants)


def _skip(text: str, at: int) -> int:
    while at < len(text) and text[at] in _WHITESPACE:
        at += 1
    return at


def _scan_object(text: str) -> tuple[int, list[_Member]]:
    """Where the top-level object opens and its members; ValueError unless `text` is exactly one JSON object."""
    at = _skip(text, 0)
    if not text.startswith("{", at):
        raise ValueError("not a JSON object")
    opening, members = at, list[_Member]()
    at = _skip(text, at + 1)
    if text.startswith("}", at):
        return opening, _end(text, at, members)
    while True:
        if not text.startswith('"', at):
            raise ValueError("expected a member name")
        name, at = _DECODER.raw_decode(text, at)
        at = _skip(text, at)
        if not text.startswith(":", at):
            raise ValueError("expected a member name and a colon")
        start = _skip(text, at + 1)
        value, end = _DECODER.raw_decode(text, start)
        members.append(_Member(name, start, end, value))
        at = _skip(text, end)
        if text.startswith("}", at):
            return opening, _end(text, at, members)
        if not text.startswith(",", at):
            raise ValueError("expected a comma")
        at = _skip(text, at + 1)


def _end(text: str, closing: int, members: list[_Member]) -> list[_Member]:
    if _skip(text, closing + 1) != len(text):
        raise ValueError("text after the JSON object")
    return members
