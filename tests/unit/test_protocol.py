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
    # nothing was ever published: no stream yet (epoch ""), and subscribing stores none
    assert ack["epoch"] == "" and ack["offset"] == 0
    assert ack["recovered"] is False and ack["publications"] == []
    realtime_epoch = alice.emit("publish", {"channel": "news", "data": 1})["epoch"]
    again = alice.emit("subscribe", {"channel": "news"})
    assert again["epoch"] == realtime_epoch != "" and again["offset"] == 1


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


def test_a_client_publish_repeated_with_its_idempotency_key_is_made_once(connect):
    alice, bob = connect("alice"), connect("bob")
    bob.emit("subscribe", {"channel": "room"})
    payload = {"channel": "room", "data": "hello", "idempotency_key": "msg-1"}
    first = alice.emit("publish", payload)
    assert first["ok"] and alice.emit("publish", payload) == first
    assert alice.emit("publish", {**payload, "idempotency_key": "msg-2"})["offset"] == 2
    assert [m["offset"] for m in bob.wait_events("message", 2)] == [1, 2]


@pytest.mark.parametrize("key", ["", "k" * 65, 1, ["k"], {"k": 1}])
def test_a_bad_idempotency_key_is_refused_with_bad_request(connect, key):
    alice = connect("alice")
    ack = alice.emit("publish", {"channel": "room", "data": 1, "idempotency_key": key})
    assert ack["ok"] is False and ack["error"]["code"] == "bad_request"
    assert alice.emit("history", {"channel": "room"})["publications"] == []


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
    watcher.emit("subscribe", {"channel": "chat:p"})
    alice1, alice2 = connect("alice"), connect("alice")
    alice1.emit("subscribe", {"channel": "chat:p"})
    alice2.emit("subscribe", {"channel": "chat:p"})
    ack = watcher.emit("presence", {"channel": "chat:p"})
    assert ack == {"ok": True, "members": [{"user": "alice", "connections": 2},
                                           {"user": "watcher", "connections": 1}]}
    wait_until(lambda: {"channel": "chat:p", "user": "alice"} in watcher.events("join"))
    assert watcher.events("join").count({"channel": "chat:p", "user": "alice"}) == 1
    alice1.emit("unsubscribe", {"channel": "chat:p"})
    alice2.disconnect()
    wait_until(lambda: watcher.events("leave"))
    assert watcher.events("leave") == [{"channel": "chat:p", "user": "alice"}]


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


@pytest.mark.parametrize("name", [["publish"], {"a": 1}, 5, None])
def test_an_event_name_that_is_not_a_string_gets_a_bad_request_ack(connect, name):
    client = connect("alice")
    ack = client.emit(name, {"channel": "c"})
    assert ack["ok"] is False and ack["error"]["code"] == "bad_request"


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


# -- limits and tokens -------------------------------------------------------------------------

def limited_app(**settings):
    from realtime.app import create_app
    from realtime.config import Config

    instance = create_app(Config(node_id="lim", **settings))
    instance.start()
    return instance


def test_events_past_the_budget_are_rate_limited_and_a_flood_disconnects(caplog):
    caplog.set_level("INFO")
    realtime = limited_app(events_per_second=1, events_burst=3)
    try:
        client = SessionClient(realtime.engine, JSON)
        client.connect({"user": "flooder"})
        ids = [client.emit_no_wait("history", {"channel": "c"}) for _ in range(5)]
        answers = [client.wait_ack(i) for i in ids]
        assert [a["ok"] for a in answers] == [True, True, True, False, False]
        assert answers[3]["error"]["code"] == "rate_limited"
        # ignoring rate_limited and sending another whole burst ends the session, for good
        for _ in range(4):
            client.emit_no_wait("history", {"channel": "c"})
        assert client.session.closed
        assert client.socketio_packets()[-1].type is PacketType.DISCONNECT
        assert caplog.text.count("is over its event budget") == 1
    finally:
        realtime.stop()


def test_the_budget_refills_with_time(monkeypatch):
    realtime = limited_app(events_per_second=10, events_burst=1)
    try:
        clock = [1000.0]
        monkeypatch.setattr("realtime.session.time.monotonic", lambda: clock[0])
        client = SessionClient(realtime.engine, JSON)
        client.connect({"user": "steady"})
        assert client.emit("history", {"channel": "c"})["ok"]
        assert client.emit("history", {"channel": "c"})["error"]["code"] == "rate_limited"
        clock[0] += 0.1  # one event's worth
        assert client.emit("history", {"channel": "c"})["ok"]
    finally:
        realtime.stop()


