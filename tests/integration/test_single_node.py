"""One real node process, real python-socketio clients over WebSocket and long-polling."""

from __future__ import annotations

import json
import signal
import threading

import pytest
import requests
import websocket

from tests.helpers import wait_until
from tests.integration.clients import connect_client
from tests.integration.processes import NodeProcess, wait_port_closed

TRANSPORTS = ["websocket", "polling"]


def api(node, method, path, **kwargs):
    response = requests.request(method, node.url + path, timeout=10, **kwargs)
    return response.status_code, response.json()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_subscriber_gets_every_publication_once_in_order(single_node, channel, clients,
                                                               transport):
    alice = connect_client(single_node.url, transport, "alice")
    bob = connect_client(single_node.url, transport, "bob")
    clients += [alice, bob]
    for client in (alice, bob):
        ack = client.call("subscribe", {"channel": channel}, timeout=10)
        assert ack["ok"] and ack["offset"] == 0
    for i in range(10):
        sender = alice if i % 2 else bob
        assert sender.call("publish", {"channel": channel, "data": i}, timeout=10)["ok"]
    api(single_node, "POST", "/api/publish", json={"channel": channel, "data": "api"})
    for client in (alice, bob):
        messages = client.wait_messages(channel, 11)
        assert [m["offset"] for m in messages] == list(range(1, 12))
        assert [m["data"] for m in messages] == [*range(10), "api"]
        assert [m["user"] for m in messages] == ["bob", "alice"] * 5 + [None]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_live_messages_follow_the_subscribe_ack_never_before_never_twice(single_node, channel,
                                                                        clients, transport):
    publisher = connect_client(single_node.url, "websocket", "pub")
    subscriber = connect_client(single_node.url, transport, "sub")
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


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_history_presence_and_join_leave(single_node, channel, clients, transport):
    watcher = connect_client(single_node.url, transport, "watcher")
    clients.append(watcher)
    watcher.call("subscribe", {"channel": channel}, timeout=10)
    alice = connect_client(single_node.url, transport, "alice")
    alice.call("subscribe", {"channel": channel}, timeout=10)
    wait_until(lambda: {"channel": channel, "user": "alice"} in watcher.events("join"))
    presence = watcher.call("presence", {"channel": channel}, timeout=10)
    assert presence == {"ok": True, "members": [{"user": "alice", "connections": 1},
                                                {"user": "watcher", "connections": 1}]}
    assert api(single_node, "GET", f"/api/presence/{channel}")[1] == {
        "members": presence["members"]}
    alice.call("publish", {"channel": channel, "data": "hello"}, timeout=10)
    history = watcher.call("history", {"channel": channel, "limit": 5}, timeout=10)
    assert [(p["data"], p["user"]) for p in history["publications"]] == [("hello", "alice")]
    alice.disconnect()
    wait_until(lambda: watcher.events("leave"), message="the leave event")
    assert watcher.events("leave") == [{"channel": channel, "user": "alice"}]


def test_api_disconnect_closes_every_connection_of_the_user(single_node, clients):
    user = "victim-" + single_node.node_id
    victims = [connect_client(single_node.url, t, user) for t in TRANSPORTS]
    bystander = connect_client(single_node.url, "websocket", "bystander")
    clients.append(bystander)
    assert api(single_node, "POST", "/api/disconnect", json={"user": user}) == (
        200, {"disconnected": 2})
    wait_until(lambda: not any(v.connected for v in victims), message="victims to drop")
    assert bystander.call("history", {"channel": "any"}, timeout=10)["ok"]


def test_unknown_events_and_bad_payloads_get_error_acks(single_node, clients):
    client = connect_client(single_node.url, "websocket", "alice")
    clients.append(client)
    assert client.call("frobnicate", {"x": 1}, timeout=10)["error"]["code"] == "bad_request"
    assert client.call("subscribe", "room", timeout=10)["error"]["code"] == "bad_request"
    too_big = {"channel": "c", "data": "x" * 70000}
    assert client.call("publish", too_big, timeout=10)["error"]["code"] == "too_large"
    assert client.call("subscribe", {"channel": "still-fine"}, timeout=10)["ok"]


