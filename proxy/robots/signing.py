"""Group-robot webhook signatures for DingTalk and Feishu: pure functions of secret and time.

Owns the two HMAC recipes and where each platform expects the result; it does not read clocks or send anything.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from urllib.parse import quote_plus, urlsplit, urlunsplit


def dingtalk_sign(secret: str, timestamp_ms: int) -> str:
    """DingTalk: base64(HMAC-SHA256(key=secret, msg=f"{timestamp_ms}\\n{secret}")), before URL-encoding.

    The platform rejects a timestamp more than an hour from its own clock (errcode 310000).
    """
    message = f"{timestamp_ms}\n{secret}".encode()
    digest = hmac.new(secret.encode(), message, hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def feishu_sign(secret: str, timestamp_s: int) -> str:
    """Feishu custom bot: base64(HMAC-SHA256(key=f"{timestamp_s}\\n{secret}", msg=b"")).

    Unusually the string-to-sign is the *key* and the message is empty; seconds, not milliseconds (19021 if wrong).
    """
    key = f"{timestamp_s}\n{secret}".encode()
    digest = hmac.new(key, b"", hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def sign_dingtalk_url(url: str, secret: str, wall: float) -> str:
    """The webhook URL with `timestamp` (ms) and the URL-encoded `sign` appended to its query."""
    timestamp_ms = int(wall * 1000)
    signature = quote_plus(dingtalk_sign(secret, timestamp_ms))
    parts = urlsplit(url)
    extra = f"timestamp={timestamp_ms}&sign={signature}"
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit(parts._replace(query=query))


def sign_feishu_body(body: dict[str, object], secret: str, wall: float) -> dict[str, object]:
    """A copy of the JSON body with `timestamp` (seconds, as a string like the official examples) and `sign`."""
    timestamp_s = int(wall)
    return {**body, "timestamp": str(timestamp_s), "sign": feishu_sign(secret, timestamp_s)}


def signatures_match(expected: str, given: str) -> bool:
    """Constant-time comparison, for the fake servers' checks."""
    return hmac.compare_digest(expected.encode(), given.encode())
