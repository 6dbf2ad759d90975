"""The client protocol's rules against a real node, over every way a client comes in.

Each test is one rule; each runs for every way in (:data:`WAYS`): WebSocket first, long-polling
only, long-polling then the upgrade, and msgpack (``serializer="msgpack"``, the wire format of
``socket.io-msgpack-parser``) on WebSocket and on long-polling. The clients are python-socketio's,
an implementation independent of realtime's; ``test_official_client.py`` runs the official
JavaScript client and parsers through the same ways.
"""

from __future__ import annotations

import threading

import pytest
import requests

from tests.helpers import wait_until
from tests.integration.clients import WAYS, connect_client


def api(node, method, path, **kwargs):
    response = requests.request(method, node.url + path, timeout=10, **kwargs)
    return response.status_code, response.json()


@pytest.fixture(params=list(WAYS))
def way(request):
    return request.param


def test_every_subscriber_gets_every_publication_once_in_order(single_node, channel, clients,
                                                               way):
    alice = connect_client(single_node.url, way, "alice")
    bob = connect_client(single_node.url, way, "bob")
    carol = connect_client(single_node.url, way, "carol")  # publishes, not subscribed
    clients += [alice, bob, carol]
    for client in (alice, bob):
        ack = client.call("subscribe", {"channel": channel}, timeout=10)
        assert ack == {"ok": True, "channel": channel, "epoch": ack["epoch"], "offset": 0,
                       "recovered": False, "publications": []}
    for i in range(10):
        sender = (alice, bob, carol)[i % 3]
        ack = sender.call("publish", {"channel": channel, "data": {"i": i, "none": None}},
                          timeout=10)
        assert ack["ok"] and ack["offset"] == i + 1
    api(single_node, "POST", "/api/publish", json={"channel": channel, "data": None})
    for client in (alice, bob):
        messages = client.wait_messages(channel, 11)
        assert [m["offset"] for m in messages] == list(range(1, 12))
        assert [m["data"] for m in messages] == [{"i": i, "none": None} for i in range(10)] + [
            None]
        assert [m["user"] for m in messages] == ["alice", "bob", "carol"] * 3 + ["alice", None]
    assert carol.messages(channel) == []


def test_live_messages_follow_the_subscribe_ack_never_before_never_twice(single_node, channel,
                                                                        clients, way):
    publisher = connect_client(single_node.url, "websocket", "pub")
    subscriber = connect_client(single_node.url, way, "sub")
    clients += [publisher, subscriber]
    first = publisher.call("publish", {"channel": channel, "data": 0}, timeout=10)
    stop = threading.Event()

    def publish_continuously():
        while not stop.is_set():
            publisher.call("publish", {"channel": channel, "data": "x"}, timeout=10)

    thread = threading.Thread(target=publish_continuously)
    thread.start()

    def published_so_far() -> int:
        return requests.get(f"{single_node.url}/api/history/{channel}?limit=0",
                            timeout=5).json()["offset"]

    try:
        wait_until(lambda: published_so_far() >= 5)
        # A little behind the publisher, well within the 1000 publications kept.
        since = {"epoch": first["epoch"], "offset": published_so_far() - 2}
        subscriber.emit_recorded("subscribe", {"channel": channel, "since": since})
        wait_until(lambda: len(subscriber.messages(channel)) >= 20, message="20 live messages")
    finally:
        stop.set()
        thread.join()
    kinds = [event for event, _ in subscriber.received]
    assert kinds[0] == "ack:subscribe", kinds[:3]
    ack = subscriber.received[0][1]
    assert ack["ok"] and ack["recovered"] is True
    recovered = [p["offset"] for p in ack["publications"]]
    live = [m["offset"] for m in subscriber.messages(channel)]
    assert recovered == list(range(since["offset"] + 1, ack["offset"] + 1))
    assert live == list(range(ack["offset"] + 1, ack["offset"] + 1 + len(live)))


