"""Loose units in config, normalised in one place: durations ("250ms", "2s", "5m", 2) and sizes ("4MiB", 1024).

Owns parsing only; defaults and validation of ranges belong to config.
"""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$", re.IGNORECASE)
_SECONDS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_BYTES = {None: 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2, "gb": 1000**3, "gib": 1024**3}


class UnitError(ValueError):
    pass


def parse_seconds(value: object) -> float:
    if isinstance(value, bool):
        raise UnitError(f"expected a duration like 250ms, 2s or 5m, got {value!r}")
    if isinstance(value, (int, float)) and value >= 0:
        return float(value)
    match = _DURATION.match(value) if isinstance(value, str) else None
    if not match:
        raise UnitError(f"expected a duration like 250ms, 2s or 5m, got {value!r}")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def parse_bytes(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if not match:
        raise UnitError(f"expected a size like 512KiB or 4MiB, got {value!r}")
    unit = match.group(2).lower() if match.group(2) else None
    return int(float(match.group(1)) * _BYTES[unit])
