"""Webhooks against real processes: the transition store contract on Redis, nodes posting to
a receiver in this process, and a 3-node cluster on Redis sending each event once."""

from __future__ import annotations

import uuid

import pytest

from realtime.webhooks.redis import RedisTransitionStore
from realtime_dev.processes import NodeProcess, RedisProcess
from tests.contract.webhooks_contract import TransitionContract, drain
from tests.helpers import wait_until
from tests.integration.clients import connect_client
from tests.integration.webhook_receiver import WebhookReceiver

SECRET = "webhook-secret-of-the-tests"


class TestRedisTransitions(TransitionContract):
    @pytest.fixture
    def make_store(self, redis_server):
        prefix = f"test:{{wh-{uuid.uuid4().hex[:8]}}}"  # a fresh backend per test
        stores = []

        def make(**options):
            store = RedisTransitionStore(redis_server.url, ttl=30, prefix=prefix, **options)
            stores.append(store)
            return store

        yield make
        for store in stores:
            store.close()


def test_a_dead_nodes_connections_expire_into_one_offline_and_vacate(redis_server):
    prefix = f"test:{{wh-{uuid.uuid4().hex[:8]}}}"
    dead = RedisTransitionStore(redis_server.url, ttl=0.3, grace=60, prefix=prefix)
    live = [RedisTransitionStore(redis_server.url, ttl=30, grace=60, prefix=prefix)
            for _ in range(2)]
    try:
        dead.connect("c1", "alice")
        dead.occupy("room", "c1")
        drain(dead)
        # every live node sweeps; the expiry is reported by exactly one of them, once
        found = wait_until(lambda: [e for store in live for e in store.sweep()[0]], timeout=5)
        for _ in range(3):
            found += [e for store in live for e in store.sweep()[0]]
        assert sorted(e["name"] for e in found) == ["channel_vacated", "user_offline"]
    finally:
        for store in (dead, *live):
            store.close()


@pytest.fixture
def receiver():
    receiver = WebhookReceiver(SECRET).start()
    yield receiver
    receiver.stop()


def webhook_node(tmp_path, node_id, receiver, *extra):
    return NodeProcess(tmp_path, node_id, "--webhook-url", receiver.url, *extra,
                       env={"REALTIME_WEBHOOK_SECRET": SECRET}).wait_ready()


def test_a_node_sends_signed_events_for_users_channels_and_members(tmp_path, receiver):
    node = webhook_node(tmp_path, "hooks", receiver, "--offline-grace", "0.5")
    try:
        client = connect_client(node.url, "websocket", "alice")
        assert client.call("subscribe", {"channel": "chat:room"}, timeout=5)["ok"]
        client.disconnect()
        wait_until(lambda: receiver.about("user_offline", "alice"), timeout=10,
                   message="alice's user_offline")
        assert [(e["name"], e.get("channel"), e.get("user")) for e in receiver.events()] == [
            ("user_online", None, "alice"), ("member_added", "chat:room", "alice"),
            ("channel_occupied", "chat:room", None), ("channel_vacated", "chat:room", None),
            ("member_removed", "chat:room", "alice"), ("user_offline", None, "alice")]
        assert receiver.bad_signatures == 0
        assert len({e["id"] for e in receiver.events()}) == 6
    finally:
        node.stop()


def test_a_batch_the_receiver_failed_comes_again_with_the_same_ids(tmp_path, receiver):
    node = webhook_node(tmp_path, "dups", receiver)
    try:
        receiver.fail_next = 1
        client = connect_client(node.url, "websocket", "alice")
        wait_until(lambda: receiver.events("user_online", duplicates=True) and
                   len(receiver.events(duplicates=True)) > len(receiver.events()),
                   timeout=10, message="the batch sent again")
        first, again = receiver.events("user_online", duplicates=True)[:2]
        assert first == again  # same id: the receiver tells it is a duplicate
        assert len(receiver.events("user_online")) == 1
        client.disconnect()
    finally:
        node.stop()


