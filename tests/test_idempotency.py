"""Idempotency keys: added once when the client sent none, kept when it did, never forced into a non-JSON body."""

from __future__ import annotations

import json

from proxy.idempotency import apply_key
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
