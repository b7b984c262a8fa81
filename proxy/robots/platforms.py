"""What differs between a DingTalk and a Feishu group robot: where the signature goes, how answers read, error shapes.

Owns each platform's robot error-code table, size limit, keyword placement and body shapes; it does not send or wait.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.outcome import Outcome, Signal, Verdict
from proxy.robots.errors import BadMessage, TooLarge
from proxy.robots.settings import Platform, RobotTarget
from proxy.robots.signing import sign_dingtalk_url, sign_feishu_body

Message = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Reading:
    """One robot answer, read: what to do (verdict), the platform's code, and for people, the cause."""

    verdict: Verdict
    code: int = 0
    cause: str = ""
    status: int = 400  # the HTTP status a sidecar client gets if this is a permanent refusal


@dataclass(frozen=True, slots=True)
class Rule:
    outcome: Outcome
    cause: str
    status: int = 503
    retry_after: float | None = None


def encode(body: Mapping[str, Any]) -> bytes:
    """The bytes we send: UTF-8 JSON, not \\u-escaped, so the platforms' byte limits count what we counted."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


class RobotPlatform(Protocol):
    name: Platform
    max_bytes: int

    def prepare(self, target: RobotTarget, message: Message, wall: float) -> tuple[str, bytes]: ...
    def read(self, status: int, body: Any) -> Reading: ...
    def validate(self, message: Any) -> Message: ...
    def with_keyword(self, message: Message, keyword: str) -> Message: ...
    def ok_body(self) -> Message: ...
    def error_body(self, code: int, message: str) -> Message: ...


# ----------------------------------------------------------------------------------------------------------------
# DingTalk custom robot: POST /robot/send?access_token=…&timestamp=…&sign=…, answers HTTP 200 {errcode, errmsg}.

SECURITY_CAUSE = ("the robot's security settings refused the message: signature or timestamp (check the secret and "
                  "the clock), keyword missing from the text, or sender IP not allowed")
TOO_FAST = Rule(Outcome.THROTTLED, "the robot sent over 20 messages a minute and is throttled for 10 minutes",
                retry_after=600.0)
DINGTALK_RULES: dict[int, Rule] = {
    -1: Rule(Outcome.RETRYABLE, "DingTalk is busy"),
    410100: TOO_FAST,
    130101: TOO_FAST,
    310000: Rule(Outcome.PERMANENT, SECURITY_CAUSE, 403),
    300001: Rule(Outcome.PERMANENT, "the robot's access_token does not exist (robot deleted or token mistyped)", 403),
    400101: Rule(Outcome.PERMANENT, "the webhook has no access_token", 403),
    400102: Rule(Outcome.PERMANENT, "the robot is disabled in the group's settings", 410),
    400013: Rule(Outcome.PERMANENT, "the group was dissolved", 410),
    460101: Rule(Outcome.PERMANENT, "the message is over DingTalk's 20000-byte limit", 413),
    **{code: Rule(Outcome.PERMANENT, "DingTalk flagged the content as unsafe (links or words it blocks)", 400)
       for code in (430101, 430102, 430103, 430104)},
}
DINGTALK_TEXT_FIELDS = {"text": "content", "markdown": "text", "actionCard": "text", "link": "text"}


class DingTalkRobot:
    name: Platform = "dingtalk"
    max_bytes = 20000

    def prepare(self, target: RobotTarget, message: Message, wall: float) -> tuple[str, bytes]:
        url = target.webhook.reveal()
        if target.secret is not None:
            url = sign_dingtalk_url(url, target.secret.reveal(), wall)
        return url, encode(message)

    def read(self, status: int, body: Any) -> Reading:
        code = _int_code(body, "errcode")  # errcode may arrive as the string "0"
        if code is None:
            return read_http(status, "DingTalk")
        if code == 0:
            return Reading(Verdict(Outcome.SUCCESS, "ok", Signal.OK))
        return _apply(DINGTALK_RULES.get(code), code, str(body.get("errmsg", "")), "errcode", "DingTalk")

    def validate(self, message: Any) -> Message:
        if not isinstance(message, dict) or not isinstance(message.get("msgtype"), str):
            raise BadMessage("a DingTalk robot message is a JSON object with a string msgtype")
        return {k: v for k, v in message.items() if k not in ("timestamp", "sign")}

    def with_keyword(self, message: Message, keyword: str) -> Message:
        """DingTalk keyword security (310000) looks for the keyword in the content: append it where missing."""
        kind = message.get("msgtype", "")
        part, key = message.get(kind), DINGTALK_TEXT_FIELDS.get(kind)
        if not isinstance(part, dict) or key is None or keyword in str(part.get(key, "")):
            return message
        return {**message, kind: {**part, key: f"{part.get(key, '')}\n\n{keyword}".lstrip()}}

    def ok_body(self) -> Message:
        return {"errcode": 0, "errmsg": "ok"}

    def error_body(self, code: int, message: str) -> Message:
        return {"errcode": code, "errmsg": message}


# ----------------------------------------------------------------------------------------------------------------
# Feishu custom bot: POST /open-apis/bot/v2/hook/<token> with timestamp+sign in the body; answers {code, msg}.
# Its rate-limit answer comes with HTTP 400 (ccfos/nightingale#1437: {"code":9499,"msg":"too many request"}).

FEISHU_RULES: dict[int, Rule] = {
    19021: Rule(Outcome.PERMANENT, "signature mismatch or timestamp over an hour off (check the secret and the clock)",
                403),
    19022: Rule(Outcome.PERMANENT, "the sidecar's IP is not in the bot's allow list", 403),
    19024: Rule(Outcome.PERMANENT, "the bot's keyword is missing from the message", 403),
    # A hook token of a Lark group sent to open.feishu.cn (or the reverse) is unknown there, and reads the same.
    19001: Rule(Outcome.PERMANENT, "Feishu rejected the request parameters (is the hook token right? a Lark group's "
                "robot needs platform: lark, a Feishu group's platform: feishu)", 400),
    11232: Rule(Outcome.THROTTLED, "the bot is sending too fast"),
    11233: Rule(Outcome.THROTTLED, "the chat is receiving too fast"),
    11247: Rule(Outcome.THROTTLED, "the bot is sending too fast"),
}
FEISHU_BUSY = Rule(Outcome.THROTTLED, "the bot is sending too fast")
FEISHU_BAD_REQUEST = Rule(Outcome.PERMANENT, "Feishu could not accept the message (malformed or too large)", 400)


class FeishuRobot:
    name: Platform = "feishu"
    max_bytes = 20 * 1024

    def prepare(self, target: RobotTarget, message: Message, wall: float) -> tuple[str, bytes]:
        body = message if target.secret is None else sign_feishu_body(message, target.secret.reveal(), wall)
        return target.webhook.reveal(), encode(body)

    def read(self, status: int, body: Any) -> Reading:
        code = _int_code(body, "code")
        if code is None:
            code = _int_code(body, "StatusCode")  # the bot's older answer shape
        if code is None:
            return read_http(status, "Feishu")
        if code == 0:
            return Reading(Verdict(Outcome.SUCCESS, "ok", Signal.OK))
        msg = str(body.get("msg", ""))
        rule = FEISHU_RULES.get(code)
        if code == 9499:  # one code for both "too many request" and "Bad Request"
            rule = FEISHU_BUSY if "too many" in msg.lower() else FEISHU_BAD_REQUEST
        return _apply(rule, code, msg, "code", "Feishu")

    def validate(self, message: Any) -> Message:
        if not isinstance(message, dict) or not isinstance(message.get("msg_type"), str):
            raise BadMessage("a Feishu bot message is a JSON object with a string msg_type")
        return {k: v for k, v in message.items() if k not in ("timestamp", "sign")}

    def with_keyword(self, message: Message, keyword: str) -> Message:
        """Feishu keyword security (19024): make sure the keyword is in a text, post or card message."""
        kind = message.get("msg_type")
        if kind == "text":
            content = message.get("content") or {}
            text = str(content.get("text", ""))
            return message if keyword in text else {**message, "content": {**content, "text": f"{text}\n{keyword}"}}
        if kind == "interactive" and isinstance(message.get("card"), dict):
            card = message["card"]
            if keyword in json.dumps(card, ensure_ascii=False) or not isinstance(card.get("elements"), list):
                return message
            note = {"tag": "note", "elements": [{"tag": "plain_text", "content": keyword}]}
            return {**message, "card": {**card, "elements": [*card["elements"], note]}}
        return message

    def ok_body(self) -> Message:
        return {"code": 0, "msg": "success"}

    def error_body(self, code: int, message: str) -> Message:
        return {"code": code, "msg": message}


PLATFORMS: dict[Platform, RobotPlatform] = {"dingtalk": DingTalkRobot(), "feishu": FeishuRobot()}
_RETRIED = (Outcome.RETRYABLE, Outcome.THROTTLED)
# The reasons a robot retry can carry that are known up front (metric series at zero): network failures, the
# statuses read_http retries, and each table's retried codes as _apply names them.
RETRY_REASONS = (
    "timeout", "connect_error", "connection_reset", "http_429", "http_500", "http_502", "http_503", "http_504",
    *(f"errcode_{code}" for code, rule in DINGTALK_RULES.items() if rule.outcome in _RETRIED),
    *(f"code_{code}" for code, rule in FEISHU_RULES.items() if rule.outcome in _RETRIED), "code_9499",
)


def check_size(platform: RobotPlatform, body: bytes) -> None:
    """Refuse before spending a rate-limit slot on a message the platform would refuse (460101)."""
    if len(body) > platform.max_bytes:
        raise TooLarge(f"the message is {len(body)} bytes; {platform.name} robots accept at most {platform.max_bytes}")


# ----------------------------------------------------------------------------------------------------------------


def read_http(status: int, who: str) -> Reading:
    """An answer without a platform code: judge by HTTP status alone."""
    if 200 <= status < 300:
        return Reading(Verdict(Outcome.RETRYABLE, f"http_{status}_no_code", Signal.SERVER_ERROR),
                       cause=f"{who} answered HTTP {status} without a result code")
    if status == 429:
        return Reading(Verdict(Outcome.THROTTLED, "http_429", Signal.THROTTLED), cause=f"{who} throttled the robot")
    if status >= 500:
        return Reading(Verdict(Outcome.RETRYABLE, f"http_{status}", Signal.SERVER_ERROR),
                       cause=f"{who} answered HTTP {status}")
    return Reading(Verdict(Outcome.PERMANENT, f"http_{status}", Signal.OK), cause=(
        f"{who} answered HTTP {status}: is the webhook URL right?"), status=400)


def _apply(rule: Rule | None, code: int, platform_msg: str, field: str, who: str) -> Reading:
    shown = f" [{field} {code}: {platform_msg[:200]}]" if platform_msg else f" [{field} {code}]"
    if rule is None:  # an unknown refusal: say so and do not hammer the robot with it
        rule = Rule(Outcome.PERMANENT, f"{who} refused the message", 400)
    signal = Signal.THROTTLED if rule.outcome is Outcome.THROTTLED else (
        Signal.SERVER_ERROR if rule.outcome is Outcome.RETRYABLE else Signal.OK)
    verdict = Verdict(rule.outcome, f"{field}_{code}", signal, processed=False, retry_after=rule.retry_after)
    return Reading(verdict, code, rule.cause + shown, rule.status)


def _int_code(body: Any, key: str) -> int | None:
    if not isinstance(body, dict) or key not in body:
        return None
    try:
        return int(body[key])
    except (TypeError, ValueError):
        return None
