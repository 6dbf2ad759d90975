"""The Engine.IO server at the WSGI level: long-polling, handshakes, errors, upgrades."""

from __future__ import annotations

import base64
import io
import json
import socket

import gevent
import msgpack
import pytest

from realtime.app import create_app
from realtime.config import Config
from realtime.session import Session
from realtime.transports.polling import MAX_PACKETS_PER_RESPONSE, decode_payload
from realtime.transports.websocket import WebSocketTransport
from tests.helpers import wait_until
from tests.unit.transports.test_framing import client_frame
from tests.unit.transports.test_websocket import Peer


class Unreadable(io.RawIOBase):
    """A request body that must not be read (it is refused from its Content-Length)."""

    def read(self, *args):
        raise AssertionError("the body was read")


def call(realtime, method, query, body=b"", headers=None, stream=None):
    """One WSGI request to the node; (status code, headers, body)."""
    environ = {"REQUEST_METHOD": method, "PATH_INFO": "/socket.io/", "QUERY_STRING": query,
               "REMOTE_ADDR": "127.0.0.1", "HTTP_HOST": "node:5000",
               "wsgi.input": stream or io.BytesIO(body), "CONTENT_LENGTH": str(len(body))}
    for name, value in (headers or {}).items():
        environ[name] = value
    answer = {}

    def start_response(status, response_headers):
        answer["status"] = int(status.split()[0])
        answer["headers"] = dict(response_headers)

    data = b"".join(realtime.wsgi(environ, start_response))
    return answer["status"], answer["headers"], data


@pytest.fixture
def realtime():
    instance = create_app(Config(node_id="eio", max_message_size=1000,
                                 max_outbound_buffer=4096))
    instance.start()
    yield instance
    instance.stop()


class PollingClient:
    """A long-polling client of the node, one request at a time."""

    def __init__(self, realtime, headers=None):
        self.realtime = realtime
        self.headers = headers or {}
        status, _, body = call(realtime, "GET", "EIO=4&transport=polling", headers=self.headers)
        assert status == 200 and body.startswith(b"0{")
        self.handshake = json.loads(body[1:])
        self.sid = self.handshake["sid"]
        self.query = f"EIO=4&transport=polling&sid={self.sid}"

    def post(self, *packets: str | bytes) -> tuple[int, bytes]:
        body = b"\x1e".join(p.encode() if isinstance(p, str) else b"b" + base64.b64encode(p)
                            for p in packets)
        status, _, data = call(self.realtime, "POST", self.query, body, self.headers)
        return status, data

    def get(self) -> list[str | bytes]:
        status, _, body = call(self.realtime, "GET", self.query, headers=self.headers)
        assert status == 200, body
        return decode_payload(body)

    def get_until(self, predicate) -> list[str | bytes]:
        """GET until a packet matches ``predicate``; every packet received on the way."""
        seen: list[str | bytes] = []
        while not any(predicate(p) for p in seen):
            seen += self.get()
        return seen

    @property
    def session(self):
        return self.realtime.engine.sessions[self.sid]


def connected(realtime, user="alice"):
    client = PollingClient(realtime)
    assert client.post("40" + json.dumps({"user": user})) == (200, b"ok")
    replies = client.get()
    assert replies[0].startswith('40{"sid":'), replies
    return client


def test_the_handshake_opens_a_session_named_after_the_node(realtime):
    client = PollingClient(realtime)
    assert client.sid.startswith("eio.")
    assert client.handshake["upgrades"] == ["websocket"]
    assert client.handshake["pingInterval"] == 25000 and client.handshake["pingTimeout"] == 20000
    assert client.handshake["maxPayload"] == 1000 + 16 * 1024


def test_events_and_acks_over_long_polling(realtime):
    client = connected(realtime)
    assert client.post('421["subscribe",{"channel":"chat:c"}]', '422["publish",'
                       '{"channel":"chat:c","data":"hi"}]') == (200, b"ok")
    packets = client.get_until(lambda p: p.startswith("432"))
    assert [p[:3] for p in packets if p[:2] == "43"] == ["431", "432"]
    events = [json.loads(p[2:]) for p in packets if p.startswith("42[")]
    assert events == [["join", {"channel": "chat:c", "user": "alice"}],
                      ["message", {"channel": "chat:c", "offset": 1, "data": "hi",
                                   "user": "alice"}]]


