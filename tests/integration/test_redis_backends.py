"""The broker and presence contracts against a real redis-server; Redis-only behaviour."""

from __future__ import annotations

import gevent
import msgpack
import pytest
import redis

from realtime.app import create_app
from realtime.broker import NO_STREAM, HistoryOptions, PublishRequest
from realtime.broker.redis import RedisBroker
from realtime.config import Config
from realtime.control import encode_control
from realtime.emitter import Emitter
from realtime.errors import BadRequest, Unavailable
from realtime.presence import PresenceMember
from realtime.presence.redis import RedisPresenceStore
from realtime.redis_support import CONTROL_CHANNEL, KEY_PREFIX, pubsub_channel, stream_keys
from tests.contract.broker_contract import BrokerContract, unique
from tests.contract.presence_contract import PresenceContract
from tests.helpers import RecordingHandler, wait_until

KEEP = HistoryOptions(size=100, ttl=300)


@pytest.fixture
def make_broker(redis_server):
    brokers = []

    def make(url=None, **options):
        broker, handler = RedisBroker(url or redis_server.url, timeout=2, **options), \
            RecordingHandler()
        broker.start(handler)
        brokers.append(broker)
        return broker, handler

    yield make
    for broker in brokers:
        broker.close()


class TestRedisBroker(BrokerContract):
    @pytest.fixture
    def broker_factory(self, make_broker):
        # Each call is another node on the same Redis.
        return make_broker

    @pytest.fixture
    def stored(self, redis_server):
        # Every key of a channel carries its name as the hash tag: rt:{channel}:...
        client = redis.Redis.from_url(redis_server.url)
        yield lambda prefix: sorted(client.keys(f"{KEY_PREFIX}:{{{prefix}*"))
        client.close()


class TestRedisPresence(PresenceContract):
    @pytest.fixture
    def store(self, redis_server):
        store = RedisPresenceStore(redis_server.url, ttl=30)
        yield store
        store.close()


def test_a_node_receives_only_the_channels_it_subscribed(make_broker, redis_server):
    (publisher, _), (subscriber, received) = make_broker(), make_broker()
    mine = unique("mine")
    subscriber.subscribe(mine)
    client = redis.Redis.from_url(redis_server.url)
    channels = {c.decode() for c in client.pubsub_channels()}
    assert pubsub_channel(mine) in channels and CONTROL_CHANNEL in channels
    for i in range(50):
        publisher.publish(unique("other"), i, user=None, history=KEEP)
    publisher.publish(mine, "x", user=None, history=KEEP)
    wait_until(lambda: received.offsets(mine) == [1])
    assert {p.channel for p in received.publications} == {mine}


def test_messages_that_do_not_decode_are_dropped(make_broker, redis_server):
    (broker, received) = make_broker()
    channel = unique("c")
    broker.subscribe(channel)
    client = redis.Redis.from_url(redis_server.url)
    client.publish(pubsub_channel(channel), b"\xc1garbage")
    client.publish(pubsub_channel(channel), msgpack.packb([99, "p", 1]) + msgpack.packb([1, None]))
    broker.publish(channel, "good", user=None, history=KEEP)
    wait_until(lambda: received.publications)
    assert [p.data for p in received.publications] == ["good"]


def test_losing_the_stream_meta_starts_a_new_epoch(make_broker, redis_server):
    broker, _ = make_broker()
    channel = unique("c")
    old = broker.publish(channel, 1, user=None, history=KEEP)
    list_key, meta_key = stream_keys(channel)
    client = redis.Redis.from_url(redis_server.url)
    client.delete(meta_key)  # as an eviction or restart would
    lost = broker.history(channel, options=KEEP)
    assert lost.position == NO_STREAM and lost.publications == []
    assert client.exists(list_key), "a read writes nothing, not even a cleanup"
    fresh = broker.publish(channel, 2, user=None, history=KEEP)
    assert fresh.epoch not in (old.epoch, "") and fresh.offset == 1
    assert [p.data for p in broker.history(channel, options=KEEP).publications] == [2]


def test_1000_reads_of_distinct_channels_create_no_key(tmp_path):
    from realtime_dev.processes import RedisProcess

    server = RedisProcess(tmp_path).wait_ready()  # its own, so DBSIZE counts only this test
    broker = RedisBroker(server.url, timeout=2)
    broker.start(RecordingHandler())
    client = redis.Redis.from_url(server.url)
    try:
        for i in range(1000):
            options = dict(({}, {"limit": 0}, {"since_offset": 0})[i % 3])
            result = broker.history(f"read-only-{i}", options=KEEP, **options)
            assert result.position == NO_STREAM
        assert client.dbsize() == 0
        broker.publish("read-only-0", "x", user=None, history=KEEP)
        assert client.dbsize() == 2  # what one publish stores: the history list and its meta
    finally:
        client.close()
        broker.close()
        server.stop()


