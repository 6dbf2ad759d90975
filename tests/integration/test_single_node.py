"""One real node process: raw WebSocket edge cases, pages, configuration, signals.

The protocol's rules over every way in are in ``test_protocol_table.py``.
"""

from __future__ import annotations

import signal

import pytest
import requests
import websocket

from realtime_dev.processes import NodeProcess, wait_port_closed
from tests.helpers import wait_until
from tests.integration.clients import connect_client

TRANSPORTS = ["websocket", "polling"]


def api(node, method, path, **kwargs):
    response = requests.request(method, node.url + path, timeout=10, **kwargs)
    return response.status_code, response.json()


def test_api_disconnect_closes_every_connection_of_the_user(single_node, clients):
    user = "victim-" + single_node.node_id
    victims = [connect_client(single_node.url, t, user) for t in TRANSPORTS]
    bystander = connect_client(single_node.url, "websocket", "bystander")
    clients.append(bystander)
    assert api(single_node, "POST", "/api/disconnect", json={"user": user}) == (
        200, {"disconnected": 2})
    wait_until(lambda: not any(v.connected for v in victims), message="victims to drop")
    assert bystander.call("history", {"channel": "any"}, timeout=10)["ok"]


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


def test_pages_and_the_client_bundle_are_served(single_node):
    index = requests.get(single_node.url + "/", timeout=5)
    assert index.status_code == 200 and "/vendor/socket.io.min.js" in index.text
    assert requests.get(single_node.url + "/notifications.html", timeout=5).status_code == 200
    bundle = requests.get(single_node.url + "/vendor/socket.io.min.js", timeout=5)
    assert bundle.status_code == 200 and "io" in bundle.text
    missing = requests.get(single_node.url + "/no-such-page.html", timeout=5)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_environment_configures_the_node_and_sigterm_stops_it(tmp_path):
    from realtime_dev.processes import free_port

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
