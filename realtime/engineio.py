"""The Engine.IO v4 server: handshakes, sessions by id, upgrades and heartbeats.

Every client request under ``/socket.io/`` ends here, whatever its transport:

* ``GET ?transport=polling`` without ``sid`` opens a session on long-polling; with ``sid`` it is
  that session's long-poll, and ``POST`` carries its client's packets.
* A WebSocket upgrade without ``sid`` opens a session on a WebSocket straight away; with the
  ``sid`` of a long-polling session it is that session's upgrade: the socket is probed
  (``2probe``/``3probe``) and, on the client's ``5``, the session moves onto it, with whatever
  long-polling had not delivered yet sent first. From then on the session costs what a
  WebSocket-first one does.

Session ids start with the node id (``n2.AbC…``) so that a load balancer can route a session's
requests to the node that holds it. One heartbeat wheel serves every session: each is visited
only when its next ping or deadline is due.
"""

from __future__ import annotations

import _socket
import base64
import collections
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event

from .codecs import PacketError
from .config import Config
from .jsontext import dumps
from .logs import CONNECTIONS_LOGGER
from .session import RequestContext, Session, parse_query
from .sockets import sendall
from .transports.framing import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
)
from .transports.polling import PollingOverlap, PollingTransport, body_limit
from .transports.websocket import WebSocketTransport, encode_packets

if TYPE_CHECKING:
    from .protocol import ClientProtocol

logger = logging.getLogger(__name__)
connections_logger = logging.getLogger(CONNECTIONS_LOGGER)

PATH = "/socket.io"
WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# Seconds a client has to finish an upgrade (send "5") once its WebSocket is open.
UPGRADE_TIMEOUT = 10.0
# Close reasons that are the client's own doing, or one per client by design: not worth a log
# line each.
QUIET_REASONS = frozenset({"client closed", "transport close", "client namespace disconnect",
                           "server draining"})
# A drain closes its sessions evenly over this share of the drain timeout; the rest is left for
# their presence clean-up and the HTTP requests in flight.
DRAIN_SPREAD = 0.8
DRAIN_TICK = 0.05  # seconds between two slices of a drain's closes

StartResponse = Callable[..., Any]


def new_session_id(node_id: str) -> str:
    """An Engine.IO session id that names its node: ``<node_id>.<random>``.

    A load balancer can then send every request of a session to the node that holds it by
    reading the ``sid`` query argument, which works for thousands of clients behind one IP,
    where ``ip_hash`` does not (see ``nginx/README.md``).
    """
    return f"{node_id}.{secrets.token_urlsafe(15)}"


def host_allowed(environ: Mapping[str, Any], allowed: frozenset[str]) -> bool:
    """True when the request's Host (without its port) is one of ``allowed`` (empty: any).

    Behind a proxy that rewrites Host, list what the proxy sends; ``--allowed-hosts`` guards a
    node reached under names it does not expect (DNS rebinding against a local node).
    """
    if not allowed:
        return True
    host = environ.get("HTTP_HOST", "").lower()
    if host.startswith("["):  # [IPv6]:port
        host = host[1:host.find("]")] if "]" in host else host
    else:
        host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return host in allowed


class HandshakeError(Exception):
    """A request under /socket.io/ that is refused with a 4xx (or 503) and a JSON error body."""

    def __init__(self, message: str, status: str = "400 Bad Request",
                 code: str = "bad_request") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


DRAINING = HandshakeError("this node is shutting down: connect again (to another node)",
                          "503 Service Unavailable", "unavailable")


