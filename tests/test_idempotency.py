"""Idempotency keys: added once when the client sent none, kept when it did, the client's Idempotency-Key mapped to
the platform's, and never forced into a body that cannot be keyed faithfully."""

from __future__ import annotations

import json
import uuid

import pytest

from proxy.idempotency import KeyProblem, apply_key, client_key, platform_key
from proxy.platforms.base import KeySpot

QUERY = KeySpot("query", "client_token")
BODY = KeySpot("body", "uuid")


def test_query_key_is_added_and_the_rest_kept() -> None:
    keyed = apply_key(QUERY, "user_id_type=open_id", b"{}", add=True, new_key=lambda: "k-1")
    assert keyed.query == "user_id_type=open_id&client_token=k-1" and keyed.added and keyed.has_key


def test_client_key_wins() -> None:
    keyed = apply_key(QUERY, "client_token=mine", None, add=True, new_key=lambda: "k-1")
    assert keyed.query == "client_token=mine" and keyed.has_key and not keyed.added
    keyed = apply_key(BODY, "", b'{"uuid":"mine","msg_type":"text"}', add=True, new_key=lambda: "k-1")
    assert json.loads(keyed.body or b"")["uuid"] == "mine" and not keyed.added


def test_body_key_is_added_to_a_json_object() -> None:
    keyed = apply_key(BODY, "", '{"msg_type":"text","content":"中文"}'.encode(), add=True, new_key=lambda: "k-2")
    assert json.loads(keyed.body or b"") == {"msg_type": "text", "content": "中文", "uuid": "k-2"}


def test_non_json_body_is_left_alone_and_has_no_key() -> None:
    keyed = apply_key(BODY, "", b"not json", add=True)
    assert keyed.body == b"not json" and not keyed.has_key


def test_switched_off_adds_nothing() -> None:
    keyed = apply_key(QUERY, "", b"{}", add=False)
    assert keyed.query == "" and not keyed.has_key


# Faithful bodies: the key goes in as text, and a body that cannot be handled faithfully is not touched ----------


def test_the_key_is_inserted_without_reformatting_the_rest() -> None:
    body = '{ "msg_type" : "text",\n  "content": "{\\"text\\":\\"\\u4e2d\\"}",  "n": 1.50 }'.encode()
    keyed = apply_key(BODY, "", body, add=True, new_key=lambda: "k-3")
    assert keyed.body == b'{"uuid":"k-3", "msg_type" : "text",\n  "content": "{\\"text\\":\\"\\u4e2d\\"}",  "n": 1.50 }'
    assert apply_key(BODY, "", b"{}", add=True, new_key=lambda: "k-4").body == b'{"uuid":"k-4"}'


def test_an_empty_key_is_replaced_in_place_never_added_beside() -> None:
    keyed = apply_key(BODY, "", b'{"uuid": "", "msg_type":"text"}', add=True, new_key=lambda: "k-5")
    assert keyed.body == b'{"uuid": "k-5", "msg_type":"text"}' and keyed.key == "k-5"
    assert apply_key(BODY, "", b'{"uuid":null}', add=True, new_key=lambda: "k-6").body == b'{"uuid":"k-6"}'
    keyed = apply_key(QUERY, "client_token=&page_size=10&client_token", None, add=True, new_key=lambda: "k-7")
    assert keyed.query == "page_size=10&client_token=k-7"


@pytest.mark.parametrize("body", [
    b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}",   # deeper than any parser here can follow
    b'{"a": 1e400}',                               # no platform reads it as a number (Python would say Infinity)
    b'{"a": NaN}', b'{"a": Infinity}',             # not JSON at all
    b'{"a": ' + b"9" * 5000 + b"}",                # past Python's int digits limit
    b'{"uuid": "x", "uuid": ""}',                  # which one would the platform read?
    b'{"a": 1} trailing', b"[1, 2]", b'"text"', b"\xff\xfe{}",
    b'{"uuid": 42}',                               # a key field that is not a string: the client's business
])
def test_a_body_that_cannot_be_keyed_faithfully_goes_out_unchanged_and_unkeyed(body: bytes) -> None:
    keyed = apply_key(BODY, "", body, add=True, new_key=lambda: "k-8")
    assert keyed.body == body and not keyed.has_key and not keyed.added


# The client's own key: Idempotency-Key, mapped to the platform's ---------------------------------------------


def test_the_idempotency_key_header_is_an_sf_string_or_a_bare_token() -> None:
    assert client_key({"Idempotency-Key": '"8e03978e-40d5-43e8-bc93-6894a57f9324"'}) == \
        "8e03978e-40d5-43e8-bc93-6894a57f9324"
    assert client_key({"Idempotency-Key": '"sync \\"7\\" batch"'}) == 'sync "7" batch'
    assert client_key({"Idempotency-Key": "nightly-2024-05-01-batch-7"}) == "nightly-2024-05-01-batch-7"
    assert client_key({}) is None
    for bad in ('""', "", '"unterminated', "two words", '"a\\nb"', '"' + "x" * 300 + '"', '"caf\u00e9"'):
        with pytest.raises(KeyProblem):
            client_key({"Idempotency-Key": bad})


def test_the_clients_key_maps_to_the_same_platform_key_every_time() -> None:
    uuid_key = "8e03978e-40d5-43e8-bc93-6894a57f9324"
    assert platform_key(uuid_key) == uuid_key                  # already what the platform takes
    assert platform_key("batch-7") == platform_key("batch-7") != platform_key("batch-8")
    assert str(uuid.UUID(platform_key("batch-7"))) == platform_key("batch-7")
    keyed = apply_key(QUERY, "x=1", b"{}", add=True, client="batch-7")
    assert keyed.query == f"x=1&client_token={platform_key('batch-7')}" and keyed.key == "batch-7" and keyed.added
    keyed = apply_key(BODY, "", b'{"msg_type":"text"}', add=True, client=uuid_key)
    assert json.loads(keyed.body or b"")["uuid"] == uuid_key


def test_the_clients_key_is_used_even_when_the_sidecar_adds_none() -> None:
    keyed = apply_key(QUERY, "", b"{}", add=False, client="batch-9")
    assert keyed.query == f"client_token={platform_key('batch-9')}"


def test_a_header_key_that_disagrees_with_the_requests_own_key_is_refused() -> None:
    with pytest.raises(KeyProblem, match="disagree"):
        apply_key(QUERY, "client_token=other", b"{}", add=True, client="batch-7")
    agreeing = apply_key(QUERY, f"client_token={platform_key('batch-7')}", b"{}", add=True, client="batch-7")
    assert not agreeing.added and agreeing.key == "batch-7"
