"""The hub's transport over python-socketio / python-engineio (gevent).

Every use of python-socketio internals lives in this module, so that the versions pinned in
``requirements.txt`` are the only ones it must fit, and so that the performance work can replace
this transport (direct writes, coalescing, no greenlet per idle connection) without touching the
hub or the node.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import socketio
from socketio import packet as sio_packet

from .hub import Connection

logger = logging.getLogger(__name__)

NAMESPACE = "/"


class PreEncodedPacket(sio_packet.Packet):
    """A Socket.IO EVENT packet whose text is computed once and reused for every recipient."""

    def __init__(self, event: str, payload: Any) -> None:
        super().__init__(sio_packet.EVENT, data=[event, payload], namespace=NAMESPACE)
        self._encoded = super().encode()

    def encode(self) -> str:
        return self._encoded


class SocketIOTransport:
    """:class:`~realtime.hub.Transport` that writes through a python-socketio server.

    Frames go through ``Server._send_packet``, the same path as python-socketio's own emits, so
    the Flask-SocketIO test client sees them too. Each recipient gets one Engine.IO queue put:
    no encoding, no greenlet switch.
    """

    def __init__(self, server: socketio.Server) -> None:
        self._server = server

    def encode_event(self, event: str, payload: Any) -> PreEncodedPacket:
        return PreEncodedPacket(event, payload)

    def send(self, connection: Connection, frame: PreEncodedPacket) -> None:
        try:
            self._server._send_packet(connection.transport_id, frame)
        except Exception:
            # One broken connection must not stop the fan-out to the others.
            logger.exception("send to %s failed", connection)

    def close(self, connection: Connection, reason: str) -> None:
        logger.info("closing %s: %s", connection, reason)
        self._server.disconnect(connection.client_id, namespace=NAMESPACE)

    def after_reply(self, callback: Callable[[], None]) -> None:
        # python-socketio queues an event's ack synchronously, in the handler's greenlet, right
        # after the handler returns (async_handlers is off). A greenlet spawned now first runs
        # when that greenlet next yields, which is after the ack is queued.
        self._server.start_background_task(_run_logged, callback)


def _run_logged(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception:
        logger.exception("deferred transport callback failed")


def guard_malformed_packets(server: socketio.Server) -> None:
    """Close connections that send undecodable Socket.IO packets, with one log line.

    Left alone, python-engineio logs a full traceback for every malformed packet and keeps the
    connection open, so a misbehaving client could flood the log. Socket.IO's reference server
    closes the connection on a parse error; so do we.
    """
    handle_message = server._handle_eio_message

    def guarded(eio_sid: str, data: Any) -> None:
        try:
            handle_message(eio_sid, data)
        except ValueError as exc:
            logger.info("closing %s: malformed Socket.IO packet (%s)", eio_sid, exc)
            server.eio.disconnect(eio_sid)

    server.eio.on("message", guarded)
