"""Every kind of packet the server writes, decoded by the official JavaScript parsers.

``socket.io-parser`` (the client's default) and ``socket.io-msgpack-parser`` validate what they
decode and throw on what they do not expect (``id: nil``, data on a DISCONNECT, ...): a client
whose parser throws loses its connection. Nothing realtime sends may make them throw.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess

import pytest

from realtime.codecs import JSON, MSGPACK, Packet, PacketType
from realtime.errors import BadRequest
from realtime.frames import EncodedEvent
from realtime.session import error_ack
from tests.integration.clients import JS_DIR, STATIC_MODULES

SERVER_PACKETS = [
    Packet(PacketType.CONNECT, "/", {"sid": "s1"}),
    Packet(PacketType.CONNECT_ERROR, "/admin", {"message": "Invalid namespace"}),
    Packet(PacketType.CONNECT_ERROR, "/", {"message": "unauthorized",
                                           "data": {"reason": "token expired"}}),
    Packet(PacketType.DISCONNECT),
    Packet(PacketType.ACK, "/", [{"ok": True}], 0),
    Packet(PacketType.ACK, "/", [error_ack(BadRequest("no"))], 7),
    Packet(PacketType.ACK, "/admin", [error_ack(BadRequest("not connected"))], 2),
    Packet(PacketType.ACK, "/", [{"ok": True, "members": [], "publications": []}], 2 ** 40),
]
EVENTS = [
    ("message", {"channel": "c", "offset": 1, "data": None, "user": None}),
    ("message", {"channel": "c", "offset": 2, "data": {"é": "😀", "n": [1.5, -2, True]},
                 "user": "alice"}),
    ("message", {"channel": "c", "offset": 3, "data": [], "user": None}),
    ("message", {"channel": "c", "offset": 4, "data": "", "user": None}),
    ("join", {"channel": "c", "user": "alice"}),
    ("leave", {"channel": "c", "user": "alice"}),
]


def decode_in_js(items: list[dict]) -> list[dict]:
    assert shutil.which("node") and (STATIC_MODULES / "socket.io-msgpack-parser").is_dir(), \
        "node or the npm packages are missing (scripts/setup installs them)"
    done = subprocess.run(["node", str(JS_DIR / "decode_packets.js")], input=json.dumps(items),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def as_js_input(codec, payload: str | bytes) -> dict:
    if codec is JSON:
        return {"parser": "json", "text": payload}
    return {"parser": "msgpack", "base64": base64.b64encode(payload).decode()}


@pytest.mark.parametrize("codec", [JSON, MSGPACK], ids=["json", "msgpack"])
def test_the_official_parsers_accept_everything_the_server_sends(codec):
    encoded = [codec.encode(packet) for packet in SERVER_PACKETS]
    # the fan-out's encode-once path, as the Engine.IO message a session writes
    for name, payload in EVENTS:
        message = EncodedEvent(name, payload).message(codec.index)
        encoded.append(message[1:] if isinstance(message, str) else message)
    results = decode_in_js([as_js_input(codec, payload) for payload in encoded])
    failures = [(payload, result) for payload, result in zip(encoded, results, strict=True)
                if "error" in result]
    assert not failures
    decoded = [result["packet"] for result in results]
    for packet, js in zip(SERVER_PACKETS, decoded, strict=False):
        assert js["type"] == packet.type and js["nsp"] == packet.namespace
        assert js.get("id") == packet.ack_id
        if packet.type is PacketType.DISCONNECT:
            assert "data" not in js
        else:
            assert js["data"] == packet.data
    events = decoded[len(SERVER_PACKETS):]
    assert [(js["data"][0], js["data"][1]) for js in events] == EVENTS
    assert all("id" not in js for js in events)
