"""The HTTP server's API lane (``realtime/server.py``): which requests it takes, and that it
answers them as the general path (pywsgi, then the node's WSGI application) would.

A RealtimeServer in this process on a loopback port, serving a node on the in-memory broker;
the lane's routes are wrapped so that a test knows which requests the lane answered.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import pytest

from realtime.app import create_app
from realtime.config import Config
from realtime.server import (
    DISCARD_LIMIT,
    MIN_BODY_RATE,
    RealtimeServer,
    parse_lane_request,
)
from tests.helpers import wait_until
from tests.unit.test_server import LATE, connect, read_response, read_until_closed

HEADER_TIMEOUT = 0.3
LIMITS = {"/api/publish": 1000, "/api/broadcast": 1000, "/api/batch": 5000}


class LaneSpy:
    """The node's FastRoutes as the lane sees them, counting the requests the lane answered."""

    def __init__(self, routes) -> None:
        self._routes = routes
        self.answered: list[str] = []
        self.reading = threading.Event()  # the lane is in the middle of an answer
        self.body_limit = routes.body_limit
        self.host_allowed = routes.host_allowed

    def answer(self, path, **request):
        self.reading.set()
        self.answered.append(path)
        return self._routes.answer(path, **request)


@pytest.fixture
def lane_server():
    started = []

    def start(**settings):
        realtime = create_app(Config(node_id="lane", **settings))
        realtime.start()
        spy = LaneSpy(realtime.fast_routes)
        server = RealtimeServer(("127.0.0.1", 0), realtime.wsgi, engine=realtime.engine,
                                max_connections=100, header_timeout=HEADER_TIMEOUT,
                                idle_timeout=5.0, fast_api=spy, log=None,
                                error_log=logging.getLogger("realtime.wsgi"))
        server.start()
        started.append((server, realtime))
        return server, spy

    yield start
    for server, realtime in started:
        server.stop()
        realtime.stop()


