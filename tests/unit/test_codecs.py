"""The Socket.IO codecs and the encode-once frames built on them."""

from __future__ import annotations

import math

import msgpack
import pytest

from realtime.codecs import (
    JSON,
    MSGPACK,
    Packet,
    PacketError,
    PacketType,
    codec_for,
)
from realtime.frames import WIRE_FORMS, EncodedEvent, EventBatch, wire_form
from realtime.transports.base import POLLING, WEBSOCKET


@pytest.mark.parametrize("text,expected", [
    ('0{"user":"a"}', Packet(PacketType.CONNECT, "/", {"user": "a"})),
    ("0", Packet(PacketType.CONNECT)),
    ('212["publish",{"channel":"c"}]', Packet(PacketType.EVENT, "/", ["publish",
                                                                      {"channel": "c"}], 12)),
    ('2/admin,3["x"]', Packet(PacketType.EVENT, "/admin", ["x"], 3)),
    ("0/admin,", Packet(PacketType.CONNECT, "/admin")),
    ('51-7["publish",{"_placeholder":true,"num":0}]',
     Packet(PacketType.BINARY_EVENT, "/", ["publish", {"_placeholder": True, "num": 0}], 7, 1)),
    ("1", Packet(PacketType.DISCONNECT)),
])
def test_json_packets_decode(text, expected):
    assert JSON.decode(text) == expected


@pytest.mark.parametrize("text", [
    "", "9", "x", '2["x"', "5x-[]", "5-[]", "50-[]", "5999-[]",
    "2" + "1" * 16 + '["x"]',          # an ack id longer than any client counts
    '2["x",NaN]', '2["x",Infinity]',   # not JSON, though Python's json reads them
    "2" + "[" * 3000 + "]" * 3000,     # nested past the decoder
    '5²-["x",{"_placeholder":true,"num":0}]',  # a digit to str.isdigit(), not to int()
])
def test_malformed_json_packets_are_packet_errors(text):
    with pytest.raises(PacketError) as raised:
        JSON.decode(text)
    assert raised.value.close_code == 1002


def test_binary_in_a_json_session_and_text_in_a_msgpack_one_are_close_code_1003():
    for codec, message in ((JSON, b"\x80"), (MSGPACK, "42[]")):
        with pytest.raises(PacketError) as raised:
            codec.decode(message)
        assert raised.value.close_code == 1003


@pytest.mark.parametrize("packet", [
    Packet(PacketType.CONNECT, "/", {"sid": "abc"}),
    Packet(PacketType.CONNECT_ERROR, "/x", {"message": "Invalid namespace"}),
    Packet(PacketType.DISCONNECT),
    Packet(PacketType.EVENT, "/", ["message", {"data": None, "user": None}]),
    Packet(PacketType.ACK, "/", [{"ok": True}], 5),
    Packet(PacketType.ACK, "/", [None], 0),
])
@pytest.mark.parametrize("codec", [JSON, MSGPACK], ids=["json", "msgpack"])
def test_packets_round_trip(codec, packet):
    assert codec.decode(codec.encode(packet)) == packet


def test_msgpack_encoding_leaves_out_what_the_js_parser_refuses():
    # socket.io-msgpack-parser throws on `id: nil`, on any data with DISCONNECT, on CONNECT
    # data that is not an object: such fields must be absent, not nil.
    assert msgpack.unpackb(MSGPACK.encode(Packet(PacketType.DISCONNECT))) == {"type": 1,
                                                                             "nsp": "/"}
    event = msgpack.unpackb(MSGPACK.encode(Packet(PacketType.EVENT, data=["x", None])))
    assert event == {"type": 2, "nsp": "/", "data": ["x", None]}


def test_msgpack_packets_from_the_official_parser_decode():
    # What socket.io-msgpack-parser (notepack.io) sends: extra keys, `undefined` as fixext 1
    # of type 0, a Date as fixext 8 of type 0.
    undefined = msgpack.ExtType(0, b"\x00")
    date = msgpack.ExtType(0, (1_700_000_000_123).to_bytes(8, "big"))
    packed = msgpack.packb({"type": 2, "data": ["publish", {"channel": "c", "data": {
        "gone": undefined, "at": date}}], "options": {"compress": True}, "id": 3, "nsp": "/"})
    packet = MSGPACK.decode(packed)
    assert packet.ack_id == 3 and packet.data == ["publish", {"channel": "c", "data": {
        "gone": None, "at": "2023-11-14T22:13:20.123Z"}}]
    connect = msgpack.packb({"type": 0, "data": undefined, "nsp": "/"})
    assert MSGPACK.decode(connect) == Packet(PacketType.CONNECT)


