"""Where the monthly call counts persist, so restarts and replicas agree: the shared store (one counter per account
and month, added to by every replica), a file per account on disk, or nowhere (this process only).

Owns reading and adding to the counts; counting and the month itself are proxy/saving/meter.py's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

from proxy.store import SharedValues, ValuesUnavailable

KEEP = 40 * 86400.0   # a month's counter outlives its month by a few days, then the store forgets it


class CountsUnavailable(Exception):
    """The counts cannot be reached now; the meter keeps what it counted and adds it later."""


class Counts(Protocol):
    remote: bool   # each add is a round trip (worth waiting for together); else it completes without waiting

    async def load(self, account: str, month: str) -> int: ...
    async def add(self, account: str, month: str, calls: int) -> int:
        """Add `calls` to the account's count of `month` and return the count, all replicas included."""


class ProcessCounts:
    """No persistence configured: the count lives as long as the process (a restart starts the month at 0)."""

    remote = False

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}

    async def load(self, account: str, month: str) -> int:
        return self._counts.get((account, month), 0)

    async def add(self, account: str, month: str, calls: int) -> int:
        total = self._counts[(account, month)] = self._counts.get((account, month), 0) + calls
        return total


class FileCounts:
    """`quota.state_dir`: one JSON file per account holding the current month's count, replaced atomically."""

    remote = False

    def __init__(self, directory: str) -> None:
        self._directory = Path(directory)
        self._totals: dict[tuple[str, str], int] = {}

    def path(self, account: str) -> Path:
        return self._directory / f"quota-{account}.json"

    async def load(self, account: str, month: str) -> int:
        try:
            record = json.loads(self.path(account).read_text(encoding="utf-8"))
            calls = int(record["calls"]) if record.get("month") == month else 0
        except (OSError, ValueError, KeyError, TypeError):
            calls = 0   # no file yet, or not ours: the month starts here
        self._totals[(account, month)] = calls
        return calls

    async def add(self, account: str, month: str, calls: int) -> int:
        total = self._totals.get((account, month), 0) + calls
        target = self.path(account)
        spare = target.with_suffix(".tmp")
        try:
            spare.write_text(json.dumps({"account": account, "month": month, "calls": total}), encoding="utf-8")
            os.replace(spare, target)
        except OSError as exc:
            raise CountsUnavailable(f"cannot write {target}: {exc.strerror}") from exc
        self._totals[(account, month)] = total   # only once written: a failed write is retried with the same calls
        return total


class SharedCounts:
    """`store: redis`: one counter per account and month that every replica adds to."""

    remote = True

    def __init__(self, values: SharedValues) -> None:
        self._values = values

    async def load(self, account: str, month: str) -> int:
        try:
            text = await self._values.get(self.key(account, month))
        except ValuesUnavailable as exc:
            raise CountsUnavailable(str(exc)) from exc
        try:
            return int(text or 0)
        except ValueError:
            return 0

    async def add(self, account: str, month: str, calls: int) -> int:
        try:
            return await self._values.add(self.key(account, month), calls, KEEP)
        except ValuesUnavailable as exc:
            raise CountsUnavailable(str(exc)) from exc

    @staticmethod
    def key(account: str, month: str) -> str:
        return f"meter:{account}:{month}"


__all__ = ["Counts", "CountsUnavailable", "FileCounts", "ProcessCounts", "SharedCounts"]
