"""Server→client events encoded once per node, in the form each kind of session writes.

A publication reaches sessions that differ in codec (JSON or msgpack) and in transport
(WebSocket frames or long-polling records). :class:`EncodedEvent` builds each of those
:data:`WIRE_FORMS` at most once, the first time a recipient needs it, and every later recipient
of that form gets the same bytes: encoding costs once per codec per node, never per recipient.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from .codecs import CODECS, Codec
from .transports import polling, websocket

logger = logging.getLogger(__name__)

EngineIOPacket = str | bytes
Wire = Any  # what a transport's write() takes: bytes (WebSocket), tuple of records (polling)

# A transport kind's encoder: Engine.IO packets -> its wire form.
TRANSPORT_ENCODERS: tuple[Callable[[Sequence[EngineIOPacket]], Wire], ...] = (
    websocket.encode_packets,
    polling.encode_packets,
)
WIRE_FORMS = len(CODECS) * len(TRANSPORT_ENCODERS)


def wire_form(codec: Codec, transport_kind: int) -> int:
    """The index of the wire form of sessions with ``codec`` on transports of that kind."""
    return codec.index * len(TRANSPORT_ENCODERS) + transport_kind


def engineio_message(socketio_packet: str | bytes) -> EngineIOPacket:
    """The Engine.IO ``message`` packet carrying a codec's output (text gets its type ``4``)."""
    return "4" + socketio_packet if isinstance(socketio_packet, str) else socketio_packet


class EncodedEvent:
    """One Socket.IO EVENT for many sessions; ``wires[form]`` once built (else None)."""

    __slots__ = ("name", "payload", "_messages", "wires")

    def __init__(self, name: str, payload: Any) -> None:
        self.name = name
        self.payload = payload
        self._messages: list[EngineIOPacket | None] = [None] * len(CODECS)
        self.wires: list[Wire | None] = [None] * WIRE_FORMS

    @property
    def events(self) -> tuple[EncodedEvent, ...]:
        return (self,)

    def message(self, codec_index: int) -> EngineIOPacket:
        """The Engine.IO message of this event for sessions using codec ``codec_index``."""
        message = self._messages[codec_index]
        if message is None:
            message = engineio_message(CODECS[codec_index].encode_event(self.name, self.payload))
            self._messages[codec_index] = message
        return message

    def build(self, form: int) -> Wire:
        """``wires[form]``, building (and keeping) it the first time it is needed."""
        wire = self.wires[form]
        if wire is None:
            codec_index, kind = divmod(form, len(TRANSPORT_ENCODERS))
            wire = self.wires[form] = TRANSPORT_ENCODERS[kind](_messages([self], codec_index))
        return wire


class EventBatch:
    """Several events for the same sessions, in order: one write per WebSocket session."""

    __slots__ = ("events", "wires")

    def __init__(self, events: list[EncodedEvent]) -> None:
        self.events = events
        self.wires: list[Wire | None] = [None] * WIRE_FORMS

    def build(self, form: int) -> Wire:
        wire = self.wires[form]
        if wire is None:
            codec_index, kind = divmod(form, len(TRANSPORT_ENCODERS))
            wire = self.wires[form] = TRANSPORT_ENCODERS[kind](
                _messages(self.events, codec_index))
        return wire


def _messages(events: Sequence[EncodedEvent], codec_index: int) -> list[EngineIOPacket]:
    """The events' messages for one codec, leaving out (and logging) any that cannot be encoded.

    Publications are checked to encode with every codec before they are accepted, so this only
    happens to data that reached Redis some other way; it must not stop the fan-out.
    """
    messages = []
    for event in events:
        try:
            messages.append(event.message(codec_index))
        except Exception:
            logger.exception("a %r event cannot be encoded for %s clients, who do not get it",
                             event.name, CODECS[codec_index].name)
    return messages


OutboundFrame = EncodedEvent | EventBatch