def test_history_presence_and_join_leave(single_node, channel, clients, way):
    channel = "chat:" + channel  # the namespace with join and leave events
    watcher = connect_client(single_node.url, way, "watcher")
    clients.append(watcher)
    watcher.call("subscribe", {"channel": channel}, timeout=10)
    alice = connect_client(single_node.url, way, "alice")
    alice.call("subscribe", {"channel": channel}, timeout=10)
    wait_until(lambda: {"channel": channel, "user": "alice"} in watcher.events("join"))
    presence = watcher.call("presence", {"channel": channel}, timeout=10)
    assert presence == {"ok": True, "members": [{"user": "alice", "connections": 1},
                                                {"user": "watcher", "connections": 1}]}
    assert api(single_node, "GET", f"/api/presence/{channel}")[1] == {
        "members": presence["members"]}
    for text in ("one", "two", "three"):
        alice.call("publish", {"channel": channel, "data": text}, timeout=10)
    history = watcher.call("history", {"channel": channel, "limit": 2}, timeout=10)
    assert history["offset"] == 3
    assert [(p["data"], p["user"]) for p in history["publications"]] == [
        ("two", "alice"), ("three", "alice")]
    assert alice.call("unsubscribe", {"channel": channel}, timeout=10) == {"ok": True}
    wait_until(lambda: watcher.events("leave"), message="the leave event")
    assert watcher.events("leave") == [{"channel": channel, "user": "alice"}]
    alice.call("publish", {"channel": channel, "data": "after"}, timeout=10)
    watcher.wait_messages(channel, 4)
    assert [m["data"] for m in alice.messages(channel)] == ["one", "two", "three"]
    alice.disconnect()


@pytest.mark.parametrize("event,payload,code", [
    ("subscribe", "not an object", "bad_request"),
    ("subscribe", {"channel": "has space"}, "bad_request"),
    ("subscribe", {"channel": "c", "since": {"epoch": 1, "offset": 1}}, "bad_request"),
    ("publish", {"channel": "c"}, "bad_request"),
    ("history", {"channel": "c", "limit": -1}, "bad_request"),
    ("no-such-event", {"channel": "c"}, "bad_request"),
    ("subscribe", {"channel": "user:somebody-else"}, "forbidden"),
    ("history", {"channel": "user:somebody-else"}, "forbidden"),
    ("publish", {"channel": "user:alice", "data": 1}, "forbidden"),
    ("publish", {"channel": "c", "data": "x" * 70000}, "too_large"),
])
def test_refused_events_get_an_error_ack_and_the_session_goes_on(single_node, clients, way,
                                                                event, payload, code):
    client = connect_client(single_node.url, way, "alice")
    clients.append(client)
    ack = client.call(event, payload, timeout=10)
    assert ack["ok"] is False and ack["error"]["code"] == code and ack["error"]["message"]
    assert client.call("history", {"channel": "still-fine"}, timeout=10)["ok"]


def test_a_packet_over_the_size_limit_closes_only_that_session(single_node, clients, way):
    bystander = connect_client(single_node.url, "websocket", "bystander")
    clients.append(bystander)
    client = connect_client(single_node.url, way, "big")
    # Not an event with oversize data (that is answered with too_large): a packet over the
    # message limit plus the envelope's room, refused before it is read whole.
    client.emit("publish", {"channel": "c", "data": "x" * 200_000})
    wait_until(lambda: not client.connected, message="the server to close the session")
    assert bystander.call("history", {"channel": "after-big"}, timeout=10)["ok"]


@pytest.mark.parametrize("packet", ["malformed", "wrong codec"])
def test_a_malformed_packet_closes_only_that_session(single_node, clients, way, packet):
    bystander = connect_client(single_node.url, "websocket", "bystander")
    clients.append(bystander)
    client = connect_client(single_node.url, way, "mangler")
    msgpack = WAYS[way][1] == "msgpack"
    if packet == "malformed":
        raw = b"\xc1" if msgpack else '2["publish", {not json'
    else:  # the other parser's packet: binary on a JSON session, text on a msgpack one
        raw = '2["history",{"channel":"c"}]' if msgpack else b"\x82\xa4type\x02\xa3nsp\xa1/"
    client.eio.send(raw)
    wait_until(lambda: not client.connected, message="the server to close the session")
    assert bystander.call("history", {"channel": "after-bad"}, timeout=10)["ok"]
    assert "Traceback" not in single_node.log()


def test_a_deliberate_disconnect_by_the_server_reaches_the_client(single_node, way):
    user = f"victim-{way}"
    victim = connect_client(single_node.url, way, user)
    reasons = []
    victim.on("disconnect", lambda *args: reasons.append(args))
    assert api(single_node, "POST", "/api/disconnect", json={"user": user}) == (
        200, {"disconnected": 1})
    wait_until(lambda: not victim.connected, message="the victim to drop")
    wait_until(lambda: reasons, message="the disconnect event")
    assert reasons == [("server disconnect",)]