def test_nothing_is_lost_while_the_receiver_is_down_for_a_few_seconds(tmp_path, receiver):
    node = webhook_node(tmp_path, "outage", receiver)
    try:
        receiver.stop()
        users = [f"user{n}" for n in range(5)]
        clients = [connect_client(node.url, "websocket", user) for user in users]
        wait_until(lambda: node_log_mentions(node, "webhook delivery failed"), timeout=10,
                   message="a failed delivery")
        # back on the same port, but answering 503 for a few retries (seconds of back-off)
        receiver.unavailable = True
        receiver.start()
        wait_until(lambda: receiver.refused >= 3, timeout=15, message="three refused retries")
        receiver.unavailable = False
        wait_until(lambda: len(receiver.events("user_online")) == 5, timeout=20,
                   message="every user_online after the outage")
        assert sorted(e["user"] for e in receiver.events("user_online")) == users
        for client in clients:
            client.disconnect()
    finally:
        node.stop()


def node_log_mentions(node: NodeProcess, text: str) -> bool:
    return text in node.log_path.read_text()


def test_a_user_of_a_3_node_cluster_goes_offline_once_and_not_on_a_quick_reconnect(
        tmp_path, receiver):
    server = RedisProcess(tmp_path).wait_ready()
    nodes = [webhook_node(tmp_path, f"n{n}", receiver, "--broker", server.url,
                          "--offline-grace", "1.5") for n in range(3)]
    clients = []
    try:
        # alice holds a connection on two nodes, then closes both
        alice = [connect_client(node.url, "websocket", "alice") for node in nodes[:2]]
        wait_until(lambda: receiver.about("user_online", "alice"), timeout=10)
        for client in alice:
            client.disconnect()
        wait_until(lambda: receiver.about("user_offline", "alice"), timeout=15,
                   message="alice's user_offline")
        # bob reloads (gone and back within the grace) while carol leaves for good at the
        # same moment: once carol's offline is in, bob's would be too
        bob = connect_client(nodes[0].url, "websocket", "bob")
        carol = connect_client(nodes[1].url, "websocket", "carol")
        wait_until(lambda: receiver.about("user_online", "bob") and
                   receiver.about("user_online", "carol"), timeout=10)
        bob.disconnect()
        carol.disconnect()
        clients.append(connect_client(nodes[2].url, "websocket", "bob"))
        wait_until(lambda: receiver.about("user_offline", "carol"), timeout=15,
                   message="carol's user_offline")
        # a marker queued after everything above: once it is in, so is any duplicate before it
        clients.append(connect_client(nodes[2].url, "websocket", "marker"))
        wait_until(lambda: receiver.about("user_online", "marker"), timeout=10)
        assert len(receiver.about("user_offline", "alice")) == 1
        assert len(receiver.about("user_online", "alice")) == 1
        assert receiver.about("user_offline", "bob") == []
        assert len(receiver.about("user_online", "bob")) == 1
        assert receiver.bad_signatures == 0
    finally:
        for client in clients:
            client.disconnect()
        for node in nodes:
            node.stop()
        server.stop()


def test_the_users_of_a_killed_node_go_offline_once_when_their_entries_expire(
        tmp_path, receiver):
    server = RedisProcess(tmp_path).wait_ready()
    # The live nodes start first: one of them holds the sender's lease, not the doomed one.
    live = [webhook_node(tmp_path, f"live{n}", receiver, "--broker", server.url,
                         "--presence-ttl", "2", "--offline-grace", "0.5") for n in range(2)]
    doomed = webhook_node(tmp_path, "doomed", receiver, "--broker", server.url,
                          "--presence-ttl", "2", "--offline-grace", "0.5")
    clients = []
    try:
        victim = connect_client(doomed.url, "websocket", "alice")
        assert victim.call("subscribe", {"channel": "chat:crash"}, timeout=5)["ok"]
        wait_until(lambda: receiver.about("member_added", "alice"), timeout=10)
        doomed.kill()
        wait_until(lambda: receiver.about("user_offline", "alice"), timeout=15,
                   message="the dead node's user going offline")
        clients.append(connect_client(live[0].url, "websocket", "marker"))
        wait_until(lambda: receiver.about("user_online", "marker"), timeout=10)
        assert len(receiver.about("user_offline", "alice")) == 1
        assert len(receiver.about("member_removed", "alice")) == 1
        assert len(receiver.about("channel_vacated", "chat:crash")) == 1
    finally:
        for client in clients:
            client.disconnect()
        for node in live:
            node.stop()
        server.stop()
