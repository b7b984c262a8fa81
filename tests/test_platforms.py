"""Classification tables per platform: what each answer means for retries, tokens and safety."""

from __future__ import annotations

import json

import pytest

from proxy import config
from proxy.outcome import Outcome, Signal
from proxy.platforms import platform_for
from proxy.platforms.base import parse_retry_after, with_query_param

APPS = config.loads("""
apps:
  - {name: f, platform: feishu, app_id: i, app_secret: s, codes: {retryable: ["123456"]}}
  - {name: d, platform: dingtalk, app_key: k, app_secret: s, codes: {throttled: ["777"]}}
""", env={}).apps
FEISHU, DING = platform_for(APPS[0]), platform_for(APPS[1])


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


@pytest.mark.parametrize("status, headers, payload, outcome, processed, retry_after", [
    (200, {}, b'{"code":0,"msg":"success","data":{}}', Outcome.SUCCESS, True, None),
    (200, {}, body(msg="ok", code=0), Outcome.SUCCESS, True, None),
    (400, {}, body(code=99991663, msg="Invalid access token"), Outcome.TOKEN_INVALID, False, None),
    (400, {}, body(code=99991664, msg="app token invalid"), Outcome.TOKEN_INVALID, False, None),
    (400, {}, body(code=99991671, msg="bad format"), Outcome.TOKEN_INVALID, False, None),
    (429, {"x-ogw-ratelimit-reset": "3"}, body(code=99991400, msg="limit"), Outcome.THROTTLED, False, 3.0),
    (400, {}, body(code=99991400, msg="limit on an old API"), Outcome.THROTTLED, False, None),
    (200, {}, body(code=11232, msg="message rate"), Outcome.THROTTLED, False, None),
    (200, {}, body(code=1254290, msg="TooManyRequest"), Outcome.THROTTLED, False, None),
    (200, {}, body(code=1254607, msg="Data not ready"), Outcome.RETRYABLE, False, None),
    (200, {}, body(code=1254291, msg="Write conflict"), Outcome.RETRYABLE, False, None),
    (500, {}, body(code=1500, msg="internal error"), Outcome.RETRYABLE, True, None),
    (200, {}, body(code=18121, msg="still processing"), Outcome.RETRYABLE, True, None),
    (400, {}, body(code=99991672, msg="scope missing"), Outcome.PERMANENT, True, None),
    (403, {}, body(code=99991401, msg="IP not allowed"), Outcome.PERMANENT, True, None),
    (400, {}, body(code=99991403, msg="monthly quota"), Outcome.PERMANENT, True, None),
    (400, {}, body(code=99991668, msg="user token invalid"), Outcome.PERMANENT, True, None),
    (200, {}, body(code=123456, msg="operator says retry"), Outcome.RETRYABLE, True, None),
    (503, {"Retry-After": "2"}, b"<html>503 Service Unavailable</html>", Outcome.RETRYABLE, False, 2.0),
    (502, {}, b"<html>Bad Gateway</html>", Outcome.RETRYABLE, True, None),
    (504, {}, b"", Outcome.RETRYABLE, True, None),
    (404, {}, b"<html>not found</html>", Outcome.PERMANENT, True, None),
    (200, {"Content-Type": "application/octet-stream"}, None, Outcome.SUCCESS, True, None),
])
def test_feishu_table(status: int, headers: dict[str, str], payload: bytes | None, outcome: Outcome,
                      processed: bool, retry_after: float | None) -> None:
    verdict = FEISHU.classify("open", status, headers, payload)
    assert (verdict.outcome, verdict.processed, verdict.retry_after) == (outcome, processed, retry_after)


