"""The direct WebSocket transport over a socket pair: framing, Engine.IO, Socket.IO, limits."""

from __future__ import annotations

import json
import os
import socket
import struct

import gevent
import pytest

from realtime.app import create_app
from realtime.config import Config
from realtime.websocket import (
    ProtocolError,
    WebSocketConnection,
    parse_socketio_packet,
    unmask,
)
from tests.helpers import wait_until


def client_frame(payload: bytes | str, opcode: int = 0x1, final: bool = True) -> bytes:
    """A masked client frame, as a browser would send it."""
    if isinstance(payload, str):
        payload = payload.encode()
    mask = os.urandom(4)
    length = len(payload)
    first = (0x80 if final else 0) | opcode
    if length < 126:
        header = struct.pack("!BB", first, 0x80 | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", first, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, length)
    return header + mask + unmask(payload, mask)


class Peer:
    """The client end of a socket pair whose other end is a WebSocketConnection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def send(self, *frames: bytes) -> None:
        self.sock.sendall(b"".join(frames))

    def frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next (opcode, payload) from the server, or (-1, b'') once it closed."""
        self.sock.settimeout(timeout)
        while True:
            if len(self.buffer) >= 2:
                length, header = self.buffer[1] & 0x7F, 2
                if length == 126:
                    length, header = struct.unpack_from("!H", self.buffer, 2)[0], 4
                elif length == 127:
                    length, header = struct.unpack_from("!Q", self.buffer, 2)[0], 10
                if len(self.buffer) >= header + length:
                    opcode = self.buffer[0] & 0x0F
                    payload = self.buffer[header:header + length]
                    self.buffer = self.buffer[header + length:]
                    return opcode, payload
            data = self.sock.recv(65536)
            if not data:
                return -1, b""
            self.buffer += data

    def text(self) -> str:
        opcode, payload = self.frame()
        assert opcode == 0x1, (opcode, payload)
        return payload.decode()

    def closed(self) -> bool:
        """Skip frames until the server closes the socket (True) or goes quiet (False)."""
        try:
            while True:
                opcode, _ = self.frame(timeout=5)
                if opcode == -1:
                    return True
        except TimeoutError:
            return False


@pytest.fixture
def realtime():
    instance = create_app(Config(node_id="ws", max_message_size=1000, max_outbound_buffer=4096))
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture
def open_peer(realtime):
    """A connection as accept() leaves it (open packet sent); returns (peer, connection)."""
    made = []

    def make():
        server_end, client_end = socket.socketpair()
        server_end.setblocking(False)
        raw = socket.socket(fileno=os.dup(server_end.fileno()))
        server_end.close()
        import _socket

        sock = _socket.socket(fileno=raw.detach())
        sock.setblocking(False)
        transport = realtime.websocket
        connection = WebSocketConnection(transport, sock, "ws.test")
        transport.connections.add(connection)
        connection.start_reading()
        peer = Peer(client_end)
        made.append(peer)
        return peer, connection

    yield make
    for peer in made:
        peer.sock.close()


def connected(open_peer, user="alice"):
    peer, connection = open_peer()
    peer.send(client_frame("40" + json.dumps({"user": user})))
    reply = peer.text()
    assert reply.startswith('40{"sid":')
    return peer, connection


def test_unmask_is_its_own_inverse():
    mask = b"\x01\x02\x03\x04"
    data = bytes(range(256)) * 3 + b"tail"
    assert unmask(unmask(data, mask), mask) == data
    assert unmask(b"", mask) == b""
    assert unmask(b"\x00\x00\x00\x00\x00", mask) == b"\x01\x02\x03\x04\x01"


@pytest.mark.parametrize("text,expected", [
    ('0{"user":"a"}', ("0", "/", 0, None, {"user": "a"})),
    ("0", ("0", "/", 0, None, None)),
    ('212["publish",{"channel":"c"}]', ("2", "/", 0, 12, ["publish", {"channel": "c"}])),
    ('2/admin,3["x"]', ("2", "/admin", 0, 3, ["x"])),
    ("0/admin,", ("0", "/admin", 0, None, None)),
    ('51-7["publish",{"_placeholder":true,"num":0}]',
     ("5", "/", 1, 7, ["publish", {"_placeholder": True, "num": 0}])),
])
def test_socketio_packets_parse(text, expected):
    assert parse_socketio_packet(text) == expected


@pytest.mark.parametrize("text", ["", "9", '2["x"', "5x-[]"])
def test_malformed_socketio_packets_are_protocol_errors(text):
    with pytest.raises(ProtocolError):
        parse_socketio_packet(text)


def test_connect_subscribe_publish_and_ack_order(open_peer, realtime):
    peer, connection = connected(open_peer)
    assert connection.user == "alice" and realtime.node.hub.get(connection.client_id)
    peer.send(client_frame('421["subscribe",{"channel":"c"}]'))
    assert peer.text().startswith('431[{"ok":true,"channel":"c"')
    assert json.loads(peer.text()[2:]) == ["join", {"channel": "c", "user": "alice"}]
    realtime.node.publish("c", "x")
    assert json.loads(peer.text()[2:]) == ["message", {"channel": "c", "offset": 1,
                                                       "data": "x", "user": None}]


def test_publishes_queued_back_to_back_go_to_the_broker_together(open_peer, realtime,
                                                                 monkeypatch):
    broker = realtime.node.broker
    runs = []
    publish_many = broker.publish_many

    def recording_publish_many(items, **kwargs):
        runs.append([item[1] for item in items])
        return publish_many(items, **kwargs)

    monkeypatch.setattr(broker, "publish_many", recording_publish_many)
    peer, _ = connected(open_peer)
    events = [
        '420["publish",{"channel":"c","data":0}]',
        '421["publish",{"channel":"bad channel!","data":1}]',
        '422["publish",{"channel":"c"}]',
        '423["publish",{"channel":"c","data":3}]',
        '424["publish"]',
        '425["publish",{"channel":"c","data":5}]',
        '426["history",{"channel":"c"}]',
        '427["publish",{"channel":"c","data":7}]',
        '428["publish",{"channel":"c","data":"' + "x" * 1200 + '"}]',
    ]
    peer.send(*(client_frame(event) for event in events))  # one write: all queue at once
    acks = {}
    while len(acks) < len(events):
        text = peer.text()
        ack_id, answer = int(text[2]), json.loads(text[3:])[0]
        assert ack_id not in acks and ack_id == len(acks), "acks out of event order"
        acks[ack_id] = answer
    assert [acks[i].get("offset") for i in (0, 3, 5, 7)] == [1, 2, 3, 4]
    assert [acks[i]["error"]["code"] for i in (1, 2, 4, 8)] == ["bad_request"] * 3 + [
        "too_large"]
    assert [p["data"] for p in acks[6]["publications"]] == [0, 3, 5]
    assert runs[0] == [0, 3, 5], "the first run of publishes was not handed over together"


def test_fragmented_messages_and_control_frames_in_between(open_peer):
    peer, _ = open_peer()
    peer.send(client_frame("4", final=False), client_frame(b"ping", opcode=0x9),
              client_frame('0{"user":"frag"}', opcode=0x0))
    assert peer.frame() == (0xA, b"ping")
    assert peer.text().startswith('40{"sid":')


def test_many_frames_in_one_write_and_one_frame_in_many(open_peer):
    peer, _ = connected(open_peer)
    frames = b"".join(client_frame(f'42{i}["history",{{"channel":"c"}}]') for i in range(5))
    peer.send(frames[:3])
    peer.send(frames[3:])
    acks = [peer.text() for _ in range(5)]
    assert [a[:3] for a in acks] == ["430", "431", "432", "433", "434"]


def test_frames_over_the_limit_are_refused_from_their_header(open_peer):
    peer, _ = connected(open_peer)
    header_only = client_frame("4" + "x" * 20000)[:14]
    peer.send(header_only)  # the payload never comes: the header alone must do it
    opcode, payload = peer.frame()
    assert opcode == 0x8 and struct.unpack("!H", payload[:2])[0] == 1009
    assert peer.closed()


@pytest.mark.parametrize("frame", [
    b"\x81\x05hello",                          # unmasked client frame
    client_frame(b"\xff\xfe"),                 # not UTF-8
    client_frame("x", opcode=0x3),             # reserved opcode
    client_frame("4", opcode=0x0),             # continuation without a start
    client_frame('42{"not":"a list"}'),        # event without a name
])
def test_protocol_violations_close_the_connection(open_peer, frame):
    peer, _ = connected(open_peer)
    peer.send(frame)
    assert peer.closed()


def test_binary_events_get_a_bad_request_ack_once_their_attachments_arrive(open_peer):
    peer, _ = connected(open_peer)
    peer.send(client_frame('451-3["publish",{"channel":"c","data":{"_placeholder":true,'
                           '"num":0}}]'))
    peer.send(client_frame(b"\x00\x01", opcode=0x2))
    ack = json.loads(peer.text()[3:])[0]
    assert ack["ok"] is False and ack["error"]["code"] == "bad_request"


def test_other_namespaces_are_refused(open_peer):
    peer, _ = open_peer()
    peer.send(client_frame("40/admin,"))
    assert peer.text() == '44/admin,{"message":"Invalid namespace"}'


def test_a_slow_reader_is_disconnected_past_its_buffer_and_forgotten(open_peer, realtime,
                                                                    caplog):
    caplog.set_level("INFO", logger="realtime.websocket")
    peer, connection = connected(open_peer, "slow")
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    peer.send(client_frame('421["subscribe",{"channel":"firehose"}]'))
    assert peer.text().startswith("431")
    for _ in range(2000):
        realtime.node.publish("firehose", "x" * 500)
        if connection.closed:
            break
    assert connection.closed and "slow" in caplog.text
    wait_until(lambda: realtime.node.hub.get(connection.client_id) is None)
    assert realtime.node.presence("firehose") == []


def test_engineio_ping_pong_and_close(open_peer, realtime):
    peer, connection = connected(open_peer)
    connection.check_heartbeat(connection.next_ping)
    assert peer.text() == "2"
    peer.send(client_frame("3"))
    wait_until(lambda: not connection.awaiting_pong)
    connection.check_heartbeat(connection.next_ping)
    assert peer.text() == "2"
    connection.check_heartbeat(connection.next_ping)  # no pong this time
    assert connection.closed and peer.closed()


def test_a_flood_of_events_pauses_reading_and_every_event_is_answered(open_peer):
    peer, connection = connected(open_peer)
    connection.transport.max_outbound_buffer = 1 << 20  # this peer reads, just not at once
    count = 600  # more than the inbox holds: reading pauses, then resumes
    sender = gevent.spawn(peer.send, *(client_frame(f'42{i}["history",{{"channel":"c"}}]')
                                       for i in range(count)))
    acks = [peer.text() for _ in range(count)]
    sender.join()
    assert [int(a[2:a.index("[")]) for a in acks] == list(range(count))
    assert connection.reader.active and not connection.closed


@pytest.mark.parametrize("environ,wanted", [
    ({"HTTP_UPGRADE": "websocket", "PATH_INFO": "/socket.io/",
      "QUERY_STRING": "EIO=4&transport=websocket"}, True),
    ({"HTTP_UPGRADE": "WebSocket", "PATH_INFO": "/socket.io",
      "QUERY_STRING": "transport=websocket&EIO=4&t=abc"}, True),
    # an upgrade of a long-polling session stays with python-engineio
    ({"HTTP_UPGRADE": "websocket", "PATH_INFO": "/socket.io/",
      "QUERY_STRING": "EIO=4&transport=websocket&sid=n1.abc"}, False),
    ({"HTTP_UPGRADE": "websocket", "PATH_INFO": "/socket.io/",
      "QUERY_STRING": "EIO=3&transport=websocket"}, False),
    ({"PATH_INFO": "/socket.io/", "QUERY_STRING": "EIO=4&transport=polling"}, False),
    ({"HTTP_UPGRADE": "websocket", "PATH_INFO": "/elsewhere",
      "QUERY_STRING": "EIO=4&transport=websocket"}, False),
])
def test_which_requests_take_the_direct_path(environ, wanted):
    from realtime.websocket import WebSocketTransport

    assert WebSocketTransport.wants(environ) is wanted


@pytest.mark.parametrize("allowed,origin,host,ok", [
    ("", None, "a:1", True),
    ("", "http://a:1", "a:1", True),
    ("", "http://evil", "a:1", False),
    ("*", "http://evil", "a:1", True),
    ("http://b", "http://b", "a:1", True),
    ("http://b", "http://a:1", "a:1", False),
])
def test_origins(realtime, allowed, origin, host, ok):
    from realtime.websocket import WebSocketTransport

    config = Config(node_id="o", allowed_origins=allowed)
    transport = WebSocketTransport(realtime.websocket.protocol, config)
    environ = {"HTTP_HOST": host, **({"HTTP_ORIGIN": origin} if origin else {})}
    assert transport._origin_allowed(environ) is ok
