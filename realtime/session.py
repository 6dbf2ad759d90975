"""One client session, whatever transport carries it.

A :class:`Session` is everything the node knows of one client: who it is (user, token claims,
the request it connected with), its channels and the subscriptions still being set up, its codec
(JSON or msgpack, from the first packet), its Engine.IO heartbeat, the ordering of its events
and their acks, its inbound backlog and its outbound limit. Its transport only moves bytes, and
can change under it: a client that starts on long-polling and upgrades continues the same
session on a WebSocket, with nothing lost, doubled or reordered.

Ordering guarantees, the same on every transport:

* A client's events are handled one at a time, in the order they were sent, by one greenlet
  that exists only while there is something to handle; each event's ack is written before
  anything the node deferred until after it (see :meth:`after_reply`).
* Server→client packets leave in the order they were written, and a publication made while a
  subscription is set up reaches the client after the subscribe ack (the hub holds it back in
  ``pending``).

Limits enforced here, once for every transport: the inbound backlog (:data:`MAX_INBOX` events;
past it the transport stops reading until half of it is handled), the event budget
(``events_per_second`` sustained, ``events_burst`` at once: events past it are answered
``rate_limited``, and a client that sends another whole burst regardless is disconnected), and
the outbound limit (``max_outbound_buffer`` bytes held back by the transport; past it the
client is too ``slow`` and the session closes).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import sys
import time
import types
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import gevent

from .client_address import IPNetwork, client_address
from .codecs import (
    JSON,
    NAMESPACE,
    Codec,
    Packet,
    PacketError,
    PacketType,
    codec_for,
)
from .errors import BadRequest, RateLimited, RealtimeError, Unauthorized
from .frames import TRANSPORT_ENCODERS, EngineIOPacket, OutboundFrame, engineio_message, wire_form
from .logs import CONNECTIONS_LOGGER
from .transports.base import Transport
from .transports.framing import CLOSE_GOING_AWAY, CLOSE_INTERNAL_ERROR, CLOSE_NORMAL
from .transports.polling import PollingTransport, decode_payload

if TYPE_CHECKING:
    from .auth import Identity
    from .broker.base import Publication
    from .engineio import EngineServer
    from .metrics import Counters

logger = logging.getLogger(__name__)
connections_logger = logging.getLogger(CONNECTIONS_LOGGER)

# Client events waiting for their session's handler greenlet; past this the transport stops
# reading until the backlog halves (TCP, or the client's one-POST-at-a-time, pushes back).
MAX_INBOX = 256
# publish events queued back to back that go to the broker together (see _handle_publishes)
MAX_PUBLISH_RUN = 64
# A handler greenlet with a long backlog yields to other greenlets every this many events.
EVENTS_PER_YIELD = 32


def parse_query(query_string: str) -> dict[str, str]:
    """A query string's arguments, decoded; the first value of each name."""
    query: dict[str, str] = {}
    for name, value in urllib.parse.parse_qsl(query_string, keep_blank_values=True):
        query.setdefault(name, value)
    return query


# What a connected session keeps of its request's headers and query (nothing): one shared,
# read-only mapping instead of two empty dicts per session.
_NOTHING: Mapping[str, str] = types.MappingProxyType({})


@dataclasses.dataclass(frozen=True, slots=True)
class RequestContext:
    """The HTTP request a session started with.

    ``headers`` (lower-case names) and ``query`` are kept until the connect hook has run, then
    dropped: a node holds thousands of idle sessions and none of that is used after connect.
    ``peer`` and ``origin`` are interned, so sessions from the same address (every session,
    behind a proxy) share one string.
    """

    peer: str
    origin: str | None
    headers: Mapping[str, str] = dataclasses.field(default_factory=lambda: _NOTHING)
    query: Mapping[str, str] = dataclasses.field(default_factory=lambda: _NOTHING)

    @classmethod
    def from_environ(cls, environ: Mapping[str, Any],
                     trusted_proxies: Iterable[IPNetwork] = ()) -> RequestContext:
        """The context of a WSGI request; ``peer`` is the real client behind
        ``trusted_proxies`` (see :func:`realtime.client_address.client_address`)."""
        headers = {key[5:].lower().replace("_", "-"): value
                   for key, value in environ.items() if key.startswith("HTTP_")}
        origin = headers.get("origin")
        forwarded_for = headers.get("x-forwarded-for")
        # Parsing addresses costs more than the rest of a handshake's bookkeeping: only when
        # there is a forwarded address to weigh.
        peer = environ.get("REMOTE_ADDR") or "" if forwarded_for is None else client_address(
            environ.get("REMOTE_ADDR"), forwarded_for, trusted_proxies)
        return cls(sys.intern(peer), sys.intern(origin) if origin else None, headers,
                   parse_query(environ.get("QUERY_STRING", "")))

    def after_connect(self, keep_headers: tuple[str, ...] = ()) -> RequestContext:
        """What the session keeps once connected: the peer, the origin, and the headers named
        in ``keep_headers`` (those the backend proxy forwards on subscribe and publish)."""
        if keep_headers:
            kept = {name: self.headers[name] for name in keep_headers if name in self.headers}
            if kept:
                return RequestContext(self.peer, self.origin, kept)
        return RequestContext(self.peer, self.origin)


