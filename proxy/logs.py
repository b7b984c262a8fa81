"""Logging set-up: text or JSON lines, one access line per request, and a last-line guard against secrets.

Owns formatting, the redaction filter and the access log's writer; what gets logged is decided where it happens
(never a raw query or token).
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any, Mapping, TextIO

from proxy import codec
from proxy.config import LogSettings

ACCESS_FIELDS = ("app", "upstream", "route", "method", "status", "outcome", "attempts", "duration_ms",
                 "retry_reasons")
# Belt and braces: the code never logs these, but a library's message might carry one.
_REDACT = re.compile(r"(access_token=|Bearer |x-acs-dingtalk-access-token[\"']?:\s*[\"']?|\"?app_?[sS]ecret\"?[:=]\s*\"?)([^&\s\"',]+)")


# Every match of _REDACT holds one of these: a line without any is returned as it is, without the regex's scan
# (3 us on an access line, which never holds one).
_MARKERS = ("access_token=", "Bearer ", "x-acs-dingtalk-access-token", "ecret")


def redact(text: str) -> str:
    if not any(map(text.__contains__, _MARKERS)):   # no generator's frame: 0.5 us a line, from 0.8
        return text
    return _REDACT.sub(lambda m: m.group(1) + "****", text)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None   # formatted once: the formatter reads it again
        return True


class JsonFormatter(logging.Formatter):
    _second, _stamp = -1, ""   # the time field of the second being logged, formatted once (one line per request)

    def format(self, record: logging.LogRecord) -> str:
        attributes = record.__dict__   # whichever ACCESS_FIELDS the record was given (`extra`), among its own
        fields = {key: attributes[key] for key in ACCESS_FIELDS if key in attributes}
        line = self.line(record.created, record.levelname, record.name, record.getMessage(), fields)
        if record.exc_info:
            line["error"] = redact(self.formatException(record.exc_info))
        return codec.dumps(line)

    def line(self, created: float, level: str, logger: str, message: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Every JSON line's shape: when, how bad, whose, the message, then `fields` (of ACCESS_FIELDS, in order)."""
        return {"time": self.stamp(created), "level": level, "logger": logger, "message": message, **fields}

    def stamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(created))
        return self._stamp


class AccessLog:
    """The access line of every request: a `logging` record of `imsidecar.access` (what tests capture and what a
    program embedding the sidecar configures), or, once `configure` set up JSON lines, the same line written
    straight to the log's stream, without a LogRecord, the handler's lock and the filter chain: 25 us a line
    through `logging`, ~6 directly (redacted all the same)."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._direct: tuple[TextIO, JsonFormatter] | None = None

    @property
    def enabled(self) -> bool:
        return self._logger.isEnabledFor(logging.INFO)

    def write(self, message: str, fields: dict[str, Any]) -> None:
        """One line: `message` for people, `fields` (of ACCESS_FIELDS, in their order) for machines."""
        if self._direct is None:
            self._logger.info("%s", message, extra=fields)
            return
        stream, formatter = self._direct
        line = formatter.line(time.time(), "INFO", self._logger.name, redact(message), fields)
        stream.write(codec.dumps(line) + "\n")

    def write_to(self, stream: TextIO | None, formatter: JsonFormatter | None = None) -> None:
        """Write JSON lines straight to `stream` from now on (None: through `logging` again)."""
        self._direct = (stream, formatter) if stream is not None and formatter is not None else None


access = AccessLog(logging.getLogger("imsidecar.access"))


def configure(settings: LogSettings) -> None:
    # What no format of ours prints, and logging works out for every record (the Logging HOWTO's "Optimization"):
    # the calling frame's file and line (a stack walk), the thread, the process. A JSON access line cost 52 us, 40
    # with these off and the formatter's own savings (a text line 36, 30).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    if settings.format == "json":
        formatter = JsonFormatter()
        handler.setFormatter(formatter)
        access.write_to(sys.stderr, formatter)   # the handler's stream: the lines stay in order
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        access.write_to(None)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    logging.getLogger("imsidecar.access").disabled = not settings.access_log
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
