"""Per-connection and per-user limits, and the Host allow-list, on a real node.

(The event budget is in test_auth.py, the server's timeouts and connection cap in
test_server_limits.py, message sizes in test_protocol_table.py, the outbound limit in
test_transports.py, the nginx limits in test_nginx_limits.py.)
"""

from __future__ import annotations

import pytest
import requests
import socketio
import websocket

from realtime_dev.processes import NodeProcess
from tests.helpers import wait_until
from tests.integration.clients import RecordingClient, connect_client


@pytest.fixture(scope="module")
def small_node(tmp_path_factory):
    node = NodeProcess(tmp_path_factory.mktemp("limits"), "limits",
                       "--max-subscriptions", "5", "--max-connections-per-user", "3",
                       "--allowed-hosts", "127.0.0.1,localhost").wait_ready()
    yield node
    node.stop()


@pytest.mark.parametrize("way", ["websocket", "polling"])
def test_subscriptions_past_the_limit_are_rate_limited(small_node, channel, way):
    client = connect_client(small_node.url, way, f"hoarder-{way}")
    try:
        for i in range(5):
            assert client.call("subscribe", {"channel": f"{channel}-{i}"}, timeout=10)["ok"]
        refused = client.call("subscribe", {"channel": f"{channel}-5"}, timeout=10)
        assert refused["error"]["code"] == "rate_limited"
        assert "5 subscriptions" in refused["error"]["message"]
        client.call("unsubscribe", {"channel": f"{channel}-0"}, timeout=10)
        assert client.call("subscribe", {"channel": f"{channel}-5"}, timeout=10)["ok"]
    finally:
        client.disconnect()


def test_connections_of_one_user_past_the_limit_get_a_connect_error(small_node):
    held = [connect_client(small_node.url, "websocket", "crowd") for _ in range(3)]
    try:
        errors = []
        extra = RecordingClient()
        extra.on("connect_error", lambda data: errors.append(data))
        with pytest.raises(socketio.exceptions.ConnectionError):
            extra.connect(small_node.url, auth={"user": "crowd"}, transports=["polling"],
                          wait_timeout=10)
        assert errors and errors[0]["message"] == "rate_limited"
        assert "3 connections" in errors[0]["data"]["reason"]
        def connections() -> int:
            return requests.get(small_node.url + "/api/info",
                                timeout=5).json()["nodes"][0]["connections"]

        before = connections()
        held.pop().disconnect()  # one leaves: room for another, once the node forgot it
        wait_until(lambda: connections() == before - 1, message="the node to forget it")
        held.append(connect_client(small_node.url, "websocket", "crowd"))
    finally:
        for client in held:
            client.disconnect()


def test_a_host_the_node_does_not_serve_is_refused_on_every_way_in(small_node):
    port = small_node.port
    bad = {"Host": f"evil.example:{port}"}
    page = requests.get(small_node.url + "/healthz", headers=bad, timeout=5)
    assert page.status_code == 400 and page.json()["error"]["code"] == "bad_request"
    polling = requests.get(small_node.url + "/socket.io/?EIO=4&transport=polling",
                           headers=bad, timeout=5)
    assert polling.status_code == 400
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket",
                                    host=f"evil.example:{port}", timeout=5)
    assert refused.value.status_code == 400
    assert requests.get(small_node.url + "/healthz", timeout=5).status_code == 200  # 127.0.0.1
