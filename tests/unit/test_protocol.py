"""The client protocol over real sessions without a network, for each codec (JSON, msgpack)."""

from __future__ import annotations

import json

import pytest

from realtime.codecs import JSON, Packet, PacketType
from tests.helpers import wait_until
from tests.unit.sessions import SessionClient


def test_subscribe_answers_the_stream_position(connect):
    alice = connect("alice")
    ack = alice.emit("subscribe", {"channel": "news"})
    assert ack["ok"] is True and ack["channel"] == "news"
    assert isinstance(ack["epoch"], str) and ack["epoch"]
    assert ack["offset"] == 0 and ack["recovered"] is False and ack["publications"] == []


def test_publish_reaches_every_subscriber_once_with_the_publisher(connect):
    alice, bob, carol = connect("alice"), connect("bob"), connect("carol")
    for client in (alice, bob):
        assert client.emit("subscribe", {"channel": "room"})["ok"]
    ack = carol.emit("publish", {"channel": "room", "data": {"text": "hi"}})
    assert ack["ok"] is True and ack["offset"] == 1 and ack["epoch"]
    expected = {"channel": "room", "offset": 1, "data": {"text": "hi"}, "user": "carol"}
    assert alice.wait_events("message", 1) == [expected]
    assert bob.wait_events("message", 1) == [expected]
    assert carol.events("message") == []


def test_messages_arrive_in_offset_order_after_the_subscribe_ack(connect, realtime):
    alice = connect("alice")
    realtime.node.publish("feed", "before")
    ack = alice.emit("subscribe", {"channel": "feed"})
    assert ack["offset"] == 1
    # Published before the deferred activation has run: held back, then sent after the ack.
    for i in range(3):
        realtime.node.publish("feed", i)
    messages = alice.wait_events("message", 3)
    assert [m["offset"] for m in messages] == [2, 3, 4]
    assert [m["data"] for m in messages] == [0, 1, 2]


def test_unsubscribe_stops_messages(connect, realtime):
    alice = connect("alice")
    alice.emit("subscribe", {"channel": "c"})
    realtime.node.publish("c", 1)
    alice.wait_events("message", 1)
    assert alice.emit("unsubscribe", {"channel": "c"}) == {"ok": True}
    realtime.node.publish("c", 2)
    alice.emit("subscribe", {"channel": "marker"})
    realtime.node.publish("marker", "m")
    wait_until(lambda: any(m["channel"] == "marker" for m in alice.events("message")))
    assert [m["data"] for m in alice.events("message")] == [1, "m"]


def test_subscribing_twice_is_not_an_error_and_does_not_double_messages(connect, realtime):
    alice = connect("alice")
    assert alice.emit("subscribe", {"channel": "c"})["ok"]
    assert alice.emit("subscribe", {"channel": "c"})["ok"]
    realtime.node.publish("c", "once")
    alice.wait_events("message", 1)
    realtime.node.publish("c", "twice")
    alice.wait_events("message", 2)
    assert [m["data"] for m in alice.events("message")] == ["once", "twice"]


def test_recovery_with_since_returns_the_missed_publications(connect, realtime):
    alice = connect("alice")
    first = alice.emit("subscribe", {"channel": "r"})
    for i in range(3):
        realtime.node.publish("r", i)
    bob = connect("bob")
    since = {"epoch": first["epoch"], "offset": 1}
    ack = bob.emit("subscribe", {"channel": "r", "since": since})
    assert ack["recovered"] is True and ack["offset"] == 3
    assert [(p["offset"], p["data"]) for p in ack["publications"]] == [(2, 1), (3, 2)]
    assert set(ack["publications"][0]) == {"channel", "offset", "data", "user"}


