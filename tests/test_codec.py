"""The hot path's JSON codec (proxy/codec.py) gives what the standard library gives, whichever codec runs."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from proxy import codec
from proxy.platforms.base import dump, load_json

# What the sidecar writes and reads: string keys; strings (any code point but lone surrogates), whole numbers
# within 64 bits, booleans, None, lists and objects of them.
_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
_scalars = st.one_of(_text, st.integers(-(2 ** 63), 2 ** 63 - 1), st.booleans(), st.none())
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(_text, inner, max_size=4)), max_leaves=12)


def stdlib_bytes(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_text, _values, max_size=6))
def test_bodies_are_the_bytes_the_standard_library_writes(value: dict[str, Any]) -> None:
    assert codec.orjson is not None   # the `test` extra has it: this compares the two
    assert codec.dumps_bytes(value) == stdlib_bytes(value)
    assert codec._std_dumps(value) == stdlib_bytes(value)   # the codec without orjson
    assert dump(value) == stdlib_bytes(value)
    assert codec.dumps(value) == stdlib_bytes(value).decode()


@settings(max_examples=300, deadline=None)
@given(_values)
def test_documents_read_as_the_standard_library_reads_them(value: Any) -> None:
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False, indent=1)):
        assert codec.loads(text.encode()) == json.loads(text)
        assert codec.loads(text) == json.loads(text)
        assert codec._std_loads(text.encode()) == json.loads(text)


@pytest.mark.parametrize("document, value", [
    (b'\xef\xbb\xbf{"code":0}', {"code": 0}),        # a byte-order mark: orjson refuses it, the platform's answer stands
    (b'{"code":0,"ratio":NaN}', None),                # NaN: json's own reading
    (b'{"code": 0}  \n', {"code": 0}),
])
def test_what_one_codec_refuses_the_other_still_reads(document: bytes, value: Any) -> None:
    read = codec.loads(document)
    assert read == json.loads(document) if value is None else read == value


@pytest.mark.parametrize("document", [b'{"code":0', b'{"msg":"\xff"}', b"", b'{"a":1} trailing', b"\x00"])
def test_what_is_not_json_is_a_value_error_and_no_classification(document: bytes) -> None:
    with pytest.raises(ValueError):
        codec.loads(document)
    assert load_json(document) is None


def test_keys_that_are_not_strings_are_written_as_the_standard_library_writes_them() -> None:
    assert codec.dumps_bytes({1: "a", "b": [1, 2]}) == stdlib_bytes({1: "a", "b": [1, 2]})
