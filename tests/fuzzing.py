"""Shared by the fuzz tests: their hypothesis settings, WebSocket frames, a reference parser.

* :func:`fuzz_settings`: a short, reproducible run by default (``derandomize``: the same
  examples on every run, no example database); ``REALTIME_FUZZ_EXAMPLES=N`` runs ``N`` random
  examples per property instead, for a long fuzzing session (pytest's ``--hypothesis-seed``
  replays a failure that hypothesis reports).
* :func:`client_frame_bytes`: any client frame, lies included (unmasked, reserved bits,
  declared lengths that are not the payload's, length encodings that are not the shortest).
* :func:`reference_parse`: RFC 6455 as a plain reading of the whole byte stream at once, frame
  after frame, independent of :class:`realtime.transports.framing.FrameParser` (which works on
  any split of the stream into reads, with offsets, buffers and early header checks). The
  fuzz tests check that the two agree; the integration fuzz uses it to know what a node must
  have made of the bytes it was sent.
* Strategies for valid streams of client frames (with the items they must come out as),
  frames with arbitrary header fields, fragment floods, and splits of a stream into reads.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import random
import struct
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from realtime.transports.framing import (
    CLOSE_BAD_DATA,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    MAX_CONTROL_PAYLOAD,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
)

FUZZ_EXAMPLES_ENV = "REALTIME_FUZZ_EXAMPLES"
# Hypothesis keeps what it learns of the code under test (constants it reads in the source)
# in a .hypothesis/ folder of the current directory: not in the working tree.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "realtime-hypothesis")
# The longest client frame header: 2 bytes, a 64-bit length, the 4-byte mask key.
MAX_CLIENT_HEADER = 14
# Payload sizes where the length encoding changes (7 bits, 16 bits, 64 bits).
BOUNDARY_SIZES = (0, 1, 125, 126, 127, 65535, 65536, 65537)

Item = tuple[int, str | bytes]


def fuzz_examples(default_examples: int) -> int:
    """How many examples a fuzz property runs: ``$REALTIME_FUZZ_EXAMPLES``, else the default."""
    raw = os.environ.get(FUZZ_EXAMPLES_ENV, "").strip()
    return int(raw) if raw else default_examples


def fuzz_timeout(default_examples: int, seconds_per_example: float) -> float:
    """A pytest timeout for a fuzz test that grows with a long session's examples."""
    return 120 + fuzz_examples(default_examples) * seconds_per_example


def fuzz_settings(default_examples: int, **overrides: object) -> settings:
    """Hypothesis settings for a fuzz property: ``default_examples`` derandomized examples, or
    ``$REALTIME_FUZZ_EXAMPLES`` random ones (a long session)."""
    long_run = bool(os.environ.get(FUZZ_EXAMPLES_ENV, "").strip())
    options: dict[str, object] = {
        "max_examples": fuzz_examples(default_examples),
        # Reproducible in CI: the same examples every run. A long session explores new ones.
        "derandomize": not long_run,
        # No .hypothesis/ folder in the working tree; failures print their reproduction blob.
        "database": None,
        "print_blob": True,
        # Examples talk to real processes or build 64 KiB frames: their time varies.
        "deadline": None,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                  HealthCheck.large_base_example,
                                  HealthCheck.filter_too_much],
    }
    options.update(overrides)
    return settings(**options)  # type: ignore[arg-type]


# -- building client frames -------------------------------------------------------------------


