"""Connections over python-socketio / python-engineio: long-polling, and WebSocket upgrades.

Every use of python-socketio internals lives in this module, so that the versions pinned in
``requirements.txt`` are the only ones it must fit. Direct WebSocket connections take the faster
path in :mod:`realtime.websocket` instead.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import socketio
from engineio import exceptions as eio_exceptions
from engineio import payload as eio_payload

from .frames import EncodedEvent, EventBatch, new_session_id
from .hub import Connection

logger = logging.getLogger(__name__)

NAMESPACE = "/"


class EngineIOConnection(Connection):
    """A connection served by python-socketio; frames go through ``Server._send_packet``.

    That is the path of python-socketio's own emits, so the Flask-SocketIO test client sees
    them too. Each recipient costs one Engine.IO queue put and no encoding: ``_send_packet``
    only calls ``frame.encode()``, which returns the text encoded once for the whole node.
    """

    __slots__ = ("server", "transport_id")

    def __init__(self, client_id: str, user: str, server: socketio.Server,
                 transport_id: str) -> None:
        super().__init__(client_id, user)
        self.server = server
        self.transport_id = transport_id

    def send(self, frame: EncodedEvent | EventBatch) -> None:
        try:
            for event in frame.events:
                self.server._send_packet(self.transport_id, event)
        except Exception:
            # One broken connection must not stop the fan-out to the others.
            logger.exception("send to %s failed", self)

    def close(self, reason: str) -> None:
        logger.info("closing %s: %s", self, reason)
        self.server.disconnect(self.client_id, namespace=NAMESPACE)

    def after_reply(self, callback: Callable[[], None]) -> None:
        # python-socketio queues an event's ack synchronously, in the handler's greenlet, right
        # after the handler returns (async_handlers is off). A greenlet spawned now first runs
        # when that greenlet next yields, which is after the ack is queued.
        self.server.start_background_task(_run_logged, callback)


def _run_logged(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception:
        logger.exception("deferred callback failed")


def prefix_session_ids(server: socketio.Server, node_id: str) -> None:
    """Issue Engine.IO session ids that name this node (see :func:`frames.new_session_id`)."""
    server.eio.generate_id = functools.partial(new_session_id, node_id)


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
