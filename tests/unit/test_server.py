"""The node's HTTP server: the request-header reader, the request timeouts, the connection cap."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import socket
import time
from unittest import mock

import gevent
import pytest
from flask import Flask
from flask import request as request_of_flask
from gevent import monkey

from realtime import server as server_module
from realtime.app import create_app
from realtime.config import Config
from realtime.errors import Unavailable
from realtime.server import (
    DESCRIPTOR_RESERVE,
    MAX_HEADERS,
    MIN_BODY_RATE,
    RealtimeServer,
    RequestHeaders,
    connection_cap,
    error_response,
)
from tests.helpers import wait_until


def headers(raw: bytes) -> RequestHeaders:
    return RequestHeaders(io.BytesIO(raw))


def test_headers_are_read_up_to_the_blank_line_and_looked_up_in_any_case():
    parsed = headers(b"Host: a:1\r\nContent-Type: text/plain\r\nX-Two: 1\r\nx-two: 2\r\n\r\n"
                     b"body")
    assert parsed.status == ""
    assert parsed.get("host") == "a:1" and parsed.getheader("HOST") == "a:1"
    assert parsed.typeheader == "text/plain"
    assert parsed.get("x-two") == "1"  # the first one, as the email parser answers
    assert parsed.get("missing", "default") == "default"
    # the raw lines, every one, for the WSGI environ
    assert parsed.headers == ["Host: a:1\r\n", "Content-Type: text/plain\r\n", "X-Two: 1\r\n",
                              "x-two: 2\r\n"]


def test_a_deleted_header_is_gone():
    parsed = headers(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n")
    del parsed["content-length"]
    assert parsed.get("Content-Length") is None


def test_the_end_of_input_ends_the_headers():
    assert headers(b"Host: a\r\n").get("host") == "a"


@pytest.mark.parametrize("raw,problem", [
    (b"Host: a\r\n folded: line\r\n\r\n", "Malformed"),
    (b"no colon here\r\n\r\n", "Malformed"),
    (b": no name\r\n\r\n", "Malformed"),
    (b"Bad Name : x\r\n\r\n", "Malformed"),
    (b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n", "Conflicting"),
    (b"X: " + b"y" * 70000 + b"\r\n\r\n", "too long"),
    (b"".join(b"H%d: v\r\n" % i for i in range(MAX_HEADERS + 1)) + b"\r\n", "More than"),
])
def test_malformed_header_sections_make_the_request_invalid(raw, problem):
    assert problem in headers(raw).status


def test_a_repeated_content_length_with_the_same_value_is_fine():
    assert headers(b"Content-Length: 5\r\ncontent-length: 5\r\n\r\n").status == ""


# -- the server's limits: request timeouts and the connection cap ---------------------------
#
# A RealtimeServer in this process on a loopback port, with small timeouts; the clients are
# plain sockets. Where a test checks that something happened "at" a timeout, it bounds the time
# from both sides: not before (it is the timeout, not an error) and not long after.

HEADER_TIMEOUT = 0.3
IDLE_TIMEOUT = 0.8
# How late a timeout may act on a loaded two-core machine before the test calls it broken.
LATE = 1.5


def _app(environ, start_response):
    """/echo reads the body; /wait?S runs S seconds (a long-poll); anything else ignores it."""
    path = environ["PATH_INFO"]
    if path == "/echo":
        body = environ["wsgi.input"].read()
    elif path == "/wait":
        gevent.sleep(float(environ["QUERY_STRING"]))  # the application, not the test, waits
        body = b"waited"
    else:
        body = b"ok"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


class FakeEngine:
    """What the server asks the engine: its WebSocket count; no request is a WebSocket."""

    websocket_count = 0

    @staticmethod
    def is_websocket_request(environ):
        return False


@pytest.fixture
def start_server():
    servers = []

    def start(app=_app, engine=None, max_connections=1000, header_timeout=HEADER_TIMEOUT,
              idle_timeout=IDLE_TIMEOUT) -> RealtimeServer:
        server = RealtimeServer(("127.0.0.1", 0), app, engine=engine,
                                max_connections=max_connections, header_timeout=header_timeout,
                                idle_timeout=idle_timeout, log=None,
                                error_log=logging.getLogger("realtime.wsgi"))
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def connect(server: RealtimeServer) -> socket.socket:
    sock = socket.create_connection(server.address)
    sock.settimeout(10)  # a test that would hang fails instead
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length; (status, headers in lower case, body).

    Reads byte by byte up to the body, and the body by its length: the next response (of
    pipelined requests) stays in the socket.
    """
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        assert byte, f"closed before a response: {head!r}"
        head += byte
    lines = head.decode("latin-1").split("\r\n")[:-2]
    headers = {name.lower(): value.strip()
               for name, _, value in (line.partition(":") for line in lines[1:])}
    body = b""
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(int(headers["content-length"]) - len(body))
        assert chunk, "closed in the middle of a response"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def request(path: str = "/", method: str = "GET", body: bytes = b"") -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if body or method == "POST" else ""
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n{length}\r\n".encode() + body


