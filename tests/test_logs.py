"""Log lines: redaction, and the access line written straight to the stream is the line `logging` would write."""

from __future__ import annotations

import io
import json
import logging
import sys
from contextlib import contextmanager
from typing import Iterator

import aiohttp
import pytest
from hypothesis import given, settings, strategies as st

from proxy import logs
from proxy.config import LogSettings
from tests.conftest import SidecarFactory
from tests.test_hostile import HOSTILE_TARGETS, exchange

FIELDS = {"app": "sales-bot", "upstream": "open", "route": "/open-apis/im/v1/messages/:message_id", "method": "GET",
          "status": 200, "outcome": "success", "attempts": 1, "duration_ms": 0.5, "retry_reasons": ["http_503"]}


def regex_only(text: str) -> str:
    return logs._REDACT.sub(lambda m: m.group(1) + "****", text)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(["access_token=", "Bearer ", "x-acs-dingtalk-access-token", "\"app_secret\":",
                                 "appSecret=", "app_Secret", "secret", "token", "t-abc", " ", "&", "\"", "'", ":",
                                 "=", "é", "x"]), max_size=12).map("".join))
def test_the_marker_check_redacts_exactly_what_the_regex_does(text: str) -> None:
    assert logs.redact(text) == regex_only(text)


@contextmanager
def configured(monkeypatch: pytest.MonkeyPatch, *, access_log: bool) -> Iterator[io.StringIO]:
    """`logs.configure` for JSON lines into a string, as the sidecar's run does into stderr; undone after."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    logs.configure(LogSettings(format="json", access_log=access_log, level="INFO"))
    try:
        yield stream
    finally:
        logs.access.write_to(None)
        logging.getLogger("imsidecar.access").disabled = False
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.fixture
def json_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    with configured(monkeypatch, access_log=True) as stream:
        yield stream


def test_a_direct_access_line_is_the_line_logging_writes(json_logs: io.StringIO) -> None:
    logs.access.write("sales-bot open GET /x 200 attempts=1 0.5ms", dict(FIELDS))
    logs.access.write_to(None)   # the same line through logging, its handler and formatter
    logs.access.write("sales-bot open GET /x 200 attempts=1 0.5ms", dict(FIELDS))
    direct, through_logging = (json.loads(line) for line in json_logs.getvalue().splitlines())
    assert direct == through_logging
    assert list(direct) == ["time", "level", "logger", "message", *logs.ACCESS_FIELDS]
    assert direct["logger"] == "imsidecar.access" and direct["retry_reasons"] == ["http_503"]


def test_a_direct_access_line_is_redacted_and_in_order_with_other_lines(json_logs: io.StringIO) -> None:
    logging.getLogger("imsidecar").warning("before")
    logs.access.write("GET /x?access_token=t-stolen Bearer t-stolen2 200", dict(FIELDS))
    logging.getLogger("imsidecar").warning("after")
    lines = [json.loads(line) for line in json_logs.getvalue().splitlines()]
    assert [line["message"] for line in lines] == ["before", "GET /x?access_token=**** Bearer **** 200", "after"]
    assert "t-stolen" not in json_logs.getvalue()


def test_no_access_line_when_the_access_log_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    with configured(monkeypatch, access_log=False):
        assert not logs.access.enabled


async def test_the_pipeline_gives_the_access_line_access_fields_only_and_in_their_order(
        start_sidecar: SidecarFactory, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> None:
    """The direct JSON line takes the fields as given (no picking them out, as from a LogRecord): what the
    pipeline passes, for a forwarded request and for a target refused before any app is known, must already be
    ACCESS_FIELDS, in their order."""
    seen: list[list[str]] = []
    monkeypatch.setattr(logs.access, "write", lambda message, fields: seen.append(list(fields)))
    monkeypatch.setattr(logs.AccessLog, "enabled", property(lambda self: True))
    running = await start_sidecar()
    async with http.get(f"{running.base}/sales-bot/open-apis/contact/v3/users/ou_1") as r:
        await r.read()
    status, _, _ = await exchange(running.base, HOSTILE_TARGETS[0])   # refused before any app can be told
    assert status == 400
    assert len(seen) == 2
    for keys in seen:
        assert keys == [key for key in logs.ACCESS_FIELDS if key in keys]
