"""The WebSocket transport: a non-blocking socket read by an event-loop watcher.

No greenlet is parked per connection. After the HTTP upgrade the socket is taken from the WSGI
handler, whose greenlet ends; reading is a watcher callback that feeds the bytes to the
:class:`~.framing.FrameParser` and hands the Engine.IO packets to the session. Writing is a
plain ``send`` of frames that were encoded once for every recipient; only when the kernel would
block do bytes wait in a buffer, which a write watcher flushes in ONE ``send`` however many
frames it holds.

The same transport serves clients that open a WebSocket straight away and clients that upgrade
from long-polling: while it is the session's ``upgrade`` being probed it reports to the
session's probe handler instead (:meth:`realtime.session.Session.on_probe_packet`).
"""

from __future__ import annotations

import _socket
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import gevent

from ..codecs import PacketError
from .base import WEBSOCKET
from .framing import (
    CLOSE_INTERNAL_ERROR,
    CLOSE_NORMAL,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameParser,
    WebSocketError,
    close_frame,
    frame,
)

if TYPE_CHECKING:
    from ..session import Session

logger = logging.getLogger(__name__)

RECV_SIZE = 65536
_READ, _WRITE = 1, 2


def encode_packets(packets: Sequence[str | bytes]) -> bytes:
    """Engine.IO packets as WebSocket frames: one frame each, text or binary."""
    if len(packets) == 1:  # a single event: most deliveries
        packet = packets[0]
        return frame(packet.encode()) if isinstance(packet, str) else frame(packet, OP_BINARY)
    return b"".join(frame(p.encode()) if isinstance(p, str) else frame(p, OP_BINARY)
                    for p in packets)


class WebSocketTransport:
    """One client's WebSocket; see the module docstring for how it reads and writes."""

    kind = WEBSOCKET
    name = "websocket"

    __slots__ = ("session", "sock", "max_message", "parser", "reader", "writer", "outbuf",
                 "outsize", "closed")

    def __init__(self, session: Session, sock: _socket.socket, max_message: int) -> None:
        self.session = session
        self.sock = sock
        self.max_message = max_message
        # Only while a frame or a fragmented message is incomplete: an idle connection holds
        # no parser state (a node holds thousands of idle connections).
        self.parser: FrameParser | None = None
        self.reader = gevent.get_hub().loop.io(sock.fileno(), _READ)
        self.writer = None
        self.outbuf: list[bytes] | None = None
        self.outsize = 0
        self.closed = False

    def __repr__(self) -> str:
        return f"<WebSocketTransport fd={self.sock.fileno()}>"

    def start(self) -> None:
        self.reader.start(self._on_readable)

    @property
    def buffered_bytes(self) -> int:
        return self.outsize

    # -- writing (the hot path) --------------------------------------------------------------

    def write(self, wire: bytes) -> int:
        if self.outbuf is None:
            # The fan-out calls this once per recipient: the common case (nothing queued, the
            # kernel takes it all) is one C call.
            if self.closed:
                return 0
            try:
                sent = self.sock.send(wire)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._lost("transport error")
                return 0
            if sent == len(wire):
                return 0
            self.outbuf = [wire[sent:]]
            self.outsize = len(wire) - sent
            if self.writer is None:
                self.writer = gevent.get_hub().loop.io(self.sock.fileno(), _WRITE)
            self.writer.start(self._flush)
            return self.outsize
        self.outbuf.append(wire)
        self.outsize += len(wire)
        return self.outsize

    def _flush(self) -> None:
        """Write watcher: send everything queued in one call (coalescing the frames)."""
        outbuf = self.outbuf
        if self.closed or outbuf is None:
            return
        data = b"".join(outbuf) if len(outbuf) > 1 else outbuf[0]
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            return
        except OSError:
            self._lost("transport error")
            return
        if sent == len(data):
            self.outbuf, self.outsize = None, 0
            self.writer.stop()
        else:
            self.outbuf, self.outsize = [data[sent:]], len(data) - sent

    # -- reading -----------------------------------------------------------------------------

    def pause_reading(self) -> None:
        if not self.closed:
            self.reader.stop()

    def resume_reading(self) -> None:
        if not self.closed and not self.reader.active:
            self.reader.start(self._on_readable)

    @property
    def reading(self) -> bool:
        return not self.closed and bool(self.reader.active)

    def _on_readable(self) -> None:
        """Read watcher (runs in the event loop: must not block or raise)."""
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            self._lost("transport error")
            return
        if not data:
            self._lost("transport close")
            return
        parser = self.parser or FrameParser(self.max_message)
        try:
            items = parser.feed(data)
            self.parser = parser if parser.incomplete else None
            for opcode, payload in items:
                if self.closed:
                    return
                if opcode in (OP_TEXT, OP_BINARY):
                    session = self.session
                    if session.upgrade is self:  # an upgrade being probed
                        session.on_probe_packet(self, payload)
                    else:
                        session.on_packet(payload)
                elif opcode == OP_PING:
                    self.write(frame(payload, OP_PONG))
                elif opcode == OP_CLOSE:
                    self._write_final(close_frame(CLOSE_NORMAL))
                    self._lost("client closed")
                # pongs answer nothing we asked: the heartbeat is Engine.IO's ping packet
        except WebSocketError as exc:
            self._refuse(exc.close_code, str(exc))
        except PacketError as exc:
            self._refuse(exc.close_code, str(exc))
        except Exception:
            logger.exception("closing %s: reading failed", self)
            self._refuse(CLOSE_INTERNAL_ERROR, "internal error")

    def _refuse(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self._write_final(close_frame(code, reason[:100]))
        self._lost(f"protocol error ({code}: {reason[:200]})")

    # -- closing -----------------------------------------------------------------------------

    def close(self, final: bytes = b"", code: int = CLOSE_NORMAL) -> None:
        if self.closed:
            return
        self._write_final(final + close_frame(code))
        self._shut()

    def _write_final(self, data: bytes) -> None:
        """Best effort, without waiting: what is queued, then ``data``."""
        if self.closed:
            return
        pending = b"".join(self.outbuf) if self.outbuf else b""
        with contextlib.suppress(OSError):
            self.sock.send(pending + data)

    def _lost(self, reason: str) -> None:
        if self.closed:
            return
        self._shut()
        self.session.on_transport_closed(self, reason)

    def _shut(self) -> None:
        self.closed = True
        for watcher in (self.reader, self.writer):
            if watcher is not None:
                watcher.stop()
                watcher.close()
        self.writer = None
        self.outbuf, self.outsize = None, 0
        self.sock.close()
        self.session.engine.on_websocket_closed()
