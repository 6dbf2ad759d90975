"""A node's defences against slow and numerous connections, against a real node process.

Header and idle timeouts (a client that sends its request too slowly, or keeps an idle
keep-alive connection, is disconnected; a long-poll waiting for data is not), and the cap on
the connections a node holds (past it, 503 at once; existing connections carry on). See
``realtime/server.py``.
"""

from __future__ import annotations

import json
import os
import socket
import time

import pytest
import requests
import websocket
from engineio import packet

from realtime_dev.processes import NodeProcess
from tests.helpers import wait_until
from tests.integration.clients import RecordingClient, _InOrderEngineIOClient, connect_client
from tests.integration.rawclients import RawHttp

HEADER_TIMEOUT = 1.0
IDLE_TIMEOUT = 2.0
PING_INTERVAL = 3.0
MAX_CONNECTIONS = 50
# How late the node may act on a timeout, on a loaded two-core machine, before a test fails.
LATE = 4.0
SLOWLORIS = 1000


@pytest.fixture(scope="module")
def timed_node(tmp_path_factory):
    """A node with short request timeouts, pinging every PING_INTERVAL seconds."""
    node = NodeProcess(tmp_path_factory.mktemp("timeouts"), "timeouts",
                       "--header-timeout", str(HEADER_TIMEOUT),
                       "--idle-timeout", str(IDLE_TIMEOUT),
                       # the engine pings every max(interval, timeout) seconds
                       "--ping-interval", str(PING_INTERVAL),
                       "--ping-timeout", str(PING_INTERVAL)).wait_ready()
    yield node
    node.stop()


@pytest.fixture
def capped_node(tmp_path):
    """A node that holds at most MAX_CONNECTIONS connections (its own: the test counts them)."""
    node = NodeProcess(tmp_path, "capped", "--max-connections", str(MAX_CONNECTIONS),
                       "--header-timeout", str(HEADER_TIMEOUT)).wait_ready()
    yield node
    node.stop()


def descriptors(node: NodeProcess) -> int:
    return len(os.listdir(f"/proc/{node.pid}/fd"))


def rss_kib(node: NodeProcess) -> int:
    with open(f"/proc/{node.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def connect(node: NodeProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", node.port))
    sock.settimeout(HEADER_TIMEOUT + LATE)  # a node that never answers fails the test
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def split_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers in lower case, body) of one complete response."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip()
               for name, _, value in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def get_keep_alive(node: NodeProcess, path: str = "/healthz") -> socket.socket:
    """A connection that got a 200 for ``path`` and stays open (HTTP/1.1 keep-alive)."""
    sock = connect(node)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while b'"ok"}' not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before the response: {data!r}"
        data += chunk
    assert data.startswith(b"HTTP/1.1 200 "), data
    return sock