def post(path: str, body: bytes, *headers: str, content_type: str = "application/json",
         version: str = "HTTP/1.1") -> bytes:
    lines = [f"POST {path} {version}", "Host: x", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


PUBLISH = json.dumps({"channel": "news", "data": {"n": 1}}).encode()


def without_date(raw: tuple[int, dict[str, str], bytes]) -> tuple[int, dict[str, str], bytes]:
    status, headers, body = raw
    assert headers.pop("date")  # both paths send one
    return status, headers, body


# -- which heads the lane takes (everything else goes the general way, which answers it) ----

def test_a_plain_keep_alive_publish_is_a_lane_request():
    head = post("/api/publish", PUBLISH, "Authorization: apikey k")
    request = parse_lane_request(head, LIMITS.get)
    assert request is not None
    assert (request.path, request.content_length, request.content_type, request.authorization,
            request.host, request.close) == ("/api/publish", len(PUBLISH), "application/json",
                                              "apikey k", "x", False)
    assert head[request.head_size:] == PUBLISH


@pytest.mark.parametrize("head", [
    post("/api/publish", PUBLISH, version="HTTP/1.0"),  # answered with HTTP/1.0's rules
    post("/api/publish?x=1", PUBLISH),  # a query string
    post("/api/publish%2F", PUBLISH),  # an escape: the general path unquotes
    post("/api/history", PUBLISH),  # not a hot route
    post("/api/publish", b"x" * 1001),  # over the route's limit: 413 on the general path
    post("/api/publish", PUBLISH)[:40],  # the head is not all here
    post("/api/publish", PUBLISH).replace(b"POST", b"PUT"),
    b"POST /api/publish HTTP/1.1\r\nHost: x\r\n\r\n",  # no Content-Length: 411 or an empty body
    b"POST /api/publish HTTP/1.1\r\nContent-Length: x1\r\n\r\n",  # 400 on the general path
    b"POST /api/publish HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    b"POST /api/publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST /api/publish HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /api/publish HTTP/1.1\r\nHost x\r\nContent-Length: 2\r\n\r\n{}",  # no colon
    b"POST /api/publish HTTP/1.1\r\nHost : x\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /api/publish HTTP/1.1\r\n folded\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /api/publish HTTP/1.1\r\nA: 1\nB: 2\r\nContent-Length: 2\r\n\r\n{}",  # bare LF
    b"POST  /api/publish HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
], ids=["http-1.0", "query", "escape", "other-route", "over-limit", "partial-head", "put",
        "no-length", "bad-length", "conflicting-lengths", "chunked", "expect", "no-colon",
        "space-before-colon", "folded", "bare-lf", "double-space"])
def test_heads_the_lane_does_not_read_as_the_general_path_would_are_left_to_it(head):
    assert parse_lane_request(head, LIMITS.get) is None


def test_repeated_headers_read_as_in_the_wsgi_environ():
    head = (b"POST /api/publish HTTP/1.1\r\nX-Forwarded-For: 10.0.0.1\r\n"
            b"x-forwarded-for: 10.0.0.2\r\nContent-Type: application/json\r\n"
            b"Content-Type: text/plain\r\nConnection: close\r\nConnection: keep-alive\r\n"
            b"Content-Length: 2\r\nContent-Length: 2\r\n\r\n{}")
    request = parse_lane_request(head, LIMITS.get)
    assert request.forwarded_for == "10.0.0.1,10.0.0.2"  # joined, as pywsgi joins them
    assert request.content_type == "application/json"  # the first, as pywsgi's CONTENT_TYPE
    assert request.close  # the first Connection header, as pywsgi reads it


# -- the lane's answers, on a real server --------------------------------------------------

def test_the_lane_answers_the_same_bytes_as_the_general_path(lane_server):
    server, spy = lane_server()
    requests = [
        post("/api/publish", PUBLISH),
        post("/api/publish", b"{not json"),
        post("/api/publish", PUBLISH, content_type="text/plain"),
        post("/api/publish", json.dumps({"channel": "bad channel", "data": 1}).encode()),
        post("/api/broadcast", json.dumps({"channels": ["a", "b"], "data": 2}).encode()),
        post("/api/batch", json.dumps({"commands": [
            {"method": "publish", "params": {"channel": "a", "data": 3}},
            {"method": "nope", "params": {}}]}).encode()),
    ]
    for raw in requests:
        # the lane: the head whole; the general path: the same with a query string, which
        # the lane leaves to it and the WSGI application serves on the same route
        lane, general = connect(server), connect(server)
        lane.sendall(raw)
        lane_answer = without_date(read_response(lane))
        general.sendall(raw.replace(b" HTTP/1.1", b"?general=1 HTTP/1.1", 1))
        general_answer = without_date(read_response(general))
        # a new publication has the next offset: compare the shapes of successes
        lane_body, general_body = json.loads(lane_answer[2]), json.loads(general_answer[2])
        for body in (lane_body, general_body):
            if "offset" in body:
                body["offset"] = 0
            for result in body.get("results", []) + body.get("replies", []):
                for position in (result, result.get("result", {})):
                    if "offset" in position:
                        position["offset"] = 0
        assert lane_answer[:2] == general_answer[:2] and lane_body == general_body, raw
    assert len(spy.answered) == len(requests)


def test_one_keep_alive_connection_carries_lane_and_other_requests_pipelined_or_not(
        lane_server):
    server, spy = lane_server()
    sock = connect(server)
    for _ in range(3):
        sock.sendall(post("/api/publish", PUBLISH))
        assert read_response(sock)[0] == 200
    sock.sendall(post("/api/publish", PUBLISH) + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                 + post("/api/publish", PUBLISH))
    offsets = []
    for expected in (200, 200, 200):
        status, _, body = read_response(sock)
        assert status == expected
        offsets.append(json.loads(body).get("offset"))
    assert offsets == [4, None, 5]
    assert len(spy.answered) == 5


def test_a_body_that_follows_its_head_later_is_waited_for(lane_server):
    server, spy = lane_server()
    sock = connect(server)
    raw = post("/api/publish", PUBLISH)
    body_at = raw.index(b"\r\n\r\n") + 4
    sock.sendall(raw[:body_at])
    wait_until(spy.reading.is_set)  # the lane took the head and waits for the body
    sock.sendall(raw[body_at:])
    status, _, body = read_response(sock)
    assert status == 200 and json.loads(body)["offset"] == 1


def test_a_body_that_does_not_arrive_in_its_budget_is_answered_408_and_closed(lane_server):
    server, spy = lane_server()
    sock = connect(server)
    raw = post("/api/publish", PUBLISH)
    started = time.monotonic()
    sock.sendall(raw[:-5])
    status, headers, body = read_response(sock)
    budget = HEADER_TIMEOUT + len(PUBLISH) / MIN_BODY_RATE
    assert budget - 0.05 <= time.monotonic() - started <= budget + LATE
    assert status == 408 and headers["connection"] == "close"
    assert json.loads(body)["error"] == {"code": "bad_request",
                                         "message": "the request body did not arrive in time"}
    assert read_until_closed(sock) == b"" and spy.answered == ["/api/publish"]


def test_connection_close_is_honoured_and_said(lane_server):
    server, spy = lane_server()
    sock = connect(server)
    sock.sendall(post("/api/publish", PUBLISH, "Connection: close"))
    status, headers, _ = read_response(sock)
    assert status == 200 and headers["connection"] == "close"
    assert read_until_closed(sock) == b"" and spy.answered == ["/api/publish"]


def test_a_draining_node_closes_lane_connections_after_the_answer(lane_server):
    server, spy = lane_server()
    sock = connect(server)
    server.draining = True
    sock.sendall(post("/api/publish", PUBLISH))
    status, headers, _ = read_response(sock)
    assert status == 200 and headers["connection"] == "close"
    assert read_until_closed(sock) == b"" and spy.answered == ["/api/publish"]


def test_a_refused_request_with_a_small_unread_body_keeps_its_connection(lane_server):
    server, spy = lane_server(api_keys=["right"])
    sock = connect(server)
    sock.sendall(post("/api/publish", PUBLISH, "Authorization: apikey wrong")
                 + post("/api/publish", PUBLISH, "Authorization: apikey right"))
    status, headers, body = read_response(sock)
    assert status == 401 and headers["www-authenticate"] == "apikey"
    assert "connection" not in headers
    assert json.loads(body)["error"]["code"] == "unauthorized"
    assert read_response(sock)[0] == 200  # the unread body was read through
    assert spy.answered == ["/api/publish", "/api/publish"]


def test_a_refused_request_with_a_large_unread_body_closes_instead_of_reading_it(lane_server):
    server, spy = lane_server(api_keys=["right"], max_message_size=DISCARD_LIMIT)
    sock = connect(server)
    # declares more than the node reads through, and sends none of it
    declared = DISCARD_LIMIT + 1
    sock.sendall(post("/api/publish", b"", "Authorization: apikey wrong").replace(
        b"Content-Length: 0", f"Content-Length: {declared}".encode()))
    status, headers, _ = read_response(sock)
    assert status == 401 and headers["connection"] == "close"
    assert read_until_closed(sock) == b"" and spy.answered == ["/api/publish"]


def test_a_host_that_is_not_served_is_refused_by_the_general_path(lane_server):
    server, spy = lane_server(allowed_hosts="realtime.example")
    sock = connect(server)
    sock.sendall(post("/api/publish", PUBLISH))
    status, _, body = read_response(sock)
    assert status == 400 and json.loads(body)["error"]["message"] == "this Host is not served here"
    sock = connect(server)
    sock.sendall(post("/api/publish", PUBLISH).replace(b"Host: x", b"Host: realtime.example"))
    assert read_response(sock)[0] == 200
    assert spy.answered == ["/api/publish"]


def test_a_client_that_goes_away_before_its_answer_leaves_the_server_serving(lane_server):
    server, spy = lane_server()
    sock = socket.create_connection(server.address)
    sock.sendall(post("/api/publish", PUBLISH))
    sock.close()
    wait_until(lambda: len(spy.answered) == 1)
    other = connect(server)
    other.sendall(post("/api/publish", PUBLISH))
    assert read_response(other)[0] == 200