def xor_mask(payload: bytes, mask: bytes) -> bytes:
    """``payload`` XOR the 4-byte ``mask`` (written apart from ``framing.unmask`` on purpose:
    the frames that test the parser must not be built with the parser's own code)."""
    if len(payload) <= 64:
        return bytes(byte ^ mask[index & 3] for index, byte in enumerate(payload))
    key = (mask * (len(payload) // 4 + 1))[:len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(
        len(payload), "big")


def client_frame_bytes(payload: bytes, opcode: int = OP_TEXT, *, final: bool = True,
                       mask: bytes | None = b"\x00\x00\x00\x00", rsv: int = 0,
                       length: int | None = None, length_form: str = "minimal") -> bytes:
    """One client frame. ``mask=None`` sends it unmasked; ``length`` declares a length that
    may not be the payload's; ``length_form`` ``"16"``/``"64"`` uses that extended length
    field even where a shorter encoding would do (when the length fits it)."""
    declared = len(payload) if length is None else length
    first = (0x80 if final else 0) | rsv | opcode
    mask_bit = 0x80 if mask is not None else 0
    if length_form == "64" or declared >= 1 << 16:
        header = struct.pack("!BBQ", first, mask_bit | 127, declared)
    elif length_form == "16" or declared >= 126:
        header = struct.pack("!BBH", first, mask_bit | 126, declared)
    else:
        header = struct.pack("!BB", first, mask_bit | declared)
    if mask is None:
        return header + payload
    return header + mask + xor_mask(payload, mask)


# -- the reference parser ---------------------------------------------------------------------


@dataclasses.dataclass
class Reference:
    """What RFC 6455 makes of a whole client byte stream.

    ``items``: the messages and control frames before the first violation (or the close
    frame), as ``FrameParser.feed`` returns them. ``error``: the close code of the first
    violation, if any. ``closed``: a valid close frame ended the stream. ``pending``: the
    stream ends inside a frame or a fragmented message.
    """

    items: list[Item]
    error: int | None = None
    closed: bool = False
    pending: bool = False

    @property
    def messages(self) -> list[str | bytes]:
        """The data messages among ``items``."""
        return [payload for opcode, payload in self.items if opcode in (OP_TEXT, OP_BINARY)]


_CONTROL = (OP_CLOSE, OP_PING, OP_PONG)


def reference_parse(data: bytes, max_message: int, max_fragments: int) -> Reference:
    """Parse the whole client byte stream ``data`` at once (see :class:`Reference`).

    Where one frame breaks several rules, the close code is the first rule's in this order,
    which is the order ``FrameParser`` documents: masking and reserved bits from the first two
    bytes; then, from the complete length, fragmentation and control-frame rules (1002) before
    the size limits (1009); then, from the payload, close-frame payloads and UTF-8 (1002, 1007).
    """
    result = Reference([])
    pos, end = 0, len(data)
    fragments: list[bytes] | None = None
    fragment_size = 0
    fragment_opcode = OP_TEXT

    def fail(code: int) -> Reference:
        result.error = code
        return result

    while True:
        if pos == end:
            result.pending = fragments is not None
            return result
        if end - pos < 2:
            result.pending = True
            return result
        first, second = data[pos], data[pos + 1]
        if not second & 0x80 or first & 0x70:
            return fail(CLOSE_PROTOCOL_ERROR)
        final, opcode, length = bool(first & 0x80), first & 0x0F, second & 0x7F
        header = 2
        if length == 126:
            header = 4
        elif length == 127:
            header = 10
        if end - pos < header:
            result.pending = True
            return result
        if header > 2:
            length = int.from_bytes(data[pos + 2:pos + header], "big")
        if opcode in _CONTROL:
            if not final or length > MAX_CONTROL_PAYLOAD:
                return fail(CLOSE_PROTOCOL_ERROR)
        elif opcode in (OP_TEXT, OP_BINARY):
            if fragments is not None:
                return fail(CLOSE_PROTOCOL_ERROR)
            if length > max_message:
                return fail(CLOSE_TOO_BIG)
        elif opcode == OP_CONTINUATION:
            if fragments is None:
                return fail(CLOSE_PROTOCOL_ERROR)
            if fragment_size + length > max_message or len(fragments) >= max_fragments:
                return fail(CLOSE_TOO_BIG)
        else:
            return fail(CLOSE_PROTOCOL_ERROR)
        start = pos + header + 4
        if end - start < length:
            result.pending = True
            return result
        payload = xor_mask(data[start:start + length], data[start - 4:start])
        pos = start + length
        if opcode in _CONTROL:
            if opcode == OP_CLOSE:
                code = _reference_close_check(payload)
                if code is not None:
                    return fail(code)
                result.items.append((OP_CLOSE, payload))
                result.closed = True
                return result
            result.items.append((opcode, payload))
            continue
        if opcode != OP_CONTINUATION:
            fragments, fragment_opcode, fragment_size = [], opcode, 0
        assert fragments is not None
        fragments.append(payload)
        fragment_size += len(payload)
        if not final:
            continue
        message, fragments = b"".join(fragments), None
        if fragment_opcode == OP_TEXT:
            try:
                result.items.append((OP_TEXT, message.decode("utf-8")))
            except UnicodeDecodeError:
                return fail(CLOSE_BAD_DATA)
        else:
            result.items.append((OP_BINARY, message))


def _reference_close_check(payload: bytes) -> int | None:
    """The close code a client close frame's payload earns (None when it is valid)."""
    if not payload:
        return None
    if len(payload) == 1:
        return CLOSE_PROTOCOL_ERROR
    code = int.from_bytes(payload[:2], "big")
    # RFC 6455 7.4: 1000-1003, 1007-1014 are defined; 1004-1006 and 1015 are reserved or
    # local-only; 1016-2999 are reserved for the protocol; 3000-4999 are for applications.
    valid = 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999
    if not valid:
        return CLOSE_PROTOCOL_ERROR
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        return CLOSE_BAD_DATA
    return None


# -- strategies -------------------------------------------------------------------------------

masks = st.binary(min_size=4, max_size=4)


@functools.cache  # one strategy object per arguments: building them is not free
@st.composite
def sizes(draw: st.DrawFn, max_size: int) -> int:
    """A payload size up to ``max_size``: small ones, and the length-encoding boundaries."""
    boundaries = [size for size in (*BOUNDARY_SIZES, max_size) if size <= max_size]
    return draw(st.one_of(st.integers(0, min(200, max_size)), st.sampled_from(boundaries)))


@functools.cache
@st.composite
def payloads(draw: st.DrawFn, opcode: int, size: int) -> bytes:
    """``size`` bytes for a message of ``opcode``: valid UTF-8 for text."""
    if opcode == OP_TEXT:
        unit = draw(st.text(min_size=1, max_size=6)).encode()
        whole, rest = divmod(size, len(unit))
        return unit * whole + b"a" * rest
    if size <= 64:
        return draw(st.binary(min_size=size, max_size=size))
    return random.Random(draw(st.integers(0, 2**32))).randbytes(size)


@functools.cache
@st.composite
def control_frames(draw: st.DrawFn) -> tuple[bytes, Item]:
    """A valid ping or pong, and the item it comes out as."""
    opcode = draw(st.sampled_from([OP_PING, OP_PONG]))
    payload = draw(st.binary(max_size=MAX_CONTROL_PAYLOAD))
    return client_frame_bytes(payload, opcode, mask=draw(masks)), (opcode, payload)


@functools.cache
@st.composite
def close_payloads(draw: st.DrawFn) -> bytes:
    """A valid close frame payload: nothing, or a code a peer may send and a UTF-8 reason."""
    if draw(st.booleans()):
        return b""
    code = draw(st.sampled_from([1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011,
                                 3000, 4999]))
    reason = draw(st.text(max_size=20)).encode()[:MAX_CONTROL_PAYLOAD - 2]
    return struct.pack("!H", code) + reason


@functools.cache
@st.composite
def valid_streams(draw: st.DrawFn, max_message: int, max_fragments: int,
                  max_messages: int = 5) -> tuple[bytes, list[Item]]:
    """Valid client frames: messages (text and binary, fragmented or not) with control frames
    between them and between their fragments; and the items they must come out as."""
    stream, expected = bytearray(), []
    for _ in range(draw(st.integers(0, max_messages))):
        for data, item in draw(st.lists(control_frames(), max_size=2)):
            stream += data
            expected.append(item)
        opcode = draw(st.sampled_from([OP_TEXT, OP_BINARY]))
        payload = draw(payloads(opcode, draw(sizes(max_message))))
        cuts = sorted(draw(st.lists(st.integers(0, len(payload)),
                                    max_size=min(6, max_fragments - 1))))
        bounds = [0, *cuts, len(payload)]
        held = []  # control frames between fragments come out before the message
        for index in range(len(bounds) - 1):
            last = index == len(bounds) - 2
            stream += client_frame_bytes(payload[bounds[index]:bounds[index + 1]],
                                         opcode if index == 0 else OP_CONTINUATION,
                                         final=last, mask=draw(masks))
            if not last:
                for data, item in draw(st.lists(control_frames(), max_size=1)):
                    stream += data
                    held.append(item)
        expected += held
        expected.append((opcode, payload.decode() if opcode == OP_TEXT else payload))
    return bytes(stream), expected


@st.composite
def framings(draw: st.DrawFn, payload: bytes, opcode: int = OP_TEXT,
             max_fragments: int = 6) -> bytes:
    """``payload`` as one valid message of ``opcode``: one frame, or fragments (up to
    ``max_fragments``) with pings and pongs between them."""
    cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=max_fragments - 1)))
    bounds = [0, *cuts, len(payload)]
    stream = bytearray()
    for index in range(len(bounds) - 1):
        last = index == len(bounds) - 2
        stream += client_frame_bytes(payload[bounds[index]:bounds[index + 1]],
                                     opcode if index == 0 else OP_CONTINUATION, final=last,
                                     mask=draw(masks))
        if not last:
            for data, _ in draw(st.lists(control_frames(), max_size=1)):
                stream += data
    return bytes(stream)


