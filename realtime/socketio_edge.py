"""The Flask-SocketIO edge: python-socketio sessions (long-polling and upgrades) to the protocol."""

from __future__ import annotations

import logging
from typing import Any

from flask import request
from flask_socketio import SocketIO

from .errors import BadRequest
from .hub import Connection
from .protocol import Ack, ClientProtocol, error_ack, user_id_from_auth
from .transport import NAMESPACE, EngineIOConnection

logger = logging.getLogger(__name__)


def register_socketio_handlers(socketio: SocketIO, protocol: ClientProtocol) -> None:
    """Route every event of ``socketio``'s clients through ``protocol``."""
    server = socketio.server
    hub = protocol.node.hub

    @socketio.on("connect", namespace=NAMESPACE)
    def on_connect(auth: Any = None) -> Any:
        if hub.get(request.sid) is not None:
            # A connected client emitted an event named "connect".
            return error_ack(BadRequest("'connect' is a reserved event name"))
        connection = EngineIOConnection(
            request.sid, user_id_from_auth(auth, request.sid), server,
            server.manager.eio_sid_from_sid(request.sid, NAMESPACE))
        protocol.node.connect(connection)
        return None

    @socketio.on("disconnect", namespace=NAMESPACE)
    def on_disconnect(*args: Any) -> Any:
        if server.manager.is_connected(request.sid, NAMESPACE):
            # A connected client emitted an event named "disconnect"; a real disconnect is
            # reported after python-socketio has marked the session as leaving.
            return error_ack(BadRequest("'disconnect' is a reserved event name"))
        connection = hub.get(request.sid)
        if connection is not None:
            protocol.node.disconnect(connection)
        return None

    @socketio.on("*", namespace=NAMESPACE)
    def on_event(event: Any, *args: Any) -> Ack:
        connection: Connection | None = hub.get(request.sid)
        if connection is None:
            return error_ack(BadRequest("not connected"))
        return protocol.handle(connection, event, args)
