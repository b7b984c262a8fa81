"""The on-disk event journal: SQLite in WAL mode on a mounted path, the default when replicas share no Redis.

Owns the schema, the transactions (admit = dedupe check + insert, committed and fsynced before the platform is
acknowledged) and the one thread all SQLite calls run on, so the event loop never waits on the disk. One sidecar
writes a journal; `imsidecar events ...` may open it beside the running sidecar (WAL allows a second connection).
It shares nothing across pods: its leases are always granted.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from proxy.clock import Clock
from proxy.events.lease import Lease, LocalLease
from proxy.events.queue import (
    Admission,
    Arrivals,
    DeadLetter,
    Event,
    EventStoreError,
    EventStoreUnavailable,
    Queued,
)

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, app TEXT NOT NULL, key TEXT NOT NULL, body BLOB NOT NULL,
    headers TEXT NOT NULL, received_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS queue_by_app ON queue (app, seq);
CREATE TABLE IF NOT EXISTS depth (app TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS seen (
    app TEXT NOT NULL, key TEXT NOT NULL, expires_at REAL NOT NULL, PRIMARY KEY (app, key)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_by_expiry ON seen (expires_at);
CREATE TABLE IF NOT EXISTS dead (
    id INTEGER PRIMARY KEY AUTOINCREMENT, app TEXT NOT NULL, key TEXT NOT NULL, body BLOB NOT NULL,
    headers TEXT NOT NULL, received_at REAL NOT NULL, died_at REAL NOT NULL, reason TEXT NOT NULL,
    attempts INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS dead_by_app ON dead (app, id);
"""
PURGE_EVERY = 1000   # admissions between sweeps of expired dedupe keys


def _headers(text: str) -> tuple[tuple[str, str], ...]:
    return tuple((str(k), str(v)) for k, v in json.loads(text))


