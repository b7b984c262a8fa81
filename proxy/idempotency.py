"""Idempotency keys: where a platform route takes one, and adding one when the client sent none.

Owns putting the key in place; which routes take which key is each platform's table of `KeySpot`s.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Callable
from urllib.parse import parse_qsl, quote

from proxy.platforms.base import KeySpot, load_json


@dataclass(frozen=True, slots=True)
class Keyed:
    """The request as it will be sent on every attempt, and whether it carries a key (client's or ours)."""

    query: str
    body: bytes | None
    has_key: bool
    added: bool


def apply_key(spot: KeySpot | None, query: str, body: bytes | None, *,
              add: bool, new_key: Callable[[], str] = lambda: str(uuid.uuid4())) -> Keyed:
    """Keep the client's key if it sent one; otherwise add one (when `add`) that every attempt will carry."""
    if spot is None:
        return Keyed(query, body, False, False)
    if spot.where == "query":
        if any(name == spot.name and value for name, value in parse_qsl(query, keep_blank_values=True)):
            return Keyed(query, body, True, False)
        if not add:
            return Keyed(query, body, False, False)
        pair = f"{spot.name}={quote(new_key(), safe='')}"
        return Keyed(f"{query}&{pair}" if query else pair, body, True, True)
    document = load_json(body)
    if document is None:
        return Keyed(query, body, False, False)   # not a JSON object: leave the body alone, and do not retry it
    if document.get(spot.name):
        return Keyed(query, body, True, False)
    if not add:
        return Keyed(query, body, False, False)
    document[spot.name] = new_key()
    return Keyed(query, json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode(), True, True)
