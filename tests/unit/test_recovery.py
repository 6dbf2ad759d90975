"""Recovery from a position of epoch "": the client saw the channel before its first publication."""

import pytest

from realtime.broker import NO_STREAM, MemoryBroker, StreamPosition
from realtime.broker.memory import MemoryUsage
from realtime.config import Config
from realtime.node import Node
from realtime.presence import MemoryPresenceStore
from tests.unit.fakes import FakeSubscriber


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def node(clock):
    node = Node(Config(node_id="n1", history_size=5, history_ttl=60), MemoryBroker(clock),
                MemoryPresenceStore())
    node.start()
    yield node
    node.stop()


def client(node, client_id):
    connection = FakeSubscriber(client_id, client_id, node)
    node.connect(connection)
    return connection


def test_subscribing_to_a_channel_without_stream_answers_epoch_none_and_stores_nothing(node):
    for i in range(3):
        result = node.subscribe(client(node, f"c{i}"), f"quiet-{i}")
        assert result.position == NO_STREAM and not result.recovered
    assert node.broker.usage() == MemoryUsage(streams=0, publications=0)


def test_since_epoch_none_while_there_is_still_no_stream_is_recovered_with_nothing_missed(node):
    seen = node.subscribe(client(node, "a"), "quiet").position
    result = node.subscribe(client(node, "b"), "quiet", seen)
    assert result.recovered is True and result.publications == []
    assert result.position == NO_STREAM
    assert node.broker.usage() == MemoryUsage(streams=0, publications=0)


def test_since_epoch_none_is_recovered_from_the_stream_created_since(node):
    seen = node.subscribe(client(node, "a"), "ch").position
    assert seen == NO_STREAM
    for i in range(3):
        node.publish("ch", i)
    result = node.subscribe(client(node, "b"), "ch", seen)
    assert result.recovered is True
    assert [(p.offset, p.data) for p in result.publications] == [(1, 0), (2, 1), (3, 2)]
    assert result.position.offset == 3 and result.position.epoch != ""
    # A client that got the first two live (still at epoch "") misses only the third.
    partly = node.subscribe(client(node, "c"), "ch", StreamPosition("", 2))
    assert partly.recovered is True and [p.offset for p in partly.publications] == [3]
    up_to_date = node.subscribe(client(node, "d"), "ch", StreamPosition("", 3))
    assert up_to_date.recovered is True and up_to_date.publications == []


def test_since_epoch_none_is_not_recovered_when_history_lost_publications(node, clock):
    node.subscribe(client(node, "a"), "trimmed")
    for i in range(7):  # history_size is 5: offsets 1 and 2 are gone
        node.publish("trimmed", i)
    result = node.subscribe(client(node, "b"), "trimmed", NO_STREAM)
    assert result.recovered is False and result.publications == []
    assert result.position.offset == 7
    node.publish("expired", "x")
    clock.now += 61  # past history_ttl: the position stays, the publication is gone
    expired = node.subscribe(client(node, "c"), "expired", NO_STREAM)
    assert expired.recovered is False and expired.publications == []
    assert expired.position.offset == 1


def test_since_epoch_none_from_the_future_is_not_recovered(node):
    # Offsets the client holds that no stream has: they came from a stream now forgotten.
    nothing = node.subscribe(client(node, "a"), "gone", StreamPosition("", 4))
    assert nothing.recovered is False and nothing.position == NO_STREAM
    node.publish("ch", 1)
    ahead = node.subscribe(client(node, "b"), "ch", StreamPosition("", 2))
    assert ahead.recovered is False and ahead.publications == []


def test_since_a_real_epoch_is_not_recovered_once_the_stream_is_gone(node, clock):
    old = node.publish("ch", 1)
    clock.now += node.history_options.meta_ttl + 1
    result = node.subscribe(client(node, "a"), "ch", old)
    assert result.recovered is False and result.position == NO_STREAM
