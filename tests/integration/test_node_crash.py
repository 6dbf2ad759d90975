"""A node that dies without cleaning up: its users' presence expires and, once cluster-wide, a
live node publishes the ``leave`` events that are due."""

from __future__ import annotations

import requests

from realtime_dev.processes import NodeProcess, RedisProcess
from tests.helpers import wait_until
from tests.integration.clients import connect_client


def test_the_users_of_a_killed_node_leave_once_when_their_presence_expires(tmp_path, clients):
    server = RedisProcess(tmp_path).wait_ready()
    nodes = [NodeProcess(tmp_path, node_id, "--broker", server.url, "--presence-ttl", "2")
             .wait_ready() for node_id in ("doomed", "live1", "live2")]
    doomed, live1, live2 = nodes
    room = "chat:crash"
    try:
        watchers = [connect_client(node.url, "websocket", f"watcher-{node.node_id}")
                    for node in (live1, live2)]
        clients.extend(watchers)
        for watcher in watchers:
            assert watcher.call("subscribe", {"channel": room}, timeout=5)["ok"]
        # alice only on the doomed node; bob there and on a live one
        victims = [connect_client(doomed.url, way, user) for way, user in (
            ("websocket", "alice"), ("polling", "bob"))]
        survivor = connect_client(live1.url, "websocket", "bob")
        clients.append(survivor)
        for client in (*victims, survivor):
            assert client.call("subscribe", {"channel": room}, timeout=5)["ok"]
        doomed.kill()
        for watcher in watchers:
            wait_until(lambda w=watcher: w.events("leave"), timeout=15,
                       message="the leave of the dead node's user")
        members = requests.get(f"{live2.url}/api/presence/{room}", timeout=5).json()["members"]
        assert {m["user"]: m["connections"] for m in members} == {
            "bob": 1, "watcher-live1": 1, "watcher-live2": 1}
        # alice's leave only (bob is still here), once: a publication made after it arrives
        # with no second leave in between (the store's contract test races three sweepers)
        marker = survivor.call("publish", {"channel": room, "data": "marker"}, timeout=5)
        assert marker["ok"]
        for watcher in watchers:
            watcher.wait_messages(room, 1)
            assert watcher.events("leave") == [{"channel": room, "user": "alice"}]
    finally:
        for node in nodes[1:]:
            node.stop()
        server.stop()
