"""The client protocol, independent of transport: client events in, exactly one ack out.

Both transports (python-socketio for long-polling, :mod:`realtime.websocket` for WebSocket)
hand every client event to :meth:`ClientProtocol.handle`, which parses, authorises, calls the
node and answers ``{ok: true, ...}`` or ``{ok: false, error: {code, message}}``. Nothing a client
sends can raise out of it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .broker.base import StreamPosition
from .channels import MAX_USER_ID_LENGTH, ChannelPolicy, validate_channel
from .errors import BadRequest, InternalError, RealtimeError
from .hub import Connection
from .node import Node

logger = logging.getLogger(__name__)

Ack = dict[str, Any]
RESERVED_EVENTS = frozenset({"connect", "disconnect", "connect_error"})


def user_id_from_auth(auth: object, client_id: str) -> str:
    """The connection's user id: ``auth.user`` when usable, else ``anon-<sid>``."""
    if isinstance(auth, dict):
        user = auth.get("user")
        if isinstance(user, str) and 0 < len(user) <= MAX_USER_ID_LENGTH:
            return user
    return "anon-" + client_id


class ClientProtocol:
    """The events a client may send, and their answers."""

    def __init__(self, node: Node, policy: ChannelPolicy) -> None:
        self.node = node
        self.policy = policy
        self._handlers: dict[str, Callable[[Connection, dict], Ack]] = {
            "subscribe": self._subscribe,
            "unsubscribe": self._unsubscribe,
            "publish": self._publish,
            "history": self._history,
            "presence": self._presence,
        }

    def handle(self, connection: Connection, event: object, args: tuple | list) -> Ack:
        """Answer client event ``event`` with arguments ``args`` (the ack's one object)."""
        try:
            handler = self._handlers.get(event) if isinstance(event, str) else None
            if handler is None:
                if event in RESERVED_EVENTS:
                    raise BadRequest(f"{event!r} is a reserved event name")
                raise BadRequest(f"unknown event {str(event)[:50]!r}")
            if len(args) != 1 or not isinstance(args[0], dict):
                raise BadRequest("the event takes one object argument")
            return {"ok": True, **handler(connection, args[0])}
        except RealtimeError as exc:
            return self._refused(event, connection, exc)
        except Exception:
            logger.exception("%s from %s failed", str(event)[:50], connection)
            return error_ack(InternalError())

    def handle_publishes(self, connection: Connection, events_args: list[tuple | list],
                         ) -> list[Ack]:
        """Answer a run of ``publish`` events (their arguments) from one connection, in order.

        The same answers as :meth:`handle` gives each event, but the publications go to the
        broker together, so a client publishing faster than the round trip to the broker is
        not held to one publication per round trip.
        """
        answers: list[Ack | None] = [None] * len(events_args)
        accepted, slots = [], []
        for index, args in enumerate(events_args):
            try:
                if len(args) != 1 or not isinstance(args[0], dict):
                    raise BadRequest("the event takes one object argument")
                channel, data = self._publication(connection, args[0])
            except RealtimeError as exc:
                answers[index] = self._refused("publish", connection, exc)
                continue
            accepted.append((channel, data, connection.user))
            slots.append(index)
        if accepted:
            try:
                results = self.node.publish_many(accepted)
            except Exception:
                logger.exception("publish from %s failed", connection)
                results = [InternalError()] * len(accepted)
            for index, result in zip(slots, results, strict=True):
                answers[index] = (self._refused("publish", connection, result)
                                  if isinstance(result, RealtimeError)
                                  else {"ok": True, "offset": result.offset,
                                        "epoch": result.epoch})
        return answers  # type: ignore[return-value]  # every slot is filled by now

    def _refused(self, event: object, connection: Connection, exc: RealtimeError) -> Ack:
        logger.info("%s from %s refused: %s %s", str(event)[:50], connection, exc.code,
                    exc.message)
        return error_ack(exc)

    def _subscribe(self, connection: Connection, payload: dict) -> Ack:
        channel = validate_channel(payload.get("channel"))
        since = _stream_position(payload.get("since"))
        self.policy.check_subscribe(connection.user, channel)
        return self.node.subscribe(connection, channel, since).to_dict()

    def _unsubscribe(self, connection: Connection, payload: dict) -> Ack:
        self.node.unsubscribe(connection, validate_channel(payload.get("channel")))
        return {}

    def _publish(self, connection: Connection, payload: dict) -> Ack:
        channel, data = self._publication(connection, payload)
        position = self.node.publish(channel, data, user=connection.user)
        return {"offset": position.offset, "epoch": position.epoch}

    def _publication(self, connection: Connection, payload: dict) -> tuple[str, Any]:
        """The channel and data of a ``publish`` event, once parsed and authorised."""
        channel = validate_channel(payload.get("channel"))
        if "data" not in payload:
            raise BadRequest("data is required")
        self.policy.check_publish(connection.user, channel)
        return channel, payload["data"]

    def _history(self, connection: Connection, payload: dict) -> Ack:
        channel = validate_channel(payload.get("channel"))
        limit = parse_limit(payload.get("limit"))
        self.policy.check_subscribe(connection.user, channel)
        result = self.node.history(channel, limit)
        return {"epoch": result.position.epoch, "offset": result.position.offset,
                "publications": [p.to_event() for p in result.publications]}

    def _presence(self, connection: Connection, payload: dict) -> Ack:
        channel = validate_channel(payload.get("channel"))
        self.policy.check_subscribe(connection.user, channel)
        return {"members": [m.to_dict() for m in self.node.presence(channel)]}


def parse_limit(limit: object) -> int | None:
    """A history ``limit``: absent/None for all kept, else a non-negative integer."""
    if limit is None:
        return None
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise BadRequest("limit must be a non-negative integer")
    return limit


def error_ack(error: RealtimeError) -> Ack:
    return {"ok": False, "error": error.to_dict()}


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
