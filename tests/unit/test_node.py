import pytest

from realtime.broker import MemoryBroker, StreamPosition
from realtime.config import Config
from realtime.errors import BadRequest, TooLarge
from realtime.node import Node
from realtime.presence import MemoryPresenceStore
from tests.unit.fakes import FakeSubscriber


@pytest.fixture
def node():
    node = Node(Config(node_id="n1", history_size=10, max_message_size=100), MemoryBroker(),
                MemoryPresenceStore())
    node.start()
    yield node
    node.stop()


def connect(node, client_id, user):
    connection = FakeSubscriber(client_id, user, node)
    node.connect(connection)
    return connection


def test_publications_during_setup_come_after_the_reply_exactly_once(node):
    alice = connect(node, "c1", "alice")
    node.publish("ch", "before")
    result = node.subscribe(alice, "ch")
    node.publish("ch", "during")
    assert alice.events("message") == []
    alice.reply_sent()
    node.publish("ch", "after")
    assert [m["data"] for m in alice.events("message")] == ["during", "after"]
    assert result.position.offset == 1


def test_recovery_returns_missed_publications(node):
    alice = connect(node, "c1", "alice")
    epoch = node.publish("ch", 1).epoch
    node.publish("ch", 2)
    node.publish("ch", 3)
    result = node.subscribe(alice, "ch", StreamPosition(epoch, 1))
    assert result.recovered and [p.data for p in result.publications] == [2, 3]
    up_to_date = node.subscribe(connect(node, "c2", "bob"), "ch", StreamPosition(epoch, 3))
    assert up_to_date.recovered and up_to_date.publications == []


def test_recovery_from_the_future_is_not_recovered(node):
    epoch = node.publish("ch", 1).epoch
    result = node.subscribe(connect(node, "c1", "a"), "ch", StreamPosition(epoch, 7))
    assert not result.recovered and result.publications == []


def test_join_once_per_user_and_leave_with_the_last_connection(node):
    # chat: is the namespace with join and leave events (they are off by default)
    watcher = connect(node, "w", "watcher")
    node.subscribe(watcher, "chat:ch")
    watcher.reply_sent()
    first, second = connect(node, "a1", "alice"), connect(node, "a2", "alice")
    node.subscribe(first, "chat:ch")
    node.subscribe(second, "chat:ch")
    node.unsubscribe(first, "chat:ch")
    assert watcher.events("leave") == []
    node.disconnect(second)
    assert watcher.events("join") == [{"channel": "chat:ch", "user": "watcher"},
                                      {"channel": "chat:ch", "user": "alice"}]
    assert watcher.events("leave") == [{"channel": "chat:ch", "user": "alice"}]
    assert [m.user for m in node.presence("chat:ch")] == ["watcher"]


def test_namespaces_without_join_leave_or_presence_send_no_events(node):
    watcher = connect(node, "w", "watcher")
    node.subscribe(watcher, "lobby")  # the default namespace: presence, no join/leave
    watcher.reply_sent()
    node.subscribe(connect(node, "a1", "alice"), "lobby")
    assert watcher.events("join") == []
    assert [m.user for m in node.presence("lobby")] == ["alice", "watcher"]


def test_disconnect_user_closes_all_their_connections_and_counts_them(node):
    alices = [connect(node, client_id, "alice") for client_id in ("a1", "a2")]
    for alice in alices:
        node.subscribe(alice, "ch")
    bob = connect(node, "b1", "bob")
    assert node.disconnect_user("alice") == 2
    # a deliberate disconnect tells the client (it must not reconnect by itself)
    assert all(alice.closed == [("disconnected by the server", True)] for alice in alices)
    assert not bob.closed
    assert node.disconnect_user("alice") == 0
    assert node.presence("ch") == []


def test_info_counts_connections_and_subscriptions(node):
    a = connect(node, "a1", "alice")
    node.subscribe(a, "x")
    node.subscribe(a, "y")
    (info,) = node.info()
    assert (info.node_id, info.connections, info.subscriptions) == ("n1", 1, 2)
    assert info.uptime_s >= 0


def test_data_must_be_json_within_the_size_limit(node):
    node.publish("ch", "x" * 98)
    with pytest.raises(TooLarge):
        node.publish("ch", "x" * 99)
    with pytest.raises(BadRequest):
        node.publish("ch", float("nan"))
    with pytest.raises(BadRequest):
        node.publish("ch", {1, 2})


def test_a_control_message_that_does_not_decode_is_dropped(node, caplog):
    node.on_control(b"\xc1 not msgpack")
    node.on_control(b"\x81\xa1v\x63")  # {"v": 99}
    assert "does not decode" in caplog.text
    assert node.disconnect_user("nobody") == 0


def test_a_connection_that_leaves_while_subscribing_leaves_no_presence_behind(node):
    alice = connect(node, "c1", "alice")
    add = node.presence_store.add

    def disconnect_first(channel, client_id, user, info=None):
        # What a disconnect from another greenlet does while subscribe waits on Redis.
        node.disconnect(alice)
        return add(channel, client_id, user, info)

    node.presence_store.add = disconnect_first
    node.subscribe(alice, "ch")
    assert node.presence("ch") == []
    assert node.hub.channels() == [] and node.hub.session_count == 0