def test_history_never_returns_a_publication_past_its_ttl_while_its_list_lives(make_broker,
                                                                               redis_server):
    broker, _ = make_broker()
    channel = unique("c")
    broker.publish(channel, "brief", user=None, history=HistoryOptions(size=10, ttl=0.2))
    # This publish refreshes the list's expiry to 300 s: "brief" stays stored past its TTL.
    broker.publish(channel, "kept", user=None, history=KEEP)
    wait_until(lambda: [p.data for p in broker.history(channel, options=KEEP).publications]
               == ["kept"], message="the brief publication to expire")
    assert [p.data for p in broker.history(channel, since_offset=0,
                                           options=KEEP).publications] == ["kept"]
    list_key, _ = stream_keys(channel)
    assert redis.Redis.from_url(redis_server.url).llen(list_key) == 2


def test_a_lone_surrogate_is_a_bad_request_not_an_outage(make_broker, redis_server):
    broker, _ = make_broker()
    channel = unique("c")
    with pytest.raises(BadRequest):
        broker.publish(channel, "x", user="\ud800", history=KEEP)
    with pytest.raises(BadRequest):
        broker.publish(channel + "\ud800", "x", user=None, history=KEEP)
    results = broker.publish_many([PublishRequest(channel, 1), PublishRequest(channel, 2, "\udfff"),
                                   PublishRequest(channel + "\ud800", 3),
                                   PublishRequest(channel, 4),
                                   PublishRequest(channel, 5, None, "key\ud800")],
                                  history=KEEP)
    assert isinstance(results[1], BadRequest) and isinstance(results[2], BadRequest)
    assert isinstance(results[4], BadRequest)
    assert [results[0].offset, results[3].offset] == [1, 2]
    with pytest.raises(BadRequest):
        broker.publish_join(channel, "\ud800")
    with pytest.raises(BadRequest):
        broker.publish_control(encode_control("n1", "disconnect", user="\ud800", req="r"))
    store = RedisPresenceStore(redis_server.url, ttl=30)
    try:
        with pytest.raises(BadRequest):
            store.add(channel, "c1", "\ud800")
        assert store.add(channel, "c1", "alice") is True  # the connection is still good
    finally:
        store.close()
    with Emitter(redis_server.url) as emitter, pytest.raises(BadRequest):
        emitter.disconnect("\ud800")
    assert broker.publish(channel, "after", user="bob", history=KEEP).offset == 3


def test_an_idempotency_key_holds_across_nodes_and_emitters(redis_server):
    nodes = [create_app(Config(node_id=f"idem{i}", broker=redis_server.url)) for i in range(2)]
    for realtime in nodes:
        realtime.start()
    channel = unique("orders")
    try:
        with Emitter(redis_server.url) as emitter:
            first = emitter.publish(channel, {"id": 1}, idempotency_key="order-1")
            for realtime in nodes:
                answer = realtime.app.test_client().post("/api/publish", json={
                    "channel": channel, "data": {"id": 1}, "idempotency_key": "order-1"}).json
                assert answer == {"offset": first.offset, "epoch": first.epoch}
            assert emitter.publish(channel, {"id": 1}, idempotency_key="order-1") == first
            assert emitter.broadcast([channel, channel + "-b"], 2, idempotency_key="order-1") \
                == [(channel, first), (channel + "-b", emitter.publish(
                    channel + "-b", 2, idempotency_key="order-1"))]
            with pytest.raises(BadRequest):
                emitter.publish(channel, 3, idempotency_key="k" * 65)
        history = nodes[0].node.history(channel)
        assert [p.data for p in history.publications] == [{"id": 1}]
    finally:
        for realtime in nodes:
            realtime.stop()


def test_api_disconnect_of_a_lone_surrogate_user_is_400_on_redis(redis_server):
    realtime = create_app(Config(node_id="surrogate", broker=redis_server.url))
    realtime.start()
    try:
        http = realtime.app.test_client()
        response = http.post("/api/disconnect", json={"user": "\ud800"})
        assert response.status_code == 400
        assert response.json["error"]["code"] == "bad_request"
        assert http.post("/api/disconnect", json={"user": "nobody"}).json == {"disconnected": 0}
    finally:
        realtime.stop()


def test_presence_entries_expire_without_refresh(redis_server):
    store = RedisPresenceStore(redis_server.url, ttl=0.5)
    channel = unique("room")
    store.add(channel, "c1", "alice")
    store.add(channel, "c2", "bob")
    assert len(store.members(channel)) == 2

    def only_the_refreshed_entry_is_left() -> bool:
        store.refresh([(channel, "c2", "bob")])
        return store.members(channel) == [PresenceMember("bob", 1)]

    wait_until(only_the_refreshed_entry_is_left, message="alice to expire")
    # alice's entry is gone: her next connection is a join again
    assert store.add(channel, "c3", "alice") is True
    store.close()


