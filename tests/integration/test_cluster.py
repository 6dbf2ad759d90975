"""Three real nodes on a real Redis behind a real nginx behave as one server."""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid

import pytest
import requests

from realtime.emitter import Emitter
from realtime_dev.cluster import LocalCluster
from tests.helpers import wait_until
from tests.integration.clients import connect_client, run_official_client

NODES = ("n1", "n2", "n3")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # One test publishes 300 events without waiting for acks: a budget above that.
    cluster = LocalCluster(workdir=tmp_path_factory.mktemp("cluster"), nodes=3,
                           node_args=["--events-burst", "1000"]).start()

    def every_node_sees_every_node() -> bool:
        return all(len(requests.get(f"{url}/api/info", timeout=5).json()["nodes"]) == 3
                   for url in cluster.node_urls.values())

    # Nodes learn of each other from heartbeats (every 2 s); a cluster-wide count such as
    # /api/disconnect's includes only the nodes heard of.
    wait_until(every_node_sees_every_node, timeout=15, message="nodes to hear of each other")
    yield cluster
    cluster.stop()


def node_of(client) -> str:
    return client.eio.sid.split(".", 1)[0]


def connect_everywhere(cluster, clients, user_prefix: str) -> list:
    """Clients through nginx on both transports, plus one straight to each node."""
    made = [connect_client(cluster.url, transport, f"{user_prefix}-{transport}-{i}")
            for transport in ("websocket", "polling") for i in range(3)]
    made += [connect_client(cluster.node_urls[node], "polling", f"{user_prefix}-{node}")
             for node in NODES]
    clients += made
    return made