class Session:
    """One client; see the module docstring. Created by :class:`~realtime.engineio.EngineServer`.

    ``sid`` is the Engine.IO session id (it names this node, for sticky routing);
    ``client_id`` is the Socket.IO id the client learns when it connects (empty until then).
    ``channels`` holds every channel subscribed to, including those being set up, which also
    appear in ``pending`` with the frames held back until their subscribe ack has left.
    """

    __slots__ = (
        "engine", "sid", "client_id", "user", "identity", "request", "channels", "pending",
        "transport", "upgrade", "codec", "form", "inbox", "worker", "deferred", "attachments",
        "attachment_ack_id", "awaiting_pong", "next_ping", "opened_at", "closed", "budget_tat",
        "rate_limited", "refusals",
    )

    def __init__(self, engine: EngineServer, sid: str, request: RequestContext) -> None:
        self.engine = engine
        self.sid = sid
        self.client_id = ""
        self.user = ""
        # The token's identity (None for anonymous connections without token claims).
        self.identity: Identity | None = None
        self.request = request
        self.channels: set[str] = set()
        self.pending: dict[str, list[tuple[Publication | None, OutboundFrame]]] = {}
        self.transport: Transport = None  # type: ignore[assignment]  # set by attach()
        self.upgrade: Transport | None = None  # a WebSocket being probed
        self.codec: Codec | None = None
        self.form = 0  # index of this session's wire form (codec x transport kind)
        self.inbox: collections.deque | None = None
        self.worker: gevent.Greenlet | None = None
        self.deferred: list[Callable[[], None]] | None = None
        self.attachments = 0  # binary attachments still expected (JSON codec)
        self.attachment_ack_id: int | None = None
        self.awaiting_pong = False
        self.opened_at = time.monotonic()
        self.next_ping = self.opened_at + engine.ping_interval
        self.closed = False
        # The event budget as GCRA: the theoretical arrival time of the next event (0.0, a
        # shared constant, once the budget is full again: idle sessions hold no float).
        self.budget_tat = 0.0
        self.rate_limited = 0  # events refused in a row for want of budget
        self.refusals: set[str] | None = None  # codes of refusals already logged

    def __repr__(self) -> str:
        user = f" user={self.user!r}" if self.user else ""
        return f"<Session {self.sid}{user} {self.transport_name}>"

    @property
    def transport_name(self) -> str:
        return self.transport.name if self.transport is not None else "-"

    def attach(self, transport: Transport) -> None:
        """Make ``transport`` carry this session from now on."""
        self.transport = transport
        self.form = wire_form(self.codec or JSON, transport.kind)

    def set_identity(self, identity: Identity) -> None:
        """Take the connect hook's (or a refresh's) identity; watch its token's expiry."""
        self.identity = identity if identity.authenticated or identity.info else None
        if identity.expires_at is not None:
            self.engine.expire_at(self, identity.expires_at)

    def first_refusal(self, code: str) -> bool:
        """True the first time this session is refused with ``code`` (worth a log line)."""
        if self.refusals is None:
            self.refusals = set()
        if code in self.refusals:
            return False
        self.refusals.add(code)
        return True

    def _spend_budget(self, now: float) -> bool:
        """Take one event from the budget (GCRA); False when there is none left."""
        engine = self.engine
        tat = max(self.budget_tat, now)
        if tat - now > engine.event_tolerance:
            return False
        self.budget_tat = tat + engine.event_interval
        return True

    # -- writing ------------------------------------------------------------------------------

    def send(self, frame: OutboundFrame) -> None:
        """Write an event encoded once for all its recipients (the hub's fan-out calls this)."""
        wire = frame.wires[self.form]
        if wire is None:
            wire = frame.build(self.form)
        if self.transport.write(wire) > self.engine.max_outbound_buffer:
            self.close("slow")

    def write_packets(self, *packets: EngineIOPacket) -> None:
        """Write Engine.IO packets of this session alone (acks, pings, connect replies)."""
        transport = self.transport
        if transport.write(TRANSPORT_ENCODERS[transport.kind](packets)) \
                > self.engine.max_outbound_buffer:
            self.close("slow")

    def write_socketio(self, packet: Packet) -> None:
        self.write_packets(engineio_message((self.codec or JSON).encode(packet)))

    # -- reading: Engine.IO, then Socket.IO ----------------------------------------------------

    def on_packet(self, packet: EngineIOPacket) -> None:
        """An Engine.IO packet from the client; raises PacketError for a protocol violation.

        Runs in the event loop (WebSocket) or a request's greenlet (long-polling): it decodes
        and queues, and never blocks.
        """
        if self.closed:
            return
        if isinstance(packet, bytes):
            self._on_message(packet)
            return
        kind = packet[:1]
        if kind == "4":
            self._on_message(packet[1:])
        elif kind == "3":
            self.awaiting_pong = False
        elif kind == "2":
            self.write_packets("3" + packet[1:])
        elif kind == "1":
            self.close("client closed")
        elif kind not in ("0", "5", "6"):
            # The reference server closes on a packet it cannot parse; so do we.
            raise PacketError(f"unknown Engine.IO packet type {kind!r}")
        # open, upgrade and noop mean nothing on an established transport: ignored.

    def _on_message(self, message: str | bytes) -> None:
        codec = self.codec
        if codec is None:
            codec = self.codec = codec_for(message)
            self.form = wire_form(codec, self.transport.kind)
        if self.attachments and codec is JSON:
            if not isinstance(message, bytes):
                raise PacketError("a text packet while binary attachments were expected")
            self._on_attachment()
            return
        self._on_socketio_packet(codec.decode(message))

    def _on_socketio_packet(self, packet: Packet) -> None:
        kind = packet.type
        if kind is PacketType.CONNECT:
            self._enqueue(("connect", packet.namespace, packet.data))
        elif packet.namespace != NAMESPACE or not self.client_id:
            self._refuse_unconnected(packet)
        elif kind is PacketType.EVENT:
            data = packet.data
            if not isinstance(data, list) or not data:
                raise PacketError("event packet without an event name")
            if self._spend_budget(time.monotonic()):
                self.rate_limited = 0
                self._enqueue(("event", data[0], data[1:], packet.ack_id))
            else:
                self._over_budget(data[0], packet.ack_id)
        elif kind is PacketType.BINARY_EVENT:
            self.attachments, self.attachment_ack_id = packet.attachments, packet.ack_id
        elif kind is PacketType.BINARY_ACK:
            self.attachments, self.attachment_ack_id = packet.attachments, None
        elif kind is PacketType.DISCONNECT:
            self.close("client namespace disconnect")
        elif kind is PacketType.ACK:
            pass  # the server never asks clients for acks
        else:
            raise PacketError(f"unexpected Socket.IO packet type {int(kind)}")

    def _over_budget(self, event: object, ack_id: int | None) -> None:
        """An event past the budget: answered rate_limited (in its turn), or, when the client
        sent another whole burst regardless, the end of the session."""
        self.rate_limited += 1
        if self.rate_limited > self.engine.events_burst:
            logger.info("closing %r: %d events past its budget in a row", self,
                        self.rate_limited)
            self.close("rate limited", notify=True)
            return
        if ack_id is not None:
            error = RateLimited(f"more than {self.engine.events_per_second:g} events per "
                                f"second (bursts of {self.engine.events_burst})")
            if self.first_refusal(error.code):
                logger.info("%r is over its event budget (%s)", self, str(event)[:50])
            self._enqueue(("reply", NAMESPACE, ack_id,
                           error_ack(error, self.engine.node.counters)))

    def _refuse_unconnected(self, packet: Packet) -> None:
        """An event for a namespace the client is not connected to: answer it, never hang."""
        if packet.type in (PacketType.BINARY_EVENT, PacketType.BINARY_ACK):
            self.attachments, self.attachment_ack_id = packet.attachments, None
        if packet.ack_id is not None and packet.type in (PacketType.EVENT,
                                                         PacketType.BINARY_EVENT):
            error = BadRequest(f"not connected to namespace {packet.namespace[:50]!r}")
            self._enqueue(("reply", packet.namespace, packet.ack_id,
                           error_ack(error, self.engine.node.counters)))

    def _on_attachment(self) -> None:
        self.attachments -= 1
        if not self.attachments and self.attachment_ack_id is not None:
            # Publications are JSON: an event with binary attachments is answered like any
            # other bad argument, once its attachments are in (and in its turn).
            error = BadRequest("binary data is not supported: event arguments are JSON")
            self._enqueue(("reply", NAMESPACE, self.attachment_ack_id,
                           error_ack(error, self.engine.node.counters)))
            self.attachment_ack_id = None

    # -- handling client events, one greenlet at a time per session -------------------------

    def _enqueue(self, item: tuple) -> None:
        inbox = self.inbox
        if inbox is None:
            inbox = self.inbox = collections.deque()
        inbox.append(item)
        if len(inbox) >= MAX_INBOX:
            self.transport.pause_reading()
        if self.worker is None:
            self.worker = gevent.spawn(self._work)

    def _work(self) -> None:
        handled = 0
        try:
            while self.inbox and not self.closed:
                handled += 1
                if handled % EVENTS_PER_YIELD == 0:
                    gevent.sleep(0)  # a client with a long backlog must not starve the others
                    if not self.inbox or self.closed:
                        break
                item = self.inbox.popleft()
                kind = item[0]
                if kind == "connect":
                    self._connect(item[1], item[2])
                elif kind == "reply":
                    self.write_socketio(Packet(PacketType.ACK, item[1], [item[3]], item[2]))
                elif item[1] == "publish" and self.inbox and _is_publish(self.inbox[0]):
                    self._handle_publishes(item)
                else:
                    self._answer([(item[3], self.engine.protocol.handle(self, item[1],
                                                                        item[2]))])
                if self.closed:
                    break
                if len(self.inbox) <= MAX_INBOX // 2:
                    self.transport.resume_reading()
        except Exception:
            logger.exception("closing %r: handling an event failed", self)
            self.close("internal error", code=CLOSE_INTERNAL_ERROR)
        finally:
            self.worker = None
            if not self.inbox:
                self.inbox = None

    def _connect(self, namespace: str, auth: Any) -> None:
        if namespace != NAMESPACE:
            self.write_socketio(Packet(PacketType.CONNECT_ERROR, namespace,
                                       {"message": "Invalid namespace"}))
            return
        if not self.client_id:
            try:
                self.engine.protocol.connect(self, auth)
            except RealtimeError as exc:
                self.engine.node.counters.error(exc.code)
                # The official client shows `message` and passes `data` to connect_error.
                self.write_socketio(Packet(PacketType.CONNECT_ERROR, NAMESPACE, {
                    "message": exc.code, "data": {"reason": exc.message}}))
                if not isinstance(exc, Unauthorized):
                    logger.info("connect of %r refused: %s", self, exc.message,
                                extra={"sid": self.sid, "code": exc.code})
                return
            self.request = self.request.after_connect(self.engine.protocol.kept_headers)
            self.opened_at = 0.0  # only the connect timeout needed it: a shared constant now
            if self.engine.log_connections:
                connections_logger.info(
                    "connected %s (user %r) over %s from %s", self.sid, self.user,
                    self.transport_name, self.request.peer,
                    extra={"sid": self.sid, "user": self.user,
                           "transport": self.transport_name, "peer": self.request.peer})
        self.write_socketio(Packet(PacketType.CONNECT, NAMESPACE, {"sid": self.client_id}))

    def _handle_publishes(self, first: tuple) -> None:
        """Handle ``first`` and the publish events queued right behind it as one run.

        A fast publisher's events go to the broker together (one round trip, not one each);
        its acks still leave in event order.
        """
        run = [first]
        inbox = self.inbox
        while inbox and _is_publish(inbox[0]) and len(run) < MAX_PUBLISH_RUN:
            run.append(inbox.popleft())
        answers = self.engine.protocol.handle_publishes(self, [item[2] for item in run])
        self._answer([(item[3], answer) for item, answer in zip(run, answers, strict=True)])

    def _answer(self, acks: list[tuple[int | None, Any]]) -> None:
        """Write the acks of handled events (those that asked for one), then what the node
        deferred until after them (see :meth:`after_reply`)."""
        codec = self.codec or JSON
        packets = [engineio_message(codec.encode(Packet(PacketType.ACK, NAMESPACE, [answer],
                                                        ack_id)))
                   for ack_id, answer in acks if ack_id is not None]
        if packets:
            self.write_packets(*packets)
        deferred, self.deferred = self.deferred, None
        for callback in deferred or ():
            callback()

    def after_reply(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the ack of the event being handled has been written.

        The node calls this while the session's worker handles the event; the ack is
        written right after the handler returns, then these run (see :meth:`_answer`).
        """
        if self.deferred is None:
            self.deferred = []
        self.deferred.append(callback)

    # -- upgrading from long-polling to WebSocket ---------------------------------------------

    def on_probe_packet(self, probe: Transport, packet: EngineIOPacket) -> None:
        """A packet on a WebSocket that is being probed to take over from long-polling."""
        if self.closed or probe is not self.upgrade:
            return
        if packet == "2probe":
            probe.write(TRANSPORT_ENCODERS[probe.kind](["3probe"]))
            # The client now pauses long-polling: it waits for its pending GET to return.
            if isinstance(self.transport, PollingTransport):
                self.transport.release()
        elif packet == "5":
            self._switch_to(probe)
        else:
            raise PacketError("unexpected packet while upgrading")

    def _switch_to(self, websocket: Transport) -> None:
        polling = self.transport
        if not isinstance(polling, PollingTransport):
            raise PacketError("upgrade of a session that is not on long-polling")
        leftovers = polling.detach()
        self.upgrade = None
        self.attach(websocket)
        if leftovers:
            # Whatever no GET took leaves first, as WebSocket frames, in order.
            self.write_packets(*decode_payload(b"\x1e".join(leftovers)))
        if not self.closed and self.inbox and len(self.inbox) >= MAX_INBOX:
            websocket.pause_reading()
        self.engine.on_upgraded(self)

    def abandon_upgrade(self, reason: str) -> None:
        """Give up on the WebSocket being probed; the session stays on long-polling."""
        probe, self.upgrade = self.upgrade, None
        if probe is not None:
            probe.close(b"", CLOSE_NORMAL)
            logger.debug("%r: upgrade abandoned (%s)", self, reason)
        if isinstance(self.transport, PollingTransport):
            self.transport.releasing = False

    def on_transport_closed(self, transport: Transport, reason: str) -> None:
        """The client's connection went away (reported by the transport)."""
        if transport is self.upgrade:
            self.upgrade = None
            if isinstance(self.transport, PollingTransport):
                self.transport.releasing = False
            return
        if transport is self.transport:
            self.close(reason)

    # -- heartbeats and closing ---------------------------------------------------------------

    def check_heartbeat(self, now: float) -> None:
        """Called by the engine's heartbeat wheel when this session's next deadline is due."""
        engine = self.engine
        if self.budget_tat and self.budget_tat <= now:
            self.budget_tat = 0.0  # the budget is full again: hold no float for it
        if self.awaiting_pong:
            self.close("ping timeout")
        elif not self.client_id and now - self.opened_at > engine.ping_timeout:
            self.close("no Socket.IO connect")
        elif now >= self.next_ping:
            self.write_packets("2")
            self.awaiting_pong = True
            self.next_ping = now + engine.ping_interval
            engine.schedule(self, now + engine.ping_timeout)
        else:
            engine.schedule(self, self.next_ping)

    def close(self, reason: str, *, code: int = CLOSE_NORMAL, notify: bool = False) -> None:
        """End the session; idempotent. The node forgets it from a greenlet of its own.

        With ``notify`` the client first gets a Socket.IO DISCONNECT, which tells the official
        client not to reconnect: only for a deliberate disconnect by the server. Every other
        reason (slow, ping timeout, protocol errors, shutdown) closes the transport alone, and
        the client reconnects by itself.
        """
        if self.closed:
            return
        self.closed = True
        transport = self.transport
        final: Any = TRANSPORT_ENCODERS[transport.kind](
            [engineio_message((self.codec or JSON).encode(Packet(PacketType.DISCONNECT)))]
            if notify and self.client_id else [])
        transport.close(final, code)
        if self.upgrade is not None:
            self.upgrade.close(b"", CLOSE_GOING_AWAY)
            self.upgrade = None
        self.inbox = None
        self.engine.on_closed(self, reason)


def _is_publish(item: tuple) -> bool:
    return item[0] == "event" and item[1] == "publish"


def error_ack(error: RealtimeError, counters: Counters | None = None) -> dict[str, Any]:
    """The ack of a refused event: ``{ok: false, error: {code, message}}``, counted in
    ``counters`` (the node's, for ``realtime_errors_total``) when given."""
    if counters is not None:
        counters.error(error.code)
    return {"ok": False, "error": error.to_dict()}

