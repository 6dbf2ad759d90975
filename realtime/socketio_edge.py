"""The Socket.IO edge: parses client events, authorises them, calls the node, answers one ack.

Every client→server event answers exactly one object, ``{ok: true, ...}`` or
``{ok: false, error: {code, message}}``; nothing a client sends can raise out of here.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from flask import request
from flask_socketio import SocketIO

from .broker.base import StreamPosition
from .channels import MAX_USER_ID_LENGTH, ChannelPolicy, validate_channel
from .errors import BadRequest, InternalError, RealtimeError
from .hub import Connection
from .node import Node
from .transport import NAMESPACE

logger = logging.getLogger(__name__)

Ack = dict[str, Any]


def user_id_from_auth(auth: object, client_id: str) -> str:
    """The connection's user id: ``auth.user`` when usable, else ``anon-<sid>``."""
    if isinstance(auth, dict):
        user = auth.get("user")
        if isinstance(user, str) and 0 < len(user) <= MAX_USER_ID_LENGTH:
            return user
    return "anon-" + client_id


def register_socketio_handlers(socketio: SocketIO, node: Node, policy: ChannelPolicy) -> None:
    """Attach the client protocol's event handlers to ``socketio``."""
    server = socketio.server

    def current_connection() -> Connection:
        connection = node.hub.get(request.sid)
        if connection is None:
            raise BadRequest("not connected")
        return connection

    def event(name: str) -> Callable[[Callable[[Connection, dict], Ack]], None]:
        """Register ``handler(connection, payload) -> dict`` as event ``name`` with error acks."""
        def register(handler: Callable[[Connection, dict], Ack]) -> None:
            @functools.wraps(handler)
            def on_event(*args: Any) -> Ack:
                return _answer(name, lambda: handler(current_connection(), _payload(args)))
            socketio.on_event(name, on_event, namespace=NAMESPACE)
        return register

    @socketio.on("connect", namespace=NAMESPACE)
    def on_connect(auth: Any = None) -> Any:
        if node.hub.get(request.sid) is not None:
            # A connected client emitted an event named "connect".
            return _error_ack(BadRequest("'connect' is a reserved event name"))
        connection = Connection(request.sid,
                                server.manager.eio_sid_from_sid(request.sid, NAMESPACE),
                                user_id_from_auth(auth, request.sid))
        node.connect(connection)
        logger.debug("connected %s", connection)
        return None

    @socketio.on("disconnect", namespace=NAMESPACE)
    def on_disconnect(*args: Any) -> Any:
        if server.manager.is_connected(request.sid, NAMESPACE):
            # A connected client emitted an event named "disconnect"; a real disconnect is
            # reported after python-socketio has marked the session as leaving.
            return _error_ack(BadRequest("'disconnect' is a reserved event name"))
        connection = node.hub.get(request.sid)
        if connection is not None:
            node.disconnect(connection)
        return None

    @socketio.on("*", namespace=NAMESPACE)
    def on_unknown_event(name: Any, *args: Any) -> Ack:
        return _error_ack(BadRequest(f"unknown event {str(name)[:50]!r}"))

    @event("subscribe")
    def subscribe(connection: Connection, payload: dict) -> Ack:
        channel = validate_channel(payload.get("channel"))
        since = _stream_position(payload.get("since"))
        policy.check_subscribe(connection.user, channel)
        return node.subscribe(connection, channel, since).to_dict()

    @event("unsubscribe")
    def unsubscribe(connection: Connection, payload: dict) -> Ack:
        node.unsubscribe(connection, validate_channel(payload.get("channel")))
        return {}

    @event("publish")
    def publish(connection: Connection, payload: dict) -> Ack:
        channel = validate_channel(payload.get("channel"))
        if "data" not in payload:
            raise BadRequest("data is required")
        policy.check_publish(connection.user, channel)
        position = node.publish(channel, payload["data"], user=connection.user)
        return {"offset": position.offset, "epoch": position.epoch}

    @event("history")
    def history(connection: Connection, payload: dict) -> Ack:
        channel = validate_channel(payload.get("channel"))
        limit = parse_limit(payload.get("limit"))
        policy.check_subscribe(connection.user, channel)
        result = node.history(channel, limit)
        return {"epoch": result.position.epoch, "offset": result.position.offset,
                "publications": [p.to_event() for p in result.publications]}

    @event("presence")
    def presence(connection: Connection, payload: dict) -> Ack:
        channel = validate_channel(payload.get("channel"))
        policy.check_subscribe(connection.user, channel)
        return {"members": [m.to_dict() for m in node.presence(channel)]}


def parse_limit(limit: object) -> int | None:
    """A history ``limit``: absent/None for all kept, else a non-negative integer."""
    if limit is None:
        return None
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise BadRequest("limit must be a non-negative integer")
    return limit


def _payload(args: tuple) -> dict:
    if len(args) != 1 or not isinstance(args[0], dict):
        raise BadRequest("the event takes one object argument")
    return args[0]


def _stream_position(since: object) -> StreamPosition | None:
    if since is None:
        return None
    if not isinstance(since, dict):
        raise BadRequest("since must be an object {epoch, offset}")
    epoch, offset = since.get("epoch"), since.get("offset")
    if not isinstance(epoch, str) or not isinstance(offset, int) or isinstance(offset, bool) \
            or offset < 0:
        raise BadRequest("since must be {epoch: string, offset: non-negative integer}")
    return StreamPosition(epoch, offset)


def _answer(event: str, call: Callable[[], Ack]) -> Ack:
    try:
        return {"ok": True, **call()}
    except RealtimeError as exc:
        logger.info("%s refused: %s %s", event, exc.code, exc.message)
        return _error_ack(exc)
    except Exception:
        logger.exception("%s failed", event)
        return _error_ack(InternalError())


def _error_ack(error: RealtimeError) -> Ack:
    return {"ok": False, "error": error.to_dict()}
