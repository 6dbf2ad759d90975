"""Counters, the Prometheus exposition and the /api/stats merge, on a node with memory backends."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from realtime.broker import MemoryBroker
from realtime.broker.base import PublishRequest
from realtime.config import Config
from realtime.control import encode_control
from realtime.metrics import Counters, disconnect_reason, merge_stats
from realtime.node import Node
from realtime.presence import MemoryPresenceStore
from tests.helpers import wait_until
from tests.unit.fakes import FakeSubscriber


@pytest.fixture
def node():
    node = Node(Config(node_id="n1"), MemoryBroker(), MemoryPresenceStore())
    node.start()
    yield node
    node.stop()


def subscribed(node, client_id, channel):
    session = FakeSubscriber(client_id, client_id, node)
    node.connect(session)
    node.subscribe(session, channel)
    session.reply_sent()
    return session


def samples(node) -> dict[tuple[str, tuple], float]:
    """Every sample of the node's exposition by (name, sorted labels)."""
    text = node.metrics.exposition().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_deliveries_count_each_publication_once_per_recipient(node):
    for index in range(3):
        subscribed(node, f"c{index}", "room")
    subscribed(node, "other", "elsewhere")
    node.publish("room", 1)
    node.publish_many([PublishRequest("room", 2), PublishRequest("elsewhere", 2)])
    assert node.counters.publications == 3
    wait_until(lambda: node.counters.deliveries == 3 + 3 + 1, message="every delivery")


def test_a_refused_publication_is_not_counted(node):
    with pytest.raises(Exception):  # noqa: B017 - which error is test_node's business
        node.publish("room", "x" * (node.config.max_message_size + 1))
    assert node.counters.publications == 0


def test_exposition_reads_the_hub_when_scraped(node):
    subscribed(node, "a", "room")
    subscribed(node, "b", "room")
    subscribed(node, "b2", "lobby")
    node.publish("room", "hello")
    wait_until(lambda: node.counters.deliveries == 2, message="the deliveries")
    values = samples(node)
    # Fake sessions have no transport name: they count as WebSocket sessions.
    assert values[("realtime_connections", (("transport", "websocket"),))] == 3
    assert values[("realtime_connections", (("transport", "polling"),))] == 0
    assert values[("realtime_subscriptions", ())] == 3
    assert values[("realtime_channels", ())] == 2
    assert values[("realtime_publications_total", ())] == 1
    assert values[("realtime_deliveries_total", ())] == 2


def test_disconnect_reasons_are_a_bounded_set_of_labels():
    assert disconnect_reason("ping timeout") == "ping_timeout"
    assert disconnect_reason("protocol error (1009: message too big)") == "protocol_error"
    assert disconnect_reason("something nobody planned") == "other"
    counters = Counters()
    counters.disconnected("slow")
    counters.disconnected("slow")
    counters.error("forbidden")
    assert counters.disconnects == {"slow": 2}
    assert counters.errors == {"forbidden": 1}


def test_disconnects_and_errors_appear_with_their_labels(node):
    node.counters.disconnected("client closed")
    node.counters.error("bad_request")
    values = samples(node)
    assert values[("realtime_disconnects_total", (("reason", "client_closed"),))] == 1
    assert values[("realtime_errors_total", (("code", "bad_request"),))] == 1


def test_each_node_has_a_registry_of_its_own():
    first = Node(Config(node_id="a"), MemoryBroker(), MemoryPresenceStore())
    second = Node(Config(node_id="b"), MemoryBroker(), MemoryPresenceStore())
    first.counters.publications = 5
    assert first.metrics.registry is not second.metrics.registry
    assert b"realtime_publications_total 0.0" in second.metrics.exposition()


def test_merge_sums_channels_over_nodes_busiest_first_and_sorts_nodes():
    def snapshot(top):
        return {"uptime": 1.0, "connections": 0, "top": top}

    merged = merge_stats({"n2": snapshot([["room", 3], ["b", 1]]),
                          "n1": snapshot([["room", 2], ["a", 4], ["b", 1]])},
                         now=12.5, limit=2)
    assert merged["time"] == 12.5
    assert [entry["node"] for entry in merged["nodes"]] == ["n1", "n2"]
    assert "top" not in merged["nodes"][0]
    assert merged["channels"] == [{"channel": "room", "subscribers": 5},
                                  {"channel": "a", "subscribers": 4}]


def test_stats_include_peers_heard_from_and_drop_silent_ones(node, monkeypatch):
    subscribed(node, "a", "room")
    peer = {"uptime": 3.0, "connections": 7, "transports": {"websocket": 5, "polling": 2},
            "subscriptions": 9, "channels": 1, "publications": 11, "deliveries": 12,
            "disconnects": {"slow": 1}, "updated": 100.0, "top": [["room", 6]]}
    node.on_control(encode_control("n0", "node", info=["n0", 7, 9, 3.0], stats=peer))
    stats = node.stats()
    assert [entry["node"] for entry in stats["nodes"]] == ["n0", "n1"]
    assert stats["nodes"][0] == {"node": "n0", **{k: v for k, v in peer.items() if k != "top"}}
    assert stats["nodes"][1]["connections"] == 1
    assert stats["channels"] == [{"channel": "room", "subscribers": 7}]
    # A node not heard from for NODE_EXPIRY is dropped, as /api/info drops it.
    seen_at, info, snapshot = node._peers["n0"]
    node._peers["n0"] = (seen_at - 60, info, snapshot)
    assert [entry["node"] for entry in node.stats()["nodes"]] == ["n1"]


def test_a_heartbeat_carries_the_stats_of_its_node(node):
    sent = []
    node.broker.publish_control = sent.append
    subscribed(node, "a", "room")
    node._send_control("node", info=["n1", 1, 1, 0.0], stats=node.metrics.snapshot())
    other = Node(Config(node_id="n2"), MemoryBroker(), MemoryPresenceStore())
    other.on_control(sent[0])
    assert [entry["node"] for entry in other.stats()["nodes"]] == ["n1", "n2"]
    assert other.stats()["channels"] == [{"channel": "room", "subscribers": 1}]


def test_a_node_reports_only_its_busiest_channels(node, monkeypatch):
    for count, channel in ((3, "big"), (2, "middle"), (1, "small")):
        for index in range(count):
            subscribed(node, f"{channel}{index}", channel)
    assert node.hub.busiest_channels(2) == [("big", 3), ("middle", 2)]
    monkeypatch.setattr("realtime.metrics.TOP_CHANNELS", 2)
    assert node.metrics.snapshot()["top"] == [["big", 3], ["middle", 2]]
    assert node.stats()["channels"] == [{"channel": "big", "subscribers": 3},
                                        {"channel": "middle", "subscribers": 2}]
