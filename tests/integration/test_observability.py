"""Metrics, JSON logs and /api/stats of real nodes, with real clients (and a real Redis)."""

from __future__ import annotations

import json
import uuid

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from realtime.broker.redis import RedisBroker
from realtime_dev.processes import NodeProcess, RedisProcess
from tests.helpers import RecordingHandler, wait_until
from tests.integration.clients import connect_client

KEY = "obs-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    """A node that logs JSON lines and every connection's life cycle."""
    node = NodeProcess(tmp_path_factory.mktemp("observed"), "obs", "--log-format", "json",
                       "--log-connections").wait_ready()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """A node with an API key, plain text logs and no connection lines (the defaults)."""
    node = NodeProcess(tmp_path_factory.mktemp("keyed"), "keyed",
                       env={"REALTIME_API_KEYS": KEY}).wait_ready()
    yield node
    node.stop()


def scrape(url: str, headers: dict[str, str] | None = None) -> dict[tuple, float]:
    """Every sample of ``url``/metrics, by (name, sorted labels)."""
    answer = requests.get(url + "/metrics", headers=headers, timeout=5)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(answer.text)
            for sample in family.samples}


def value(url: str, name: str, **labels: str) -> float:
    return scrape(url).get((name, tuple(sorted(labels.items()))), 0.0)


def publish(url: str, channel: str, data: object, headers: dict | None = None) -> None:
    answer = requests.post(url + "/api/publish", json={"channel": channel, "data": data},
                           headers=headers, timeout=5)
    assert answer.status_code == 200, answer.text


def json_lines(node: NodeProcess) -> list[dict]:
    return [json.loads(line) for line in node.log().splitlines() if line.strip()]


def test_metrics_move_with_real_connections_publishes_and_disconnects(observed, channel,
                                                                      clients):
    url = observed.url
    before = scrape(url)
    delivered = before.get(("realtime_deliveries_total", ()), 0.0)
    published = before.get(("realtime_publications_total", ()), 0.0)
    websocket = connect_client(url, "websocket", "ws-user")
    polling = connect_client(url, "polling", "poll-user")
    clients += [websocket, polling]
    for client in (websocket, polling):
        assert client.call("subscribe", {"channel": channel}, timeout=5)["ok"]
    values = scrape(url)
    assert values[("realtime_connections", (("transport", "websocket"),))] >= 1
    assert values[("realtime_connections", (("transport", "polling"),))] >= 1
    assert values[("realtime_subscriptions", ())] >= 2
    assert values[("realtime_channels", ())] >= 1
    for number in range(3):
        publish(url, channel, number)
    websocket.wait_messages(channel, 3)
    polling.wait_messages(channel, 3)
    values = scrape(url)
    assert values[("realtime_publications_total", ())] == published + 3
    assert values[("realtime_deliveries_total", ())] == delivered + 6
    assert values[("realtime_fanout_seconds_count", ())] >= 3
    # A refused event is counted by its code, once per error sent.
    errors = values.get(("realtime_errors_total", (("code", "bad_request"),)), 0.0)
    assert not websocket.call("subscribe", {"channel": "no spaces"}, timeout=5)["ok"]
    assert value(url, "realtime_errors_total", code="bad_request") == errors + 1
    # A client that goes away is counted by why.
    closed = value(url, "realtime_disconnects_total", reason="client_disconnect")
    polling.disconnect()
    wait_until(lambda: value(url, "realtime_disconnects_total", reason="client_disconnect")
               == closed + 1, message="the disconnect to be counted")
    wait_until(lambda: value(url, "realtime_connections", transport="polling") == 0,
               message="the polling connection to be gone")


@pytest.mark.parametrize("path", ["/metrics", "/api/stats"])
def test_metrics_and_stats_follow_the_api_access_rule(observed, keyed, path):
    # Without keys: loopback only, and behind a trusted proxy (loopback) the client is the
    # forwarded address.
    assert requests.get(observed.url + path, timeout=5).status_code == 200
    remote = requests.get(observed.url + path, headers={"X-Forwarded-For": "203.0.113.7"},
                          timeout=5)
    assert remote.status_code == 403 and remote.json()["error"]["code"] == "forbidden"
    # With keys: a key, from anywhere; a wrong one or none is 401.
    wrong = requests.get(keyed.url + path, headers={"Authorization": "apikey nope"}, timeout=5)
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "apikey"
    assert requests.get(keyed.url + path, timeout=5).status_code == 401
    right = requests.get(keyed.url + path, timeout=5,
                         headers={"Authorization": f"apikey {KEY}",
                                  "X-Forwarded-For": "203.0.113.7"})
    assert right.status_code == 200


