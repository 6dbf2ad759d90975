"""Serving one node: the gevent WSGI server with WebSocket support, and a clean shutdown.

The server defends the node against slow and numerous connections:

* **Request timeouts.** A client has ``header_timeout`` seconds, from the moment its connection
  is accepted, to send its request line and headers; on a keep-alive connection it may first
  sit idle for ``idle_timeout`` seconds (then the connection is closed silently, as servers
  do), and the next request's ``header_timeout`` starts with its first byte. A request that
  started arriving but did not finish in time is answered ``408`` with a JSON error body; a
  connection that never sent a byte is just closed (there is no request to answer, and a
  browser's pre-opened connection must not read a 408 as the answer to its next request).
  A request's body is held to the same clock, with one more second per KiB it declares
  (:data:`MIN_BODY_RATE`): the body of a long-polling POST or an API call must arrive by then
  or the request is answered ``408``. Only reading the request is timed: the application is
  not, so a long-polling GET waits for data inside it for as long as the engine wants.
* **A cap on open connections** (``max_connections``): HTTP connections being served
  (keep-alive ones and long-polls in flight included) plus the WebSockets the engine took over.
  Past it a new connection is answered ``503`` with ``Retry-After: 1`` straight from the accept
  loop, without a greenlet and without reading its request, and closed; existing connections
  are untouched, and one log line marks the start and one the end of each burst of refusals.
  gevent's own mechanism (``spawn=Pool(n)``) would stop accepting instead: clients would queue
  unanswered in the kernel's backlog, and a pool counts greenlets, not the WebSockets that
  leave pywsgi. An answer at once lets clients (and a load balancer) go elsewhere or retry.
* **The API lane.** ``POST /api/publish``, ``/api/broadcast`` and ``/api/batch`` are what
  backends call thousands of times a second on keep-alive connections. When such a request's
  head is already in the connection's read buffer and is a plain one (HTTP/1.1, a
  Content-Length within the route's limit, no Expect, no Transfer-Encoding, no query string),
  the handler reads it itself and hands it to :meth:`realtime.http_api.FastRoutes.answer`,
  without pywsgi's environ, ``start_response``, input wrappers and timers: a publish cost a
  node a third less CPU that way (bench/RESULTS.md). Anything else, including every request
  pywsgi would refuse, takes the general path, which answers it as before; both answer the
  same bytes, under the same timeouts and the same rules on closing the connection.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import resource
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
from gevent import pywsgi

from .app import Realtime, create_app
from .config import Config, ConfigError
from .errors import BadRequest, RealtimeError, Unavailable
from .http_api import FastRoutes
from .redis_support import redacted_url
from .sockets import sendall, wait_readable

logger = logging.getLogger(__name__)

# Body bytes an application left unread that the node still reads through to keep the connection
# (past this, the answer closes it instead).
DISCARD_LIMIT = 64 * 1024

# Connection bursts (a reconnect storm, a benchmark) queue in the kernel rather than being
# refused; Linux caps it at net.core.somaxconn.
LISTEN_BACKLOG = 4096


def check_monkey_patched() -> None:
    """Refuse to serve without gevent's monkey patching: blocking I/O would stall every client."""
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        raise RuntimeError("gevent monkey patching is missing: call gevent.monkey.patch_all() "
                           "first thing in the entry point (run.py does)")


