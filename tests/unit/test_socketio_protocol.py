"""The client protocol, through Flask-SocketIO's test client (no network)."""

from __future__ import annotations

import pytest

from tests.helpers import wait_until


def events(client, name):
    """Payloads of the ``name`` events the client received so far (and forget them all)."""
    received = client.get_received()
    # The test client unwraps the single argument of events named "message" only.
    return [r["args"] if r["name"] == "message" else r["args"][0]
            for r in received if r["name"] == name]


class Inbox:
    """Accumulates a test client's received events across calls."""

    def __init__(self, client):
        self.client = client
        self.items: list[tuple[str, dict]] = []

    def poll(self):
        for r in self.client.get_received():
            self.items.append((r["name"], r["args"] if r["name"] == "message" else r["args"][0]))
        return self.items

    def of(self, name):
        self.poll()
        return [payload for event, payload in self.items if event == name]

    def wait_for(self, name, count):
        return wait_until(lambda: len(self.of(name)) >= count and self.of(name),
                          message=f"{count} {name} events")


def test_subscribe_answers_the_stream_position(connect):
    alice = connect("alice")
    ack = alice.emit("subscribe", {"channel": "news"}, callback=True)
    assert ack["ok"] is True and ack["channel"] == "news"
    assert isinstance(ack["epoch"], str) and ack["epoch"]
    assert ack["offset"] == 0 and ack["recovered"] is False and ack["publications"] == []


def test_publish_reaches_every_subscriber_once_with_the_publisher(connect):
    alice, bob, carol = connect("alice"), connect("bob"), connect("carol")
    inboxes = {name: Inbox(c) for name, c in (("alice", alice), ("bob", bob), ("carol", carol))}
    for client in (alice, bob):
        assert client.emit("subscribe", {"channel": "room"}, callback=True)["ok"]
    ack = carol.emit("publish", {"channel": "room", "data": {"text": "hi"}}, callback=True)
    assert ack["ok"] is True and ack["offset"] == 1 and ack["epoch"]
    expected = {"channel": "room", "offset": 1, "data": {"text": "hi"}, "user": "carol"}
    assert inboxes["alice"].wait_for("message", 1) == [expected]
    assert inboxes["bob"].wait_for("message", 1) == [expected]
    assert inboxes["carol"].of("message") == []


def test_messages_arrive_in_offset_order_after_the_subscribe_ack(connect, realtime):
    alice = connect("alice")
    inbox = Inbox(alice)
    realtime.node.publish("feed", "before")
    ack = alice.emit("subscribe", {"channel": "feed"}, callback=True)
    assert ack["offset"] == 1
    # Published before the deferred activation has run: held back, then sent after the ack.
    for i in range(3):
        realtime.node.publish("feed", i)
    messages = inbox.wait_for("message", 3)
    assert [m["offset"] for m in messages] == [2, 3, 4]
    assert [m["data"] for m in messages] == [0, 1, 2]


def test_unsubscribe_stops_messages(connect, realtime):
    alice = connect("alice")
    inbox = Inbox(alice)
    alice.emit("subscribe", {"channel": "c"}, callback=True)
    realtime.node.publish("c", 1)
    inbox.wait_for("message", 1)
    assert alice.emit("unsubscribe", {"channel": "c"}, callback=True) == {"ok": True}
    realtime.node.publish("c", 2)
    alice.emit("subscribe", {"channel": "marker"}, callback=True)
    realtime.node.publish("marker", "m")
    wait_until(lambda: any(m["channel"] == "marker" for m in inbox.of("message")))
    assert [m["data"] for m in inbox.of("message")] == [1, "m"]


def test_subscribing_twice_is_not_an_error_and_does_not_double_messages(connect, realtime):
    alice = connect("alice")
    inbox = Inbox(alice)
    assert alice.emit("subscribe", {"channel": "c"}, callback=True)["ok"]
    assert alice.emit("subscribe", {"channel": "c"}, callback=True)["ok"]
    realtime.node.publish("c", "once")
    inbox.wait_for("message", 1)
    realtime.node.publish("c", "twice")
    inbox.wait_for("message", 2)
    assert [m["data"] for m in inbox.of("message")] == ["once", "twice"]


def test_recovery_with_since_returns_the_missed_publications(connect, realtime):
    alice = connect("alice")
    first = alice.emit("subscribe", {"channel": "r"}, callback=True)
    for i in range(3):
        realtime.node.publish("r", i)
    bob = connect("bob")
    since = {"epoch": first["epoch"], "offset": 1}
    ack = bob.emit("subscribe", {"channel": "r", "since": since}, callback=True)
    assert ack["recovered"] is True and ack["offset"] == 3
    assert [(p["offset"], p["data"]) for p in ack["publications"]] == [(2, 1), (3, 2)]
    assert set(ack["publications"][0]) == {"channel", "offset", "data", "user"}


