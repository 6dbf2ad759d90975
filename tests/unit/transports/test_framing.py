"""The WebSocket frame parser alone: bytes in, messages out, close codes for every violation."""

from __future__ import annotations

import os
import struct

import pytest

from realtime.transports.framing import (
    CLOSE_BAD_DATA,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameParser,
    WebSocketError,
    close_frame,
    frame,
    unmask,
)


def client_frame(payload: bytes | str, opcode: int = OP_TEXT, final: bool = True,
                 mask: bytes | None = None, rsv: int = 0, length: int | None = None) -> bytes:
    """A masked client frame, as a browser would send it (``length`` may lie)."""
    if isinstance(payload, str):
        payload = payload.encode()
    mask = os.urandom(4) if mask is None else mask
    declared = len(payload) if length is None else length
    first = (0x80 if final else 0) | rsv | opcode
    if declared < 126:
        header = struct.pack("!BB", first, 0x80 | declared)
    elif declared < 1 << 16:
        header = struct.pack("!BBH", first, 0x80 | 126, declared)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, declared)
    return header + mask + unmask(payload, mask)


def refused(parser: FrameParser, data: bytes) -> int:
    """The close code the parser answers ``data`` with (it must refuse it)."""
    with pytest.raises(WebSocketError) as raised:
        parser.feed(data)
    return raised.value.close_code


def test_unmask_is_its_own_inverse():
    mask = b"\x01\x02\x03\x04"
    data = bytes(range(256)) * 3 + b"tail"
    assert unmask(unmask(data, mask), mask) == data
    assert unmask(b"", mask) == b""
    assert unmask(b"\x00\x00\x00\x00\x00", mask) == b"\x01\x02\x03\x04\x01"


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_every_length_encoding_round_trips_with_any_mask(size):
    payload = os.urandom(size)
    parser = FrameParser(max_message=100_000)
    assert parser.feed(client_frame(payload, OP_BINARY)) == [(OP_BINARY, payload)]
    assert parser.feed(client_frame(payload, OP_BINARY, mask=b"\x00\x00\x00\x00")) == [
        (OP_BINARY, payload)]


def test_text_messages_come_out_decoded():
    assert FrameParser(100).feed(client_frame("héllo")) == [(OP_TEXT, "héllo")]


def test_many_frames_in_one_feed_and_one_frame_over_many_feeds():
    parser = FrameParser(1000)
    frames = b"".join(client_frame(f"m{i}") for i in range(50))
    assert parser.feed(frames) == [(OP_TEXT, f"m{i}") for i in range(50)]
    big = client_frame("x" * 300)
    out = []
    for i in range(len(big)):  # byte by byte: nothing comes out until the last one
        out += parser.feed(big[i:i + 1])
        assert parser.buffered == (i + 1 if i + 1 < len(big) else 0)
    assert out == [(OP_TEXT, "x" * 300)]


def test_fragmented_messages_are_reassembled_with_control_frames_in_between():
    parser = FrameParser(1000)
    data = (client_frame("he", final=False) + client_frame(b"ping!", OP_PING)
            + client_frame("ll", OP_CONTINUATION, final=False)
            + client_frame(b"", OP_PONG)
            + client_frame("o", OP_CONTINUATION))
    assert parser.feed(data) == [(OP_PING, b"ping!"), (OP_PONG, b""), (OP_TEXT, "hello")]
    assert parser.buffered == 0


def test_a_fragmented_message_split_across_feeds_is_reassembled():
    parser = FrameParser(1000)
    data = client_frame(b"\x01", OP_BINARY, final=False) + client_frame(
        b"\x02", OP_CONTINUATION)
    assert parser.feed(data[:5]) == []
    assert parser.feed(data[5:]) == [(OP_BINARY, b"\x01\x02")]