# Limits on a request's header section, as http.client sets them.
MAX_HEADER_LINE = 65536
MAX_HEADERS = 100
# The read buffer of each HTTP connection (pywsgi's default is 8 KiB). It lives as long as the
# connection: long-polls in flight, browsers' idle keep-alive connections. A larger header
# section just takes another recv; large bodies are read past the buffer.
HTTP_READ_BUFFER = 1024
# The slowest a request body may arrive, in bytes per second: its budget is header_timeout plus
# one second per KiB it declares. 8 kbit/s is slower than any real client's link, and the
# bodies a node reads are small (two messages at most), so an honest client never runs out of
# time, while one that dribbles its body holds its connection for a bounded time.
MIN_BODY_RATE = 1024
# The most of an unread body that is read and discarded to keep a connection alive; past it
# (or for a chunked body) the connection is closed instead.
DISCARD_LIMIT = 64 * 1024
# Descriptors a node keeps for itself when max_connections is derived from its open-file limit.
# At rest a node holds about ten (stdio, the event loop's epoll and eventfd, the listener, its
# Redis connections); on top of that come short-lived ones: a static file per page being
# served, a Redis reconnection overlapping the old socket, a JWKS fetch, a DNS lookup, and the
# accepted socket that is answered 503. Running out of descriptors would fail those instead of
# refusing a client cleanly, for 0.3% of a 20,000-file limit.
DESCRIPTOR_RESERVE = 64
# A burst of refused connections ends (and is logged as ended) after this many seconds without
# a refusal.
REFUSAL_QUIET = 5.0
# The API lane's requests: what the head of one starts with, and the HTTP version it takes.
API_LANE_PREFIX = b"POST /api/"
API_LANE_VERSION = b"HTTP/1.1"


def error_response(status: str, error: RealtimeError, headers: tuple[str, ...] = ()) -> bytes:
    """A complete HTTP response with the JSON error body, closing the connection."""
    body = json.dumps({"error": error.to_dict()}).encode()
    head = "".join(f"{header}\r\n" for header in (
        f"HTTP/1.1 {status}", "Content-Type: application/json", f"Content-Length: {len(body)}",
        *headers, "Connection: close"))
    return head.encode("latin-1") + b"\r\n" + body


_date_cache: list[Any] = [0, b""]


def http_date() -> bytes:
    """Now as an HTTP ``Date`` value (pywsgi's), worked out once a second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0], _date_cache[1] = now, pywsgi.format_date_time(now)
    return _date_cache[1]


class LaneRequest:
    """The head of an API-lane request (see the module docstring), as the general path would
    read it: the first Content-Type and Content-Length; other headers' repeated values joined
    with ``,`` and names with ``_`` left out, as in pywsgi's environ."""

    __slots__ = ("path", "head_size", "content_length", "content_type", "authorization",
                 "forwarded_for", "host", "close")

    def __init__(self, path: str, head_size: int, content_length: int,
                 fields: dict[bytes, bytes]) -> None:
        self.path = path
        self.head_size = head_size
        self.content_length = content_length
        content_type = fields.get(b"content-type")
        self.content_type = None if content_type is None else content_type.decode("latin-1")
        authorization = fields.get(b"authorization")
        self.authorization = None if authorization is None else authorization.decode("latin-1")
        forwarded = fields.get(b"x-forwarded-for")
        self.forwarded_for = None if forwarded is None else forwarded.decode("latin-1")
        self.host = fields.get(b"host", b"").decode("latin-1")
        self.close = fields.get(b"connection", b"").lower() == b"close"


def parse_lane_request(buffered: bytes, body_limit: Callable[[str], int | None],
                       ) -> LaneRequest | None:
    """The API-lane request at the start of ``buffered``, or None when it is not one the lane
    serves as the general path would (then nothing about it is decided here).

    ``body_limit(path)`` is the route's body limit, None for a path that is not a fast route.
    """
    if not buffered.startswith(API_LANE_PREFIX):
        return None
    head_end = buffered.find(b"\r\n\r\n")
    if head_end < 0:
        return None  # the head is not all here yet, or is too big for the buffer
    lines = buffered[:head_end].split(b"\r\n")
    request_line = lines[0].split(b" ")
    if len(request_line) != 3 or request_line[2] != API_LANE_VERSION or \
            len(lines) - 1 > MAX_HEADERS:
        return None
    path = request_line[1].decode("latin-1")
    limit = body_limit(path)  # a query string or %-escapes: not a route here
    if limit is None:
        return None
    fields: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip() or b"\n" in line or b"\r" in line:
            return None  # malformed, or obsolete line folding: the general path answers 400
        key, value = name.lower(), value.strip()
        known = fields.get(key)
        if known is None:
            fields[key] = value
        elif key == b"content-length":
            if known != value:
                return None
        elif key != b"content-type" and key != b"connection":
            fields[key] = known + b"," + value
    if b"transfer-encoding" in fields or b"expect" in fields:
        return None
    length = fields.get(b"content-length", b"")
    if not length.isdigit() or len(length) > 12 or int(length) > limit:
        return None  # the general path answers 400, 411 or 413
    return LaneRequest(path, head_end + 4, int(length), fields)