def test_error_responses_carry_the_json_error_body_and_close():
    raw = error_response("503 Service Unavailable", Unavailable("full"), ("Retry-After: 1",))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [b"HTTP/1.1 503 Service Unavailable",
                                   b"Content-Type: application/json",
                                   b"Content-Length: %d" % len(body), b"Retry-After: 1",
                                   b"Connection: close"]
    assert json.loads(body) == {"error": {"code": "unavailable", "message": "full"}}


def test_the_connection_cap_is_the_setting_or_the_open_file_limit_less_a_reserve():
    assert connection_cap(50, 20000) == 50
    assert connection_cap(0, 20000) == 20000 - DESCRIPTOR_RESERVE
    assert connection_cap(0, 10) == 1  # a node with almost no descriptors still serves one


def test_a_connection_that_sends_nothing_is_closed_silently_at_the_header_timeout(
        start_server):
    server = start_server()
    sock = connect(server)
    started = time.monotonic()
    assert read_until_closed(sock) == b""
    assert HEADER_TIMEOUT - 0.05 <= time.monotonic() - started <= HEADER_TIMEOUT + LATE
    wait_until(lambda: server.http_connections == 0, message="the connection to be forgotten")


def test_a_request_that_stops_half_way_is_answered_408_at_the_header_timeout(start_server):
    server = start_server()
    sock = connect(server)
    started = time.monotonic()
    sock.sendall(b"GET /healthz HT")
    status, headers, body = read_response(sock)
    assert HEADER_TIMEOUT - 0.05 <= time.monotonic() - started <= HEADER_TIMEOUT + LATE
    assert status == 408 and headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "bad_request"
    assert read_until_closed(sock) == b""


def test_headers_dribbled_slower_than_the_header_timeout_are_cut_though_bytes_keep_coming(
        start_server):
    server = start_server()
    sock = connect(server)
    started = time.monotonic()

    def dribble():  # the slow client: a byte every 50 ms, each well within any read timeout
        sock.sendall(b"GET / HTTP/1.1\r\n")
        with contextlib.suppress(OSError):
            while True:
                sock.sendall(b"X")
                gevent.sleep(0.05)

    sender = gevent.spawn(dribble)
    try:
        status, _, body = read_response(sock)
    finally:
        sender.kill()
    assert status == 408 and json.loads(body)["error"]["code"] == "bad_request"
    assert time.monotonic() - started <= HEADER_TIMEOUT + LATE


def test_an_idle_keep_alive_connection_is_closed_at_the_idle_timeout_not_the_header_timeout(
        start_server):
    server = start_server()
    sock = connect(server)
    sock.sendall(request("/"))
    assert read_response(sock)[0] == 200
    answered = time.monotonic()
    assert read_until_closed(sock) == b""  # closed silently: no 408 for an idle connection
    assert IDLE_TIMEOUT - 0.05 <= time.monotonic() - answered <= IDLE_TIMEOUT + LATE


def test_a_keep_alive_connection_serves_requests_one_after_the_other(start_server):
    server = start_server()
    sock = connect(server)
    for _ in range(3):
        sock.sendall(request("/echo", "POST", b"hello"))
        assert read_response(sock) == (200, mock.ANY, b"hello")
    sock.sendall(request("/") + request("/echo", "POST", b"pipelined"))
    assert read_response(sock)[2] == b"ok" and read_response(sock)[2] == b"pipelined"


def test_an_application_that_runs_longer_than_the_header_timeout_is_not_cut(start_server):
    server = start_server()
    sock = connect(server)
    sock.sendall(request(f"/wait?{3 * HEADER_TIMEOUT}"))
    assert read_response(sock) == (200, mock.ANY, b"waited")


def test_a_body_that_does_not_arrive_in_its_budget_is_answered_408(start_server):
    server = start_server()
    sock = connect(server)
    started = time.monotonic()
    sock.sendall(request("/echo", "POST", b"0123456789")[:-5])  # half the body, then nothing
    status, headers, body = read_response(sock)
    budget = HEADER_TIMEOUT + 10 / MIN_BODY_RATE
    assert budget - 0.05 <= time.monotonic() - started <= budget + LATE
    assert status == 408 and headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "bad_request"
    assert read_until_closed(sock) == b""


def test_a_slow_body_is_answered_408_through_an_application_that_catches_everything(
        start_server):
    flask_app = Flask(__name__)

    @flask_app.post("/data")
    def data():
        return {"length": len(request_of_flask.get_data())}

    server = start_server(app=flask_app)
    sock = connect(server)
    sock.sendall(request("/data", "POST", b"0123456789")[:-5])
    status, _, body = read_response(sock)
    assert status == 408 and json.loads(body)["error"]["code"] == "bad_request"
    sock = connect(server)
    sock.sendall(request("/data", "POST", b"0123456789"))
    assert read_response(sock)[:1] == (200,)


def test_a_large_unread_body_closes_the_connection_instead_of_being_read(start_server):
    server = start_server()
    sock = connect(server)
    # declares 10 MB, sends none of it: the answer comes, then the close, without waiting
    sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n")
    started = time.monotonic()
    assert read_response(sock)[2] == b"ok"
    assert read_until_closed(sock) == b""
    assert time.monotonic() - started < HEADER_TIMEOUT