class EngineServer:
    """Engine.IO sessions of one node (see the module docstring)."""

    def __init__(self, config: Config, protocol: ClientProtocol) -> None:
        self.protocol = protocol
        self.node = protocol.node
        self.node_id = config.node_id
        self.ping_interval = config.ping_interval
        self.ping_timeout = config.ping_timeout
        self.max_payload = config.max_message_size + config.frame_overhead
        self.max_outbound_buffer = config.max_outbound_buffer
        # The per-session event budget (GCRA, see Session._spend_budget): one event every
        # event_interval seconds, events_burst of them at once.
        self.events_per_second = config.events_per_second
        self.events_burst = config.events_burst
        self.event_interval = 1.0 / config.events_per_second
        self.event_tolerance = (config.events_burst - 1) * self.event_interval
        self.allowed_origins = config.cors_allowed_origins
        self.allowed_hosts = config.allowed_host_names
        self.trusted_proxies = config.trusted_proxy_networks
        # One info line per connect, upgrade and disconnect (--log-connections); never per
        # message.
        self.log_connections = config.log_connections
        self._open_fields = {"pingInterval": int(self.ping_interval * 1000),
                             "pingTimeout": int(self.ping_timeout * 1000),
                             "maxPayload": self.max_payload}
        self.sessions: dict[str, Session] = {}
        # greenlets making the node forget closed sessions (see on_closed)
        self.cleanups: set[gevent.Greenlet] = set()
        # due second -> sessions to check then (pings, pong deadlines, connect timeouts)
        self._wheel: dict[int, list[Session]] = collections.defaultdict(list)
        # due second (monotonic) -> sessions whose token expires then (see expire_at)
        self._expiries: dict[int, list[Session]] = collections.defaultdict(list)
        # WebSockets being probed for an upgrade -> (session, deadline)
        self._upgrades: dict[WebSocketTransport, tuple[Session, float]] = {}
        # WebSockets this node adopted and that are not closed yet (a count, not a set: a
        # set entry per idle connection would cost more than the rest of its bookkeeping)
        self.websocket_count = 0
        self._ticker: gevent.Greenlet | None = None
        # True once drain() began: new sessions are refused (503), existing ones closed
        self.draining = False

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._ticker = gevent.spawn(self._tick_forever)

    def stop(self, timeout: float = 5.0) -> None:
        """Close every session and wait (up to ``timeout``) until the node forgot them.

        The node's presence and subscriptions are cleaned up before its broker closes, instead
        of failing half-way on closed Redis connections.
        """
        if self._ticker is not None:
            self._ticker.kill()
        for session in list(self.sessions.values()):
            session.close("server shutting down", code=CLOSE_GOING_AWAY)
        gevent.joinall(list(self.cleanups), timeout=timeout)

    def drain(self, duration: float, cut_short: gevent.event.Event) -> None:
        """Close every session by closing its transport, evenly over most of ``duration``
        seconds, and wait (up to the rest of it) until the node forgot them.

        A transport close, never a Socket.IO DISCONNECT: the official client then reconnects
        by itself, to another node behind the load balancer, spread over the drain rather than
        all at once. New sessions are refused with 503 from now on. When ``cut_short`` is set
        (a second SIGTERM), the remaining sessions are closed at once and nothing is waited
        for.
        """
        self.draining = True
        started = time.monotonic()
        sessions = [session for session in self.sessions.values() if not session.closed]
        spread = duration * DRAIN_SPREAD
        closed = 0
        while closed < len(sessions):
            elapsed = time.monotonic() - started
            due = len(sessions) if cut_short.is_set() or spread <= 0 else \
                min(len(sessions), int(len(sessions) * elapsed / spread) + 1)
            for session in sessions[closed:due]:
                if not session.closed:
                    session.close("server draining", code=CLOSE_GOING_AWAY)
            closed = due
            if closed < len(sessions):
                cut_short.wait(DRAIN_TICK)
        end = started + duration
        while self.cleanups and not cut_short.is_set() and time.monotonic() < end:
            cut_short.wait(min(DRAIN_TICK, max(0.0, end - time.monotonic())))
        logger.info("drained %d sessions in %.1f s (%d presence clean-ups unfinished)",
                    len(sessions), time.monotonic() - started, len(self.cleanups))

    @property
    def session_count(self) -> int:
        return len(self.sessions)

    def on_websocket_closed(self) -> None:
        """A WebSocket transport this node adopted closed (it calls this once)."""
        self.websocket_count -= 1

    def new_session(self, request: RequestContext) -> Session:
        """A session for a client that started with ``request`` (not yet on a transport)."""
        return Session(self, new_session_id(self.node_id), request)

    def _register(self, session: Session) -> None:
        self.sessions[session.sid] = session
        self.schedule(session, time.monotonic() + self.ping_interval)

    def on_upgraded(self, session: Session) -> None:
        """``session`` moved from long-polling onto its WebSocket."""
        self._upgrades.pop(session.transport, None)  # type: ignore[call-overload]
        if self.log_connections:
            connections_logger.info("upgraded %s to websocket", session.sid,
                                    extra={"sid": session.sid, "user": session.user,
                                           "transport": "websocket"})

    def on_closed(self, session: Session, reason: str) -> None:
        """``session`` closed: forget it here now, and in the node from a greenlet of its own.

        Closing may happen inside the hub's fan-out loop or the event loop itself, where
        forgetting (which may wait on Redis) must not run. A long-polling session stays
        reachable until its client fetched the close packet, or one ping timeout at most.
        """
        label = self.node.counters.disconnected(reason)
        if self.log_connections and session.client_id:
            # The lifecycle line replaces the one below: one line per disconnect.
            connections_logger.info("disconnected %s (user %r): %s", session.sid, session.user,
                                    reason, extra={"sid": session.sid, "user": session.user,
                                                   "reason": label})
        elif reason not in QUIET_REASONS:
            logger.info("closed %r: %s", session, reason,
                        extra={"sid": session.sid, "user": session.user or None,
                               "reason": label})
        transport = session.transport
        if isinstance(transport, PollingTransport) and not transport.finished:
            self.schedule(session, time.monotonic() + self.ping_timeout)
        else:
            self._forget(session)
        if session.client_id:
            cleanup = gevent.spawn(self.node.disconnect, session)
            self.cleanups.add(cleanup)
            cleanup.link(self.cleanups.discard)

    def _forget(self, session: Session) -> None:
        if self.sessions.get(session.sid) is session:
            del self.sessions[session.sid]

    def expire_at(self, session: Session, expires_at: float) -> None:
        """Close ``session`` at ``expires_at`` (a token's exp, seconds since the epoch) unless
        its identity has been refreshed by then. A transport close: the official client
        reconnects, and asks its auth function for a fresh token."""
        delay = expires_at - time.time()
        self._expiries[int(time.monotonic() + max(0.0, delay)) + 1].append(session)

    def _expire(self, now: float, wall: float | None = None) -> None:
        """Close the sessions due by ``now`` (monotonic) whose token expired by ``wall``."""
        wall = time.time() if wall is None else wall
        for second in [s for s in self._expiries if s <= now]:
            for session in self._expiries.pop(second):
                identity = session.identity
                if not session.closed and identity is not None and \
                        identity.expires_at is not None and identity.expires_at <= wall:
                    session.close("token expired", code=CLOSE_POLICY)

    # -- heartbeats ---------------------------------------------------------------------------

    def schedule(self, session: Session, when: float) -> None:
        """Visit ``session`` (``check_heartbeat``) at ``when`` (to the next second)."""
        self._wheel[int(when) + 1].append(session)

    def _tick_forever(self) -> None:
        while True:
            try:
                self._tick(time.monotonic())
            except Exception:
                logger.exception("heartbeat tick failed")
            gevent.sleep(1.0)

    def _tick(self, now: float) -> None:
        for second in [s for s in self._wheel if s <= now]:
            for session in self._wheel.pop(second):
                if session.closed:
                    self._forget(session)  # a long-polling session whose close went unread
                    continue
                try:
                    session.check_heartbeat(now)
                except Exception:
                    # One session's failure must not cost the others of this second their
                    # visit (they are off the wheel now): close it, and carry on.
                    logger.exception("heartbeat of %r failed; closing it", session)
                    session.close("internal error", code=CLOSE_INTERNAL_ERROR)
        self._expire(now)
        for probe, (session, deadline) in list(self._upgrades.items()):
            if session.upgrade is not probe:
                del self._upgrades[probe]
            elif now >= deadline:
                del self._upgrades[probe]
                session.abandon_upgrade("no upgrade packet in time")

    # -- origins ------------------------------------------------------------------------------

    def origin_allowed(self, environ: dict) -> bool:
        """The same rule for every transport: same origin by default, else the allow-list."""
        origin = environ.get("HTTP_ORIGIN")
        allowed = self.allowed_origins
        if not origin or allowed == "*":
            return True
        if allowed is None:
            host = environ.get("HTTP_X_FORWARDED_HOST") or environ.get("HTTP_HOST", "")
            return origin in (f"http://{host}", f"https://{host}")
        return origin in allowed

    def _cors_headers(self, environ: dict) -> list[tuple[str, str]]:
        origin = environ.get("HTTP_ORIGIN")
        if not origin:
            return []
        if self.allowed_origins == "*":
            # Any origin, so never with credentials (browsers refuse "*" with credentials
            # anyway; echoing the origin with credentials would let any site ride on cookies).
            return [("Access-Control-Allow-Origin", "*")]
        return [("Access-Control-Allow-Origin", origin),
                ("Access-Control-Allow-Credentials", "true"), ("Vary", "Origin")]

    # -- long-polling (WSGI) ------------------------------------------------------------------

    def handle_http(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        """The WSGI application for every non-WebSocket request under ``/socket.io/``."""
        try:
            return self._handle_http(environ, start_response)
        except HandshakeError as exc:
            return self._error(start_response, exc.status, str(exc), environ,
                               close=exc is DRAINING, code=exc.code)

    def _handle_http(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        query = parse_query(environ.get("QUERY_STRING", ""))
        method = environ.get("REQUEST_METHOD", "GET")
        if query.get("EIO") != "4":
            raise HandshakeError("unsupported Engine.IO protocol version (this server speaks 4)")
        if query.get("transport") != "polling":
            raise HandshakeError("unknown transport (WebSocket requests must ask to upgrade)")
        if not self.origin_allowed(environ):
            raise HandshakeError("Not an accepted origin.")
        cors = self._cors_headers(environ)
        if method == "OPTIONS":
            headers = [*cors, ("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
                       ("Access-Control-Max-Age", "86400")]
            requested = environ.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS")
            if requested:
                headers.append(("Access-Control-Allow-Headers", requested))
            return _respond(start_response, "200 OK", b"", "text/plain", headers)
        sid = query.get("sid")
        if sid is None:
            if method != "GET":
                raise HandshakeError("a session starts with a GET")
            if self.draining:
                raise DRAINING
            return self._open_polling(environ, start_response, cors)
        session = self.sessions.get(sid)
        if session is None:
            raise HandshakeError("Session ID unknown")
        transport = session.transport
        if not isinstance(transport, PollingTransport):
            raise HandshakeError("this session is no longer on long-polling")
        if method == "GET":
            return self._poll(session, transport, start_response, cors)
        if method == "POST":
            return self._receive(session, transport, environ, start_response, cors)
        raise HandshakeError("method not allowed", "405 Method Not Allowed")

    def _open_polling(self, environ: dict, start_response: StartResponse,
                      cors: list[tuple[str, str]]) -> Iterable[bytes]:
        session = self.new_session(RequestContext.from_environ(environ, self.trusted_proxies))
        session.attach(PollingTransport(session, self.max_payload))
        self._register(session)
        body = b"0" + self._open_packet(session, ["websocket"]).encode()
        return _respond(start_response, "200 OK", body, "text/plain; charset=UTF-8", cors)

    def _poll(self, session: Session, transport: PollingTransport,
              start_response: StartResponse, cors: list[tuple[str, str]]) -> Iterable[bytes]:
        try:
            body = transport.poll(self.ping_interval + self.ping_timeout)
        except PollingOverlap as exc:
            session.close(f"protocol error ({exc})", code=CLOSE_POLICY)
            raise HandshakeError(str(exc)) from None
        if session.closed and transport.finished:
            self._forget(session)
        headers = list(cors)
        if transport.releasing or transport.closed:
            # The client will not poll on this connection again (it is upgrading, or the
            # session ended): free it now rather than at its keep-alive timeout.
            headers.append(("Connection", "close"))
        return _respond(start_response, "200 OK", body, "text/plain; charset=UTF-8", headers)

    def _receive(self, session: Session, transport: PollingTransport, environ: dict,
                 start_response: StartResponse, cors: list[tuple[str, str]],
                 ) -> Iterable[bytes]:
        limit = body_limit(self.max_payload)
        declared = environ.get("CONTENT_LENGTH")
        try:
            length = int(declared) if declared else None
        except ValueError:
            raise HandshakeError("Content-Length is not a number") from None
        if length is not None and length > limit:
            # Refused from the header: the body is never read (and the connection is closed).
            session.close("payload over the limit", code=CLOSE_TOO_BIG)
            return self._error(start_response, "413 Payload Too Large",
                               f"payload of {length} bytes is over the limit of {limit}",
                               environ, close=True, code="too_large")
        body = environ["wsgi.input"].read(limit + 1 if length is None else length)
        if len(body) > limit:
            session.close("payload over the limit", code=CLOSE_TOO_BIG)
            return self._error(start_response, "413 Payload Too Large",
                               "payload over the limit", environ, close=True, code="too_large")
        try:
            transport.receive(body)
        except PacketError as exc:
            session.close(f"protocol error ({exc})", code=exc.close_code)
            if exc.close_code == CLOSE_TOO_BIG:
                return self._error(start_response, "413 Payload Too Large", str(exc), environ,
                                   close=True, code="too_large")
            raise HandshakeError(f"not a valid payload: {exc}") from None
        except PollingOverlap as exc:
            session.close(f"protocol error ({exc})", code=CLOSE_POLICY)
            raise HandshakeError(str(exc)) from None
        headers = list(cors)
        if transport.releasing or transport.closed:
            headers.append(("Connection", "close"))
        return _respond(start_response, "200 OK", b"ok", "text/html", headers)

    def _error(self, start_response: StartResponse, status: str, message: str, environ: dict,
               *, close: bool = False, code: str = "bad_request") -> Iterable[bytes]:
        self.node.counters.error(code)
        body = json.dumps({"error": {"code": code, "message": message}}).encode()
        headers = self._cors_headers(environ) if self.origin_allowed(environ) else []
        if close:
            headers.append(("Connection", "close"))
        return _respond(start_response, status, body, "application/json", headers)

    def _open_packet(self, session: Session, upgrades: list[str]) -> str:
        return dumps({"sid": session.sid, "upgrades": upgrades, **self._open_fields})

    # -- WebSocket ---------------------------------------------------------------------------

    @staticmethod
    def is_websocket_request(environ: dict) -> bool:
        """True for a WebSocket upgrade request under ``/socket.io/``."""
        return (environ.get("HTTP_UPGRADE", "").lower() == "websocket"
                and environ.get("PATH_INFO", "").rstrip("/") == PATH)

    def handle_websocket(self, handler: Any) -> None:
        """Answer a WebSocket upgrade on pywsgi ``handler``'s socket and take the socket over.

        New sessions start on it; a long-polling session's upgrade is probed on it.
        """
        environ = handler.environ
        query = parse_query(environ.get("QUERY_STRING", ""))
        key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "")
        sid = query.get("sid")
        session: Session | None = None
        problem: str | HandshakeError | None = None
        if environ.get("HTTP_SEC_WEBSOCKET_VERSION") != "13" or len(key) != 24:
            problem = "Bad WebSocket handshake"
        elif query.get("EIO") != "4" or query.get("transport") != "websocket":
            problem = "unsupported Engine.IO protocol version or transport"
        elif not self.origin_allowed(environ):
            problem = "Not an accepted origin."
        elif not host_allowed(environ, self.allowed_hosts):
            problem = "this Host is not served here"
        elif sid is None and self.draining:
            problem = DRAINING
        elif sid is not None:
            session = self.sessions.get(sid)
            if session is None or session.closed:
                problem = "Session ID unknown"
            elif not isinstance(session.transport, PollingTransport) \
                    or session.upgrade is not None:
                problem = "this session cannot be upgraded now"
        try:
            if problem is not None:
                refusal = problem if isinstance(problem, HandshakeError) else \
                    HandshakeError(problem)
                self.node.counters.error(refusal.code)
                body = json.dumps({"error": {"code": refusal.code, "message": str(refusal)}})
                handler.socket.sendall(
                    b"HTTP/1.1 %s\r\nContent-Type: application/json\r\n"
                    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
                    % (refusal.status.encode(), len(body), body.encode()))
                return
            accept_key = base64.b64encode(hashlib.sha1(key.encode() + WEBSOCKET_GUID).digest())
            response = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept_key
                        + b"\r\n\r\n")
            if session is None:
                session = self.new_session(
                    RequestContext.from_environ(environ, self.trusted_proxies))
                response += encode_packets(["0" + self._open_packet(session, [])])
            sendall(handler.socket, response)
        except OSError:
            return  # the client left during the handshake
        # Take the descriptor: the handler's socket object forgets it (and does not close
        # it), so the handler and its greenlet end while the connection lives on.
        sock = _socket.socket(fileno=handler.socket.detach())
        handler.socket = None
        self.adopt_websocket(sock, session, probe=sid is not None)

    def adopt_websocket(self, sock: _socket.socket, session: Session, *,
                        probe: bool = False) -> WebSocketTransport:
        """Serve ``session`` over ``sock``, a WebSocket whose handshake was answered.

        A new session starts on it; with ``probe``, it is a long-polling session's upgrade,
        which the session probes and switches to on the client's ``5``.
        """
        sock.setblocking(False)
        # Frames leave as soon as they are written: the fan-out already batches what piled
        # up, and Nagle's algorithm would hold the next frame until the client's delayed ACK
        # (up to 40 ms on Linux).
        with contextlib.suppress(OSError):  # not a TCP socket (a socket pair in tests)
            sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        transport = WebSocketTransport(session, sock, self.max_payload)
        self.websocket_count += 1
        if probe:
            session.upgrade = transport
            self._upgrades[transport] = (session, time.monotonic() + UPGRADE_TIMEOUT)
        else:
            session.attach(transport)
            self._register(session)
        transport.start()
        return transport


def _respond(start_response: StartResponse, status: str, body: bytes, content_type: str,
             headers: list[tuple[str, str]]) -> list[bytes]:
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body))),
                            *headers])
    return [body]