def connection_cap(max_connections: int, open_files: int) -> int:
    """The connections a node holds at once: ``max_connections``, or (0) what its open-file
    limit allows after :data:`DESCRIPTOR_RESERVE`."""
    if max_connections:
        return max_connections
    return max(open_files - DESCRIPTOR_RESERVE, 1)


def _send_nowait(sock: Any, data: bytes) -> None:
    """Best effort: what the kernel takes now. A client that does not read gets no more."""
    with contextlib.suppress(OSError):
        sock.settimeout(0.0)
        sock.send(data)


def _drain(sock: Any) -> None:
    """Read what has arrived on non-blocking ``sock`` (a little at most), without waiting.

    Closing a socket with unread input makes the kernel reset the connection, which can cost
    the client the answer it was sent.
    """
    with contextlib.suppress(OSError):
        for _ in range(4):
            if not sock.recv(16384):
                return


class _IdleTimeout(BaseException):
    """A keep-alive connection sent nothing for ``idle_timeout`` seconds."""


class _RequestTimeout(BaseException):
    """A client did not send its request (line, headers, body) in time.

    A BaseException, as gevent's Timeout is: an application that catches every Exception
    (Flask does, to answer 500) lets it through to the handler, which answers 408.
    """


class RequestHeaders:
    """A request's header section, read the way pywsgi's handler expects headers to behave.

    pywsgi parses headers with the standard library's ``email`` parser, which costs more than
    everything else in a long-polling request. This reads the lines directly, and is stricter:
    obsolete line folding, a line without a colon, and conflicting Content-Length values make
    the request invalid (``status`` says why, and pywsgi answers 400).
    """

    __slots__ = ("_lines", "_values", "status")

    def __init__(self, rfile: Any) -> None:
        self._lines: list[str] = []
        self._values: dict[str, str] = {}
        self.status = ""
        while True:
            raw = rfile.readline(MAX_HEADER_LINE + 1)
            if len(raw) > MAX_HEADER_LINE:
                self.status = "Line too long"
                return
            if raw in (b"\r\n", b"\n", b""):
                return
            if len(self._lines) == MAX_HEADERS:
                self.status = f"More than {MAX_HEADERS} headers"
                return
            line = raw.decode("latin-1")
            name, colon, value = line.partition(":")
            if not colon or not name or name[0] in " \t" or name != name.strip():
                self.status = "Malformed header line"
                return
            key, value = name.lower(), value.strip()
            if key == "content-length" and self._values.get(key, value) != value:
                self.status = "Conflicting Content-Length headers"
                return
            self._lines.append(line)
            self._values.setdefault(key, value)

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of header ``name`` (any case), else ``default``."""
        return self._values.get(name.lower(), default)

    getheader = get

    def __delitem__(self, name: str) -> None:
        del self._values[name.lower()]

    @property
    def typeheader(self) -> str | None:
        return self._values.get("content-type")

    @property
    def headers(self) -> list[str]:
        """The raw ``Name: value`` lines, for building the WSGI environ."""
        return self._lines


class TimedInput:
    """``wsgi.input`` that must deliver the request's body by ``deadline`` (monotonic).

    Each read waits at most until the deadline, then raises :class:`_RequestTimeout` through
    the application to the handler, which answers 408.
    """

    __slots__ = ("_input", "_deadline", "_handler")

    def __init__(self, wsgi_input: pywsgi.Input, deadline: float,
                 handler: RealtimeHandler) -> None:
        self._input = wsgi_input
        self._deadline = deadline
        self._handler = handler

    def _timed(self, read: Any, *args: Any) -> Any:
        # A read that finds its data buffered returns before the timer can fire, even late.
        timer = gevent.Timeout(max(self._deadline - time.monotonic(), 0.001), _RequestTimeout)
        timer.start()
        try:
            return read(*args)
        finally:
            timer.close()

    def read(self, length: int | None = None) -> bytes:
        return self._timed(self._input.read, length)

    def readline(self, size: int | None = None) -> bytes:
        return self._timed(self._input.readline, size)

    def readlines(self, hint: int | None = None) -> list[bytes]:
        return self._timed(self._input.readlines, hint)

    def __iter__(self) -> TimedInput:
        return self

    @property
    def unread(self) -> int | None:
        """Bytes of the body the application left unread (None: unknown, chunked)."""
        body = self._input
        if body.chunked_input:
            return None
        return max(0, (body.content_length or 0) - body.position)

    def _discard(self) -> None:
        # pywsgi reads what the application left of the body so that the connection can
        # serve its next request; not when the answer already closes it (start_response).
        if not self._handler.close_connection:
            self._timed(self._input._discard)

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def _discard(self) -> None:
        """What pywsgi calls after the response: skip the unread body, or close instead."""
        handler, wsgi_input = self._handler, self._input
        if handler.close_connection:
            return  # nothing more is read from this connection
        left = None if wsgi_input.chunked_input else \
            (wsgi_input.content_length or 0) - wsgi_input.position
        if left is None or left > DISCARD_LIMIT:
            handler.close_connection = True  # cheaper than reading it, and never slow
            return
        if left:
            try:
                self._timed(wsgi_input._discard)
            except _RequestTimeout:
                handler.close_connection = True


class RealtimeHandler(pywsgi.WSGIHandler):
    """pywsgi handler that gives WebSocket upgrades under /socket.io/ to the Engine.IO server.

    An upgrade needs the raw socket (which WSGI does not expose): the engine answers it and
    takes the socket over. Everything else (pages, the API, long-polling) is plain WSGI, with
    a small read buffer (:data:`HTTP_READ_BUFFER`), headers read by :class:`RequestHeaders`,
    no access log (one line per long-poll would drown everything else), and the request
    timeouts of :class:`RealtimeServer` (see the module docstring).
    """

    server: RealtimeServer

    def __init__(self, sock: Any, address: Any, server: RealtimeServer) -> None:
        super().__init__(sock, address, server, rfile=sock.makefile("rb", HTTP_READ_BUFFER))
        self._started = 0.0  # when the budget of the request being read started (monotonic)
        self._answered = False  # a request was served on this connection (keep-alive)
        self._received = False  # a byte of the request being read has arrived
        # The read buffer is known to be empty: the API lane read all it held. (False when
        # not known: pywsgi's requests leave no account of it.)
        self._buffer_empty = False
        # The request's budget, running from the start of its read to its headers' end. A new
        # timer per request: gevent (26.9, libev) keeps a restarted timer's first deadline when
        # it is stopped and started again without the loop running in between, which closed
        # busy keep-alive connections at their first idle_timeout.
        self._request_timer: gevent.Timeout | None = None

    def MessageClass(self, rfile: Any, *args: Any) -> RequestHeaders:  # noqa: N802 - pywsgi's
        return RequestHeaders(rfile)

    def log_request(self) -> None:
        pass

    def start_response(self, status: str, headers: list[tuple[str, str]],
                       exc_info: Any = None) -> Any:
        # An answer after which the node closes the connection says so: a proxy that keeps
        # connections alive (the shipped nginx does) would otherwise send its next request
        # down a dead one. The node closes while it drains (the proxy must not reuse
        # connections to a node going away), when the request asked it to, and when the
        # application left more of the body unread than is worth reading through.
        body = self.wsgi_input
        unread = body.unread if isinstance(body, TimedInput) else 0
        if self.server.draining or (unread is None and status[:1] in "45") or \
                (unread or 0) > DISCARD_LIMIT:
            self.close_connection = True
        if self.close_connection and \
                not any(name.lower() == "connection" for name, _ in headers):
            headers = [*headers, ("Connection", "close")]
        return super().start_response(status, headers, exc_info)

    def handle(self) -> None:
        try:
            super().handle()
        finally:
            self._stop_request_timer()

    def _stop_request_timer(self) -> None:
        if self._request_timer is not None:
            self._request_timer.close()
            self._request_timer = None

    def handle_one_request(self) -> Any:
        """Read one request against the clock, then serve it (pywsgi's loop calls this)."""
        server, rfile = self.server, self.rfile
        if rfile.closed:
            return None
        try:
            if self._answered:
                # Keep-alive: the next request may take idle_timeout to start, then it has
                # header_timeout from its first byte (which is often here already).
                idle_timer = gevent.Timeout(server.idle_timeout, _IdleTimeout)
                idle_timer.start()
                try:
                    if self._buffer_empty:
                        # The lane read all the buffer held: peek would first try a read that
                        # finds nothing (an EAGAIN and an exception) before it waits.
                        self._buffer_empty = False
                        wait_readable(self.socket)
                    if not rfile.peek(1):
                        return None
                finally:
                    idle_timer.close()
                self._received = True
            # A new connection's budget starts here, as its handler starts after the accept.
            self._started = time.monotonic()
            lane = server.fast_api is not None
            # The lane reads only a head that is all in the buffer: it needs no timer for it,
            # and a keep-alive request's head usually came in one piece.
            result = self._serve_api_lane() if lane and self._received else None
            if result is None:
                self._request_timer = gevent.Timeout(server.header_timeout, _RequestTimeout)
                self._request_timer.start()
                try:
                    if not self._received:
                        self._received = bool(rfile.peek(1))
                        result = self._serve_api_lane() if lane else None
                    if result is None:
                        # read_request stops the timer once the headers are in
                        result = super().handle_one_request()
                finally:
                    self._stop_request_timer()
            if result is False:
                result = None  # served by the lane, and the connection closes
        except _IdleTimeout:
            return None  # closed silently, as servers close idle keep-alive connections
        except _RequestTimeout:
            self.close_connection = True
            if self._received:  # else there is no request to answer: just close
                _send_nowait(self.socket, error_response("408 Request Timeout", BadRequest(
                    f"the request did not arrive within {server.header_timeout:g} s")))
            return None
        except OSError:
            return None  # the client went away while we waited for its request (peek)
        self._answered, self._received = True, False
        if isinstance(result, tuple) and result[0] == "414":
            result = ("414", error_response("414 URI Too Long", BadRequest(
                "the request line is too long")))
        return result

    def _serve_api_lane(self) -> bool | None:
        """Serve an API-lane request (module docstring) if one is at the head of the buffer.

        True: served, the connection stays; False: served (or timed out), the connection
        closes; None: not a lane request, nothing was read.
        """
        server, rfile = self.server, self.rfile
        fast = server.fast_api
        buffered = rfile.peek(HTTP_READ_BUFFER)  # what is buffered: no read (peek(1) ran)
        request = parse_lane_request(buffered, fast.body_limit)
        if request is None or not fast.host_allowed(request.host):
            return None
        # (a new connection's timer) the head is in; the body has its own deadline
        self._stop_request_timer()
        length = request.content_length
        in_buffer = request.head_size + length <= len(buffered)
        rfile.read(request.head_size)
        deadline = self._started + server.header_timeout + length / MIN_BODY_RATE
        body_read = False

        def read_body(limit: int) -> bytes:
            # The lane took the request because its length is within the route's limit.
            nonlocal body_read
            body_read = True
            return rfile.read(length) if in_buffer else self._read_timed(length, deadline)

        server.busy_requests += 1
        try:
            status, headers, body = fast.answer(
                request.path, authorization=request.authorization,
                remote_addr=self.client_address[0] if isinstance(self.client_address, tuple)
                else None, forwarded_for=request.forwarded_for,
                content_type=request.content_type, read_body=read_body)
        except _RequestTimeout:
            _send_nowait(self.socket, error_response("408 Request Timeout", BadRequest(
                "the request body did not arrive in time")))
            return False
        finally:
            server.busy_requests -= 1
        unread = 0 if body_read else length
        self._buffer_empty = in_buffer and request.head_size + length == len(buffered)
        close = request.close or server.draining or unread > DISCARD_LIMIT
        head = "".join([f"HTTP/1.1 {status}\r\n",
                        *(f"{name}: {value}\r\n" for name, value in headers),
                        "Connection: close\r\nDate: " if close else "Date: "])
        try:
            sendall(self.socket, b"".join([head.encode("latin-1"), http_date(), b"\r\n\r\n",
                                           body]))
            if unread and not close:
                self._read_timed(unread, deadline)  # read through what was not needed
        except (OSError, _RequestTimeout):
            return False
        return not close

    def _read_timed(self, size: int, deadline: float) -> bytes:
        """``size`` bytes of the request body, by ``deadline``; _RequestTimeout if not."""
        timer = gevent.Timeout(max(deadline - time.monotonic(), 0.001), _RequestTimeout)
        timer.start()
        try:
            return self.rfile.read(size)
        finally:
            timer.close()

    def _handle_client_error(self, ex: Exception) -> tuple[str, bytes]:
        # pywsgi's answer to a request it cannot parse (a malformed Content-Length, request
        # line or header) is an empty 400 and an ERROR log line: ours is the JSON error every
        # other refusal gets, and a throttled info line (it is the client's fault).
        self.server.note_bad_request(self.client_address, ex)
        return "400", error_response("400 Bad Request", BadRequest(
            "this is not an HTTP request this node can read"))

    def read_request(self, raw_requestline: str) -> bool:
        try:
            return super().read_request(raw_requestline)
        finally:
            # The headers are in: the application is not timed (a long-poll waits in it).
            self._stop_request_timer()

    def get_environ(self) -> dict:
        environ = super().get_environ()
        body = self.content_length or \
            environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked"
        if body and environ["wsgi.input"] is self.wsgi_input:
            deadline = (self._started + self.server.header_timeout
                        + (self.content_length or 0) / MIN_BODY_RATE)
            self.wsgi_input = environ["wsgi.input"] = TimedInput(self.wsgi_input, deadline, self)
        return environ

    def run_application(self) -> None:
        engine = self.server.engine
        if engine is not None and engine.is_websocket_request(self.environ):
            engine.handle_websocket(self)
            self.close_connection = True
            return
        server = self.server
        server.busy_requests += 1
        try:
            super().run_application()
        except _RequestTimeout:
            # The body did not arrive in time (TimedInput): answer if nothing was sent yet.
            self.close_connection = True
            if not self.headers_sent:
                _send_nowait(self.socket, error_response("408 Request Timeout", BadRequest(
                    "the request body did not arrive in time")))
        finally:
            server.busy_requests -= 1


class RealtimeServer(pywsgi.WSGIServer):
    """pywsgi's server with a cap on the connections a node holds, and request timeouts.

    ``engine`` (an :class:`~realtime.engineio.EngineServer`, or None) takes WebSocket upgrades
    over and counts them; ``fast_api`` serves the API lane; see the module docstring for the
    rest.
    """

    def __init__(self, listener: Any, application: Any, *, engine: Any, max_connections: int,
                 header_timeout: float, idle_timeout: float, fast_api: FastRoutes | None = None,
                 **kwargs: Any) -> None:
        super().__init__(listener, application, handler_class=RealtimeHandler, **kwargs)
        self.engine = engine
        self.fast_api = fast_api  # the API lane's routes (None: every request goes to WSGI)
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.http_connections = 0  # accepted and not yet closed or handed to the engine
        self.busy_requests = 0  # requests being answered (a long-poll waits in one)
        self.draining = False  # answers close their connections (see drain())
        self.refused = 0  # connections answered 503 in the current burst
        self._last_refusal = 0.0
        self._burst_watch: gevent.Greenlet | None = None
        self._bad_requests = 0  # unreadable requests not logged yet (note_bad_request)
        self._bad_request_logged = 0.0
        self._refusal = error_response("503 Service Unavailable", Unavailable(
            f"this node holds its maximum of {max_connections} connections; retry in a "
            f"moment"), ("Retry-After: 1",))

    def note_bad_request(self, client: Any, error: Exception) -> None:
        """Log a request that could not be parsed: one line a second at most, with a count."""
        now = time.monotonic()
        self._bad_requests += 1
        if now - self._bad_request_logged >= 1.0:
            logger.info("refused %d unreadable request(s), the last from %s: %s",
                        self._bad_requests, client, str(error)[:200])
            self._bad_requests, self._bad_request_logged = 0, now

    @property
    def open_connections(self) -> int:
        """HTTP connections being served plus the engine's WebSockets."""
        websockets = self.engine.websocket_count if self.engine is not None else 0
        return self.http_connections + websockets

    def do_handle(self, sock: Any, address: Any) -> None:
        # Runs in the accept loop (the event loop): counts the connection before its greenlet
        # starts, so that a burst accepted in one go is measured against the cap.
        if self.open_connections >= self.max_connections:
            self._refuse(sock)
            return
        self.http_connections += 1
        try:
            super().do_handle(sock, address)
        except BaseException:
            self.http_connections -= 1  # its greenlet could not start (and never will)
            raise

    def handle(self, sock: Any, address: Any) -> None:
        try:
            super().handle(sock, address)
        finally:
            self.http_connections -= 1

    def _refuse(self, sock: Any) -> None:
        """Answer 503 and close, in the accept loop: no greenlet, nothing waited for."""
        with contextlib.suppress(OSError):
            sock.settimeout(0.0)
            _drain(sock)
            sock.send(self._refusal)
            sock.shutdown(socket.SHUT_WR)
            _drain(sock)
        sock.close()
        self._last_refusal = time.monotonic()
        self.refused += 1
        if self._burst_watch is None:
            logger.warning("connection cap reached (%d open, max_connections %d): answering "
                           "new connections 503 until some close", self.open_connections,
                           self.max_connections)
            self._burst_watch = gevent.spawn(self._watch_burst, self._last_refusal)

    def _watch_burst(self, started: float) -> None:
        """Log the end of a burst of refusals: :data:`REFUSAL_QUIET` seconds without one."""
        while (quiet := time.monotonic() - self._last_refusal) < REFUSAL_QUIET:
            gevent.sleep(REFUSAL_QUIET - quiet)
        logger.info("accepting new connections again: %d refused with 503 over %.1f s",
                    self.refused, self._last_refusal - started)
        self.refused = 0
        self._burst_watch = None

    def stop(self, timeout: float | None = None) -> None:
        if self._burst_watch is not None:
            self._burst_watch.kill(block=False)
            self._burst_watch = None
        super().stop(timeout)


# Python's cyclic garbage collector makes a pass over young objects every 700 net allocations,
# and now and then one over every tracked object. A node's startup objects (Flask, the modules
# it imported, its configuration: most of its heap) live as long as the process; frozen, the
# full passes skip them. A batch of publications allocates thousands of short-lived objects:
# a young threshold of 5,000 makes those passes 7x rarer. Together, POST /api/batch costs a
# node 15-20% less CPU per publication (bench/RESULTS.md); a single publish, no different.
GC_YOUNG_THRESHOLD = 5000


def settle_heap() -> None:
    """Collect once, freeze what startup built, make young passes rarer (see above).

    Called once a node is built and started, right before it serves (``realtime serve`` and
    the gunicorn worker): objects created later are collected as usual.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to the hard limit; return it.

    Every connection is a descriptor: the usual soft limit of 1024 would cap a node at about a
    thousand clients.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20  # Linux refuses "unlimited"
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open-file limit above %d: %s", soft, exc)
            return soft
    return max(soft, target)


def node_server(config: Config, realtime: Realtime, listener: Any) -> RealtimeServer:
    """The listening server of one node, not started yet: ``listener`` is an address
    ``(host, port)`` to bind, or a listening socket handed over (gunicorn's worker does that).

    Raises ConfigError when it cannot listen. Shared by ``run.py serve`` and
    :class:`realtime.gunicorn_worker.RealtimeWorker`, so that both serve with the same limits.
    """
    open_files = raise_open_file_limit()
    max_connections = connection_cap(config.max_connections, open_files)
    if max_connections > open_files - DESCRIPTOR_RESERVE:
        logger.warning("max_connections %d is more than the open-file limit (%d) allows: past "
                       "%d connections, accepting fails instead of answering 503",
                       max_connections, open_files, open_files - DESCRIPTOR_RESERVE)
    server = RealtimeServer(
        listener,
        realtime.wsgi,
        engine=realtime.engine,
        fast_api=realtime.fast_routes,
        max_connections=max_connections,
        header_timeout=config.header_timeout,
        idle_timeout=config.idle_timeout,
        log=None,  # no access log line per long-polling request
        # (a socket handed over is listening already, with the backlog its owner chose)
        backlog=LISTEN_BACKLOG if isinstance(listener, tuple) else None,
        error_log=logging.getLogger("realtime.wsgi"),
    )
    try:
        server.init_socket()
    except OSError as exc:
        raise ConfigError(f"cannot listen on {config.host}:{config.port}: {exc.strerror}") from exc
    # Accepted sockets inherit it: long-polling responses and events leave at once instead of
    # waiting behind Nagle's algorithm for the client's delayed ACK.
    server.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    host, port = server.socket.getsockname()[:2]
    logger.info("node %s serving on http://%s:%d (broker %s, up to %d connections, %d open "
                "files)", config.node_id, host, port, redacted_url(config.broker), max_connections,
                open_files)
    return server


def serve(config: Config) -> None:
    """Run one node until SIGINT or SIGTERM. Raises ConfigError when it cannot start."""
    check_monkey_patched()
    realtime: Realtime = create_app(config)
    server = node_server(config, realtime, (config.host, config.port))
    realtime.start()
    stop_asked = gevent.event.Event()
    cut_short = gevent.event.Event()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stop_asked.is_set():
            logger.info("received %s again: stopping now", name)
            cut_short.set()
            return
        logger.info("received %s: draining (%d sessions, up to %g s; send it again to stop "
                    "at once)", name, realtime.engine.session_count, config.drain_timeout)
        stop_asked.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(signum, on_signal, signum)
    settle_heap()
    server.start()
    stop_asked.wait()
    drain(server, realtime, config.drain_timeout, cut_short)
    logger.info("node %s stopped", config.node_id)


def drain(server: RealtimeServer, realtime: Realtime, timeout: float,
          cut_short: gevent.event.Event) -> None:
    """Take a node out of service within ``timeout`` seconds, losing nothing on the way.

    In order: ``/readyz`` answers 503 (load balancers stop sending new clients); the listening
    socket closes and new Engine.IO sessions on connections already open are refused with
    503; every answer closes its connection; the clients are closed gradually by their
    transport (they reconnect elsewhere by themselves) and their presence removed, with
    ``leave`` events; the HTTP requests in flight finish. ``cut_short`` (a second signal)
    ends the wait at once.
    """
    deadline = time.monotonic() + timeout
    realtime.node.draining = True
    server.draining = True
    server.close()
    realtime.engine.drain(timeout, cut_short)
    while server.busy_requests and not cut_short.is_set() and time.monotonic() < deadline:
        cut_short.wait(0.05)
    if server.busy_requests:
        logger.warning("stopping with %d HTTP requests unanswered", server.busy_requests)
    server.stop(timeout=0)
    realtime.stop(timeout=0.0 if cut_short.is_set() else max(0.5, deadline - time.monotonic()))
