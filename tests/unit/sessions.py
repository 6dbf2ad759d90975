"""Sessions without a network, for unit tests: a recording transport and a client on top.

:class:`SessionClient` drives a real :class:`~realtime.session.Session` of a real node the way
a Socket.IO client would (Engine.IO packets in through ``on_packet``), with either codec, and
decodes what the session writes to its :class:`RecordingTransport`.
"""

from __future__ import annotations

import base64
from typing import Any

from realtime.codecs import JSON, Codec, Packet, PacketType
from realtime.engineio import EngineServer
from realtime.session import RequestContext, Session
from realtime.transports.base import POLLING
from tests.helpers import wait_until


class RecordingTransport:
    """A long-polling-kind transport that keeps every record the session wrote."""

    kind = POLLING
    name = "recording"

    def __init__(self, session: Session) -> None:
        self.session = session
        self.records: list[bytes] = []
        self.backlog = 0  # what write() reports as held back
        self.reading = True
        self.closed_with: tuple[Any, int] | None = None

    def write(self, wire: tuple[bytes, ...]) -> int:
        if self.closed_with is None:
            self.records.extend(wire)
        return self.backlog

    @property
    def buffered_bytes(self) -> int:
        return self.backlog

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self, final: tuple[bytes, ...], code: int) -> None:
        if self.closed_with is None:
            self.records.extend(final)
            self.closed_with = (final, code)

    def packets(self) -> list[str | bytes]:
        """The Engine.IO packets written so far."""
        return [base64.b64decode(r[1:]) if r[:1] == b"b" else r.decode() for r in self.records]


class SessionClient:
    """A Socket.IO client of ``engine``'s node, talking to one session directly."""

    def __init__(self, engine: EngineServer, codec: Codec = JSON,
                 request: RequestContext | None = None) -> None:
        self.codec = codec
        self.session = engine.new_session(
            request or RequestContext("127.0.0.1", None, {"host": "x"}))
        self.transport = RecordingTransport(self.session)
        self.session.attach(self.transport)
        engine.sessions[self.session.sid] = self.session
        self._next_ack = 0
        self._seen = 0

    # -- sending ------------------------------------------------------------------------------

    def send_packet(self, packet: Packet) -> None:
        encoded = self.codec.encode(packet)
        self.session.on_packet("4" + encoded if isinstance(encoded, str) else encoded)

    def connect(self, auth: Any = None, namespace: str = "/") -> Packet:
        """Send CONNECT; the server's answer (CONNECT or CONNECT_ERROR)."""
        self.send_packet(Packet(PacketType.CONNECT, namespace, auth))
        return wait_until(lambda: next(
            (p for p in self.socketio_packets()
             if p.type in (PacketType.CONNECT, PacketType.CONNECT_ERROR)
             and p.namespace == namespace), None), message="the CONNECT answer")

    def emit(self, event: str, *args: Any, namespace: str = "/") -> Any:
        """Emit ``event`` with an ack id; the ack's one argument, once it arrived."""
        ack_id = self._next_ack
        self._next_ack += 1
        self.send_packet(Packet(PacketType.EVENT, namespace, [event, *args], ack_id))
        return self.wait_ack(ack_id)

    def emit_no_wait(self, event: str, *args: Any) -> int:
        ack_id = self._next_ack
        self._next_ack += 1
        self.send_packet(Packet(PacketType.EVENT, "/", [event, *args], ack_id))
        return ack_id

    def wait_ack(self, ack_id: int) -> Any:
        packet = wait_until(lambda: next(
            (p for p in self.socketio_packets()
             if p.type is PacketType.ACK and p.ack_id == ack_id), None),
            message=f"ack {ack_id}")
        assert isinstance(packet.data, list) and len(packet.data) == 1, packet
        return packet.data[0]

    # -- receiving ----------------------------------------------------------------------------

    def socketio_packets(self) -> list[Packet]:
        """Every Socket.IO packet the session wrote, decoded with the client's codec."""
        packets = []
        for packet in self.transport.packets():
            if isinstance(packet, bytes):
                packets.append(self.codec.decode(packet))
            elif packet.startswith("4"):
                packets.append(self.codec.decode(packet[1:]))
        return packets

    def events(self, name: str | None = None) -> list[Any]:
        """Payloads of the server's events (of ``name`` only, when given), in order."""
        return [p.data[1] if name else (p.data[0], p.data[1])
                for p in self.socketio_packets()
                if p.type is PacketType.EVENT and (name is None or p.data[0] == name)]

    def wait_events(self, name: str, count: int) -> list[Any]:
        return wait_until(lambda: len(self.events(name)) >= count and self.events(name),
                          message=f"{count} {name} events")

    def disconnect(self) -> None:
        self.session.close("client closed")