def test_every_client_on_every_node_gets_every_publication_once_in_order(cluster, channel,
                                                                         clients):
    subscribers = connect_everywhere(cluster, clients, "sub")
    through_nginx = {node_of(c) for c in subscribers[:6]}
    assert len(through_nginx) >= 2, f"nginx sent every handshake to {through_nginx}"
    assert {node_of(c) for c in subscribers} == set(NODES)
    for client in subscribers:
        assert client.call("subscribe", {"channel": channel}, timeout=10)["ok"]
    publishers = [connect_client(cluster.node_urls[node], "websocket", f"pub-{node}")
                  for node in NODES]
    clients += publishers
    per_publisher = 30

    def publish_all(publisher):
        for i in range(per_publisher):
            ack = publisher.call("publish", {"channel": channel, "data": i}, timeout=10)
            assert ack["ok"], ack

    threads = [threading.Thread(target=publish_all, args=(p,)) for p in publishers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = per_publisher * len(publishers)
    for client in subscribers:
        messages = client.wait_messages(channel, total, timeout=20)
        assert [m["offset"] for m in messages] == list(range(1, total + 1)), node_of(client)
    # each publisher's own messages keep the order it sent them in
    from_n1 = [m["data"] for m in subscribers[0].messages(channel) if m["user"] == "pub-n1"]
    assert from_n1 == list(range(per_publisher))


def test_a_publisher_that_does_not_wait_for_acks_keeps_its_order(cluster, channel, clients):
    """Publishes queued back to back go to Redis together (pipelined): same offsets, acks
    and deliveries as one at a time."""
    subscribers = [connect_client(cluster.node_urls[node], "websocket", f"fast-sub-{node}")
                   for node in NODES]
    clients += subscribers
    for client in subscribers:
        assert client.call("subscribe", {"channel": channel}, timeout=10)["ok"]
    publisher = connect_client(cluster.node_urls["n1"], "websocket", "fast-pub")
    clients.append(publisher)
    total = 300
    for i in range(total):
        publisher.emit_recorded("publish", {"channel": channel, "data": i})
    acks = wait_until(lambda: len(publisher.events("ack:publish")) == total
                      and publisher.events("ack:publish"), timeout=20, message="every ack")
    assert [ack.get("offset") for ack in acks] == list(range(1, total + 1)), acks[:3]
    for client in subscribers:
        messages = client.wait_messages(channel, total, timeout=20)
        assert [(m["offset"], m["data"]) for m in messages] == [
            (i + 1, i) for i in range(total)], node_of(client)


def test_the_official_client_through_nginx_upgrades_from_polling(cluster, channel):
    """The official client's default start (polling, then the upgrade) needs sticky routing."""
    summary = run_official_client(cluster.url, "default", channel, 20)
    assert summary["transport"] == "websocket"
    assert [ack["offset"] for ack in summary["acks"]] == list(range(1, 21))
    assert [m["offset"] for m in summary["messages"]] == list(range(1, 22))  # + null data
    # /api/disconnect on whichever node nginx picked reached the client's node
    assert summary["disconnected"] == {"disconnected": 1}
    assert summary["reason"] == "io server disconnect"


def test_history_and_presence_are_the_same_from_every_node(cluster, channel, clients):
    for node in NODES:
        client = connect_client(cluster.node_urls[node], "websocket", f"user-{node}")
        clients.append(client)
        client.call("subscribe", {"channel": channel}, timeout=10)
        client.call("publish", {"channel": channel, "data": node}, timeout=10)
    expected_members = [{"user": f"user-{node}", "connections": 1} for node in NODES]
    for url in cluster.node_urls.values():
        presence = requests.get(f"{url}/api/presence/{channel}", timeout=5).json()
        assert presence == {"members": expected_members}
        history = requests.get(f"{url}/api/history/{channel}", timeout=5).json()
        assert [p["data"] for p in history["publications"]] == list(NODES)
        assert history["offset"] == 3


def test_join_and_leave_cross_nodes(cluster, channel, clients):
    channel = "chat:" + channel  # the namespace with join and leave events
    watcher = connect_client(cluster.node_urls["n1"], "websocket", "watcher")
    clients.append(watcher)
    watcher.call("subscribe", {"channel": channel}, timeout=10)
    alice = connect_client(cluster.node_urls["n2"], "polling", "alice")
    alice.call("subscribe", {"channel": channel}, timeout=10)
    wait_until(lambda: {"channel": channel, "user": "alice"} in watcher.events("join"))
    alice.disconnect()
    wait_until(lambda: watcher.events("leave"), message="the leave event")
    assert watcher.events("leave") == [{"channel": channel, "user": "alice"}]


def test_api_disconnect_and_info_are_cluster_wide(cluster, clients):
    user = "everywhere-" + uuid.uuid4().hex[:6]
    victims = [connect_client(cluster.node_urls[node], "websocket", user) for node in NODES]

    def info_counts_them_on_every_node():
        # Other nodes' figures come from their heartbeats: a few seconds old at most.
        nodes = requests.get(cluster.url + "/api/info", timeout=5).json()["nodes"]
        return ([n["node_id"] for n in nodes] == list(NODES)
                and all(n["connections"] >= 1 and n["uptime_s"] > 0 for n in nodes))

    wait_until(info_counts_them_on_every_node, timeout=15, message="heartbeats with the victims")
    response = requests.post(cluster.node_urls["n1"] + "/api/disconnect", json={"user": user},
                             timeout=10)
    assert response.json() == {"disconnected": 3}
    wait_until(lambda: not any(v.connected for v in victims), message="all three to drop")


def test_emitter_and_http_api_reach_clients_on_every_node(cluster, channel, clients):
    subscribers = [connect_client(cluster.node_urls[node], "websocket", f"u-{node}")
                   for node in NODES]
    clients += subscribers
    for client in subscribers:
        client.call("subscribe", {"channel": channel}, timeout=10)
    with Emitter(cluster.redis_url) as emitter:
        position = emitter.publish(channel, {"via": "emitter"})
        assert position.offset == 1
        emitter.broadcast([channel], {"via": "broadcast"})
    response = requests.post(cluster.url + "/api/publish",
                             json={"channel": channel, "data": {"via": "api"}}, timeout=10)
    assert response.json()["offset"] == 3 and response.json()["epoch"] == position.epoch
    for client in subscribers:
        messages = client.wait_messages(channel, 3)
        assert [(m["offset"], m["data"]["via"], m["user"]) for m in messages] == [
            (1, "emitter", None), (2, "broadcast", None), (3, "api", None)]


def test_emitter_disconnect_reaches_every_node(cluster, clients):
    user = "kicked-" + uuid.uuid4().hex[:6]
    victims = [connect_client(cluster.node_urls[node], "polling", user) for node in NODES]
    with Emitter(cluster.redis_url) as emitter:
        emitter.disconnect(user)
    wait_until(lambda: not any(v.connected for v in victims), message="all three to drop")


def test_the_emitter_runs_without_gevent(cluster, channel):
    code = (
        "import sys\n"
        "from realtime.emitter import Emitter\n"
        f"position = Emitter({cluster.redis_url!r}).publish({channel!r}, 'plain python')\n"
        "assert 'gevent' not in sys.modules, 'the emitter imported gevent'\n"
        "print(position.offset)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"


def test_a_killed_node_drops_out_of_presence_and_the_others_keep_serving(tmp_path, channel):
    cluster = LocalCluster(workdir=tmp_path, nodes=2,
                           node_args=["--presence-ttl", "2"]).start()
    survivor_client = None
    try:
        doomed = connect_client(cluster.node_urls["n2"], "websocket", "doomed")
        doomed.call("subscribe", {"channel": channel}, timeout=10)
        survivor_client = connect_client(cluster.node_urls["n1"], "websocket", "survivor")
        survivor_client.call("subscribe", {"channel": channel}, timeout=10)
        presence_url = f"{cluster.node_urls['n1']}/api/presence/{channel}"
        users = lambda: [m["user"] for m in requests.get(presence_url, timeout=5).json()["members"]]  # noqa: E731
        assert users() == ["doomed", "survivor"]
        cluster.kill_node("n2")
        wait_until(lambda: users() == ["survivor"], timeout=10, interval=0.2,
                   message="the killed node's presence to expire")
        ack = survivor_client.call("publish", {"channel": channel, "data": "still here"},
                                   timeout=10)
        assert ack["ok"]
        assert survivor_client.wait_messages(channel, 1)[0]["data"] == "still here"
        assert requests.get(cluster.url + "/readyz", timeout=5).status_code == 200
    finally:
        if survivor_client is not None:
            survivor_client.disconnect()
        cluster.stop()