def test_json_logs_carry_each_connections_life_cycle(observed, clients):
    client = connect_client(observed.url, "upgrade", "logged-user")
    sid = client.eio.sid
    client.disconnect()

    def lines_of(event: str) -> list[dict]:
        return [line for line in json_lines(observed) if line.get("sid") == sid
                and line["message"].startswith(event)]

    wait_until(lambda: lines_of("disconnected"), message="the disconnected line")
    [connected], [upgraded], [disconnected] = (lines_of(event) for event in
                                               ("connected", "upgraded", "disconnected"))
    assert connected["logger"] == "realtime.connections" and connected["level"] == "info"
    assert connected["node"] == "obs" and connected["user"] == "logged-user"
    # (python-socketio may finish its upgrade before it connects to the namespace)
    assert connected["transport"] in ("polling", "websocket")
    assert connected["peer"] == "127.0.0.1"
    assert connected["time"].endswith("Z")
    assert upgraded["transport"] == "websocket"
    assert disconnected["user"] == "logged-user"
    assert disconnected["reason"] in ("client_disconnect", "client_closed")


def test_no_connection_lines_unless_asked(keyed, clients):
    headers = {"Authorization": f"apikey {KEY}"}

    def disconnects() -> float:
        return sum(count for (name, _), count in scrape(keyed.url, headers).items()
                   if name == "realtime_disconnects_total")

    closed = disconnects()
    client = connect_client(keyed.url, "websocket", "quiet-user")
    sid = client.eio.sid
    client.disconnect()
    wait_until(lambda: disconnects() == closed + 1, message="the disconnect to be counted")
    assert sid not in keyed.log()
    assert "quiet-user" not in keyed.log()


@pytest.fixture
def redis_pair(tmp_path, redis_server):
    nodes = [NodeProcess(tmp_path, node_id, "--broker", redis_server.url).wait_ready()
             for node_id in ("s1", "s2")]
    yield nodes
    for node in nodes:
        node.stop()


def test_stats_show_every_node_on_redis_with_counters_that_move(redis_pair, channel, clients):
    first, second = redis_pair

    def stats(node: NodeProcess) -> dict:
        answer = requests.get(node.url + "/api/stats", timeout=5)
        assert answer.status_code == 200
        return answer.json()

    def nodes_of(node: NodeProcess) -> dict[str, dict]:
        return {entry["node"]: entry for entry in stats(node)["nodes"]}

    wait_until(lambda: set(nodes_of(first)) == {"s1", "s2"} == set(nodes_of(second)),
               timeout=10, message="both nodes in each other's stats")
    listener = connect_client(second.url, "websocket", "listener")
    clients.append(listener)
    assert listener.call("subscribe", {"channel": channel}, timeout=5)["ok"]
    for number in range(4):
        publish(first.url, channel, number)
    listener.wait_messages(channel, 4)

    def seen_from_the_first() -> bool:
        answer = stats(first)
        entries = {entry["node"]: entry for entry in answer["nodes"]}
        s2 = entries["s2"]
        return (entries["s1"]["publications"] >= 4 and s2["deliveries"] >= 4
                and s2["connections"] == 1 and s2["transports"]["websocket"] == 1
                and {"channel": channel, "subscribers": 1} in answer["channels"])

    # The second node's figures travel in its heartbeat: one beat (2 s) at most.
    wait_until(seen_from_the_first, timeout=8, message="the second node's figures")
    answer = stats(first)
    assert [entry["node"] for entry in answer["nodes"]] == ["s1", "s2"]
    assert set(answer["nodes"][1]) == {"node", "uptime", "connections", "transports",
                                       "subscriptions", "channels", "publications",
                                       "deliveries", "disconnects", "updated"}
    assert abs(answer["time"] - answer["nodes"][1]["updated"]) < 10
    # Redis round trips are measured on a node with a Redis broker.
    assert value(first.url, "realtime_broker_round_trip_seconds_count") > 0


def test_the_broker_reports_its_reconnections_and_round_trips(tmp_path):
    class Recorder:
        def __init__(self) -> None:
            self.round_trips: list[float] = []
            self.reconnects = 0

        def observe_round_trip(self, seconds: float) -> None:
            self.round_trips.append(seconds)

        def broker_reconnected(self) -> None:
            self.reconnects += 1

    server = RedisProcess(tmp_path).wait_ready()
    broker, recorder = RedisBroker(server.url, timeout=1), Recorder()
    broker.instrument(recorder)
    broker.start(RecordingHandler())
    try:
        broker.publish_control(b"x")
        assert len(recorder.round_trips) == 1 and 0 < recorder.round_trips[0] < 1
        assert recorder.reconnects == 0
        server.stop()
        wait_until(lambda: not broker.is_healthy(), timeout=10, message="the outage")
        server = RedisProcess(tmp_path, port=server.port).wait_ready()
        wait_until(broker.is_healthy, timeout=5, message="the reconnection")
        assert recorder.reconnects == 1
    finally:
        broker.close()
        server.stop()