def test_msgpack_clients_on_long_polling_send_and_get_binary_records(realtime):
    client = PollingClient(realtime)
    assert client.post(msgpack.packb({"type": 0, "nsp": "/", "data": {"user": "m"}}))[0] == 200
    reply = client.get()[0]
    assert isinstance(reply, bytes) and msgpack.unpackb(reply)["type"] == 0
    client.post(msgpack.packb({"type": 2, "nsp": "/", "id": 4,
                               "data": ["history", {"channel": "c"}]}))
    ack = msgpack.unpackb(client.get()[0])
    assert ack == {"type": 3, "nsp": "/", "id": 4,
                   "data": [{"ok": True, "epoch": ack["data"][0]["epoch"], "offset": 0,
                             "publications": []}]}


def test_a_poll_returns_at_most_16_packets_and_the_rest_next_time(realtime):
    client = connected(realtime)
    for i in range(20):
        client.session.write_packets(f"42[\"n\",{i}]")
    assert len(client.get()) == MAX_PACKETS_PER_RESPONSE
    assert len(client.get()) == 4


def test_a_pending_poll_is_answered_as_soon_as_something_is_written(realtime):
    client = connected(realtime)
    poll = gevent.spawn(client.get)
    gevent.sleep(0.05)
    assert not poll.ready()
    client.session.write_packets("42[\"late\"]")
    assert poll.get(timeout=5) == ['42["late"]']


