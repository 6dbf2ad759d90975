"""Serving one node: the gevent WSGI server with WebSocket support, and a clean shutdown."""

from __future__ import annotations

import logging
import resource
import signal
import socket
from typing import Any

import gevent
from gevent import pywsgi

from .app import Realtime, create_app
from .config import Config, ConfigError

logger = logging.getLogger(__name__)

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


class RealtimeHandler(pywsgi.WSGIHandler):
    """pywsgi handler that gives WebSocket upgrades under /socket.io/ to the Engine.IO server.

    An upgrade needs the raw socket (which WSGI does not expose): the engine answers it and
    takes the socket over. Everything else (pages, the API, long-polling) is plain WSGI, with
    a small read buffer (:data:`HTTP_READ_BUFFER`), headers read by :class:`RequestHeaders`,
    and no access log (one line per long-poll would drown everything else).
    """

    def __init__(self, sock: Any, address: Any, server: Any) -> None:
        super().__init__(sock, address, server, rfile=sock.makefile("rb", HTTP_READ_BUFFER))

    def MessageClass(self, rfile: Any, *args: Any) -> RequestHeaders:  # noqa: N802 - pywsgi's
        return RequestHeaders(rfile)

    def log_request(self) -> None:
        pass

    def run_application(self) -> None:
        engine = getattr(self.server, "realtime_engine", None)
        if engine is not None and engine.is_websocket_request(self.environ):
            engine.handle_websocket(self)
            self.close_connection = True
            return
        super().run_application()


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


def serve(config: Config) -> None:
    """Run one node until SIGINT or SIGTERM. Raises ConfigError when it cannot start."""
    check_monkey_patched()
    open_files = raise_open_file_limit()
    realtime: Realtime = create_app(config)
    server = pywsgi.WSGIServer(
        (config.host, config.port),
        realtime.wsgi,
        handler_class=RealtimeHandler,
        log=None,  # no access log line per long-polling request
        backlog=LISTEN_BACKLOG,
        error_log=logging.getLogger("realtime.wsgi"),
    )
    try:
        server.init_socket()
    except OSError as exc:
        raise ConfigError(f"cannot listen on {config.host}:{config.port}: {exc.strerror}") from exc
    # Accepted sockets inherit it: long-polling responses and events leave at once instead of
    # waiting behind Nagle's algorithm for the client's delayed ACK.
    server.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    server.realtime_engine = realtime.engine
    realtime.start()
    host, port = server.socket.getsockname()[:2]
    logger.info("node %s serving on http://%s:%d (broker %s, up to %d open files)",
                config.node_id, host, port, config.broker, open_files)
    stopped = gevent.event.Event()

    def shut_down(signum: int) -> None:
        logger.info("received %s; stopping", signal.Signals(signum).name)
        stopped.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(signum, shut_down, signum)
    server.start()
    stopped.wait()
    server.stop(timeout=2)
    realtime.stop()
    logger.info("node %s stopped", config.node_id)