# Declared lengths worth lying with: the encoding boundaries, the extremes of each field.
LYING_LENGTHS = (0, 1, 2, 125, 126, 127, 65535, 65536, 50 * 1024 * 1024, 2**63 - 1, 2**64 - 1)


# One flaw per frame (or none), so that a stream's frames get past each other's first checks
# and the later ones (sizes, fragmentation, UTF-8, close payloads) are reached too.
FLAWS = ("none", "none", "none", "reserved_bits", "unmasked", "opcode", "length",
         "length_form", "not_final", "too_big")


@functools.cache
@st.composite
def arbitrary_frames(draw: st.DrawFn, max_message: int) -> bytes:
    """One client frame with a flaw or none: reserved bits, unmasked, a reserved opcode, a
    length that is not the payload's, a longer length encoding than needed, not final. Its
    payload may be over ``max_message``, not UTF-8 in a text frame, a bad close payload."""
    flaw = draw(st.sampled_from(FLAWS))
    if flaw == "too_big":
        # A message over the limit: all of it, or its header alone (refused from it).
        over = draw(st.sampled_from([1, 20]))
        if max_message > 1000 or draw(st.booleans()):
            return client_frame_bytes(b"", draw(st.sampled_from([OP_TEXT, OP_BINARY])),
                                      mask=draw(masks), length=max_message + over)
        return client_frame_bytes(b"p" * (max_message + over),
                                  draw(st.sampled_from([OP_TEXT, OP_BINARY])), mask=draw(masks))
    opcode = draw(st.integers(0, 15) if flaw == "opcode" else st.sampled_from(
        [OP_TEXT, OP_BINARY, OP_CONTINUATION, OP_CLOSE, OP_PING, OP_PONG]))
    if opcode == OP_CLOSE:
        payload = draw(st.one_of(close_payloads(), st.binary(max_size=4),
                                 st.integers(0, 65535).map(lambda code: struct.pack("!H", code))))
    elif opcode == OP_TEXT and draw(st.booleans()):
        payload = draw(st.one_of(
            st.text(max_size=40).map(str.encode),
            st.sampled_from([b"\xff", b"\xc3", b"\xc3(", b"\xed\xa0\x80", b"a\xf4\x90\x80\x80"])))
    elif max_message <= 1000 and draw(st.booleans()):
        payload = b"p" * max_message
    else:
        payload = draw(st.binary(max_size=150))
    length = None
    if flaw == "length":
        length = draw(st.one_of(st.sampled_from([*LYING_LENGTHS, max_message, max_message + 1]),
                                st.integers(0, 300)))
    return client_frame_bytes(
        payload, opcode, final=flaw != "not_final",
        mask=None if flaw == "unmasked" else draw(masks),
        rsv=draw(st.sampled_from([0x10, 0x20, 0x40, 0x70])) if flaw == "reserved_bits" else 0,
        length=length, length_form=draw(st.sampled_from(["16", "64"])) if flaw == "length_form"
        else "minimal")