@pytest.mark.parametrize("query,message", [
    ("EIO=3&transport=polling", "unsupported Engine.IO protocol version"),
    ("EIO=4&transport=carrier-pigeon", "unknown transport"),
    ("EIO=4&transport=polling&sid=eio.nope", "Session ID unknown"),
])
def test_bad_requests_get_a_400_with_a_json_error(realtime, query, message):
    status, headers, body = call(realtime, "GET", query)
    assert status == 400 and headers["Content-Type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["code"] == "bad_request" and message in error["message"]


@pytest.mark.parametrize("body", [b"x", b"", b"\xff\xfe", b"42[\x1e\x1e", b"b!!!"])
def test_bad_polling_bodies_get_a_400_and_end_the_session(realtime, body):
    client = connected(realtime)
    session = client.session
    status, _, answer = call(realtime, "POST", client.query, body)
    assert status == 400 and json.loads(answer)["error"]["code"] == "bad_request"
    assert session.closed
    wait_until(lambda: realtime.node.hub.get(session.client_id) is None)


def test_a_body_over_the_limit_is_refused_from_its_content_length_unread(realtime):
    client = connected(realtime)
    environ_length = str(2_000_000)
    status, headers, body = call(realtime, "POST", client.query, stream=Unreadable(),
                                 headers={"CONTENT_LENGTH": environ_length})
    assert status == 413 and json.loads(body)["error"]["code"] == "too_large"
    assert headers["Connection"] == "close"
    assert client.session.closed


def test_a_packet_over_the_message_limit_inside_an_acceptable_body_is_refused(realtime):
    # Text packets get no base64 slack: one over the message limit is refused like a
    # WebSocket frame over it, while a binary one of the same size fits once decoded.
    client = connected(realtime)
    limit = client.handshake["maxPayload"]
    status, _ = client.post("4" + "x" * limit)
    assert status == 413 and client.session.closed
    binary = PollingClient(realtime)
    connect = msgpack.packb({"type": 0, "nsp": "/", "data": {"pad": "x" * (limit - 100)}})
    assert len(connect) < limit < len(base64.b64encode(connect))
    assert binary.post(connect) == (200, b"ok")
    assert msgpack.unpackb(binary.get()[0])["type"] == 0  # connected


def test_a_second_get_while_one_is_pending_ends_the_session(realtime):
    client = connected(realtime)
    first = gevent.spawn(client.get)
    gevent.sleep(0.05)
    status, _, body = call(realtime, "GET", client.query)
    assert status == 400 and "already pending" in json.loads(body)["error"]["message"]
    assert first.get(timeout=5) == ["1"]  # the pending one learns that the session closed


def test_the_server_closing_a_session_sends_the_close_packet_to_the_next_poll(realtime):
    client = connected(realtime)
    session = client.session
    session.close("ping timeout")
    assert client.get() == ["1"]  # a transport close: the official client reconnects
    assert session.sid not in realtime.engine.sessions


def test_a_deliberate_disconnect_tells_the_client_before_closing(realtime):
    client = connected(realtime, "victim")
    session = client.session
    assert realtime.node.disconnect_user("victim") == 1
    # The DISCONNECT and the close packet never share a response: the official client would
    # act on the close first and report "transport close" instead of "io server disconnect".
    assert client.get() == ["41"]
    assert client.get() == ["1"]
    assert session.sid not in realtime.engine.sessions


@pytest.mark.parametrize("allowed,origin,ok,cors", [
    ("", "http://node:5000", True, "http://node:5000"),
    ("", "http://evil.example", False, None),
    ("*", "http://evil.example", True, "*"),
    ("http://app.example", "http://app.example", True, "http://app.example"),
    ("http://app.example", "http://node:5000", False, None),
])
def test_origins_are_checked_on_long_polling_as_on_websocket(allowed, origin, ok, cors):
    realtime = create_app(Config(node_id="o", allowed_origins=allowed))
    status, headers, _ = call(realtime, "GET", "EIO=4&transport=polling",
                                 headers={"HTTP_ORIGIN": origin})
    assert (status == 200) is ok and realtime.engine.origin_allowed(
        {"HTTP_ORIGIN": origin, "HTTP_HOST": "node:5000"}) is ok
    assert headers.get("Access-Control-Allow-Origin") == cors
    # "*" is never combined with credentials
    credentials = headers.get("Access-Control-Allow-Credentials")
    assert credentials == (None if cors in (None, "*") else "true")


def test_cors_preflight_is_answered(realtime):
    status, headers, _ = call(realtime, "OPTIONS", "EIO=4&transport=polling", headers={
        "HTTP_ORIGIN": "http://node:5000", "HTTP_ACCESS_CONTROL_REQUEST_HEADERS": "x-token"})
    assert status == 200 and headers["Access-Control-Allow-Headers"] == "x-token"
    assert "POST" in headers["Access-Control-Allow-Methods"]


def test_a_polling_client_that_stops_fetching_is_cut_at_the_outbound_limit(realtime, caplog):
    caplog.set_level("INFO", logger="realtime.engineio")
    client = connected(realtime, "slow")
    client.post('421["subscribe",{"channel":"firehose"}]')
    client.get_until(lambda p: p.startswith("431"))
    session = client.session
    for _ in range(100):
        realtime.node.publish("firehose", "x" * 500)
        if session.closed:
            break
    assert session.closed and "slow" in caplog.text
    assert session.transport.queued < 4096 + 1000  # cut as the limit was passed
    wait_until(lambda: realtime.node.hub.get(session.client_id) is None)


def test_a_heartbeat_that_fails_closes_its_session_and_spares_the_others(realtime, monkeypatch,
                                                                         caplog):
    broken, fine = connected(realtime, "broken"), connected(realtime, "fine")
    engine = realtime.engine
    due = max(broken.session.next_ping, fine.session.next_ping)

    original = Session.check_heartbeat

    def explode_for_one(session, now):
        if session is broken.session:
            raise RuntimeError("boom")
        original(session, now)

    monkeypatch.setattr(Session, "check_heartbeat", explode_for_one)
    engine._tick(due + 1)
    assert broken.session.closed and "heartbeat of" in caplog.text
    assert not fine.session.closed and fine.session.awaiting_pong  # pinged all the same


# -- upgrades ----------------------------------------------------------------------------------


def probe(realtime, client):
    """Open the WebSocket of ``client``'s upgrade (as the handshake leaves it): its peer."""
    server_end, client_end = socket.socketpair()
    realtime.engine.adopt_websocket(server_end, client.session, probe=True)
    return Peer(client_end)


def test_an_upgrade_moves_the_session_onto_the_websocket_with_nothing_lost(realtime):
    client = connected(realtime)
    session = client.session
    client.post('421["subscribe",{"channel":"c"}]')
    client.get_until(lambda p: p.startswith("431"))
    pending_get = gevent.spawn(client.get)
    gevent.sleep(0.05)
    peer = probe(realtime, client)
    peer.send(client_frame("2probe"))
    assert peer.text() == "3probe"
    assert pending_get.get(timeout=5) == ["6"]  # released so that the client can pause
    # Published while the client pauses long-polling: waits in the polling queue...
    realtime.node.publish("c", "during")
    peer.send(client_frame("5"))
    # ...and leaves first on the WebSocket, followed by what comes next.
    assert json.loads(peer.text()[2:])[1]["data"] == "during"
    realtime.node.publish("c", "after")
    assert json.loads(peer.text()[2:])[1]["data"] == "after"
    assert isinstance(session.transport, WebSocketTransport)
    peer.send(client_frame('422["history",{"channel":"c"}]'))
    assert [p["data"] for p in json.loads(peer.text()[3:])[0]["publications"]] == [
        "during", "after"]
    status, _, body = call(realtime, "GET", client.query)
    assert status == 400 and "no longer on long-polling" in body.decode()


def test_a_probe_that_sends_anything_else_is_dropped_and_polling_goes_on(realtime):
    client = connected(realtime)
    peer = probe(realtime, client)
    peer.send(client_frame('42["history",{"channel":"c"}]'))
    assert peer.close_code() == 1002
    client.post('421["history",{"channel":"c"}]')
    assert client.get_until(lambda p: p.startswith("431"))
    assert client.session.upgrade is None and not client.session.closed


def test_an_upgrade_that_never_finishes_is_abandoned(realtime):
    client = connected(realtime)
    peer = probe(realtime, client)
    peer.send(client_frame("2probe"))
    assert peer.text() == "3probe"
    assert client.get() == ["6"]  # GETs are answered at once while the upgrade is pending
    realtime.engine._tick(realtime.engine._upgrades[client.session.upgrade][1] + 1)
    assert peer.closed()
    assert client.session.upgrade is None and not client.session.transport.releasing
    poll = gevent.spawn(client.get)  # long-polling again: the GET waits
    gevent.sleep(0.05)
    assert not poll.ready()
    client.session.write_packets('42["still here"]')
    assert poll.get(timeout=5) == ['42["still here"]']


def test_a_second_upgrade_is_refused_while_one_is_probed(realtime):
    client = connected(realtime)
    probe(realtime, client)
    engine = realtime.engine
    handler = type("Handler", (), {})()
    server_end, client_end = socket.socketpair()
    handler.socket = server_end
    handler.environ = {"HTTP_UPGRADE": "websocket", "PATH_INFO": "/socket.io/",
                       "QUERY_STRING": client.query.replace("polling", "websocket"),
                       "HTTP_SEC_WEBSOCKET_KEY": "dGhlIHNhbXBsZSBub25jZQ==",
                       "HTTP_SEC_WEBSOCKET_VERSION": "13"}
    engine.handle_websocket(handler)
    answer = client_end.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400") and b"cannot be upgraded now" in answer


@pytest.mark.parametrize("host,ok", [
    ("app.example", True), ("APP.example:8443", True), ("evil.example", False),
    ("[::1]:5000", True), ("", False), ("app.example.evil:80", False),
])
def test_allowed_hosts_apply_to_every_request(host, ok):
    realtime = create_app(Config(node_id="h", allowed_hosts="app.example,::1"))
    status, _, body = call(realtime, "GET", "EIO=4&transport=polling",
                           headers={"HTTP_HOST": host})
    assert (status == 200) is ok, body
    from werkzeug.test import Client

    response = Client(realtime.wsgi).get("/healthz", headers={"Host": host})
    assert response.status_code == (200 if ok else 400)
