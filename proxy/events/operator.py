"""What `imsidecar events ...` does for an operator: list the dead letters and queue them again, against the store
the config names (the journal file, even while the sidecar runs, or the shared Redis).

Owns opening that store outside the sidecar and the text it prints; argument parsing and exit codes are the CLI's.
Bodies are never printed: an event carries the application's data and, for Feishu, the verification token.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from proxy.clock import SystemClock
from proxy.events.queue import DeadLetter, EventStoreError, EventStoreUnavailable, backend_for, open_event_store
from proxy.events.settings import EventsSettings
from proxy.store import StoreSettings


class OperatorError(Exception):
    """A problem to print as one line; the store's messages never carry a password."""


async def list_dead_letters(events: EventsSettings, store: StoreSettings, apps: Sequence[str], limit: int) -> str:
    async def work(opened) -> str:  # type: ignore[no-untyped-def]
        lines = []
        for app in apps:
            lines += [describe(letter) for letter in await opened.dead_letters(app, limit)]
        return "\n".join(lines) if lines else "no dead letters"
    return await _with_store(events, store, work)


async def replay(events: EventsSettings, store: StoreSettings, app: str, ids: Sequence[str] | None) -> str:
    async def work(opened) -> str:  # type: ignore[no-untyped-def]
        count = await opened.replay(app, ids)
        return f"queued {count} dead letter{'s' if count != 1 else ''} of {app} again"
    return await _with_store(events, store, work)


async def _with_store(events: EventsSettings, store: StoreSettings, work) -> str:  # type: ignore[no-untyped-def]
    if backend_for(events.queue, store) == "memory":
        raise OperatorError("the memory backend keeps dead letters inside the sidecar process: nothing to see from "
                            "outside (use the journal or Redis)")
    opened = open_event_store(events.queue, store, SystemClock())
    try:
        await opened.start()
    except EventStoreError as exc:
        raise OperatorError(str(exc)) from exc
    try:
        return str(await work(opened))
    except EventStoreUnavailable as exc:
        raise OperatorError(str(exc)) from exc
    finally:
        await opened.close()


def describe(letter: DeadLetter) -> str:
    """One line per dead letter: where, why, when, how often tried, what kind; no body."""
    kind = dict(letter.event.headers).get("X-Imsidecar-Event-Type", "-")
    return (f"{letter.app} id={letter.id} reason={letter.reason} attempts={letter.attempts} "
            f"received={_when(letter.event.received_at)} died={_when(letter.died_at)} "
            f"key={json.dumps(letter.event.key)} type={kind} bytes={len(letter.event.body)}")


def _when(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))
