"""Known vectors computed independently with `openssl dgst -sha256 -hmac`, not with the code under test."""

from urllib.parse import parse_qs, urlsplit

from proxy.robots.signing import dingtalk_sign, feishu_sign, sign_dingtalk_url, sign_feishu_body

DT_SECRET = "SEC" + "0" * 64
DT_TS = 1_700_000_000_000
# printf '%s\n%s' 1700000000000 SEC000... | openssl dgst -sha256 -hmac SEC000... -binary | base64
DT_SIGN = "+8WOOUUcTkFRyfCevQaISh9EUbkxaatnd6MLtL7dAY8="
FS_SECRET = "fs-secret-abc"
FS_TS = 1_700_000_000
# printf '' | openssl dgst -sha256 -hmac "$(printf '%s\n%s' 1700000000 fs-secret-abc)" -binary | base64
FS_SIGN = "uhsN/f6JPS/5w0mzUleUD3tVP+KGlE6FOGwTSbxPZG4="


def test_dingtalk_sign_matches_the_documented_recipe():
    assert dingtalk_sign(DT_SECRET, DT_TS) == DT_SIGN
    assert dingtalk_sign("this is secret", 1577262236757) == "hmPWwU+7lVdm3ZZz0r9tSfx0L4Q26jWOZr9+Gs6EZQM="


def test_feishu_sign_uses_the_string_as_key_and_an_empty_message():
    assert feishu_sign(FS_SECRET, FS_TS) == FS_SIGN


def test_dingtalk_url_carries_millisecond_timestamp_and_url_encoded_sign():
    url = sign_dingtalk_url("https://oapi.dingtalk.com/robot/send?access_token=abc", DT_SECRET, DT_TS / 1000)
    assert url.endswith("&timestamp=1700000000000&sign=%2B8WOOUUcTkFRyfCevQaISh9EUbkxaatnd6MLtL7dAY8%3D")
    query = parse_qs(urlsplit(url).query)
    assert query == {"access_token": ["abc"], "timestamp": [str(DT_TS)], "sign": [DT_SIGN]}


def test_feishu_body_carries_second_timestamp_and_sign_and_keeps_the_message():
    body = sign_feishu_body({"msg_type": "text", "content": {"text": "hi"}}, FS_SECRET, FS_TS + 0.9)
    assert body == {"msg_type": "text", "content": {"text": "hi"}, "timestamp": str(FS_TS), "sign": FS_SIGN}