def test_unknown_events_are_logged_once_per_session(connect, caplog):
    caplog.set_level("INFO", logger="realtime.protocol")
    client = connect("noisy")
    for _ in range(20):
        assert client.emit("no-such-event", {})["error"]["code"] == "bad_request"
    assert caplog.text.count("no-such-event from") == 1


def test_subscriptions_per_connection_are_capped():
    realtime = limited_app(max_subscriptions=3)
    try:
        client = SessionClient(realtime.engine, JSON)
        client.connect({"user": "hoarder"})
        for i in range(3):
            assert client.emit("subscribe", {"channel": f"c{i}"})["ok"]
        refused = client.emit("subscribe", {"channel": "c3"})
        assert refused["error"]["code"] == "rate_limited" and "3" in refused["error"]["message"]
        assert client.emit("subscribe", {"channel": "c1"})["ok"]  # already subscribed: fine
        client.emit("unsubscribe", {"channel": "c0"})
        assert client.emit("subscribe", {"channel": "c3"})["ok"]
    finally:
        realtime.stop()


def test_connections_per_user_are_capped_with_a_connect_error():
    realtime = limited_app(max_connections_per_user=2)
    try:
        for _ in range(2):
            assert SessionClient(realtime.engine, JSON).connect({"user": "many"}).type \
                is PacketType.CONNECT
        refused = SessionClient(realtime.engine, JSON).connect({"user": "many"})
        assert refused.type is PacketType.CONNECT_ERROR
        assert refused.data["message"] == "rate_limited"
        assert "2 connections" in refused.data["data"]["reason"]
        assert SessionClient(realtime.engine, JSON).connect({"user": "other"}).type \
            is PacketType.CONNECT
    finally:
        realtime.stop()


def test_a_bad_token_is_a_connect_error_with_the_reason(codec):
    realtime = limited_app(jwt_secret="k" * 32)
    try:
        refused = SessionClient(realtime.engine, codec).connect({"user": "alice"})
        assert refused.type is PacketType.CONNECT_ERROR
        assert refused.data == {"message": "unauthorized", "data": {"reason": "token required"}}
    finally:
        realtime.stop()


def test_a_token_expires_unless_refreshed_and_the_close_lets_the_client_reconnect():
    import time as wall

    import jwt as pyjwt

    secret = "k" * 32
    realtime = limited_app(jwt_secret=secret)
    try:
        soon = wall.time() + 30
        token = pyjwt.encode({"sub": "alice", "exp": soon, "info": {"name": "A"}}, secret)
        client = SessionClient(realtime.engine, JSON)
        assert client.connect({"token": token}).type is PacketType.CONNECT
        assert client.session.user == "alice" and client.session.identity.authenticated
        later = int(wall.time()) + 3600
        ack = client.emit("refresh", {"token": pyjwt.encode({"sub": "alice", "exp": later},
                                                           secret)})
        assert ack == {"ok": True, "expires_at": later}
        mallory = pyjwt.encode({"sub": "mallory", "exp": later}, secret)
        assert client.emit("refresh", {"token": mallory})["error"]["code"] == "unauthorized"
        engine = realtime.engine
        # past the first exp: the refreshed session stays open
        engine._expire(wall.monotonic() + 60, wall=soon + 1)
        assert not client.session.closed
        other = SessionClient(engine, JSON)
        other.connect({"token": token})
        engine._expire(wall.monotonic() + 60, wall=soon + 1)
        assert other.session.closed  # its token expired: closed
        # a transport close (no DISCONNECT), so the official client reconnects for a new token
        assert all(p.type is not PacketType.DISCONNECT for p in other.socketio_packets())
    finally:
        realtime.stop()


def test_the_peer_is_the_real_client_behind_a_trusted_proxy():
    from ipaddress import ip_network

    from realtime.session import RequestContext

    behind_nginx = {"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": "203.0.113.9"}
    loopback = (ip_network("127.0.0.0/8"),)
    assert RequestContext.from_environ(behind_nginx, loopback).peer == "203.0.113.9"
    # the same header from a peer that is not a trusted proxy is not believed
    spoofed = {"REMOTE_ADDR": "198.51.100.4", "HTTP_X_FORWARDED_FOR": "127.0.0.1"}
    assert RequestContext.from_environ(spoofed, loopback).peer == "198.51.100.4"
