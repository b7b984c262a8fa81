"""An attempt cut off while its new connection was being made (a slow TLS handshake, DNS, an egress proxy's tunnel)
was not sent: a write may be retried, and its client is never told it may have been applied.

Through the sidecar: DingTalk's oapi origin has no connection before the test's write (tokens come from the api
origin), so the write makes the first one, which takes 0.15 s (real seconds, a fraction of one).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from yarl import URL

from tests.conftest import Platforms, SidecarFactory
from tests.test_exactly_once import ASYNCSEND, NOTICE, key, post

HANDSHAKE = 0.15
ASYNCSEND_ROUTE = "/topapi/message/corpconversation/asyncsend_v2"


@pytest.fixture
def slow_first_connection(platforms: Platforms, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The first connection made to DingTalk's oapi origin takes HANDSHAKE; later ones are fast. Returns the
    delays of every connection made there."""
    port = URL(platforms.oapi_url).port
    made: list[float] = []
    create = aiohttp.TCPConnector._create_connection

    async def slow_once(self: aiohttp.TCPConnector, req: Any, *args: Any, **kwargs: Any) -> Any:
        if req.url.port == port:
            made.append(0.0 if made else HANDSHAKE)
            await asyncio.sleep(made[-1])
        return await create(self, req, *args, **kwargs)

    monkeypatch.setattr(aiohttp.TCPConnector, "_create_connection", slow_once)
    return made


async def test_a_write_cut_off_while_connecting_is_retried_and_applied_once(
        start_sidecar: SidecarFactory, platforms: Platforms, http: aiohttp.ClientSession,
        slow_first_connection: list[float]) -> None:
    """Its per-try timeout (50 ms) comes during the handshake: nothing went out, so the write is retried like a
    refused connection. Before, it counted as a timeout that may have been applied: not retried, and the client
    got 502 "unknown" for a message the platform never had."""
    running = await start_sidecar(retry="{backoff_base: 1ms, backoff_cap: 5ms, per_try_timeout: 50ms}")
    status, body, headers = await post(http, running.base + ASYNCSEND, NOTICE)
    assert (status, body["errcode"]) == (200, 0)
    assert (headers["X-Imsidecar-Outcome"], headers["X-Imsidecar-Attempts"]) == ("applied", "2")
    assert running.metric("imsidecar_upstream_attempts_total", app="ops-ding", upstream="oapi", route=ASYNCSEND_ROUTE,
                          outcome="retryable", reason="connect_timeout") == 1
    await asyncio.sleep(HANDSHAKE)   # the first attempt's connection is made by now: it must not carry the write
    assert len(platforms.dingtalk.sent) == 1 and len(slow_first_connection) == 2


@pytest.mark.parametrize("keyed", [False, True])
async def test_a_write_whose_client_deadline_passes_while_connecting_is_answered_not_applied(
        start_sidecar: SidecarFactory, platforms: Platforms, http: aiohttp.ClientSession,
        slow_first_connection: list[float], keyed: bool) -> None:
    """The client's own deadline (50 ms) comes during the handshake: 504, and `not-applied` (it was `unknown`),
    so the client may send it again; the platform never gets it, not even once connected. Keyed, the key keeps
    nothing: its repeat is executed, once."""
    running = await start_sidecar()
    headers = {"X-Imsidecar-Timeout": "50ms", **(key("notice-connecting") if keyed else {})}
    status, body, answered = await post(http, running.base + ASYNCSEND, NOTICE, headers)
    assert (status, answered["X-Imsidecar-Error"], answered["X-Imsidecar-Outcome"]) == (504, "DeadlineExceeded",
                                                                                     "not-applied")
    await asyncio.sleep(HANDSHAKE)
    assert platforms.dingtalk.sent == []
    status, body, answered = await post(http, running.base + ASYNCSEND, NOTICE, key("notice-connecting") if keyed
                                        else None)
    assert (status, body["errcode"]) == (200, 0) and "X-Imsidecar-Replayed" not in answered
    assert len(platforms.dingtalk.sent) == 1