@pytest.mark.parametrize("upstream, status, payload, outcome, processed, retry_after", [
    ("oapi", 200, body(errcode=0, errmsg="ok"), Outcome.SUCCESS, True, None),
    ("oapi", 200, body(errcode="0", errmsg="ok"), Outcome.SUCCESS, True, None),   # errcode as a string
    ("oapi", 200, body(errcode=40014, errmsg="不合法的access_token"), Outcome.TOKEN_INVALID, False, None),
    ("oapi", 200, body(errcode="42001", errmsg="expired"), Outcome.TOKEN_INVALID, False, None),
    ("oapi", 200, body(errcode=33001, errmsg="无效的企业"), Outcome.TOKEN_INVALID, False, None),
    ("oapi", 200, body(errcode=90018, errmsg="QPS"), Outcome.THROTTLED, False, 1.0),   # the one-second rule
    ("oapi", 200, body(errcode=90002, errmsg="global QPS"), Outcome.THROTTLED, False, None),
    ("oapi", 200, body(errcode=45009, errmsg="limit"), Outcome.THROTTLED, False, None),
    ("oapi", 200, body(errcode=-1, errmsg="系统繁忙"), Outcome.RETRYABLE, False, None),
    ("oapi", 200, body(errcode=88, errmsg="auth timeout", sub_code=""), Outcome.RETRYABLE, False, None),
    ("oapi", 200, body(errcode=15, errmsg="remote", sub_code="isp.top-remote-connection-timeout"),
     Outcome.RETRYABLE, True, None),
    ("oapi", 200, body(errcode=90020, errmsg="monthly quota"), Outcome.PERMANENT, True, None),
    ("oapi", 200, body(errcode=60011, errmsg="no permission"), Outcome.PERMANENT, True, None),
    ("oapi", 200, body(errcode=90006, errmsg="banned for minutes"), Outcome.PERMANENT, True, None),
    ("oapi", 200, body(errcode=777, errmsg="operator says throttled"), Outcome.THROTTLED, False, None),
    ("oapi", 502, b"<html>502 Bad Gateway</html>", Outcome.RETRYABLE, True, None),
    ("api", 200, body(result=True), Outcome.SUCCESS, True, None),
    ("api", 401, body(code="InvalidAuthentication", message="x"), Outcome.TOKEN_INVALID, False, None),
    ("api", 400, body(code="InvalidAuthentication", message="x"), Outcome.TOKEN_INVALID, False, None),
    ("api", 403, body(code="Forbidden.AccessDenied.QpsLimitForAppkeyAndApi", message="x"), Outcome.THROTTLED, False, 1.0),
    ("api", 403, body(code="Forbidden.AccessDenied.QpmLimitForAppkeyAndApi", message="x"), Outcome.THROTTLED, False, None),
    ("api", 429, body(code="system.busy", message="x"), Outcome.THROTTLED, False, None),
    ("api", 403, body(code="Forbidden.AccessDenied.IpNotInWhiteList", message="x"), Outcome.PERMANENT, True, None),
    ("api", 403, body(code="Forbidden.AccessDenied.AccessTokenPermissionDenied", message="x"), Outcome.PERMANENT, True, None),
    ("api", 500, body(code="systemError", message="x"), Outcome.RETRYABLE, True, None),
    ("api", 503, body(code="ServiceUnavailable", message="x"), Outcome.RETRYABLE, False, None),
    ("api", 400, body(code="paramError", message="x"), Outcome.PERMANENT, True, None),
    ("api", 403, body(status=1111, wait=5), Outcome.THROTTLED, False, 5.0),
])
def test_dingtalk_table(upstream: str, status: int, payload: bytes, outcome: Outcome, processed: bool,
                        retry_after: float | None) -> None:
    verdict = DING.classify(upstream, status, {}, payload)
    assert (verdict.outcome, verdict.processed, verdict.retry_after) == (outcome, processed, retry_after)


def test_reasons_are_bounded_labels() -> None:
    odd = DING.classify("api", 418, {}, body(code="some.Random.Code-" + "x" * 50, message="?"))
    assert odd.reason == "http_other"
    assert FEISHU.classify("open", 599, {}, b"").reason == "http_5xx"


def test_temporary_bans_tell_the_network_monitor_about_throttling() -> None:
    assert DING.classify("oapi", 200, {}, body(errcode=90006, errmsg="ban")).signal is Signal.THROTTLED


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now_wall=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_token_goes_where_each_platform_wants_it() -> None:
    from multidict import CIMultiDict

    headers: CIMultiDict[str] = CIMultiDict()
    assert DING.attach_token("oapi", headers, "a=1&access_token=old&b=2", "NEW") == "a=1&b=2&access_token=NEW"
    assert DING.attach_token("api", headers, "a=1", "NEW") == "a=1" and headers["x-acs-dingtalk-access-token"] == "NEW"
    FEISHU.attach_token("open", headers, "", "t-1")
    assert headers["Authorization"] == "Bearer t-1"
    assert with_query_param("", "k", "v/1") == "k=v%2F1"


@pytest.mark.parametrize(("code", "msg", "says"), [
    (10014, "app id not exists", "app_id i is not an app of Feishu (code 10014: app id not exists); if it was "
                                 "created on Lark (open.larksuite.com), set platform: lark"),
    (1000040351, "Incorrect domain name", "set platform: lark"),
    (10014, "app secret invalid", "app_id or app_secret rejected (code 10014: app secret invalid)"),
])
def test_a_token_refusal_says_when_the_app_belongs_to_the_other_brand(code: int, msg: str, says: str) -> None:
    from proxy.platforms.base import TokenFetchError

    with pytest.raises(TokenFetchError) as refused:
        FEISHU.parse_token("tenant", 200, body(code=code, msg=msg))
    assert says in str(refused.value) and refused.value.permanent
