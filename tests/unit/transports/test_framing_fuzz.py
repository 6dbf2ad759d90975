"""Property-based fuzzing of the WebSocket frame parser alone (bytes in, messages out).

Hypothesis generates byte streams (arbitrary bytes; valid client frames with fragmentation,
control frames between fragments and payloads around the length-encoding boundaries; frames
with any header; fragment floods; all of these mixed, cut short and with flipped bits) and
splits them into feeds anywhere, then checks:

* the parser never raises anything but ``WebSocketError``, with close code 1002, 1007 or 1009;
* valid frames come out as exactly the messages that were framed, whatever the split;
* it agrees with :func:`tests.fuzzing.reference_parse`, a plain reading of the whole stream;
* what it holds between feeds stays under the message limit plus one frame header (and one
  control frame, which may arrive in the middle of a message);
* nothing comes out after a close frame.

The default run is short and the same every time (derandomized). For a long fuzzing session,
``REALTIME_FUZZ_EXAMPLES`` sets the number of random examples per property::

    REALTIME_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest -q \
        tests/unit/transports/test_framing_fuzz.py

(``--hypothesis-seed=N`` replays the run of a reported failure.)
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from realtime.transports.framing import (
    CLOSE_BAD_DATA,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    DEFAULT_MAX_FRAGMENTS,
    MAX_CONTROL_PAYLOAD,
    OP_CLOSE,
    FrameParser,
    WebSocketError,
)
from tests.fuzzing import (
    MAX_CLIENT_HEADER,
    Item,
    client_frame_bytes,
    close_payloads,
    frame_soups,
    fuzz_settings,
    fuzz_timeout,
    masks,
    reference_parse,
    splits,
    valid_streams,
)

ERROR_CODES = {CLOSE_PROTOCOL_ERROR, CLOSE_BAD_DATA, CLOSE_TOO_BIG}
# Examples per property in the default run (a few seconds in all); a long session's timeout
# grows with its examples.
ANY_BYTES_EXAMPLES = 200
VALID_STREAM_EXAMPLES = 80
SOUP_EXAMPLES = 150
CLOSE_EXAMPLES = 80
SECONDS_PER_EXAMPLE = 0.05
# Limits small enough for generated input to reach them, and the ones a node uses.
max_messages = st.sampled_from([0, 1, 125, 126, 1000, 65536, 81920])
max_fragment_counts = st.sampled_from([1, 2, 3, 16, DEFAULT_MAX_FRAGMENTS])


def held_bytes(parser: FrameParser) -> int:
    """What the parser really holds between feeds: its partial frame and its fragments.

    Read from its private state on purpose: ``buffered`` is what the transport trusts, and
    this checks it is not lying.
    """
    fragments = parser._fragments or []
    return len(parser._buffer or b"") + sum(map(len, fragments))


def memory_bound(max_message: int) -> int:
    # A message's fragments (at most max_message bytes) plus the frame being read: a
    # continuation frame's header (its payload counts against max_message), or a whole control
    # frame, which may arrive between fragments.
    return max_message + MAX_CLIENT_HEADER + MAX_CONTROL_PAYLOAD


def run(parser: FrameParser, feeds: list[bytes]) -> tuple[list[Item], int | None]:
    """Feed ``feeds`` in order until the parser refuses one: (items out, close code or None).

    Checks after every feed that the parser holds no more than :func:`memory_bound`.
    """
    items: list[Item] = []
    for data in feeds:
        try:
            items += parser.feed(data)
        except WebSocketError as exc:
            return items, exc.close_code
        held = held_bytes(parser)
        assert parser.buffered == held
        assert held <= memory_bound(parser.max_message), (held, parser.max_message)
    return items, None


@pytest.mark.timeout(fuzz_timeout(ANY_BYTES_EXAMPLES, SECONDS_PER_EXAMPLE))
@fuzz_settings(ANY_BYTES_EXAMPLES)
@given(data=st.binary(max_size=300), max_message=max_messages,
       max_fragments=max_fragment_counts, cuts=st.data())
def test_any_bytes_in_any_split_raise_nothing_but_websocket_errors_with_a_close_code(
        data, max_message, max_fragments, cuts):
    parser = FrameParser(max_message, max_fragments)
    # run() lets only WebSocketError through as a result: anything else fails the test here.
    _, code = run(parser, cuts.draw(splits(data)))
    assert code is None or code in ERROR_CODES


@pytest.mark.timeout(fuzz_timeout(VALID_STREAM_EXAMPLES, SECONDS_PER_EXAMPLE))
@fuzz_settings(VALID_STREAM_EXAMPLES)
@given(max_message=st.sampled_from([65536, 70000]), max_fragments=max_fragment_counts,
       data=st.data())
def test_valid_frames_come_out_as_the_messages_framed_whatever_the_split(
        max_message, max_fragments, data):
    stream, expected = data.draw(valid_streams(max_message, max_fragments))
    parser = FrameParser(max_message, max_fragments)
    items, code = run(parser, data.draw(splits(stream)))
    assert code is None
    assert items == expected
    assert not parser.incomplete and parser.buffered == 0


@pytest.mark.timeout(fuzz_timeout(SOUP_EXAMPLES, SECONDS_PER_EXAMPLE))
@fuzz_settings(SOUP_EXAMPLES)
@given(max_message=max_messages, max_fragments=max_fragment_counts, data=st.data())
def test_the_parser_agrees_with_the_reference_reading_of_any_frame_soup(
        max_message, max_fragments, data):
    stream = data.draw(frame_soups(max_message, max_fragments))
    reference = reference_parse(stream, max_message, max_fragments)
    parser = FrameParser(max_message, max_fragments)
    items, code = run(parser, data.draw(splits(stream)))
    assert code == reference.error
    if code is None:
        assert items == reference.items
        assert parser.incomplete == (reference.pending or reference.closed)
    else:
        # The items of the read that held the violation are not returned: a prefix is.
        assert code in ERROR_CODES
        assert items == reference.items[:len(items)]


@pytest.mark.timeout(fuzz_timeout(CLOSE_EXAMPLES, SECONDS_PER_EXAMPLE))
@fuzz_settings(CLOSE_EXAMPLES)
@given(max_message=st.sampled_from([1000, 65536]), data=st.data())
def test_nothing_comes_out_after_a_close_frame(max_message, data):
    before, expected = data.draw(valid_streams(max_message, DEFAULT_MAX_FRAGMENTS,
                                               max_messages=3))
    payload = data.draw(close_payloads())
    close = client_frame_bytes(payload, OP_CLOSE, mask=data.draw(masks))
    if data.draw(st.booleans()):
        # Between the fragments of a message, where control frames may arrive.
        close = client_frame_bytes(b"half", final=False, mask=data.draw(masks)) + close
    after = data.draw(st.one_of(st.binary(max_size=200), frame_soups(max_message, 16)))
    parser = FrameParser(max_message)
    items, code = run(parser, data.draw(splits(before + close + after)))
    assert code is None
    assert items == [*expected, (OP_CLOSE, payload)]
    assert parser.feed(data.draw(st.binary(min_size=1, max_size=50))) == []
