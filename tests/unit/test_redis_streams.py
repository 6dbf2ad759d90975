"""The pub/sub wire format of realtime/broker/redis_streams.py: what decode_message takes and
what it refuses (a message that does not decode is dropped by the broker, never raised)."""

from __future__ import annotations

import msgpack
import pytest

from realtime.broker.base import Publication
from realtime.broker.redis_streams import (
    WIRE_VERSION,
    MessageDecoder,
    WireFormatError,
    decode_message,
    encode_presence_message,
    pack_body,
)


def publication_message(*header: object, body: bytes | None = None) -> bytes:
    """What PUBLISH_SCRIPT sends: the msgpack header, then the packed body."""
    return msgpack.packb(list(header)) + (pack_body({"n": 1}, "alice") if body is None else body)


def test_a_publication_decodes_with_its_position_data_and_user():
    blob = publication_message(WIRE_VERSION, "p", 7, "ep0ch")
    assert decode_message("room", blob) == ("p", Publication("room", 7, {"n": 1}, "alice",
                                                             "ep0ch"))


def test_a_publication_of_an_earlier_release_has_no_epoch():
    kind, publication = decode_message("room", publication_message(WIRE_VERSION, "p", 3))
    assert kind == "p" and (publication.offset, publication.epoch) == (3, "")


def test_joins_and_leaves_decode_to_their_user():
    assert decode_message("room", encode_presence_message("j", "bob")) == ("j", "bob")
    assert decode_message("room", encode_presence_message("l", "bob")) == ("l", "bob")


def test_integer_map_keys_in_data_survive():
    blob = publication_message(WIRE_VERSION, "p", 1, "e", body=msgpack.packb([{1: "a"}, None]))
    assert decode_message("room", blob)[1].data == {1: "a"}


@pytest.mark.parametrize("blob", [
    b"",  # nothing
    b"\xc1",  # never valid msgpack
    publication_message(WIRE_VERSION, "p", 1, "e")[:-3],  # cut short
    publication_message(WIRE_VERSION, "p", 1, "e", body=b""),  # no body
    publication_message(WIRE_VERSION, "p", 1, "e", body=msgpack.packb([1, 2, 3])),  # 3 items
    publication_message(WIRE_VERSION, "p", 1, "e", body=msgpack.packb("x")),  # not a list
    publication_message(WIRE_VERSION, "p", 1, 5),  # an epoch that is not a string
    publication_message(WIRE_VERSION + 1, "p", 1, "e"),  # a version this node does not know
    publication_message(WIRE_VERSION, "x", 1, "e"),  # an unknown kind
    publication_message(WIRE_VERSION, "p"),  # a header too short
    msgpack.packb([WIRE_VERSION, "j", 5]),  # a join without a user name
    msgpack.packb({"v": 1}),  # not a header at all
], ids=["empty", "invalid", "truncated", "no-body", "body-of-3", "body-not-list",
        "epoch-not-str", "version", "kind", "short-header", "join-without-user", "map"])
def test_anything_else_is_a_wire_format_error(blob):
    with pytest.raises(WireFormatError):
        decode_message("room", blob)


def test_one_decoder_reads_every_message_after_bad_and_overlong_ones():
    # The broker's reader keeps one decoder for all messages: a message that fails, or that
    # has bytes after its last object, must not leave anything behind for the next one.
    decoder = MessageDecoder()
    good = publication_message(WIRE_VERSION, "p", 7, "ep0ch")
    expected = ("p", Publication("room", 7, {"n": 1}, "alice", "ep0ch"))
    for bad in (good[:-3], b"\xc1", publication_message(WIRE_VERSION, "p", 1, "e", body=b"")):
        with pytest.raises(WireFormatError):
            decoder.decode("room", bad)
        assert decoder.decode("room", good) == expected
    assert decoder.decode("room", good + b"\x93\x01") == expected  # trailing bytes dropped
    assert decoder.decode("room", good) == expected
    assert decoder.decode("room", encode_presence_message("j", "bob") + b"\x01") == ("j", "bob")
    assert decoder.decode("room", good) == expected