def raw_websocket(node: NodeProcess) -> websocket.WebSocket:
    """A Socket.IO session on a raw WebSocket (held by the engine, not by pywsgi)."""
    ws = websocket.create_connection(
        node.url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket", timeout=10)
    assert ws.recv().startswith("0{")
    ws.send("40")
    assert ws.recv().startswith("40{")
    return ws


def open_slowloris(node: NodeProcess, count: int) -> list[socket.socket]:
    """``count`` connections that send part of a request's headers, then nothing."""
    sockets = []
    for _ in range(count):
        sock = connect(node)
        sock.sendall(b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\nX-Sl")
        sockets.append(sock)
    return sockets


def assert_cut_with_408(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        status, headers, body = split_response(read_until_closed(sock))
        assert status == 408 and headers["connection"] == "close"
        assert json.loads(body)["error"]["code"] == "bad_request"
        sock.close()


def test_slowloris_sockets_are_cut_at_the_header_timeout_and_the_node_gets_its_resources_back(
        timed_node, channel, clients):
    node = timed_node
    # A first burst takes the allocator to its high-water mark (freed memory stays in the
    # process, ~9 MB for 1,000 sockets here, and is reused by the next burst): measure after.
    assert_cut_with_408(open_slowloris(node, SLOWLORIS))
    fds_before, rss_before = descriptors(node), rss_kib(node)

    steady = connect_client(node.url, "websocket", "steady")
    clients.append(steady)
    assert steady.call("subscribe", {"channel": channel}, timeout=10)["ok"]
    started = time.monotonic()
    slow = open_slowloris(node, SLOWLORIS)
    # meanwhile, the well-behaved client is served as usual
    assert steady.call("publish", {"channel": channel, "data": "during"}, timeout=10)["ok"]
    steady.wait_messages(channel, 1)
    assert_cut_with_408(slow)
    assert time.monotonic() - started <= HEADER_TIMEOUT + LATE + 5  # + the time to open them
    assert steady.call("publish", {"channel": channel, "data": "after"}, timeout=10)["ok"]
    steady.wait_messages(channel, 2)
    # the steady client's WebSocket is one descriptor; a couple more for slack
    wait_until(lambda: descriptors(node) <= fds_before + 3, 10,
               message=f"the node's descriptors to return to ~{fds_before}")
    # held, 1,000 of them cost ~15 MB here (46 MB per 3,000 before the node cut them)
    wait_until(lambda: rss_kib(node) <= rss_before + 4096, 10,
               message=f"the node's RSS to return to ~{rss_before} KiB")


def test_an_idle_keep_alive_connection_is_closed_silently_after_the_idle_timeout(timed_node):
    sock = get_keep_alive(timed_node)
    answered = time.monotonic()
    assert read_until_closed(sock) == b""
    assert IDLE_TIMEOUT - 0.2 <= time.monotonic() - answered <= IDLE_TIMEOUT + LATE


def test_a_keep_alive_connection_in_steady_use_outlives_the_idle_and_header_timeouts(timed_node):
    """Each request restarts the idle clock: a connection asked something every 50 ms is
    answered every time, on the same connection, long past the idle timeout (a reused gevent
    timer once kept its first deadline and cut such connections at idle_timeout)."""
    with RawHttp(timed_node.port) as http:
        began = time.monotonic()
        answers = 0
        while time.monotonic() - began < 2 * IDLE_TIMEOUT + HEADER_TIMEOUT:
            reply = http.request("GET", "/healthz", keep_alive=True)
            assert reply.status == 200, reply
            assert reply.headers.get("connection", "").lower() != "close", reply.headers
            answers += 1
            time.sleep(0.05)
        assert answers >= 40


def test_an_answer_after_which_the_node_closes_says_connection_close(timed_node):
    """A proxy that keeps connections alive (the shipped nginx) must never be left holding one
    the node closed without saying so: it would send its next request down a dead one."""
    with RawHttp(timed_node.port) as http:
        # refused unread (not JSON), but small: read through, and the connection stays
        reply = http.request("POST", "/api/publish", b"x" * 10_000, keep_alive=True)
        reply.assert_json_error(400, "bad_request")
        assert "connection" not in reply.headers
        assert http.request("GET", "/healthz", keep_alive=True).status == 200
        # refused unread and large: not worth reading through, the node closes and says so
        reply = http.request("POST", "/api/publish", b"x" * 300_000, keep_alive=True)
        reply.assert_json_error(400, "bad_request")
        assert reply.headers["connection"] == "close"


class PingCountingClient(RecordingClient):
    """A python-socketio client that counts the Engine.IO pings it answered."""

    def __init__(self) -> None:
        super().__init__()
        self.pings = 0

    def _engineio_client_class(self):
        outer = self

        class Counting(_InOrderEngineIOClient):
            def _receive_packet(self, pkt):
                if pkt.packet_type == packet.PING:
                    outer.pings += 1
                return super()._receive_packet(pkt)

        return Counting


def test_a_long_poll_waiting_longer_than_the_header_timeout_is_not_cut(timed_node, clients):
    client = PingCountingClient()
    client.connect(timed_node.url, transports=["polling"], wait_timeout=10)
    clients.append(client)
    sid = client.get_sid()
    # with no traffic, each GET waits a whole ping interval (3 s) for the next ping: three
    # times the header timeout, and longer than the idle timeout
    wait_until(lambda: client.pings >= 3 or not client.connected, 3 * PING_INTERVAL + LATE + 5,
               message="three pings")
    assert client.connected and client.get_sid() == sid and client.transport() == "polling"
    assert client.call("history", {"channel": "any"}, timeout=10)["ok"]


def test_past_the_cap_new_connections_get_503_existing_ones_carry_on_and_room_comes_back(
        capped_node, channel, clients):
    node = capped_node
    listener = connect_client(node.url, "websocket", "listener")
    speaker = connect_client(node.url, "websocket", "speaker")
    clients.extend([listener, speaker])
    assert listener.call("subscribe", {"channel": channel}, timeout=10)["ok"]
    websockets = [raw_websocket(node) for _ in range(28)]  # the engine's
    keep_alive = [get_keep_alive(node) for _ in range(MAX_CONNECTIONS - 30)]  # pywsgi's

    for _ in range(3):
        sock = connect(node)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = split_response(read_until_closed(sock))
        assert status == 503
        assert headers["retry-after"] == "1" and headers["connection"] == "close"
        assert json.loads(body)["error"]["code"] == "unavailable"
    assert requests.get(node.url + "/healthz", timeout=10).status_code == 503

    # the connections the node holds are untouched
    assert speaker.call("publish", {"channel": channel, "data": "at the cap"}, timeout=10)["ok"]
    assert [m["data"] for m in listener.wait_messages(channel, 1)] == ["at the cap"]
    keep_alive[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert keep_alive[0].recv(65536).startswith(b"HTTP/1.1 200 ")
    websockets[0].send('42["history",{"channel":"x"}]')

    for ws in websockets[:10]:
        ws.close()

    def accepted() -> bool:
        return requests.get(node.url + "/healthz", timeout=10).status_code == 200

    wait_until(accepted, 10, interval=0.2, message="a new connection to be accepted again")
    assert listener.call("history", {"channel": channel}, timeout=10)["ok"]
    assert node.log().count("connection cap reached") == 1  # once per burst, not per refusal
    wait_until(lambda: "accepting new connections again" in node.log(), 15,
               message="the end of the burst to be logged")
    for sock in keep_alive:
        sock.close()
    for ws in websockets[10:]:
        ws.close()