@functools.cache
@st.composite
def oversize_messages(draw: st.DrawFn, max_message: int) -> bytes:
    """A fragmented message whose fragments, each under the limit, add up to a little over
    it (or exactly to it)."""
    opcode = draw(st.sampled_from([OP_TEXT, OP_BINARY]))
    total = max_message + draw(st.sampled_from([0, 1, 2, 100]))
    if total > 70000:
        total = max_message + 1
    first = draw(st.integers(0, min(total, max_message)))
    frames = client_frame_bytes(b"a" * first, opcode, final=False, mask=draw(masks))
    rest = total - first
    middle = draw(st.integers(0, rest))
    frames += client_frame_bytes(b"b" * middle, OP_CONTINUATION, final=False, mask=draw(masks))
    return frames + client_frame_bytes(b"c" * (rest - middle), OP_CONTINUATION,
                                       mask=draw(masks))


@functools.cache
@st.composite
def fragment_floods(draw: st.DrawFn, max_fragments: int) -> bytes:
    """A message started and not finished, then many (empty or tiny) continuation frames."""
    count = draw(st.sampled_from([max_fragments - 2, max_fragments - 1, max_fragments,
                                  max_fragments + 1, 2 * max_fragments]))
    piece = client_frame_bytes(draw(st.binary(max_size=2)), OP_CONTINUATION, final=False,
                               mask=draw(masks))
    start = client_frame_bytes(b"x", draw(st.sampled_from([OP_TEXT, OP_BINARY])),
                               final=False, mask=draw(masks))
    return start + piece * max(0, count)