def test_recovery_fails_for_another_epoch_or_trimmed_history(connect, realtime):
    alice = connect("alice")
    ack = alice.emit("subscribe", {"channel": "r"}, callback=True)
    for i in range(8):  # history_size is 5 in these tests: offsets 1..3 are gone
        realtime.node.publish("r", i)
    bob = connect("bob")
    wrong_epoch = bob.emit("subscribe", {"channel": "r", "since": {"epoch": "other", "offset": 7}},
                           callback=True)
    assert wrong_epoch["recovered"] is False and wrong_epoch["publications"] == []
    carol = connect("carol")
    trimmed = carol.emit("subscribe", {"channel": "r", "since": {"epoch": ack["epoch"],
                                                                 "offset": 1}}, callback=True)
    assert trimmed["recovered"] is False and trimmed["publications"] == []
    assert trimmed["offset"] == 8


def test_history_returns_the_last_limit_publications(connect, realtime):
    alice = connect("alice")
    for i in range(4):
        realtime.node.publish("h", i)
    ack = alice.emit("history", {"channel": "h", "limit": 2}, callback=True)
    assert ack["ok"] and ack["offset"] == 4
    assert [p["data"] for p in ack["publications"]] == [2, 3]
    everything = alice.emit("history", {"channel": "h"}, callback=True)
    assert [p["offset"] for p in everything["publications"]] == [1, 2, 3, 4]


def test_presence_counts_distinct_users_and_join_leave_events(connect):
    watcher = connect("watcher")
    inbox = Inbox(watcher)
    watcher.emit("subscribe", {"channel": "p"}, callback=True)
    alice1, alice2 = connect("alice"), connect("alice")
    alice1.emit("subscribe", {"channel": "p"}, callback=True)
    alice2.emit("subscribe", {"channel": "p"}, callback=True)
    ack = watcher.emit("presence", {"channel": "p"}, callback=True)
    assert ack == {"ok": True, "members": [{"user": "alice", "connections": 2},
                                           {"user": "watcher", "connections": 1}]}
    wait_until(lambda: {"channel": "p", "user": "alice"} in inbox.of("join"))
    assert inbox.of("join").count({"channel": "p", "user": "alice"}) == 1
    alice1.emit("unsubscribe", {"channel": "p"}, callback=True)
    alice2.disconnect()
    wait_until(lambda: inbox.of("leave"))
    assert inbox.of("leave") == [{"channel": "p", "user": "alice"}]


def test_anonymous_users_get_anon_sid(connect):
    for auth in (None, {}, {"user": ""}, {"user": 42}, {"user": "x" * 65}):
        client = connect(auth=auth)
        client.emit("subscribe", {"channel": "who"}, callback=True)
    members = client.emit("presence", {"channel": "who"}, callback=True)["members"]
    assert len(members) == 5
    assert all(m["user"].startswith("anon-") for m in members)
    assert connect("y" * 64).emit("subscribe", {"channel": "who"}, callback=True)["ok"]


def test_personal_channels(connect, realtime):
    alice, bob = connect("alice"), connect("bob")
    inbox = Inbox(alice)
    assert alice.emit("subscribe", {"channel": "user:alice"}, callback=True)["ok"]
    refused = bob.emit("subscribe", {"channel": "user:alice"}, callback=True)
    assert refused["ok"] is False and refused["error"]["code"] == "forbidden"
    for client in (alice, bob):
        ack = client.emit("publish", {"channel": "user:alice", "data": 1}, callback=True)
        assert ack["error"]["code"] == "forbidden"
    realtime.node.publish("user:alice", {"title": "hi"})
    assert inbox.wait_for("message", 1)[0]["user"] is None


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
    ack = client.emit(event, payload, callback=True)
    assert ack["ok"] is False and ack["error"]["code"] == "bad_request", ack
    assert ack["error"]["message"]
    assert client.emit("subscribe", {"channel": "still-works"}, callback=True)["ok"] is True


def test_an_event_with_no_argument_gets_an_error_ack(connect):
    client = connect("alice")
    ack = client.emit("subscribe", callback=True)
    assert ack["error"]["code"] == "bad_request"


def test_oversize_data_is_refused_with_too_large(connect):
    client = connect("alice")
    ack = client.emit("publish", {"channel": "c", "data": "x" * (64 * 1024)}, callback=True)
    assert ack["ok"] is False and ack["error"]["code"] == "too_large"
    fits = client.emit("publish", {"channel": "c", "data": "x" * (64 * 1024 - 2)}, callback=True)
    assert fits["ok"] is True


def test_binary_data_is_not_json(connect):
    client = connect("alice")
    ack = client.emit("publish", {"channel": "c", "data": b"\x00\x01"}, callback=True)
    assert ack["error"]["code"] == "bad_request"
