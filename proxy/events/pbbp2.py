"""A tiny protobuf codec for exactly one message: Feishu's long-connection `pbbp2.Frame` (and its `Header`).

Owns the wire format of that frame (field numbers as in lark-oapi's ws/pb/pbbp2.proto); it is not a general
protobuf library and does not know what frames mean.

    message Header { required string key = 1; required string value = 2; }
    message Frame  { required uint64 SeqID = 1; required uint64 LogID = 2; required int32 service = 3;
                     required int32 method = 4; repeated Header headers = 5; optional string payload_encoding = 6;
                     optional string payload_type = 7; optional bytes payload = 8; optional string LogIDNew = 9; }
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5

METHOD_CONTROL = 0
METHOD_DATA = 1


class FrameError(ValueError):
    """The bytes are not a well-formed Frame."""


@dataclass(frozen=True, slots=True)
class Frame:
    seq_id: int = 0
    log_id: int = 0
    service: int = 0
    method: int = METHOD_CONTROL
    headers: tuple[tuple[str, str], ...] = ()
    payload_encoding: str = ""
    payload_type: str = ""
    payload: bytes = b""
    log_id_new: str = ""
    _extra: bytes = field(default=b"", repr=False)   # unknown fields, kept so a response echoes them

    def header(self, key: str, default: str = "") -> str:
        for k, v in self.headers:
            if k == key:
                return v
        return default

    def with_header(self, key: str, value: str) -> Frame:
        return replace(self, headers=(*self.headers, (key, value)))


# ---- encoding ------------------------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1   # int32/int64 negatives are sent as 10-byte two's complement, as protobuf does
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _len_field(number: int, data: bytes) -> bytes:
    return _key(number, _LEN) + _varint(len(data)) + data


def _header(key: str, value: str) -> bytes:
    return _len_field(1, key.encode()) + _len_field(2, value.encode())


def encode_frame(frame: Frame) -> bytes:
    parts = [_key(1, _VARINT) + _varint(frame.seq_id), _key(2, _VARINT) + _varint(frame.log_id),
             _key(3, _VARINT) + _varint(frame.service), _key(4, _VARINT) + _varint(frame.method)]
    parts += [_len_field(5, _header(k, v)) for k, v in frame.headers]
    if frame.payload_encoding:
        parts.append(_len_field(6, frame.payload_encoding.encode()))
    if frame.payload_type:
        parts.append(_len_field(7, frame.payload_type.encode()))
    if frame.payload:
        parts.append(_len_field(8, frame.payload))
    if frame.log_id_new:
        parts.append(_len_field(9, frame.log_id_new.encode()))
    return b"".join(parts) + frame._extra


# ---- decoding ------------------------------------------------------------------------------------------------


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise FrameError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, int, Any, bytes]]:
    """Yield (number, wire type, value, raw bytes of the field) for each field in `data`."""
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        value: Any
        if wire == _VARINT:
            value, pos = _read_varint(data, pos)
        elif wire == _LEN:
            length, pos = _read_varint(data, pos)
            if pos + length > len(data):
                raise FrameError("truncated field")
            value, pos = data[pos:pos + length], pos + length
        elif wire in (_I64, _I32):
            size = 8 if wire == _I64 else 4
            if pos + size > len(data):
                raise FrameError("truncated field")
            value, pos = data[pos:pos + size], pos + size
        else:
            raise FrameError(f"unsupported wire type {wire}")
        yield number, wire, value, data[start:pos]


def _int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def _decode_header(data: bytes) -> tuple[str, str]:
    key = value = ""
    for number, wire, raw, _ in _fields(data):
        if wire == _LEN and number in (1, 2):
            text = bytes(raw).decode("utf-8", errors="replace")
            key, value = (text, value) if number == 1 else (key, text)
    return key, value


def decode_frame(data: bytes) -> Frame:
    values: dict[str, object] = {}
    headers: list[tuple[str, str]] = []
    extra = bytearray()
    for number, wire, raw, whole in _fields(data):
        if wire == _VARINT and number in (1, 2, 3, 4):
            name = ("seq_id", "log_id", "service", "method")[number - 1]
            values[name] = _int32(raw) if number in (3, 4) else raw  # type: ignore[arg-type]
        elif wire == _LEN and number == 5:
            headers.append(_decode_header(bytes(raw)))  # type: ignore[arg-type]
        elif wire == _LEN and number in (6, 7, 9):
            name = {6: "payload_encoding", 7: "payload_type", 9: "log_id_new"}[number]
            values[name] = bytes(raw).decode("utf-8", errors="replace")  # type: ignore[arg-type]
        elif wire == _LEN and number == 8:
            values["payload"] = bytes(raw)  # type: ignore[arg-type]
        else:
            extra += whole
    return Frame(headers=tuple(headers), _extra=bytes(extra), **values)  # type: ignore[arg-type]
