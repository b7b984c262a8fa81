"""JSON on the hot path: the platforms' answers the sidecar classifies, its own error bodies, JSON log lines.

Owns the choice of codec: orjson when it is installed (the `fast` extra; the image has it), else the standard
library. Both give the same bytes for what the sidecar writes (string keys, strings, whole numbers, lists, None,
booleans: compact, UTF-8 unescaped) and the same values for what it reads, but for whole numbers past 64 bits, which
orjson reads as floats (the sidecar only reads such documents, for codes and fields it compares, and forwards the
bytes it was given). What orjson refuses and the standard library takes (a byte-order mark, NaN, keys that are not
strings) goes to the standard library, so the choice never turns a document the sidecar could read into one it
cannot. The standard library's `json.dumps` builds its C encoder again on every call: 6-7 us for an access line's
dict, against under 1 us for orjson. Stores and the idempotency-key rewriter keep `json`: they are not per request
(or need its exact literal forms).
"""

from __future__ import annotations

import json
from typing import Any

try:
    import orjson
except ImportError:  # pragma: no cover - the `fast` extra is in the tests' environment
    orjson = None   # type: ignore[assignment]

_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _std_loads(data: bytes | str) -> Any:
    return json.loads(data)


def _std_dumps(value: Any) -> bytes:
    return _compact(value).encode()


if orjson is not None:
    _ORJSON_LOADS, _ORJSON_DUMPS = orjson.loads, orjson.dumps

    def loads(data: bytes | str) -> Any:
        """The value of a JSON document; ValueError (UnicodeDecodeError among them) when it is not one."""
        try:
            return _ORJSON_LOADS(data)
        except ValueError:
            return _std_loads(data)   # what orjson refuses and json takes; else json's own error

    def dumps_bytes(value: Any) -> bytes:
        """Compact JSON in UTF-8, non-ASCII as is: a body."""
        try:
            return _ORJSON_DUMPS(value)
        except TypeError:
            return _std_dumps(value)
else:  # pragma: no cover
    loads, dumps_bytes = _std_loads, _std_dumps


def dumps(value: Any) -> str:
    """The same as text: a log line."""
    return dumps_bytes(value).decode()


__all__ = ["dumps", "dumps_bytes", "loads"]
