import base64
import json

import pytest

from proxy.events.crypto import (
    BadSignature,
    DingTalkCipher,
    Undecryptable,
    check_dingtalk_signature,
    check_feishu_signature,
    dingtalk_signature,
    feishu_decrypt,
    feishu_encrypt,
    feishu_signature,
)

# Published vectors. Feishu: the decryption example in the open.feishu.cn event docs.
# DingTalk: a getEncryptedMap("success") output with its inputs (o2oa TestMain), and a decrypt test
# from a Deno port of DingTalk-Callback-Crypto.
O2OA = dict(token="o2oa", aes="Nzk5ZjFiODIxMzkyNGMyNWIyMmFiZWZkNjIzNjIxYTg", owner="ding21016b71e78da961",
            ts="1603697312745", nonce="2dffdfdfdf2222",
            encrypt="QH/UQCL7dUGoPQZcBf2H2u/8ImJ+6tjDOSfHle3GmMoG/zopHbD8JpXVCBFGSUFmQ3bWXIuzwyXAZCeS2kptmA==",
            signature="502b261eda47a212db163c91322f7ddecb2e99cc")


def test_feishu_decrypts_the_documented_example():
    assert feishu_decrypt("test key", "P37w+VZImNgPEO1RBhJ6RtKl7n6zymIbEG1pReEzghk=") == b"hello world"


def test_feishu_decrypt_matches_the_official_sdk():
    from lark_oapi.core.utils.decryptor import AESCipher

    ours = feishu_encrypt("k3y", json.dumps({"challenge": "c"}).encode(), iv=bytes(range(16)))
    assert AESCipher("k3y").decrypt_str(ours) == '{"challenge": "c"}'


def test_feishu_signature_is_hex_sha256_of_the_concatenation():
    import hashlib

    body = b'{"encrypt":"x"}'
    assert feishu_signature("1700000000", "n", "key", body) == hashlib.sha256(b"1700000000nkey" + body).hexdigest()
    check_feishu_signature("1700000000", "n", "key", body, feishu_signature("1700000000", "n", "key", body))
    with pytest.raises(BadSignature):
        check_feishu_signature("1700000000", "n", "key", body + b" ", feishu_signature("1700000000", "n", "key", body))


@pytest.mark.parametrize("blob", ["not base64!!", base64.b64encode(b"short").decode(),
                                  base64.b64encode(bytes(48)).decode()])
def test_feishu_garbage_is_undecryptable_not_a_crash(blob):
    with pytest.raises(Undecryptable):
        feishu_decrypt("test key", blob)


def test_feishu_wrong_key_is_undecryptable():
    blob = feishu_encrypt("right", b'{"a": 1}', iv=bytes(16))
    with pytest.raises(Undecryptable):
        feishu_decrypt("wrong", blob)


def test_dingtalk_signature_matches_published_vector():
    assert dingtalk_signature(O2OA["token"], O2OA["ts"], O2OA["nonce"], O2OA["encrypt"]) == O2OA["signature"]
    with pytest.raises(BadSignature):
        check_dingtalk_signature(O2OA["token"], O2OA["ts"], "other", O2OA["encrypt"], O2OA["signature"])


def test_dingtalk_decrypts_published_vectors():
    assert DingTalkCipher(O2OA["aes"]).decrypt(O2OA["encrypt"]) == (b"success", O2OA["owner"])
    deno = DingTalkCipher("aaabWe22zMdfpVVF6kFsZ9E4ODL1wjjykB5ifzjLzzz")
    blob = "cKVPF3fvpb646ZnKPbYn/bhwggCKWyF+4H4aqPLqmhD1wT7TKRRjHaRJs9/KcAK2oiiCeYS6FV30KJQoKDFmqg=="
    assert deno.decrypt(blob) == ("中文测试".encode(), "dingn4jxcg1w9jy9exxx")


def test_dingtalk_round_trip_pads_to_32_byte_blocks():
    cipher = DingTalkCipher(O2OA["aes"])
    for size in (0, 1, 11, 12, 43, 44, 200):
        msg = b"x" * size
        blob = cipher.encrypt(msg, "dingapp", random16=b"r" * 16)
        assert len(base64.b64decode(blob)) % 32 == 0
        assert cipher.decrypt(blob) == (msg, "dingapp")


def test_dingtalk_wrong_key_is_undecryptable():
    blob = DingTalkCipher(O2OA["aes"]).encrypt(b"{}", "ding", random16=bytes(16))
    with pytest.raises(Undecryptable):
        DingTalkCipher("aaabWe22zMdfpVVF6kFsZ9E4ODL1wjjykB5ifzjLzzz").decrypt(blob)


def test_dingtalk_key_must_be_43_chars():
    with pytest.raises(ValueError):
        DingTalkCipher("short")
    assert "Nzk5" not in repr(DingTalkCipher(O2OA["aes"]))