@pytest.mark.parametrize("message", [
    b"", b"\xc1", b"\x93\x01\x02\x03", msgpack.packb({"nsp": "/"}),
    msgpack.packb({"type": 9, "nsp": "/"}), msgpack.packb({"type": True, "nsp": "/"}),
    msgpack.packb({"type": 2, "nsp": 5}), msgpack.packb({"type": 2, "nsp": "no-slash"}),
    msgpack.packb({"type": 2, "nsp": "/", "id": -1}),
    msgpack.packb({"type": 2, "nsp": "/", "id": 1.5}),
    msgpack.packb({1: 2}), msgpack.packb({"type": 2}) + b"\x00",
    b"\xa2\xff\xfe",  # a string that is not UTF-8
])
def test_malformed_msgpack_packets_are_packet_errors(message):
    with pytest.raises(PacketError):
        MSGPACK.decode(message)


def test_binary_extensions_stay_binary_and_are_refused_later_as_not_json():
    packet = MSGPACK.decode(msgpack.packb({"type": 2, "nsp": "/", "data": [
        "publish", {"data": msgpack.ExtType(0, b"\x01\x02\x03")}]}))
    assert isinstance(packet.data[1]["data"], msgpack.ExtType)


def test_the_codec_of_a_session_follows_its_first_message():
    assert codec_for("40") is JSON and codec_for(b"\x82") is MSGPACK


def test_an_event_is_encoded_once_per_form_and_shared():
    event = EncodedEvent("message", {"channel": "c", "offset": 1, "data": math.pi,
                                     "user": None})
    forms = {form: event.build(form) for form in range(WIRE_FORMS)}
    assert all(event.build(form) is forms[form] for form in range(WIRE_FORMS))
    assert forms[wire_form(JSON, WEBSOCKET)].startswith(b"\x81")
    assert forms[wire_form(MSGPACK, WEBSOCKET)].startswith(b"\x82")
    assert forms[wire_form(JSON, POLLING)] == (b'42["message",{"channel":"c","offset":1,'
                                                b'"data":3.141592653589793,"user":null}]',)
    assert forms[wire_form(MSGPACK, POLLING)][0].startswith(b"b")


def test_a_batch_is_one_write_on_websocket_and_one_record_per_event_on_polling():
    events = [EncodedEvent("message", i) for i in range(3)]
    batch = EventBatch(events)
    assert batch.build(wire_form(JSON, WEBSOCKET)) == b"".join(
        e.build(wire_form(JSON, WEBSOCKET)) for e in events)
    assert batch.build(wire_form(MSGPACK, POLLING)) == tuple(
        e.build(wire_form(MSGPACK, POLLING))[0] for e in events)


def test_an_event_one_codec_cannot_encode_is_left_out_for_that_codec_only(caplog):
    # Data that never passed the publish checks (written to Redis by something else):
    # msgpack cannot encode an integer past 64 bits; JSON can.
    event = EncodedEvent("message", {"data": 2 ** 70})
    assert event.build(wire_form(MSGPACK, WEBSOCKET)) == b""
    assert event.build(wire_form(MSGPACK, POLLING)) == ()
    assert b"1180591620717411303424" in event.build(wire_form(JSON, WEBSOCKET))
    assert "cannot be encoded for msgpack clients" in caplog.text
    batch = EventBatch([event, EncodedEvent("message", 1)])
    assert len(batch.build(wire_form(MSGPACK, POLLING))) == 1


@pytest.mark.parametrize("payload", [{"channel": "a", "data": {"é": [1, None, "x"]}}, None, 3])
def test_the_fan_outs_event_encoding_is_the_packet_encoding(codec, payload):
    """encode_event skips building a Packet (the fan-out's shortcut): same output."""
    packet = Packet(PacketType.EVENT, data=["message", payload])
    assert codec.encode_event("message", payload) == codec.encode(packet)
