"""The HTTP API through Flask's test client."""

import pytest

from realtime.codecs import PacketType
from tests.helpers import wait_until


@pytest.fixture
def http(realtime):
    return realtime.app.test_client()


def test_publish_and_history(http):
    first = http.post("/api/publish", json={"channel": "news", "data": {"title": "a"}})
    assert first.status_code == 200 and first.json["offset"] == 1
    second = http.post("/api/publish", json={"channel": "news", "data": "b"}).json
    assert second == {"offset": 2, "epoch": first.json["epoch"]}
    history = http.get("/api/history/news?limit=1").json
    assert history == {"epoch": second["epoch"], "offset": 2, "publications": [
        {"channel": "news", "offset": 2, "data": "b", "user": None}]}
    assert len(http.get("/api/history/news").json["publications"]) == 2


def test_broadcast_publishes_on_each_channel(http):
    http.post("/api/publish", json={"channel": "b", "data": 0})
    response = http.post("/api/broadcast", json={"channels": ["a", "b"], "data": 1})
    assert response.status_code == 200
    assert [(r["channel"], r["offset"]) for r in response.json["results"]] == [("a", 1), ("b", 2)]


def test_publish_reaches_socketio_subscribers(http, connect):
    alice = connect("alice")
    alice.emit("subscribe", {"channel": "user:alice"})
    http.post("/api/publish", json={"channel": "user:alice", "data": {"n": 1}})
    assert alice.wait_events("message", 1) == [
        {"channel": "user:alice", "offset": 1, "data": {"n": 1}, "user": None}]


def test_presence_and_disconnect(http, connect):
    alice, alice2, bob = connect("alice"), connect("alice"), connect("bob")
    for client in (alice, alice2, bob):
        client.emit("subscribe", {"channel": "room"})
    assert http.get("/api/presence/room").json == {"members": [
        {"user": "alice", "connections": 2}, {"user": "bob", "connections": 1}]}
    assert http.post("/api/disconnect", json={"user": "alice"}).json == {"disconnected": 2}
    assert alice.session.closed and alice2.session.closed and not bob.session.closed
    # told with a Socket.IO DISCONNECT: the client must not reconnect by itself
    assert alice.socketio_packets()[-1].type is PacketType.DISCONNECT
    wait_until(lambda: http.get("/api/presence/room").json == {"members": [
        {"user": "bob", "connections": 1}]})


def test_info_and_probes(http, connect):
    connect("alice").emit("subscribe", {"channel": "x"})
    (node,) = http.get("/api/info").json["nodes"]
    assert node["node_id"] == "unit" and node["connections"] == 1
    assert node["subscriptions"] == 1 and node["uptime_s"] >= 0
    assert http.get("/healthz").status_code == 200
    assert http.get("/readyz").status_code == 200


def test_readyz_is_503_when_the_node_is_stopped(realtime, http):
    realtime.node.stop()
    assert http.get("/readyz").status_code == 503
    assert http.get("/healthz").status_code == 200


@pytest.mark.parametrize("method,path,body,status,code", [
    ("post", "/api/publish", {"channel": "bad name", "data": 1}, 400, "bad_request"),
    ("post", "/api/publish", {"channel": "c"}, 400, "bad_request"),
    ("post", "/api/publish", ["not", "an", "object"], 400, "bad_request"),
    ("post", "/api/publish", {"channel": "c", "data": "x" * 70000}, 413, "too_large"),
    ("post", "/api/broadcast", {"channels": "c", "data": 1}, 400, "bad_request"),
    ("post", "/api/broadcast", {"channels": [], "data": 1}, 400, "bad_request"),
    ("post", "/api/broadcast", {"channels": ["ok", "not ok"], "data": 1}, 400, "bad_request"),
    ("post", "/api/disconnect", {"user": 7}, 400, "bad_request"),
    ("get", "/api/history/c?limit=x", None, 400, "bad_request"),
    ("get", "/api/history/c?limit=-2", None, 400, "bad_request"),
    ("get", "/api/history/" + "x" * 201, None, 400, "bad_request"),
    ("get", "/api/nothing-here", None, 404, "not_found"),
])
def test_bad_requests_get_json_errors(http, method, path, body, status, code):
    response = getattr(http, method)(path, json=body)
    assert response.status_code == status
    assert response.json["error"]["code"] == code and response.json["error"]["message"]


def test_non_json_bodies_and_huge_bodies(http):
    response = http.post("/api/publish", data="{nope", content_type="application/json")
    assert response.status_code == 400 and response.json["error"]["code"] == "bad_request"
    response = http.post("/api/publish", data="x" * 300_000, content_type="application/json")
    assert response.status_code == 413 and response.json["error"]["code"] == "too_large"


def test_the_api_answers_loopback_only(http):
    response = http.post("/api/publish", json={"channel": "c", "data": 1},
                         environ_base={"REMOTE_ADDR": "10.1.2.3"})
    assert response.status_code == 403 and response.json["error"]["code"] == "forbidden"
    assert http.get("/api/info", environ_base={"REMOTE_ADDR": "::1"}).status_code == 200
