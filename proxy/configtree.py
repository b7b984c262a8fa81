"""Reading a config tree: `${VAR}` expansion, and `Node`, a mapping that knows its path and its unknown keys.

Owns the mechanics every config section shares (core, robots, events); what each section means is its owner's.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from proxy.secret import Secret
from proxy.units import UnitError, parse_bytes, parse_seconds

ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"



def expand(value: Any, env: Mapping[str, str], path: str, problems: list[str]) -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in every string of the tree."""
    if isinstance(value, dict):
        return {k: expand(v, env, join(path, k), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, env, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env and env[name] != "":
            return env[name]
        if default is not None:
            return default
        problems.append(f"{path}: {match.group(0)} is not set")
        return ""

    return ENV_PATTERN.sub(substitute, value)


def join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


class Node:
    """A mapping being read, that remembers its path and reports unknown keys."""

    def __init__(self, value: Any, path: str, problems: list[str]) -> None:
        self.path, self.problems = path, problems
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.problem(f"expected a mapping, got {type(value).__name__}")
            value = {}
        self.value: dict[str, Any] = value
        self.read: set[str] = set()

    def problem(self, message: str, key: str | None = None) -> None:
        self.problems.append(f"{join(self.path, key) if key else self.path or '<root>'}: {message}")

    def reported(self, key: str) -> bool:
        """True when expansion already named this key (an unset `${VAR}`), so it is not reported twice."""
        return any(p.startswith(f"{join(self.path, key)}:") for p in self.problems)

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return self.value.get(key, default)

    def has(self, key: str) -> bool:
        return key in self.value

    def child(self, key: str) -> Node:
        return Node(self.get(key), join(self.path, key), self.problems)

    def children(self, key: str) -> Iterator[Node]:
        items = self.get(key) or []
        if not isinstance(items, list):
            self.problem("expected a list", key)
            return
        for i, item in enumerate(items):
            yield Node(item, f"{join(self.path, key)}[{i}]", self.problems)

    def text(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self.get(key, default)
        if value is None or value == "":
            if required and not self.reported(key):
                self.problem("is required" if not self.has(key) else "is empty", key)
            return default
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            self.problem(f"expected a string, got {type(value).__name__}", key)
            return default
        return value

    def choice(self, key: str, options: tuple[str, ...], default: str | None = None) -> str:
        """One of `options`; a wrong or missing value is reported and comes back as "" (nothing valid)."""
        value = self.text(key, default, required=default is None)
        if value is not None and value not in options:
            self.problem(f"{value!r} is not one of {', '.join(options)}", key)
            return ""
        return value or ""

    def seconds(self, key: str, default: float) -> float:
        return self._unit(key, default, parse_seconds)

    def positive_seconds(self, key: str, default: float) -> float:
        """A duration that must be longer than 0 (a timeout, an interval, a TTL)."""
        value = self.seconds(key, default)
        if value <= 0:
            self.problem("must be longer than 0", key)
            return default
        return value

    def bytes(self, key: str, default: int) -> int:
        return int(self._unit(key, default, parse_bytes))

    def number(self, key: str, default: float, *, minimum: float = 0.0) -> float:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
            self.problem(f"expected a number ≥ {minimum:g}, got {value!r}", key)
            return default
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            self.problem(f"expected true or false, got {value!r}", key)
            return default
        return value

    def strings(self, key: str) -> tuple[str, ...]:
        value = self.get(key) or []
        # Numbers are welcome (a phone number, a code); a bool is YAML reading `yes`/`on`, never a string meant.
        if not isinstance(value, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
            self.problem("expected a list of strings", key)
            return ()
        return tuple(str(v) for v in value)

    def secret(self, key: str, *, required: bool = True) -> Secret | None:
        """`key` inline (usually `${VAR}`) or `key_file`, a mounted Kubernetes Secret; exactly one, or at most one
        when not `required` (neither key present is then None; a present but empty one is still a problem)."""
        file_key = f"{key}_file"
        self.read.update((key, file_key))
        if self.has(key) and self.has(file_key):
            self.problem(f"give {key} or {file_key}, not both")
            return None
        if self.has(file_key):
            return self._secret_file(file_key)
        if not required and not self.has(key):
            return None
        value = self.text(key, required=True)
        return Secret(value) if value else None

    def _secret_file(self, key: str) -> Secret | None:
        location = self.text(key, required=True)
        if not location:
            return None
        try:
            value = Path(location).read_text(encoding="utf-8").strip()
        except OSError as exc:
            self.problem(f"cannot read {location}: {exc.strerror}", key)
            return None
        if not value:
            self.problem(f"{location} is empty", key)
            return None
        return Secret(value)

    def _unit(self, key: str, default: float, convert: Any) -> float:
        value = self.get(key)
        if value is None:
            return default
        try:
            return float(convert(value))
        except UnitError as exc:
            self.problem(str(exc), key)
            return default

    def address(self, key: str, default: str | None) -> Address | None:
        text = self.text(key, default)
        if text is None:
            return None
        host, sep, port = text.rpartition(":")
        host = host.strip("[]")
        try:
            if not sep or not host or not 0 < int(port) < 65536:
                raise ValueError
            if host != "localhost":
                ipaddress.ip_address(host)
        except ValueError:
            self.problem(f"{text!r} is not a host:port address (an IP or localhost, and a port 1-65535)", key)
            return None
        return Address(host, int(port))

    def finish(self) -> None:
        for key in self.value:
            if key not in self.read:
                self.problem("unknown key", str(key))
