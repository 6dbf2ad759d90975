"""The hub's transport over python-socketio / python-engineio (gevent).

Every use of python-socketio internals lives in this module, so that the versions pinned in
``requirements.txt`` are the only ones it must fit, and so that the performance work can replace
this transport (direct writes, coalescing, no greenlet per idle connection) without touching the
hub or the node.
"""

from __future__ import annotations

import functools
import logging
import secrets
from collections.abc import Callable
from typing import Any

import socketio
from engineio import exceptions as eio_exceptions
from engineio import payload as eio_payload
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


def prefix_session_ids(server: socketio.Server, node_id: str) -> None:
    """Issue Engine.IO session ids of the form ``<node_id>.<random>``.

    A load balancer can then send every request of a long-polling session to the node that
    holds it by reading the ``sid`` query argument, which works for thousands of clients
    behind one IP, where ``ip_hash`` does not (see ``nginx/README.md``).
    """
    server.eio.generate_id = lambda: f"{node_id}.{secrets.token_urlsafe(15)}"


def cap_packets_per_poll(server: socketio.Server) -> None:
    """Send at most as many packets per long-polling response as python clients accept.

    python-engineio's client refuses a payload of more than ``Payload.max_decode_packets`` (16)
    packets and drops the connection, while its server sends everything queued in one response.
    A burst of publications would then cut off every python-socketio client on long-polling. The
    rest of the queue goes out with the next poll, which the client sends at once.
    """
    limit = eio_payload.Payload.max_decode_packets
    handle_connect = server.eio.handlers["connect"]

    def connect_with_capped_polls(eio_sid: str, environ: dict, *args: Any) -> Any:
        eio_socket = server.eio.sockets.get(eio_sid)
        if eio_socket is not None:
            eio_socket.poll = functools.partial(_capped_poll, eio_socket, limit)
        return handle_connect(eio_sid, environ, *args)

    server.eio.on("connect", connect_with_capped_polls)


def _capped_poll(eio_socket: Any, limit: int) -> list:
    # engineio.socket.Socket.poll, with a cap on how many packets one call returns.
    queue_empty = eio_socket.server.get_queue_empty_exception()
    server = eio_socket.server
    try:
        first = eio_socket.queue.get(timeout=server.ping_interval + server.ping_timeout)
        eio_socket.queue.task_done()
    except queue_empty:
        raise eio_exceptions.QueueEmpty() from None
    if first is None:
        return []
    packets = [first]
    while len(packets) < limit:
        try:
            pkt = eio_socket.queue.get(block=False)
            eio_socket.queue.task_done()
        except queue_empty:
            break
        if pkt is None:  # the close marker: leave it for the next poll
            eio_socket.queue.put(None)
            break
        packets.append(pkt)
    return packets


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
        except Exception as exc:
            # Our event handlers answer every error with an ack, so what reaches here is
            # python-socketio failing on the packet itself (bad JSON, no event name, ...).
            logger.info("closing %s: malformed Socket.IO packet (%s: %s)", eio_sid,
                        type(exc).__name__, exc)
            server.eio.disconnect(eio_sid)

    server.eio.on("message", guarded)
