"""Shared helpers for the robot tests: drive a coroutine in virtual time while real loopback I/O runs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from proxy.clock import VirtualClock

T = TypeVar("T")


async def drive(clock: VirtualClock, work: Awaitable[T], step: float = 0.25, limit: float = 7200.0) -> T:
    """Run `work`, moving virtual time on whenever it sleeps; real I/O gets a real (millisecond) moment."""
    task: asyncio.Future[T] = asyncio.ensure_future(work)
    moved = 0.0
    while not task.done():
        if clock.sleepers:
            await clock.advance(step)
            moved += step
            assert moved <= limit, "virtual time ran away"
        else:
            await asyncio.wait({task}, timeout=0.002)
    return task.result()


def markdown(text: str, title: str = "t") -> dict[str, Any]:
    return {"msgtype": "markdown", "markdown": {"title": title, "text": text}}


def card(title: str = "hello") -> dict[str, Any]:
    return {"msg_type": "interactive", "card": {"header": {"title": {"tag": "plain_text", "content": title}},
                                                 "elements": [{"tag": "markdown", "content": "body"}]}}