def test_a_close_frame_ends_parsing():
    parser = FrameParser(100)
    data = client_frame(struct.pack("!H", 1000) + b"bye", OP_CLOSE) + client_frame("after")
    assert parser.feed(data) == [(OP_CLOSE, struct.pack("!H", 1000) + b"bye")]
    assert parser.feed(client_frame("more")) == []


@pytest.mark.parametrize("data", [
    b"\x81\x05hello",                                        # unmasked
    client_frame("x", rsv=0x40),                             # reserved bit (no extension)
    client_frame("x", opcode=0x3),                           # reserved data opcode
    client_frame("x", opcode=0xB),                           # reserved control opcode
    client_frame("x", OP_CONTINUATION),                      # continuation without a start
    client_frame("a", final=False) + client_frame("b"),      # new message inside a fragmented one
    client_frame(b"", OP_PING, final=False),                 # fragmented control frame
    client_frame(b"x" * 126, OP_PING),                       # control payload over 125 bytes
    client_frame(b"\x03", OP_CLOSE),                         # one-byte close payload
    client_frame(struct.pack("!H", 1005), OP_CLOSE),         # reserved close code
    client_frame(struct.pack("!H", 999), OP_CLOSE),          # close code below 1000
])
def test_protocol_violations_are_close_code_1002(data):
    assert refused(FrameParser(1000), data) == CLOSE_PROTOCOL_ERROR


@pytest.mark.parametrize("data", [
    client_frame(b"\xff\xfe"),                                               # text not UTF-8
    client_frame(b"\xc3", final=False) + client_frame(b"\x28", OP_CONTINUATION),
    client_frame(struct.pack("!H", 1000) + b"\xff", OP_CLOSE),               # close reason
])
def test_text_that_is_not_utf8_is_close_code_1007(data):
    assert refused(FrameParser(1000), data) == CLOSE_BAD_DATA


def test_a_multibyte_character_split_between_fragments_is_fine():
    text = "é".encode()
    data = client_frame(text[:1], final=False) + client_frame(text[1:], OP_CONTINUATION)
    assert FrameParser(100).feed(data) == [(OP_TEXT, "é")]


def test_oversize_frames_are_refused_from_their_header_before_the_payload():
    parser = FrameParser(max_message=1000)
    assert parser.feed(client_frame("x" * 1000)) == [(OP_TEXT, "x" * 1000)]
    header_only = client_frame(b"", length=50 * 1024 * 1024)  # declares 50 MB, sends none
    assert refused(parser, header_only) == CLOSE_TOO_BIG


def test_fragmented_messages_are_capped_in_total_size():
    parser = FrameParser(max_message=1000)
    data = client_frame("x" * 600, final=False) + client_frame("x" * 401, OP_CONTINUATION)
    assert refused(parser, data) == CLOSE_TOO_BIG


def test_fragmented_messages_are_capped_in_fragment_count():
    parser = FrameParser(max_message=1_000_000, max_fragments=100)
    start = client_frame("x", final=False)
    empties = client_frame(b"", OP_CONTINUATION, final=False) * 99
    assert parser.feed(start + empties) == []
    assert refused(parser, client_frame(b"", OP_CONTINUATION, final=False)) == CLOSE_TOO_BIG


def test_a_flood_of_empty_fragments_is_refused_after_the_cap_in_one_feed():
    # The probe that froze a node: a message started, then tens of thousands of empty
    # continuation frames. The parser gives up at the cap, within the same feed.
    parser = FrameParser(max_message=65536)
    data = client_frame("4", final=False) + client_frame(b"", OP_CONTINUATION,
                                                         final=False) * 40000
    assert refused(parser, data) == CLOSE_TOO_BIG


def test_server_frames_are_unmasked_and_final():
    assert frame(b"hi") == b"\x81\x02hi"
    assert frame(b"x" * 200, OP_BINARY)[:4] == b"\x82\x7e\x00\xc8"
    assert frame(b"x" * 70000)[:2] == b"\x81\x7f"
    assert close_frame(1009, "too big") == b"\x88\x09\x03\xf1too big"