def test_recovery_fails_for_another_epoch_or_trimmed_history(connect, realtime):
    alice = connect("alice")
    ack = alice.emit("subscribe", {"channel": "r"})
    for i in range(8):  # history_size is 5 in these tests: offsets 1..3 are gone
        realtime.node.publish("r", i)
    bob = connect("bob")
    wrong_epoch = bob.emit("subscribe",
                           {"channel": "r", "since": {"epoch": "other", "offset": 7}})
    assert wrong_epoch["recovered"] is False and wrong_epoch["publications"] == []
    carol = connect("carol")
    trimmed = carol.emit("subscribe", {"channel": "r", "since": {"epoch": ack["epoch"],
                                                                 "offset": 1}})
    assert trimmed["recovered"] is False and trimmed["publications"] == []
    assert trimmed["offset"] == 8


def test_history_returns_the_last_limit_publications(connect, realtime):
    alice = connect("alice")
    for i in range(4):
        realtime.node.publish("h", i)
    ack = alice.emit("history", {"channel": "h", "limit": 2})
    assert ack["ok"] and ack["offset"] == 4
    assert [p["data"] for p in ack["publications"]] == [2, 3]
    everything = alice.emit("history", {"channel": "h"})
    assert [p["offset"] for p in everything["publications"]] == [1, 2, 3, 4]


def test_presence_counts_distinct_users_and_join_leave_events(connect):
    watcher = connect("watcher")
    watcher.emit("subscribe", {"channel": "p"})
    alice1, alice2 = connect("alice"), connect("alice")
    alice1.emit("subscribe", {"channel": "p"})
    alice2.emit("subscribe", {"channel": "p"})
    ack = watcher.emit("presence", {"channel": "p"})
    assert ack == {"ok": True, "members": [{"user": "alice", "connections": 2},
                                           {"user": "watcher", "connections": 1}]}
    wait_until(lambda: {"channel": "p", "user": "alice"} in watcher.events("join"))
    assert watcher.events("join").count({"channel": "p", "user": "alice"}) == 1
    alice1.emit("unsubscribe", {"channel": "p"})
    alice2.disconnect()
    wait_until(lambda: watcher.events("leave"))
    assert watcher.events("leave") == [{"channel": "p", "user": "alice"}]


def test_anonymous_users_get_anon_sid(connect):
    for auth in (None, {}, {"user": ""}, {"user": 42}, {"user": "x" * 65}):
        client = connect(auth=auth)
        client.emit("subscribe", {"channel": "who"})
    members = client.emit("presence", {"channel": "who"})["members"]
    assert len(members) == 5
    assert all(m["user"].startswith("anon-") for m in members)
    assert connect("y" * 64).emit("subscribe", {"channel": "who"})["ok"]


def test_personal_channels(connect, realtime):
    alice, bob = connect("alice"), connect("bob")
    assert alice.emit("subscribe", {"channel": "user:alice"})["ok"]
    refused = bob.emit("subscribe", {"channel": "user:alice"})
    assert refused["ok"] is False and refused["error"]["code"] == "forbidden"
    for client in (alice, bob):
        ack = client.emit("publish", {"channel": "user:alice", "data": 1})
        assert ack["error"]["code"] == "forbidden"
    realtime.node.publish("user:alice", {"title": "hi"})
    assert alice.wait_events("message", 1)[0]["user"] is None


@pytest.mark.parametrize("event,payload", [
    ("subscribe", "not an object"),
    ("subscribe", {}),
    ("subscribe", {"channel": 5}),
    ("subscribe", {"channel": "has space"}),
    ("subscribe", {"channel": "x" * 201}),
    ("subscribe", {"channel": ""}),
    ("subscribe", {"channel": "c", "since": "yesterday"}),
    ("subscribe", {"channel": "c", "since": {"epoch": 1, "offset": 1}}),
    ("subscribe", {"channel": "c", "since": {"epoch": "e", "offset": -1}}),
    ("subscribe", {"channel": "c", "since": {"epoch": "e", "offset": True}}),
    ("unsubscribe", {"channel": None}),
    ("publish", {"channel": "c"}),
    ("publish", {"data": 1}),
    ("history", {"channel": "c", "limit": -1}),
    ("history", {"channel": "c", "limit": "3"}),
    ("presence", [1, 2]),
    ("no-such-event", {"channel": "c"}),
    ("connect", {"user": "mallory"}),
    ("disconnect", {}),
])
def test_bad_input_gets_a_bad_request_ack(connect, event, payload):
    client = connect("alice")
    ack = client.emit(event, payload)
    assert ack["ok"] is False and ack["error"]["code"] == "bad_request", ack
    assert ack["error"]["message"]
    assert client.emit("subscribe", {"channel": "still-works"})["ok"] is True