@functools.cache
@st.composite
def frame_soups(draw: st.DrawFn, max_message: int, max_fragments: int) -> bytes:
    """Valid frames, arbitrary frames, fragment floods and junk, one after the other,
    sometimes cut short or with a few bytes flipped."""
    parts = draw(st.lists(st.one_of(
        valid_streams(max_message, max_fragments, max_messages=2).map(lambda v: v[0]),
        arbitrary_frames(max_message),
        arbitrary_frames(max_message),
        oversize_messages(max_message),
        fragment_floods(max_fragments),
        st.binary(max_size=12),
    ), max_size=6))
    stream = bytearray(b"".join(parts))
    if stream and draw(st.booleans()):
        for position, bits in draw(st.lists(st.tuples(st.integers(0, len(stream) - 1),
                                                      st.integers(1, 255)), max_size=3)):
            stream[position] ^= bits
    if stream and draw(st.booleans()):
        del stream[draw(st.integers(0, len(stream))):]
    return bytes(stream)


@st.composite
def splits(draw: st.DrawFn, stream: bytes) -> list[bytes]:
    """``stream`` cut into the reads a socket might return: whole, anywhere, byte by byte."""
    length = len(stream)
    how = draw(st.sampled_from(["whole", "cuts", "cuts", "fixed", "bytes"]))
    if how == "whole" or length < 2:
        return [stream]
    if how == "bytes" and length <= 1024:
        return [stream[i:i + 1] for i in range(length)]
    if how == "fixed":
        step = draw(st.integers(1, max(1, length // 2)))
        return [stream[i:i + step] for i in range(0, length, step)]
    cuts = sorted(draw(st.lists(st.integers(0, length), max_size=16)))
    bounds = [0, *cuts, length]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]
