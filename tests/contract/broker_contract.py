"""The Broker contract, run against every implementation.

A subclass provides a ``broker_factory`` fixture: ``broker_factory()`` returns a new, started
broker wired to a :class:`RecordingHandler`, as ``(broker, handler)``, all sharing one backend
(so that two of them behave like two nodes), and ``broker_factory(idempotency_ttl=...)`` one
with that option; and a ``stored`` fixture: ``stored(prefix)``
returns a comparable snapshot of what the backend holds for channels whose names start with
``prefix`` (that changes whenever anything is stored for one of them).
"""

from __future__ import annotations

import uuid

import pytest

from realtime.broker import NO_STREAM, HistoryOptions, PublishRequest
from tests.helpers import wait_until

KEEP = HistoryOptions(size=100, ttl=300)


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


class BrokerContract:
    @pytest.fixture
    def node(self, broker_factory):
        return broker_factory()

    def test_offsets_start_at_one_and_grow_by_one_in_one_epoch(self, node):
        broker, _ = node
        channel = unique("c")
        positions = [broker.publish(channel, i, user=None, history=KEEP) for i in range(3)]
        assert [p.offset for p in positions] == [1, 2, 3]
        assert len({p.epoch for p in positions}) == 1
        assert positions[0].epoch

    def test_channels_have_independent_streams(self, node):
        broker, _ = node
        a, b = unique("a"), unique("b")
        broker.publish(a, 1, user=None, history=KEEP)
        assert broker.publish(b, 1, user=None, history=KEEP).offset == 1
        assert broker.publish(a, 2, user=None, history=KEEP).offset == 2

    def test_reads_of_unknown_channels_answer_epoch_none_and_store_nothing(self, node, stored):
        broker, _ = node
        prefix = unique("unread")
        before = stored(prefix)
        for i in range(20):
            channel = f"{prefix}-{i}"
            for result in (broker.history(channel, options=KEEP),
                           broker.history(channel, limit=0, options=KEEP),
                           broker.history(channel, limit=5, options=KEEP),
                           broker.history(channel, since_offset=0, options=KEEP),
                           broker.history(channel, since_offset=9, options=KEEP)):
                assert result.publications == [] and result.position == NO_STREAM
        assert stored(prefix) == before
        broker.publish(f"{prefix}-0", "x", user=None, history=KEEP)
        assert stored(prefix) != before  # the snapshot does see what a publish stores

    def test_the_first_publish_after_reads_starts_a_stream_at_offset_one(self, node):
        broker, _ = node
        channel = unique("c")
        for _ in range(3):
            broker.history(channel, options=KEEP)
        first = broker.publish(channel, "x", user=None, history=KEEP)
        assert first.offset == 1 and first.epoch != NO_STREAM.epoch
        after = broker.history(channel, options=KEEP)
        assert after.position == first
        assert [(p.offset, p.data) for p in after.publications] == [(1, "x")]

    def test_history_returns_publications_oldest_first_with_their_fields(self, node):
        broker, _ = node
        channel = unique("c")
        broker.publish(channel, {"n": 1}, user="alice", history=KEEP)
        broker.publish(channel, [1, "two", None], user=None, history=KEEP)
        result = broker.history(channel, options=KEEP)
        assert [(p.channel, p.offset, p.data, p.user) for p in result.publications] == [
            (channel, 1, {"n": 1}, "alice"), (channel, 2, [1, "two", None], None)]
        assert result.position.offset == 2

    def test_history_limit_keeps_the_newest(self, node):
        broker, _ = node
        channel = unique("c")
        for i in range(5):
            broker.publish(channel, i, user=None, history=KEEP)
        assert [p.data for p in broker.history(channel, limit=2, options=KEEP).publications] \
            == [3, 4]
        limited = broker.history(channel, limit=0, options=KEEP)
        assert limited.publications == [] and limited.position.offset == 5

    def test_history_since_offset_returns_what_came_after(self, node):
        broker, _ = node
        channel = unique("c")
        for i in range(5):
            broker.publish(channel, i, user=None, history=KEEP)
        result = broker.history(channel, since_offset=3, options=KEEP)
        assert [p.offset for p in result.publications] == [4, 5]
        assert broker.history(channel, since_offset=5, options=KEEP).publications == []

    def test_history_keeps_only_the_last_size_publications(self, node):
        broker, _ = node
        channel = unique("c")
        small = HistoryOptions(size=3, ttl=300)
        for i in range(5):
            broker.publish(channel, i, user=None, history=small)
        result = broker.history(channel, options=small)
        assert [p.offset for p in result.publications] == [3, 4, 5]
        assert result.position.offset == 5

    def test_publications_expire_after_ttl_but_the_position_stays(self, node):
        broker, _ = node
        channel = unique("c")
        short = HistoryOptions(size=10, ttl=0.3)
        position = broker.publish(channel, "x", user=None, history=short)
        wait_until(lambda: not broker.history(channel, options=short).publications,
                   message="publication to expire")
        assert broker.history(channel, options=short).position == position

    def test_a_stream_forgotten_after_meta_ttl_starts_a_new_epoch(self, node):
        broker, _ = node
        channel = unique("c")
        brief = HistoryOptions(size=10, ttl=0.2, meta_ttl=0.4)
        old = broker.publish(channel, "x", user=None, history=brief)

        def forgotten():
            # Only reads here: a read must not keep an expired stream alive by itself.
            return broker.history(channel, options=brief).position == NO_STREAM

        wait_until(forgotten, message="the stream to be forgotten")
        fresh = broker.publish(channel, "y", user=None, history=brief)
        assert fresh.epoch != old.epoch and fresh.offset == 1

    def test_subscribed_node_receives_publications_in_order(self, broker_factory):
        (publisher, _), (subscriber, received) = broker_factory(), broker_factory()
        channel = unique("c")
        subscriber.subscribe(channel)
        for i in range(20):
            publisher.publish(channel, i, user="u", history=KEEP)
        wait_until(lambda: len(received.offsets(channel)) == 20, message="20 publications")
        assert received.offsets(channel) == list(range(1, 21))
        assert [p.data for p in received.publications] == list(range(20))

    def test_publish_many_is_publish_one_after_the_other(self, broker_factory):
        (publisher, _), (subscriber, received) = broker_factory(), broker_factory()
        a, b = unique("a"), unique("b")
        subscriber.subscribe(a)
        subscriber.subscribe(b)
        publisher.publish(a, "before", user=None, history=KEEP)
        items = [PublishRequest(a, 0, "u"), PublishRequest(b, 1), PublishRequest(a, {"n": 2}, "v"),
                 PublishRequest(a, [3])]
        results = publisher.publish_many(items, history=KEEP)
        assert [r.offset for r in results] == [2, 1, 3, 4]
        assert results[0].epoch == results[2].epoch == results[3].epoch
        wait_until(lambda: len(received.publications) == 5, message="5 publications")
        assert [(p.channel, p.offset, p.data, p.user) for p in received.publications] == [
            (a, 1, "before", None), (a, 2, 0, "u"), (b, 1, 1, None), (a, 3, {"n": 2}, "v"),
            (a, 4, [3], None)]
        assert [p.data for p in publisher.history(a, options=KEEP).publications] == [
            "before", 0, {"n": 2}, [3]]
        assert publisher.publish_many([], history=KEEP) == []

    def test_a_repeated_idempotency_key_publishes_once_and_answers_the_first_position(
            self, broker_factory):
        (first_node, _), (second_node, received) = broker_factory(), broker_factory()
        channel, other = unique("c"), unique("other")
        second_node.subscribe(channel)
        first = first_node.publish(channel, "once", user=None, history=KEEP,
                                   idempotency_key="order-1")
        again = second_node.publish(channel, "once", user=None, history=KEEP,
                                    idempotency_key="order-1")
        assert again == first
        in_a_batch = first_node.publish_many(
            [PublishRequest(channel, "once", None, "order-1"),
             PublishRequest(channel, "twice", None, "order-2"),
             PublishRequest(channel, "twice", None, "order-2")], history=KEEP)
        assert in_a_batch[0] == first and in_a_batch[1] == in_a_batch[2]
        assert in_a_batch[1].offset == first.offset + 1
        # the key is per channel: the same key elsewhere is another publication
        assert first_node.publish(other, "x", user=None, history=KEEP,
                                  idempotency_key="order-1").offset == 1
        assert [p.data for p in first_node.history(channel, options=KEEP).publications] == [
            "once", "twice"]
        wait_until(lambda: len(received.offsets(channel)) == 2, message="2 publications")
        assert received.offsets(channel) == [1, 2]

    def test_an_idempotency_key_is_forgotten_after_its_ttl(self, broker_factory):
        broker, _ = broker_factory(idempotency_ttl=0.2)
        channel = unique("c")
        first = broker.publish(channel, 1, user=None, history=KEEP, idempotency_key="k")

        def published_again() -> bool:
            return broker.publish(channel, 1, user=None, history=KEEP,
                                  idempotency_key="k").offset > first.offset

        wait_until(published_again, timeout=5, interval=0.05, message="the key to expire")

    def test_unsubscribed_channels_are_not_delivered(self, broker_factory):
        (publisher, _), (subscriber, received) = broker_factory(), broker_factory()
        wanted, other = unique("wanted"), unique("other")
        subscriber.subscribe(wanted)
        publisher.publish(other, "no", user=None, history=KEEP)
        publisher.publish(wanted, "yes", user=None, history=KEEP)
        wait_until(lambda: received.offsets(wanted) == [1], message="the wanted publication")
        assert received.offsets(other) == []

    def test_unsubscribe_stops_delivery_and_subscribe_is_idempotent(self, broker_factory):
        (publisher, _), (subscriber, received) = broker_factory(), broker_factory()
        channel, marker = unique("c"), unique("marker")
        subscriber.subscribe(channel)
        subscriber.subscribe(channel)
        subscriber.subscribe(marker)
        publisher.publish(channel, 1, user=None, history=KEEP)
        wait_until(lambda: received.offsets(channel) == [1], message="first publication")
        subscriber.unsubscribe(channel)
        publisher.publish(channel, 2, user=None, history=KEEP)
        publisher.publish(marker, "after", user=None, history=KEEP)
        # The marker was published after the second publication: once it is in, the second one
        # would have been too.
        wait_until(lambda: received.offsets(marker) == [1], message="the marker")
        assert received.offsets(channel) == [1]

    def test_join_and_leave_reach_subscribed_nodes_only(self, broker_factory):
        (sender, _), (subscriber, received) = broker_factory(), broker_factory()
        channel, other = unique("c"), unique("other")
        subscriber.subscribe(channel)
        sender.publish_join(other, "nobody")
        sender.publish_join(channel, "alice")
        sender.publish_leave(channel, "alice")
        wait_until(lambda: received.leaves, message="the leave")
        assert received.joins == [(channel, "alice")]
        assert received.leaves == [(channel, "alice")]

    def test_control_messages_reach_every_node_including_the_sender(self, broker_factory):
        (sender, sent), (_other, received) = broker_factory(), broker_factory()
        sender.publish_control(b"\x81\xa1t\xa4ping")
        wait_until(lambda: sent.controls and received.controls, message="control on both")
        assert sent.controls == received.controls == [b"\x81\xa1t\xa4ping"]