def raw_socketio(node) -> websocket.WebSocket:
    """A raw WebSocket that has done the Engine.IO and Socket.IO handshakes."""
    ws = websocket.create_connection(
        node.url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket", timeout=10)
    assert ws.recv().startswith("0{")
    ws.send("40")
    assert ws.recv().startswith("40{")
    return ws


def closed_by_server(ws: websocket.WebSocket) -> bool:
    """True when the server closes ``ws`` (skipping any frames it still had queued)."""
    try:
        for _ in range(20):
            frame = ws.recv()
            if frame == "" or frame is None:
                return True
    except (websocket.WebSocketConnectionClosedException, ConnectionError):
        return True
    return False


@pytest.mark.parametrize("frame", [
    '42["publish", {not json',
    "42",
    '42{"an": "object, not a list"}',
    "47",
])
def test_malformed_packets_close_only_that_connection(single_node, clients, frame):
    bystander = connect_client(single_node.url, "websocket", "bystander")
    clients.append(bystander)
    ws = raw_socketio(single_node)
    ws.send(frame)
    assert closed_by_server(ws)
    assert bystander.call("subscribe", {"channel": "after-bad"}, timeout=10)["ok"]
    assert "Traceback" not in single_node.log()


def test_unknown_engineio_packet_types_close_the_connection(single_node):
    ws = raw_socketio(single_node)
    ws.send('421["history",{"channel":"c","limit":0}]')
    assert ws.recv().startswith('431[{"ok":true')
    ws.send("9whatever")
    assert closed_by_server(ws)


def test_oversize_frames_close_the_connection(single_node, clients):
    bystander = connect_client(single_node.url, "polling", "bystander")
    clients.append(bystander)
    ws = raw_socketio(single_node)
    ws.send("42" + json.dumps(["publish", {"channel": "c", "data": "x" * 200_000}]))
    assert closed_by_server(ws)
    assert bystander.call("subscribe", {"channel": "after-big"}, timeout=10)["ok"]


def test_pages_and_the_client_bundle_are_served(single_node):
    index = requests.get(single_node.url + "/", timeout=5)
    assert index.status_code == 200 and "/vendor/socket.io.min.js" in index.text
    assert requests.get(single_node.url + "/notifications.html", timeout=5).status_code == 200
    bundle = requests.get(single_node.url + "/vendor/socket.io.min.js", timeout=5)
    assert bundle.status_code == 200 and "io" in bundle.text
    missing = requests.get(single_node.url + "/no-such-page.html", timeout=5)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_environment_configures_the_node_and_sigterm_stops_it(tmp_path):
    from tests.helpers import free_port

    port = free_port()
    node = NodeProcess(tmp_path, "from-env", port=port,
                       env={"REALTIME_HISTORY_SIZE": "2", "REALTIME_NODE_ID": "ignored"})
    # the --node-id flag given by NodeProcess wins over REALTIME_NODE_ID
    node.wait_ready()
    for i in range(4):
        api(node, "POST", "/api/publish", json={"channel": "c", "data": i})
    assert [p["data"] for p in api(node, "GET", "/api/history/c")[1]["publications"]] == [2, 3]
    assert api(node, "GET", "/api/info")[1]["nodes"][0]["node_id"] == "from-env"
    node.signal(signal.SIGTERM)
    assert node.process.wait(15) == 0
    wait_port_closed(port)
    node.stop()


def test_bad_configuration_exits_with_a_clear_message(tmp_path):
    node = NodeProcess(tmp_path, "bad", "--broker", "kafka://x")
    assert node.process.wait(15) == 2
    assert "unsupported broker URL" in node.log()
    node.stop()


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"},
    {"Sec-WebSocket-Version": "8"},
])
def test_bad_websocket_handshakes_get_a_400_with_a_json_error(single_node, headers):
    request_headers = {"Upgrade": "websocket", "Connection": "Upgrade",
                       "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                       "Sec-WebSocket-Version": "13", **headers}
    response = requests.get(single_node.url + "/socket.io/?EIO=4&transport=websocket",
                            headers=request_headers, timeout=5)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_request"