def test_a_small_unread_body_is_skipped_and_the_connection_kept(start_server):
    server = start_server()
    sock = connect(server)
    sock.sendall(request("/", "POST", b"unread") + request("/echo", "POST", b"next"))
    assert read_response(sock)[2] == b"ok" and read_response(sock)[2] == b"next"


def hold(server: RealtimeServer) -> socket.socket:
    """A keep-alive connection the server has served one request on (so it counts it)."""
    sock = connect(server)
    sock.sendall(request("/"))
    assert read_response(sock)[0] == 200
    return sock


def assert_refused(sock: socket.socket) -> None:
    status, headers, body = read_response(sock)
    assert status == 503 and headers["retry-after"] == "1" and headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "unavailable"
    assert read_until_closed(sock) == b""


def test_past_the_cap_a_new_connection_is_answered_503_and_existing_ones_carry_on(
        start_server):
    server = start_server(max_connections=2, idle_timeout=30)
    held = [hold(server), hold(server)]
    refused = connect(server)
    refused.sendall(request("/"))
    assert_refused(refused)
    assert_refused(connect(server))  # also one that sent nothing yet
    for sock in held:
        sock.sendall(request("/echo", "POST", b"still here"))
        assert read_response(sock)[2] == b"still here"
    held.pop().close()
    wait_until(lambda: server.open_connections == 1, message="the closed connection to leave")
    held.append(hold(server))


def test_a_burst_accepted_at_once_is_counted_before_any_of_it_is_served(start_server):
    server = start_server(max_connections=2, idle_timeout=30)
    # Five connections in the kernel's queue before the server's accept loop runs: blocking
    # connects, which do not let gevent's loop run in between; then cooperative sockets.
    blocking = [monkey.get_original("socket", "socket")() for _ in range(5)]
    for sock in blocking:
        sock.connect(server.address)
    socks = [socket.socket(fileno=sock.detach()) for sock in blocking]
    for sock in socks:
        sock.settimeout(10)
        sock.sendall(request("/"))
    statuses = sorted(read_response(sock)[0] for sock in socks)
    assert statuses == [200, 200, 503, 503, 503]


def test_the_engines_websockets_count_against_the_cap(start_server):
    engine = FakeEngine()
    server = start_server(engine=engine, max_connections=2, idle_timeout=30)
    held = [hold(server)]
    engine.websocket_count = 1
    assert_refused(connect(server))
    engine.websocket_count = 0
    held.append(hold(server))


def test_a_burst_of_refusals_is_logged_once_when_it_starts_and_once_when_it_ends(
        start_server, caplog, monkeypatch):
    caplog.set_level("INFO", logger="realtime.server")
    monkeypatch.setattr(server_module, "REFUSAL_QUIET", 0.3)
    server = start_server(max_connections=1, idle_timeout=30)
    held = hold(server)
    for _ in range(5):
        assert_refused(connect(server))
    records = [r for r in caplog.records if r.name == "realtime.server"]
    assert [r.levelname for r in records] == ["WARNING"]
    assert "connection cap reached" in records[0].getMessage()
    wait_until(lambda: "accepting new connections again: 5 refused" in caplog.text, 5,
               message="the end of the burst to be logged")
    held.close()


def test_websockets_the_engine_adopted_count_until_they_close(start_server):
    realtime = create_app(Config(node_id="limits"))
    realtime.start()
    try:
        server = start_server(app=realtime.wsgi, engine=realtime.engine, max_connections=1)
        sock = connect(server)
        sock.sendall(b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: x\r\n"
                     b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Sec-WebSocket-Version: 13\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 101 ")
        wait_until(lambda: server.http_connections == 0, message="the handler to hand it over")
        assert realtime.engine.websocket_count == 1 and server.open_connections == 1
        assert_refused(connect(server))
        sock.close()
        wait_until(lambda: realtime.engine.websocket_count == 0, 5,
                   message="the engine to forget the closed WebSocket")
        hold(server)
    finally:
        realtime.stop()


def test_settling_the_heap_freezes_what_startup_built_and_makes_young_passes_rarer():
    # In a child: freezing this test process's heap would change every later test.
    import subprocess
    import sys

    from realtime_dev.processes import node_environment

    script = ("import gc\n"
              "from realtime.app import create_app\n"
              "from realtime.config import Config\n"
              "from realtime.server import GC_YOUNG_THRESHOLD, settle_heap\n"
              "app = create_app(Config(node_id='gc'))\n"
              "before = gc.get_freeze_count()\n"
              "settle_heap()\n"
              "print(before, gc.get_freeze_count(), gc.get_threshold()[0] == GC_YOUNG_THRESHOLD,\n"
              "      len(gc.get_objects(generation=2)))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=node_environment(), check=True, timeout=60).stdout.split()
    before, frozen, threshold_set, old_generation = int(out[0]), int(out[1]), out[2], int(out[3])
    assert before == 0 and frozen > 50_000  # Flask, the modules, the node: frozen
    assert threshold_set == "True"
    assert old_generation < 1000  # full passes no longer walk them
