"""WebSocket framing (RFC 6455), server side, without I/O: bytes in, messages out.

:class:`FrameParser` is fed whatever a ``recv`` brought and returns the complete messages and
control frames in it; it never reads a socket, so it can be tested and fuzzed alone. Its work
is linear in the bytes fed, whatever their shape: a frame's header is checked against the
limits before its payload is awaited, so a declared 50 MB frame is refused from its first ten
bytes, and a fragmented message is capped both in total size and in the number of fragments.

The writers (:func:`frame`, :func:`close_frame`) build the unmasked frames a server sends.
"""

from __future__ import annotations

import struct
from typing import Final

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA
CONTROL_OPCODES: Final = frozenset({OP_CLOSE, OP_PING, OP_PONG})

# Close codes (RFC 6455 section 7.4.1)
CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_UNSUPPORTED_DATA: Final = 1003
CLOSE_BAD_DATA: Final = 1007
CLOSE_POLICY: Final = 1008
CLOSE_TOO_BIG: Final = 1009
CLOSE_INTERNAL_ERROR: Final = 1011
# Codes a peer may not put in a close frame (reserved, or only for reporting locally).
_FORBIDDEN_CLOSE_CODES: Final = frozenset({1004, 1005, 1006, 1015})

# Fragments one message may arrive in. Browsers and common client libraries send a message as
# one frame; the cap bounds the bookkeeping of a peer that sends a message in tiny pieces.
DEFAULT_MAX_FRAGMENTS: Final = 1024
MAX_CONTROL_PAYLOAD: Final = 125


