"""Server→client events encoded once per node, in the forms each transport writes."""

from __future__ import annotations

import json
import secrets
import struct
from typing import Any

# Engine.IO v4 packet types
EIO_OPEN, EIO_CLOSE, EIO_PING, EIO_PONG, EIO_MESSAGE = "0", "1", "2", "3", "4"
# Socket.IO v5 packet types
SIO_CONNECT, SIO_DISCONNECT, SIO_EVENT, SIO_ACK = "0", "1", "2", "3"
SIO_CONNECT_ERROR, SIO_BINARY_EVENT, SIO_BINARY_ACK = "4", "5", "6"

# WebSocket opcodes (RFC 6455)
OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA


def dumps(value: Any) -> str:
    """JSON exactly as python-socketio writes it: compact, ASCII-escaped."""
    return json.dumps(value, separators=(",", ":"))


def websocket_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
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


def socketio_text_frame(socketio_packet: str) -> bytes:
    """A WebSocket frame carrying one Engine.IO message with one Socket.IO packet."""
    return websocket_frame((EIO_MESSAGE + socketio_packet).encode())


class EncodedEvent:
    """A Socket.IO EVENT for namespace ``/``, encoded once and written to many connections.

    ``encode()`` gives the Socket.IO packet text (python-socketio's packet interface, so the
    Engine.IO transport can queue it as is); ``websocket_frame`` the complete WebSocket frame,
    shared by every WebSocket recipient. Both are built here, once per publication per node, so
    that the per-recipient fan-out only reads an attribute.
    """

    __slots__ = ("_text", "websocket_frame")

    def __init__(self, event: str, payload: Any) -> None:
        self._text = SIO_EVENT + dumps([event, payload])
        self.websocket_frame = socketio_text_frame(self._text)

    def encode(self) -> str:
        return self._text

    @property
    def events(self) -> tuple[EncodedEvent, ...]:
        return (self,)


class EventBatch:
    """Several events for the same subscribers, in order: one write for a WebSocket client.

    ``websocket_frame`` is every event's frame back to back (still one Engine.IO packet per
    WebSocket frame, as the protocol wants), joined once for all recipients.
    """

    __slots__ = ("events", "websocket_frame")

    def __init__(self, events: list[EncodedEvent]) -> None:
        self.events = events
        self.websocket_frame = b"".join(event.websocket_frame for event in events)


def new_session_id(node_id: str) -> str:
    """An Engine.IO session id that names its node: ``<node_id>.<random>``.

    A load balancer can then send every request of a session to the node that holds it by
    reading the ``sid`` query argument, which works for thousands of clients behind one IP,
    where ``ip_hash`` does not (see ``nginx/README.md``).
    """
    return f"{node_id}.{secrets.token_urlsafe(15)}"