def test_an_event_with_no_argument_gets_an_error_ack(connect):
    client = connect("alice")
    ack = client.emit("subscribe")
    assert ack["error"]["code"] == "bad_request"


def test_oversize_data_is_refused_with_too_large(connect):
    client = connect("alice")
    ack = client.emit("publish", {"channel": "c", "data": "x" * (64 * 1024)})
    assert ack["ok"] is False and ack["error"]["code"] == "too_large"
    fits = client.emit("publish", {"channel": "c", "data": "x" * (64 * 1024 - 2)})
    assert fits["ok"] is True


def test_binary_data_is_not_json(connect, codec):
    client = connect("alice")
    if codec is JSON:
        # the default parser sends binary as an attachment after a BINARY_EVENT packet
        client.send_packet(Packet(PacketType.BINARY_EVENT, data=[
            "publish", {"channel": "c", "data": {"_placeholder": True, "num": 0}}],
            ack_id=7, attachments=1))
        client.session.on_packet(b"\x00\x01")
        ack = client.wait_ack(7)
        assert "binary data is not supported" in ack["error"]["message"]
    else:
        ack = client.emit("publish", {"channel": "c", "data": b"\x00\x01"})
    assert ack["error"]["code"] == "bad_request"
    assert client.emit("history", {"channel": "c"})["ok"]


def test_an_event_for_a_namespace_not_connected_gets_an_error_ack(connect):
    client = connect("alice")
    client.send_packet(Packet(PacketType.EVENT, "/admin", ["history", {"channel": "c"}], 3))
    ack = wait_until(lambda: next((p for p in client.socketio_packets()
                                   if p.type is PacketType.ACK and p.namespace == "/admin"),
                                  None))
    assert ack.ack_id == 3 and ack.data[0]["error"]["code"] == "bad_request"


def test_connecting_to_another_namespace_is_refused(connect):
    client = connect("alice")
    reply = client.connect(namespace="/admin")
    assert reply.type is PacketType.CONNECT_ERROR
    assert reply.data == {"message": "Invalid namespace"}


@pytest.mark.parametrize("data,message", [
    ("\ud800 lone surrogate", "not valid Unicode"),
    (10 ** 30, "64 bits"),
    (json.loads("[" * 600 + "]" * 600), "nested too deeply"),
])
def test_data_no_client_could_decode_is_a_bad_request(realtime, data, message):
    # Only the JSON parser can send these (msgpack has no way to say them): they must not
    # reach msgpack subscribers, whose encoding would fail.
    client = SessionClient(realtime.engine, JSON)
    client.connect({"user": "alice"})
    ack = client.emit("publish", {"channel": "c", "data": data})
    assert ack["error"]["code"] == "bad_request" and message in ack["error"]["message"]


def test_a_user_id_that_is_not_valid_unicode_is_anonymous(realtime):
    client = SessionClient(realtime.engine, JSON)
    client.connect({"user": "\udc00"})
    assert client.session.user.startswith("anon-")


def test_a_connected_session_keeps_only_the_peer_and_origin_of_its_request(realtime):
    from realtime.session import RequestContext

    request = RequestContext.from_environ({
        "REMOTE_ADDR": "10.0.0.7", "HTTP_ORIGIN": "http://app.example",
        "HTTP_COOKIE": "token=secret", "QUERY_STRING": "EIO=4&transport=polling&x=%41"})
    assert request.headers["cookie"] == "token=secret" and request.query["x"] == "A"
    client = SessionClient(realtime.engine, JSON, request)
    client.connect({"user": "alice"})
    kept = client.session.request
    assert (kept.peer, kept.origin) == ("10.0.0.7", "http://app.example")
    assert dict(kept.headers) == {} and dict(kept.query) == {}
