"""The WebSocket transport over a socket pair, with a real session and node behind it."""

from __future__ import annotations

import json
import socket
import struct

import gevent
import pytest

from realtime.app import create_app
from realtime.config import Config
from realtime.session import RequestContext
from realtime.transports.framing import OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING
from tests.helpers import wait_until
from tests.unit.transports.test_framing import client_frame


class Peer:
    """The client end of a socket pair whose other end is a session's WebSocket."""

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

    def close_code(self) -> int | None:
        """Skip frames until the server's close frame; its code (None if it just hung up)."""
        while True:
            opcode, payload = self.frame()
            if opcode == OP_CLOSE:
                return struct.unpack("!H", payload[:2])[0]
            if opcode == -1:
                return None

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
    # A budget no test here reaches: the event budget has tests of its own.
    instance = create_app(Config(node_id="ws", max_message_size=1000, max_outbound_buffer=4096,
                                 events_burst=100_000, events_per_second=100_000))
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture
def open_peer(realtime):
    """A session on a WebSocket as the handshake leaves it; returns (peer, session)."""
    made = []

    def make():
        server_end, client_end = socket.socketpair()
        engine = realtime.engine
        session = engine.new_session(RequestContext("127.0.0.1", None))
        engine.adopt_websocket(server_end, session)
        peer = Peer(client_end)
        made.append(peer)
        return peer, session

    yield make
    for peer in made:
        peer.sock.close()


def connected(open_peer, user="alice"):
    peer, session = open_peer()
    peer.send(client_frame("40" + json.dumps({"user": user})))
    reply = peer.text()
    assert reply.startswith('40{"sid":')
    return peer, session


def test_connect_subscribe_publish_and_ack_order(open_peer, realtime):
    peer, session = connected(open_peer)
    assert session.user == "alice" and realtime.node.hub.get(session.client_id) is session
    peer.send(client_frame('421["subscribe",{"channel":"chat:c"}]'))
    assert peer.text().startswith('431[{"ok":true,"channel":"chat:c"')
    assert json.loads(peer.text()[2:]) == ["join", {"channel": "chat:c", "user": "alice"}]
    realtime.node.publish("chat:c", "x")
    assert json.loads(peer.text()[2:]) == ["message", {"channel": "chat:c", "offset": 1,
                                                       "data": "x", "user": None}]


def test_publishes_queued_back_to_back_go_to_the_broker_together(open_peer, realtime,
                                                                 monkeypatch):
    broker = realtime.node.broker
    runs = []
    publish_many = broker.publish_many

    def recording_publish_many(items, **kwargs):
        runs.append([item.data for item in items])
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
    peer.send(client_frame("4", final=False), client_frame(b"ping", OP_PING),
              client_frame('0{"user":"frag"}', OP_CONTINUATION))
    assert peer.frame() == (0xA, b"ping")
    assert peer.text().startswith('40{"sid":')


def test_many_frames_in_one_write_and_one_frame_in_many(open_peer):
    peer, _ = connected(open_peer)
    frames = b"".join(client_frame(f'42{i}["history",{{"channel":"c"}}]') for i in range(5))
    peer.send(frames[:3])
    peer.send(frames[3:])
    acks = [peer.text() for _ in range(5)]
    assert [a[:3] for a in acks] == ["430", "431", "432", "433", "434"]


def test_frames_over_the_limit_are_refused_from_their_header(open_peer, realtime):
    peer, session = connected(open_peer)
    header_only = client_frame("4" + "x" * 20000)[:14]
    peer.send(header_only)  # the payload never comes: the header alone must do it
    assert peer.close_code() == 1009
    assert peer.closed()
    wait_until(lambda: realtime.node.hub.get(session.client_id) is None)