def test_a_dead_nodes_expired_users_are_reported_once_across_nodes(redis_server):
    dead = RedisPresenceStore(redis_server.url, ttl=0.3)  # writes, then never refreshes
    live = [RedisPresenceStore(redis_server.url, ttl=30) for _ in range(3)]
    reports = []
    for store in live:
        store.on_expired = lambda channel, users: reports.append((channel, sorted(users)))
    quiet, busy = unique("quiet"), unique("busy")
    for channel in (quiet, busy):
        dead.add(channel, "d1", "alice")
        dead.add(channel, "d2", "bob")
    live[0].add(busy, "l1", "bob")  # bob is still connected to busy through a live node

    def every_expiry_reported() -> bool:
        for store in live:  # the nodes' heartbeats, racing each other
            store.sweep()
        return len(reports) >= 2

    try:
        wait_until(every_expiry_reported, timeout=5, interval=0.05, message="two reports")
        for store in live:
            store.sweep()
        # nobody touches quiet: the sweep found it; alice and bob left it, reported once
        assert sorted(reports) == sorted([(quiet, ["alice", "bob"]), (busy, ["alice"])])
        assert live[1].members(busy) == [PresenceMember("bob", 1)]
        assert live[2].members(quiet) == []
    finally:
        for store in (dead, *live):
            store.close()


def test_unreachable_redis_raises_unavailable():
    from realtime_dev.processes import free_port

    broker = RedisBroker(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    broker.start(RecordingHandler())
    try:
        assert not broker.is_healthy()
        with pytest.raises(Unavailable):
            broker.publish("c", 1, user=None, history=KEEP)
        with pytest.raises(Unavailable):
            broker.subscribe("c")
    finally:
        broker.close()
    store = RedisPresenceStore(f"redis://127.0.0.1:{free_port()}/0", ttl=1, timeout=0.5)
    with pytest.raises(Unavailable):
        store.members("c")


def test_the_subscriber_reconnects_and_resubscribes(tmp_path):
    from realtime_dev.processes import RedisProcess

    server = RedisProcess(tmp_path).wait_ready()
    broker, received = RedisBroker(server.url, timeout=1), RecordingHandler()
    broker.start(received)
    try:
        channel = unique("c")
        broker.subscribe(channel)
        redis.Redis.from_url(server.url).client_kill_filter(_type="pubsub")
        wait_until(broker.is_healthy, timeout=10, message="reconnection")

        def delivered() -> bool:
            broker.publish(channel, "after", user=None, history=KEEP)
            return bool(received.publications)

        wait_until(delivered, timeout=10, interval=0.2, message="delivery after reconnect")
    finally:
        broker.close()
        server.stop()


def test_broker_and_presence_come_back_after_a_redis_restart(tmp_path, caplog):
    from realtime_dev.processes import RedisProcess

    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    server = RedisProcess(tmp_path / "first").wait_ready()
    broker, received = RedisBroker(server.url, timeout=1), RecordingHandler()
    store = RedisPresenceStore(server.url, ttl=30, timeout=1)
    broker.start(received)
    try:
        channel = unique("c")
        broker.subscribe(channel)
        broker.publish(channel, "before", user=None, history=KEEP)
        store.add(channel, "c1", "alice")
        server.kill()
        with pytest.raises(Unavailable):
            broker.publish(channel, "while down", user=None, history=KEEP)
        with pytest.raises(Unavailable):
            store.members(channel)
        server = RedisProcess(tmp_path / "second", port=server.port).wait_ready()
        wait_until(broker.is_healthy, timeout=10, message="the subscriber to reconnect")

        def delivered_again() -> bool:  # the new Redis knows no scripts: EVALSHA falls back
            try:
                broker.publish(channel, "after", user=None, history=KEEP)
            except Unavailable:
                return False
            return any(p.data == "after" for p in received.publications)

        wait_until(delivered_again, timeout=10, interval=0.2, message="delivery after restart")
        assert store.add(channel, "c2", "bob") is True
        assert store.members(channel) == [PresenceMember("bob", 1)]
        tracebacks = [r for r in caplog.records
                      if r.name.startswith("realtime") and r.exc_info is not None]
        assert tracebacks == [], "a Redis restart is not a bug: warnings, not tracebacks"
    finally:
        store.close()
        broker.close()
        server.stop()


def test_publications_that_pile_up_are_handed_over_together(make_broker):
    (publisher, _), (subscriber, received) = make_broker(), make_broker()
    channel = unique("c")
    subscriber.subscribe(channel)
    batch_sizes = []
    record = received.on_publications

    def slow_first_batch(publications):
        batch_sizes.append(len(publications))
        record(publications)
        if len(batch_sizes) == 1:
            gevent.sleep(0.3)  # a long fan-out: the next ones pile up meanwhile

    received.on_publications = slow_first_batch
    publisher.publish(channel, 0, user=None, history=KEEP)
    wait_until(lambda: batch_sizes)
    for i in range(1, 51):
        publisher.publish(channel, i, user=None, history=KEEP)
    wait_until(lambda: len(received.publications) == 51)
    assert received.offsets(channel) == list(range(1, 52))
    assert max(batch_sizes[1:]) > 10, batch_sizes
