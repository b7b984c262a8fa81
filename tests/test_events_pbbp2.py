import pytest
from lark_oapi.ws.pb.pbbp2_pb2 import Frame as OfficialFrame

from proxy.events.pbbp2 import Frame, FrameError, decode_frame, encode_frame

SAMPLE = Frame(seq_id=2**40 + 5, log_id=7, service=33, method=1,
               headers=(("type", "event"), ("message_id", "m-1"), ("sum", "2"), ("seq", "0")),
               payload_encoding="", payload_type="", payload=b'{"schema":"2.0"}', log_id_new="abc")


def test_our_bytes_parse_with_the_official_sdk_classes():
    official = OfficialFrame()
    official.ParseFromString(encode_frame(SAMPLE))
    assert (official.SeqID, official.LogID, official.service, official.method) == (2**40 + 5, 7, 33, 1)
    assert [(h.key, h.value) for h in official.headers] == list(SAMPLE.headers)
    assert official.payload == SAMPLE.payload and official.LogIDNew == "abc"


def test_official_sdk_bytes_decode_to_the_same_frame():
    official = OfficialFrame(SeqID=2**40 + 5, LogID=7, service=33, method=1, payload=b'{"schema":"2.0"}',
                             LogIDNew="abc")
    for key, value in SAMPLE.headers:
        header = official.headers.add()
        header.key, header.value = key, value
    assert decode_frame(official.SerializeToString()) == SAMPLE


def test_zero_required_fields_and_negative_int32_round_trip():
    ping = Frame(service=-1, method=0, headers=(("type", "ping"),))
    official = OfficialFrame()
    official.ParseFromString(encode_frame(ping))
    assert official.service == -1 and official.SeqID == 0
    assert decode_frame(encode_frame(ping)) == ping


def test_unknown_fields_survive_a_round_trip():
    unknown = bytes([0x50, 0x2A])   # field 10, varint 42
    frame = decode_frame(encode_frame(SAMPLE) + unknown)
    assert frame.payload == SAMPLE.payload and encode_frame(frame).endswith(unknown)


@pytest.mark.parametrize("garbage", [b"\x0a\x05ab", b"\x08\xff\xff", b"\x0f"])
def test_truncated_or_odd_bytes_raise_frame_error(garbage):
    with pytest.raises(FrameError):
        decode_frame(garbage)