@pytest.mark.parametrize("frame,code", [
    (b"\x81\x05hello", 1002),                          # unmasked client frame
    (client_frame(b"\xff\xfe"), 1007),                 # not UTF-8
    (client_frame("x", opcode=0x3), 1002),             # reserved opcode
    (client_frame("4", opcode=OP_CONTINUATION), 1002),  # continuation without a start
    (client_frame('42{"not":"a list"}'), 1002),        # event without a name
    (client_frame('42["x"'), 1002),                    # not JSON
    (client_frame("42" + "1" * 5000 + '["x"]'), 1002),  # an ack id no client counts to
    (client_frame("42[" + "[" * 5000 + "]" * 5000 + "]"), 1002),  # nested past any decoder
    (client_frame(b"\x93\x01\x02\x03", OP_BINARY), 1003),  # binary in a JSON session
])
def test_protocol_violations_close_with_their_code(open_peer, frame, code):
    peer, _ = connected(open_peer)
    peer.send(frame)
    assert peer.close_code() == code
    assert peer.closed()


def test_a_text_packet_in_a_msgpack_session_closes_with_1003(open_peer):
    import msgpack

    peer, session = open_peer()
    peer.send(client_frame(msgpack.packb({"type": 0, "nsp": "/"}), OP_BINARY))
    opcode, payload = peer.frame()
    assert opcode == OP_BINARY and msgpack.unpackb(payload)["type"] == 0
    assert session.codec is not None and session.codec.name == "msgpack"
    peer.send(client_frame('42["history",{"channel":"c"}]'))
    assert peer.close_code() == 1003


def test_a_slow_reader_is_disconnected_past_its_buffer_and_forgotten(open_peer, realtime,
                                                                    caplog):
    caplog.set_level("INFO", logger="realtime.engineio")
    peer, session = connected(open_peer, "slow")
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    peer.send(client_frame('421["subscribe",{"channel":"firehose"}]'))
    assert peer.text().startswith("431")
    for _ in range(2000):
        realtime.node.publish("firehose", "x" * 500)
        if session.closed:
            break
    assert session.closed and "slow" in caplog.text
    wait_until(lambda: realtime.node.hub.get(session.client_id) is None)
    assert realtime.node.presence("firehose") == []


def test_engineio_ping_pong_and_close(open_peer, realtime):
    peer, session = connected(open_peer)
    session.check_heartbeat(session.next_ping)
    assert peer.text() == "2"
    peer.send(client_frame("3"))
    wait_until(lambda: not session.awaiting_pong)
    session.check_heartbeat(session.next_ping)
    assert peer.text() == "2"
    session.check_heartbeat(session.next_ping)  # no pong this time
    assert session.closed
    # a transport close, not a Socket.IO DISCONNECT: the client reconnects by itself
    assert peer.close_code() == 1000


def test_a_flood_of_events_pauses_reading_and_every_event_is_answered(open_peer, realtime):
    peer, session = connected(open_peer)
    realtime.engine.max_outbound_buffer = 1 << 20  # this peer reads, just not at once
    count = 600  # more than the inbox holds: reading pauses, then resumes
    sender = gevent.spawn(peer.send, *(client_frame(f'42{i}["history",{{"channel":"c"}}]')
                                       for i in range(count)))
    acks = [peer.text() for _ in range(count)]
    sender.join()
    assert [int(a[2:a.index("[")]) for a in acks] == list(range(count))
    assert session.transport.reading and not session.closed


def test_the_client_closing_is_quiet_and_forgotten(open_peer, realtime, caplog):
    caplog.set_level("INFO")
    peer, session = connected(open_peer)
    peer.send(client_frame(struct.pack("!H", 1000), OP_CLOSE))
    assert peer.close_code() == 1000
    wait_until(lambda: realtime.node.hub.get(session.client_id) is None)
    assert session.sid not in realtime.engine.sessions
    assert "closed" not in caplog.text


def test_an_idle_connection_holds_no_parser_state(open_peer):
    peer, session = connected(open_peer)
    transport = session.transport
    assert transport.parser is None
    whole = client_frame('421["history",{"channel":"c"}]')
    peer.send(whole[:5])  # half a frame: the parser keeps it
    wait_until(lambda: transport.parser is not None)
    peer.send(whole[5:])
    assert peer.text().startswith("43")
    assert transport.parser is None