class WebSocketError(ValueError):
    """The peer broke the WebSocket protocol (or a limit); ``close_code`` says how."""

    def __init__(self, message: str, close_code: int = CLOSE_PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.close_code = close_code


def unmask(payload: bytes | bytearray | memoryview, mask: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte client ``mask`` (one big-integer XOR, in C)."""
    length = len(payload)
    if not length:
        return b""
    key = (mask * (length // 4 + 1))[:length]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        length, "little")


class FrameParser:
    """Turns the bytes a client sends into messages and control frames.

    :meth:`feed` returns ``(opcode, payload)`` pairs in arrival order:

    * ``(OP_TEXT, str)`` and ``(OP_BINARY, bytes)``: a complete data message, reassembled from
      its fragments; text is already checked to be UTF-8.
    * ``(OP_PING, bytes)``, ``(OP_PONG, bytes)``: control frames, which may arrive between the
      fragments of a message.
    * ``(OP_CLOSE, bytes)``: the peer's close frame payload (code and reason, checked). Nothing
      after it is parsed.

    Any violation raises :class:`WebSocketError` with the close code to answer: 1002 for
    protocol errors (unmasked frames, reserved bits or opcodes, bad fragmentation, malformed
    control frames), 1007 for text that is not UTF-8, 1009 for a message over
    ``max_message`` bytes (from the frame header, before its payload arrives) or in more than
    ``max_fragments`` fragments. Once it raised, the parser must not be fed again.
    """

    __slots__ = ("max_message", "max_fragments", "_buffer", "_needed", "_fragments",
                 "_fragment_opcode", "_fragment_size", "_closed")

    def __init__(self, max_message: int, max_fragments: int = DEFAULT_MAX_FRAGMENTS) -> None:
        self.max_message = max_message
        self.max_fragments = max_fragments
        # Bytes of an incomplete frame, kept between feeds (None when there are none, which is
        # the usual case: an idle connection holds no buffer), and how many it must reach
        # before parsing is worth trying again.
        self._buffer: bytearray | None = None
        self._needed = 0
        self._fragments: list[bytes] | None = None
        self._fragment_opcode = OP_TEXT
        self._fragment_size = 0
        self._closed = False

    @property
    def buffered(self) -> int:
        """Bytes held for a frame or a fragmented message that is not complete yet."""
        return len(self._buffer or b"") + self._fragment_size

    @property
    def incomplete(self) -> bool:
        """True while a frame or a fragmented message is only partly fed (or after a close):
        the parser's state must then be kept for the next feed."""
        return self._buffer is not None or self._fragments is not None or self._closed

    def feed(self, data: bytes) -> list[tuple[int, str | bytes]]:
        """Parse ``data`` (following whatever was fed before); the complete items in it."""
        if self._closed:
            return []
        buf: bytes | bytearray
        if self._buffer is not None:
            # Appending is amortised O(1): a frame trickled in byte by byte costs linear time.
            self._buffer += data
            if len(self._buffer) < self._needed:
                return []
            buf, self._buffer = self._buffer, None
        else:
            buf = data
        out: list[tuple[int, str | bytes]] = []
        end = len(buf)
        pos = 0
        needed = 2
        # Offsets into one buffer instead of deleting each parsed frame from its front: a
        # read full of tiny frames costs time linear in its size, not quadratic.
        while end - pos >= 2:
            first, second = buf[pos], buf[pos + 1]
            if not second & 0x80:
                raise WebSocketError("client frames must be masked")
            if first & 0x70:
                raise WebSocketError("reserved bits set (no extension was negotiated)")
            opcode, final = first & 0x0F, first & 0x80
            length, header = second & 0x7F, 2
            if length == 126:
                if end - pos < 4:
                    needed = 4
                    break
                length, header = struct.unpack_from("!H", buf, pos + 2)[0], 4
            elif length == 127:
                if end - pos < 10:
                    needed = 10
                    break
                length, header = struct.unpack_from("!Q", buf, pos + 2)[0], 10
            self._check_header(opcode, final, length)
            start = pos + header + 4
            if end - start < length:
                needed = header + 4 + length
                break
            payload = unmask(buf[start:start + length], bytes(buf[start - 4:start]))
            pos = start + length
            item = self._on_frame(opcode, final, payload)
            if item is not None:
                out.append(item)
                if item[0] == OP_CLOSE:
                    self._closed = True
                    return out
        if pos < end:
            self._buffer = bytearray(buf[pos:]) if pos or not isinstance(buf, bytearray) \
                else buf
            self._needed = needed
        return out

    def _check_header(self, opcode: int, final: int, length: int) -> None:
        """Refuse a frame from its header alone, before any of its payload is awaited."""
        if opcode in CONTROL_OPCODES:
            if not final:
                raise WebSocketError("fragmented control frame")
            if length > MAX_CONTROL_PAYLOAD:
                raise WebSocketError("control frame payload over 125 bytes")
        elif opcode in (OP_TEXT, OP_BINARY):
            if self._fragments is not None:
                raise WebSocketError("a new message started inside a fragmented one")
            if length > self.max_message:
                raise WebSocketError(f"frame of {length} bytes is over the limit of "
                                     f"{self.max_message}", CLOSE_TOO_BIG)
        elif opcode == OP_CONTINUATION:
            if self._fragments is None:
                raise WebSocketError("continuation frame without a message")
            if self._fragment_size + length > self.max_message:
                raise WebSocketError("fragmented message over the limit", CLOSE_TOO_BIG)
            if len(self._fragments) >= self.max_fragments:
                raise WebSocketError(f"message in more than {self.max_fragments} fragments",
                                     CLOSE_TOO_BIG)
        else:
            raise WebSocketError(f"unknown opcode {opcode:#x}")

    def _on_frame(self, opcode: int, final: int, payload: bytes,
                  ) -> tuple[int, str | bytes] | None:
        if opcode == OP_CONTINUATION:
            assert self._fragments is not None  # checked from the header
            self._fragments.append(payload)
            self._fragment_size += len(payload)
            if not final:
                return None
            payload = b"".join(self._fragments)
            opcode = self._fragment_opcode
            self._fragments, self._fragment_size = None, 0
        elif opcode in (OP_TEXT, OP_BINARY) and not final:
            self._fragments, self._fragment_opcode = [payload], opcode
            self._fragment_size = len(payload)
            return None
        if opcode == OP_TEXT:
            try:
                return OP_TEXT, payload.decode()
            except UnicodeDecodeError:
                raise WebSocketError("text message is not UTF-8", CLOSE_BAD_DATA) from None
        if opcode == OP_CLOSE:
            _check_close_payload(payload)
        return opcode, payload


def _check_close_payload(payload: bytes) -> None:
    if not payload:
        return
    if len(payload) == 1:
        raise WebSocketError("close frame with a one-byte payload")
    code = struct.unpack_from("!H", payload)[0]
    if code < 1000 or code in _FORBIDDEN_CLOSE_CODES or 1016 <= code < 3000 or code >= 5000:
        raise WebSocketError(f"close frame with invalid code {code}")
    try:
        payload[2:].decode()
    except UnicodeDecodeError:
        raise WebSocketError("close reason is not UTF-8", CLOSE_BAD_DATA) from None


def frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One final, unmasked server frame carrying ``payload``."""
    length = len(payload)
    first = 0x80 | opcode
    if length < 126:
        header = struct.pack("!BB", first, length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", first, 126, length)
    else:
        header = struct.pack("!BBQ", first, 127, length)
    return header + payload


def close_frame(code: int = CLOSE_NORMAL, reason: str = "") -> bytes:
    """A close frame with ``code`` and a (short) ``reason``."""
    return frame(struct.pack("!H", code) + reason.encode()[:MAX_CONTROL_PAYLOAD - 2], OP_CLOSE)
