"""The client protocol, independent of transport and codec: client events in, one ack out.

Every session (:mod:`realtime.session`), whatever carries it, connects through
:meth:`ClientProtocol.connect`, the one connect hook that decides who the client is (an
:class:`~realtime.auth.Authenticator`: tokens, or the connect backend of :mod:`realtime.proxy`),
and hands every client event to :meth:`ClientProtocol.handle`, which parses, authorises (the
channel's namespace rules, :mod:`realtime.channels`, then the namespace's subscribe or publish
backend, if any), calls the node and answers ``{ok: true, ...}`` or ``{ok: false,
error: {code, message}}``. Nothing a client sends can raise out of it.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .auth import Authenticator, Identity, create_authenticator
from .broker.base import PublishRequest, StreamPosition
from .channels import validate_channel
from .errors import BadRequest, Forbidden, InternalError, RateLimited, RealtimeError
from .node import Node
from .payloads import check_idempotency_key
from .proxy import BackendProxy, create_proxy_authenticator
from .session import error_ack

if TYPE_CHECKING:
    from .session import Session

logger = logging.getLogger(__name__)

Ack = dict[str, Any]
RESERVED_EVENTS = frozenset({"connect", "disconnect", "connect_error"})


class ClientProtocol:
    """The events a client may send, and their answers."""

    def __init__(self, node: Node, authenticator: Authenticator | None = None) -> None:
        self.node = node
        self.policy = node.channels
        config = node.config
        self.max_subscriptions = config.max_subscriptions
        self.max_connections_per_user = config.max_connections_per_user
        # The backend proxy (realtime/proxy.py), when the configuration names a backend.
        self.proxy = BackendProxy.from_config(config)
        if self.proxy is not None:
            node.metrics.watch_proxy(self.proxy)
        self.authenticator = authenticator or (
            create_proxy_authenticator(config, self.proxy)
            if self.proxy is not None and config.proxy_connect_url
            else create_authenticator(config))
        # Headers a session keeps after connect: those the subscribe/publish backends get.
        self.kept_headers = self.proxy.header_names \
            if self.proxy is not None and self.proxy.decides_events else ()
        self._handlers: dict[str, Callable[[Session, dict], Ack]] = {
            "subscribe": self._subscribe,
            "unsubscribe": self._unsubscribe,
            "publish": self._publish,
            "history": self._history,
            "presence": self._presence,
            "refresh": self._refresh,
        }

    def connect(self, session: Session, auth: object) -> None:
        """Authenticate a session's Socket.IO CONNECT and add it to the node.

        Raises the authenticator's error, or RateLimited when the user already holds
        ``max_connections_per_user`` connections on this node (the session answers
        ``connect_error``).
        """
        client_id = secrets.token_urlsafe(15)
        identity = self.authenticator.authenticate(session.request, auth, client_id)
        held = self.node.hub.session_count_of(identity.user)
        if held >= self.max_connections_per_user:
            raise RateLimited(f"user {identity.user!r} already has {held} connections on this "
                              f"node (the limit)")
        session.client_id, session.user = client_id, identity.user
        session.set_identity(identity)
        self.node.connect(session)

    def handle(self, session: Session, event: object, args: tuple | list) -> Ack:
        """Answer client event ``event`` with arguments ``args`` (the ack's one object)."""
        try:
            handler = self._handlers.get(event) if isinstance(event, str) else None
            if handler is None:
                # (an event name may be any JSON value: only strings are looked up)
                if isinstance(event, str) and event in RESERVED_EVENTS:
                    raise BadRequest(f"{event!r} is a reserved event name")
                raise BadRequest(f"unknown event {str(event)[:50]!r}")
            if len(args) != 1 or not isinstance(args[0], dict):
                raise BadRequest("the event takes one object argument")
            return {"ok": True, **handler(session, args[0])}
        except RealtimeError as exc:
            return self.refused(event, session, exc)
        except Exception:
            logger.exception("%s from %s failed", str(event)[:50], session)
            return error_ack(InternalError(), self.node.counters)

    def handle_publishes(self, session: Session, events_args: list[tuple | list],
                         ) -> list[Ack]:
        """Answer a run of ``publish`` events (their arguments) from one session, in order.

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
                request = self._publication(session, args[0])
            except RealtimeError as exc:
                answers[index] = self.refused("publish", session, exc)
                continue
            accepted.append(request)
            slots.append(index)
        if accepted:
            try:
                results = self.node.publish_many(accepted)
            except Exception:
                logger.exception("publish from %s failed", session)
                results = [InternalError()] * len(accepted)
            for index, result in zip(slots, results, strict=True):
                answers[index] = (self.refused("publish", session, result)
                                  if isinstance(result, RealtimeError)
                                  else {"ok": True, "offset": result.offset,
                                        "epoch": result.epoch})
        return answers  # type: ignore[return-value]  # every slot is filled by now

    def refused(self, event: object, session: Session, exc: RealtimeError) -> Ack:
        """The error ack of a refused event; logged the first time per kind and session.

        A client repeating a refused event (or flooding unknown ones) must not flood the log.
        """
        if session.first_refusal(exc.code):
            logger.info("%s from %s refused: %s %s (further %s refusals of this session are "
                        "not logged)", str(event)[:50], session, exc.code, exc.message,
                        exc.code, extra={"sid": session.sid, "user": session.user or None,
                                         "code": exc.code})
        return error_ack(exc, self.node.counters)

    def _subscribe(self, session: Session, payload: dict) -> Ack:
        channel = validate_channel(payload.get("channel"))
        since = _stream_position(payload.get("since"))
        self.policy.check_subscribe(session.user, session.identity, channel)
        if channel not in session.channels and len(session.channels) >= self.max_subscriptions:
            raise RateLimited(f"at most {self.max_subscriptions} subscriptions per connection")
        if self.proxy is not None and channel not in session.channels \
                and self.proxy.subscribe_url(channel):
            # Last, after the local rules: the backend is asked only about what they allow.
            self.proxy.subscribe(session, channel)
        return self.node.subscribe(session, channel, since).to_dict()

    def _unsubscribe(self, session: Session, payload: dict) -> Ack:
        self.node.unsubscribe(session, validate_channel(payload.get("channel")))
        return {}

    def _publish(self, session: Session, payload: dict) -> Ack:
        result = self.node.publish_many([self._publication(session, payload)])[0]
        if isinstance(result, RealtimeError):
            raise result
        return {"offset": result.offset, "epoch": result.epoch}

    def _publication(self, session: Session, payload: dict) -> PublishRequest:
        """The publication a ``publish`` event asks for, once parsed and authorised."""
        channel = validate_channel(payload.get("channel"))
        if "data" not in payload:
            raise BadRequest("data is required")
        idempotency_key = check_idempotency_key(payload.get("idempotency_key"))
        self.policy.check_publish(session.user, session.identity, channel,
                                  channel in session.channels)
        data = payload["data"]
        if self.proxy is not None and self.proxy.publish_url(channel):
            # Oversize data is refused here rather than sent to the backend for nothing (what
            # the backend answers is checked again when it is published).
            self.node.check_data_size(channel, data)
            data = self.proxy.publish(session, channel, data)
        return PublishRequest(channel, data, session.user, idempotency_key)

    def _history(self, session: Session, payload: dict) -> Ack:
        channel = validate_channel(payload.get("channel"))
        limit = parse_limit(payload.get("limit"))
        self._check_read(session, channel)
        result = self.node.history(channel, limit)
        return {"epoch": result.position.epoch, "offset": result.position.offset,
                "publications": [p.to_event() for p in result.publications]}

    def _presence(self, session: Session, payload: dict) -> Ack:
        channel = validate_channel(payload.get("channel"))
        self._check_read(session, channel)
        return {"members": [m.to_dict() for m in self.node.presence(channel)]}

    def _check_read(self, session: Session, channel: str) -> None:
        """Raise Forbidden unless ``session`` may read ``channel``'s history and presence:
        the subscribe rules, and, where a backend decides subscribes, a subscription it
        allowed (asking it on every read would cost a call per read)."""
        self.policy.check_subscribe(session.user, session.identity, channel)
        if self.proxy is not None and channel not in session.channels \
                and self.proxy.subscribe_url(channel):
            raise Forbidden("a backend decides who may read this channel: subscribe first")

    def _refresh(self, session: Session, payload: dict) -> Ack:
        """A fresh token before the current one expires: the session lives on until its exp."""
        identity = self.authenticator.refresh(session.identity or Identity(session.user),
                                              payload.get("token"))
        session.set_identity(identity)
        expires_at = identity.expires_at
        return {"expires_at": int(expires_at) if expires_at is not None
                and expires_at.is_integer() else expires_at}


# No channel keeps more publications than this; a larger history limit is a bad request, not
# something to hand to Redis (which refuses integers past 2^63 as an error that reads like an
# outage).
MAX_HISTORY_LIMIT = 1_000_000


def parse_limit(limit: object) -> int | None:
    """A history ``limit``: absent/None for all kept, else an integer 0..MAX_HISTORY_LIMIT."""
    if limit is None:
        return None
    if not isinstance(limit, int) or isinstance(limit, bool) or not \
            0 <= limit <= MAX_HISTORY_LIMIT:
        raise BadRequest(f"limit must be an integer from 0 to {MAX_HISTORY_LIMIT}")
    return limit


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
