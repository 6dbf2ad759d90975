"""Redis outages against a real redis-server: the broker comes back fast and quietly, and a
node's subscribers never miss a publication without a ``reset`` telling them."""

from __future__ import annotations

import logging
import time

import pytest
import redis

from realtime.broker import HistoryOptions
from realtime.broker.redis import RedisBroker
from realtime.emitter import Emitter
from realtime.errors import Unavailable
from realtime_dev.processes import NodeProcess, RedisProcess
from tests.contract.broker_contract import unique
from tests.helpers import RecordingHandler, wait_until
from tests.integration.clients import connect_client

KEEP = HistoryOptions(size=100, ttl=300)


@pytest.fixture
def redis_dir(tmp_path):
    path = tmp_path / "redis"
    path.mkdir()
    return path


def kill_subscriber_connections(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        assert client.client_kill_filter(_type="pubsub") >= 1
    finally:
        client.close()


def test_the_handler_hears_that_delivery_resumed_before_anything_published_after(redis_dir):
    server = RedisProcess(redis_dir).wait_ready()
    broker, received = RedisBroker(server.url, timeout=1), RecordingHandler()
    order = []
    received.on_delivery_resumed = lambda: order.append("resumed")
    received.on_publications = lambda publications: order.extend(p.data for p in publications)
    broker.start(received)
    try:
        channel = unique("c")
        broker.subscribe(channel)
        assert order == []  # the first connection is not a resumption
        kill_subscriber_connections(server.url)
        wait_until(lambda: "resumed" in order, timeout=5, message="the resumption")

        def delivered() -> bool:
            broker.publish(channel, "after", user=None, history=KEEP)
            return "after" in order

        wait_until(delivered, timeout=5, interval=0.1, message="delivery after the resumption")
        assert order[0] == "resumed"
    finally:
        broker.close()
        server.stop()


def test_after_an_outage_the_subscriber_is_back_within_a_second_and_logs_it_twice(
        redis_dir, caplog):
    caplog.set_level(logging.DEBUG, logger="realtime")
    server = RedisProcess(redis_dir).wait_ready()
    broker = RedisBroker(server.url, timeout=1)
    broker.start(RecordingHandler())
    try:
        server.kill()
        wait_until(lambda: not broker.is_healthy(), message="the broker to notice")
        # Long enough for an exponential back-off to have grown well past a second.
        outage_ends = time.monotonic() + 3
        wait_until(lambda: time.monotonic() > outage_ends, timeout=5)
        server = RedisProcess(redis_dir, port=server.port).wait_ready()
        answering = time.monotonic()
        wait_until(broker.is_healthy, timeout=5, interval=0.01, message="resubscription")
        assert time.monotonic() - answering < 1.0
    finally:
        broker.close()
        server.stop()
    lines = [r for r in caplog.records
             if r.name == "realtime.broker.redis" and r.levelno >= logging.WARNING]
    kinds = ["back" if "works again" in r.getMessage() else "down" if "failed" in r.getMessage()
             else "other" for r in lines]
    assert kinds == ["down", "back"], [r.getMessage() for r in lines]
    assert all(r.exc_info is None for r in lines)


@pytest.fixture
def node_on_redis(tmp_path, redis_dir):
    def start(persistence=("--appendonly", "no")):
        server = RedisProcess(redis_dir, persistence=persistence).wait_ready()
        node = NodeProcess(tmp_path, "n1", "--broker", server.url).wait_ready()
        started.append((server, node))
        return server, node

    started = []
    yield start
    for server, node in started:
        node.stop()
        server.stop()


def test_publications_made_while_the_node_was_resubscribing_still_reach_its_subscribers(
        node_on_redis, channel, clients):
    server, node = node_on_redis()
    subscriber = connect_client(node.url, "websocket", "watcher")
    clients.append(subscriber)
    assert subscriber.call("subscribe", {"channel": channel}, timeout=5)["ok"]
    emitter = Emitter(server.url)
    try:
        emitter.publish(channel, "before")
        subscriber.wait_messages(channel, 1)
        kill_subscriber_connections(server.url)
        # The node waits at least 25 ms before it reconnects: these land in the gap.
        emitter.publish(channel, "lost by pub/sub 1")
        emitter.publish(channel, "lost by pub/sub 2")
        messages = subscriber.wait_messages(channel, 3)
        wait_until(lambda: requests_ready(node), message="the node to be ready again")
        emitter.publish(channel, "after")
        messages = subscriber.wait_messages(channel, 4)
    finally:
        emitter.close()
    assert [(m["offset"], m["data"]) for m in messages] == [
        (1, "before"), (2, "lost by pub/sub 1"), (3, "lost by pub/sub 2"), (4, "after")]
    assert subscriber.events("reset") == []


def requests_ready(node) -> bool:
    import requests

    return requests.get(node.url + "/readyz", timeout=2).status_code == 200


def test_a_redis_restart_without_persistence_is_announced_by_reset(
        node_on_redis, redis_dir, channel, clients):
    server, node = node_on_redis()
    subscriber = connect_client(node.url, "polling", "watcher")
    clients.append(subscriber)
    assert subscriber.call("subscribe", {"channel": channel}, timeout=5)["ok"]
    emitter = Emitter(server.url, timeout=1)
    restarted = None  # the fixture stops the first redis-server; this test, the second
    try:
        for index in range(3):
            emitter.publish(channel, index)
        subscriber.wait_messages(channel, 3)
        server.kill()
        with pytest.raises(Unavailable):
            emitter.publish(channel, "refused")
        restarted = RedisProcess(redis_dir, port=server.port).wait_ready()
        reset = wait_until(lambda: subscriber.events("reset"), timeout=5, message="a reset")
        assert reset == [{"channel": channel, "epoch": "", "offset": 0}]
        position = emitter.publish(channel, "in the new stream")
        messages = subscriber.wait_messages(channel, 4)
    finally:
        emitter.close()
        if restarted is not None:
            restarted.stop()
    assert messages[-1]["offset"] == position.offset == 1
    assert [name for name, _ in subscriber.received if name in ("message", "reset")] == [
        "message", "message", "message", "reset", "message"]


def test_a_redis_restart_from_an_append_only_file_loses_nothing_and_resets_nothing(
        node_on_redis, redis_dir, channel, clients):
    server, node = node_on_redis(persistence=("--appendonly", "yes", "--appendfsync", "always"))
    subscribers = [connect_client(node.url, way, f"watcher-{way}")
                   for way in ("websocket", "msgpack-polling")]
    clients.extend(subscribers)
    for subscriber in subscribers:
        assert subscriber.call("subscribe", {"channel": channel}, timeout=5)["ok"]
    emitter = Emitter(server.url, timeout=1)
    restarted = None  # the fixture stops the first redis-server; this test, the second
    try:
        for index in range(5):
            emitter.publish(channel, index)
        server.kill()
        restarted = RedisProcess(redis_dir, port=server.port, persistence=(
            "--appendonly", "yes", "--appendfsync", "always")).wait_ready()

        def published(data) -> bool:
            try:
                emitter.publish(channel, data)
            except Unavailable:
                return False
            return True

        wait_until(lambda: published(5), timeout=5, interval=0.05, message="publishing again")
        for index in range(6, 10):
            emitter.publish(channel, index)
        for subscriber in subscribers:
            messages = subscriber.wait_messages(channel, 10)
            assert [(m["offset"], m["data"]) for m in messages] == [
                (index + 1, index) for index in range(10)]
            assert subscriber.events("reset") == []
    finally:
        emitter.close()
        if restarted is not None:
            restarted.stop()