class Journal:
    def __init__(self, path: str, clock: Clock, dead_letter_max: int, poll_interval: float = 1.0) -> None:
        self.path, self._clock, self._dead_max, self._poll = path, clock, dead_letter_max, poll_interval
        self._db: sqlite3.Connection | None = None
        self._sync = "FULL"
        self._thread: ThreadPoolExecutor | None = None
        self._arrivals = Arrivals()
        self._admitted = 0

    # Lifecycle ---------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="events-journal")
        try:
            await self._run(self._open)
        except EventStoreUnavailable as exc:
            raise EventStoreError(f"events.queue.path: cannot open the journal at {self.path}: {exc.__cause__}; "
                                  "mount a writable volume there, or set events.queue.path") from exc

    def _open(self) -> None:
        if not Path(self.path).parent.is_dir():
            raise sqlite3.OperationalError(f"{Path(self.path).parent} is not a directory")
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")    # a commit is on disk before the platform hears "stored"
        db.executescript(SCHEMA)
        self._db, self._sync = db, "FULL"

    async def close(self) -> None:
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None

    async def _run(self, work: Callable[..., T], *args: Any) -> T:
        """Run `work` on the journal's thread; SQLite errors become EventStoreUnavailable."""
        if self._thread is None:
            raise EventStoreUnavailable("journal: not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, work, *args)
        except sqlite3.Error as exc:
            raise EventStoreUnavailable(f"journal: {exc}") from exc

    def _tx(self, work: Callable[[sqlite3.Connection], T], sync: str = "FULL") -> T:
        """One transaction. FULL (an fsync at commit) for what a platform is told is stored; NORMAL for settling
        and burying, where WAL mode still survives a crashed process and a lost commit means only a redelivery."""
        assert self._db is not None, "journal not started"
        if sync != self._sync:
            self._db.execute(f"PRAGMA synchronous={sync}")
            self._sync = sync
        self._db.execute("BEGIN IMMEDIATE")
        try:
            result = work(self._db)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return result

    # The queue ---------------------------------------------------------------------------------------------------

    async def admit(self, app: str, event: Event, dedupe_ttl: float, limit: int) -> Admission:
        now = self._clock.wall()
        admission = await self._run(self._tx, lambda db: self._admit(db, app, event, now, dedupe_ttl, limit))
        if admission is Admission.QUEUED:
            self._arrivals.notify(app)
            await self._maybe_purge(now)
        return admission

    @staticmethod
    def _admit(db: sqlite3.Connection, app: str, event: Event, now: float, ttl: float, limit: int) -> Admission:
        seen = db.execute("SELECT 1 FROM seen WHERE app = ? AND key = ? AND expires_at > ?",
                          (app, event.key, now)).fetchone()
        if seen:
            return Admission.DUPLICATE
        depth = db.execute("SELECT n FROM depth WHERE app = ?", (app,)).fetchone()
        if depth and depth[0] >= limit:
            return Admission.FULL
        db.execute("INSERT INTO queue (app, key, body, headers, received_at) VALUES (?, ?, ?, ?, ?)",
                   (app, event.key, event.body, json.dumps(event.headers), event.received_at))
        db.execute("INSERT INTO depth (app, n) VALUES (?, 1) ON CONFLICT (app) DO UPDATE SET n = n + 1", (app,))
        db.execute("INSERT OR REPLACE INTO seen (app, key, expires_at) VALUES (?, ?, ?)", (app, event.key, now + ttl))
        return Admission.QUEUED

    async def _maybe_purge(self, now: float) -> None:
        self._admitted += 1
        if self._admitted % PURGE_EVERY == 0:
            await self._run(self._tx, lambda db: db.execute("DELETE FROM seen WHERE expires_at <= ?", (now,)))

    async def head(self, app: str) -> Queued | None:
        row = await self._run(self._fetch, "SELECT seq, key, body, headers, received_at FROM queue "
                              "WHERE app = ? ORDER BY seq LIMIT 1", (app,))
        if row is None:
            return None
        seq, key, body, headers, received_at = row
        return Queued(str(seq), Event(key, bytes(body), _headers(headers), received_at))

    def _fetch(self, sql: str, args: tuple[Any, ...]) -> Any:
        assert self._db is not None, "journal not started"
        return self._db.execute(sql, args).fetchone()

    async def settle(self, app: str, item: Queued) -> None:
        await self._run(self._tx, lambda db: self._remove(db, app, item.id), "NORMAL")

    @staticmethod
    def _remove(db: sqlite3.Connection, app: str, seq: str) -> bool:
        if db.execute("DELETE FROM queue WHERE seq = ? AND app = ?", (int(seq), app)).rowcount:
            db.execute("UPDATE depth SET n = n - 1 WHERE app = ?", (app,))
            return True
        return False

    async def bury(self, app: str, item: Queued, reason: str, attempts: int) -> None:
        died_at = self._clock.wall()
        await self._run(self._tx, lambda db: self._bury(db, app, item, reason, attempts, died_at), "NORMAL")

    def _bury(self, db: sqlite3.Connection, app: str, item: Queued, reason: str, attempts: int,
              died_at: float) -> None:
        if not self._remove(db, app, item.id):
            return
        event = item.event
        db.execute("INSERT INTO dead (app, key, body, headers, received_at, died_at, reason, attempts) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (app, event.key, event.body, json.dumps(event.headers),
                                                       event.received_at, died_at, reason, attempts))
        db.execute("DELETE FROM dead WHERE app = ? AND id NOT IN "
                   "(SELECT id FROM dead WHERE app = ? ORDER BY id DESC LIMIT ?)", (app, app, self._dead_max))

    async def depth(self, app: str) -> int:
        row = await self._run(self._fetch, "SELECT n FROM depth WHERE app = ?", (app,))
        return int(row[0]) if row else 0

    async def wait(self, app: str, seconds: float) -> None:
        # Polled too, at most `poll_interval` apart: `imsidecar events replay` writes from another process.
        await self._arrivals.wait(app, min(seconds, self._poll), self._clock)

    # Dead letters ------------------------------------------------------------------------------------------------

    async def dead_letters(self, app: str, limit: int) -> list[DeadLetter]:
        rows = await self._run(self._fetch_all, "SELECT id, key, body, headers, received_at, died_at, reason, "
                               "attempts FROM dead WHERE app = ? ORDER BY id LIMIT ?", (app, limit))
        return [DeadLetter(str(i), app, Event(k, bytes(b), _headers(h), r), reason, died, attempts)
                for i, k, b, h, r, died, reason, attempts in rows]

    def _fetch_all(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        assert self._db is not None, "journal not started"
        return self._db.execute(sql, args).fetchall()

    async def replay(self, app: str, ids: Sequence[str] | None) -> int:
        now = self._clock.wall()
        count = await self._run(self._tx, lambda db: self._replay(db, app, ids, now))
        if count:
            self._arrivals.notify(app)
        return count

    @staticmethod
    def _replay(db: sqlite3.Connection, app: str, ids: Sequence[str] | None, now: float) -> int:
        rows = db.execute("SELECT id, key, body, headers FROM dead WHERE app = ? ORDER BY id", (app,)).fetchall()
        chosen = [r for r in rows if ids is None or str(r[0]) in ids]
        for dead_id, key, body, headers in chosen:
            db.execute("INSERT INTO queue (app, key, body, headers, received_at) VALUES (?, ?, ?, ?, ?)",
                       (app, key, body, headers, now))
            db.execute("INSERT INTO depth (app, n) VALUES (?, 1) ON CONFLICT (app) DO UPDATE SET n = n + 1", (app,))
            db.execute("DELETE FROM dead WHERE id = ?", (dead_id,))
        return len(chosen)

    def lease(self, app: str, role: str, slots: int) -> Lease:
        return LocalLease()
