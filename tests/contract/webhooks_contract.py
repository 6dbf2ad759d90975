"""The TransitionStore contract, run against every implementation.

Fixture ``make_store(**options)``: a store on the backend shared by the test's stores (another
"node"), with ``grace`` (seconds) and ``queue_limit`` options; every test gets a fresh backend.
"""

from __future__ import annotations

import gevent

from tests.helpers import wait_until

GRACE = 0.3


def names(result):
    queued, dropped = result
    assert dropped == 0
    return [(event["name"], event.get("user") or event.get("channel")) for event in queued]


def drain(store, owner="test"):
    """Every queued event, acknowledged."""
    events = store.claim(owner, 5, 10_000)
    store.ack(owner, len(events))
    return events


class TransitionContract:
    def test_a_users_first_connection_is_online_and_later_ones_are_not(self, make_store):
        store = make_store(grace=GRACE)
        assert names(store.connect("c1", "alice")) == [("user_online", "alice")]
        assert names(store.connect("c2", "alice")) == []
        assert names(store.connect("c1", "alice")) == []  # the same connection again
        assert names(store.connect("c3", "bob")) == [("user_online", "bob")]

    def test_the_last_connection_going_is_offline_only_after_the_grace(self, make_store):
        store = make_store(grace=GRACE)
        store.connect("c1", "alice")
        store.connect("c2", "alice")
        assert names(store.disconnect("c1")) == []
        assert names(store.disconnect("c2")) == []
        assert names(store.sweep()) == []  # within the grace
        offline = wait_until(lambda: names(store.sweep()), timeout=5,
                             message="user_offline after the grace")
        assert offline == [("user_offline", "alice")]
        assert names(store.sweep()) == []  # once

    def test_a_reconnect_within_the_grace_is_neither_offline_nor_online(self, make_store):
        store = make_store(grace=GRACE)
        store.connect("c1", "alice")
        store.disconnect("c1")
        assert names(store.connect("c2", "alice")) == []
        gevent.sleep(GRACE * 1.5)
        assert names(store.sweep()) == []
        store.disconnect("c2")
        assert wait_until(lambda: names(store.sweep()), timeout=5) == [
            ("user_offline", "alice")]
        assert names(store.connect("c3", "alice")) == [("user_online", "alice")]

    def test_disconnecting_an_unknown_connection_changes_nothing(self, make_store):
        store = make_store(grace=0)
        assert names(store.disconnect("nope")) == []
        gevent.sleep(0.05)
        assert names(store.sweep()) == []

    def test_a_channels_first_subscriber_occupies_it_and_its_last_vacates_it(self, make_store):
        store = make_store(grace=GRACE)
        assert names(store.occupy("room", "c1")) == [("channel_occupied", "room")]
        assert names(store.occupy("room", "c1")) == []
        assert names(store.occupy("room", "c2")) == []
        assert names(store.vacate("room", "c1")) == []
        assert names(store.vacate("room", "c1")) == []  # already gone
        assert names(store.vacate("other", "c2")) == []  # never there
        assert names(store.vacate("room", "c2")) == [("channel_vacated", "room")]
        assert names(store.occupy("room", "c3")) == [("channel_occupied", "room")]

    def test_concurrent_first_connections_on_several_nodes_are_online_once(self, make_store):
        stores = [make_store(grace=GRACE) for _ in range(3)]
        jobs = [gevent.spawn(store.connect, f"c{i}-{n}", "alice")
                for n in range(5) for i, store in enumerate(stores)]
        gevent.joinall(jobs, raise_error=True)
        onlines = [event for job in jobs for event in job.value[0]]
        assert [event["name"] for event in onlines] == ["user_online"]
        jobs = [gevent.spawn(store.occupy, "room", f"c{i}-{n}")
                for n in range(5) for i, store in enumerate(stores)]
        gevent.joinall(jobs, raise_error=True)
        assert len([event for job in jobs for event in job.value[0]]) == 1

    def test_queued_events_keep_their_order_and_get_unique_ids(self, make_store):
        store = make_store(grace=GRACE)
        store.connect("c1", "alice")
        store.occupy("room", "c1")
        store.enqueue([{"name": "member_added", "channel": "room", "user": "alice"}])
        events = drain(store)
        assert [e["name"] for e in events] == ["user_online", "channel_occupied",
                                               "member_added"]
        assert events[2] == {"id": events[2]["id"], "name": "member_added", "channel": "room",
                             "user": "alice"}
        assert len({e["id"] for e in events}) == 3
        assert store.queue_length() == 0

    def test_one_sender_holds_the_queue_and_another_takes_it_over_when_its_lease_ends(
            self, make_store):
        first, second = make_store(grace=GRACE), make_store(grace=GRACE)
        first.connect("c1", "alice")
        claimed = first.claim("node-a", 0.3, 10)
        assert [e["name"] for e in claimed] == ["user_online"]
        assert second.claim("node-b", 0.3, 10) is None
        assert second.ack("node-b", 1) is False
        # node-a died before acknowledging: node-b gets the same event, same id
        again = wait_until(lambda: second.claim("node-b", 5, 10), timeout=5)
        assert again == claimed
        assert first.ack("node-a", 1) is False  # its lease is gone: nothing removed
        assert second.ack("node-b", 1) is True
        assert second.claim("node-b", 5, 10) == []

    def test_a_claim_reads_at_most_the_batch_and_ack_removes_only_that(self, make_store):
        store = make_store(grace=GRACE)
        for n in range(5):
            store.occupy(f"room{n}", "c1")
        batch = store.claim("me", 5, 2)
        assert [e["channel"] for e in batch] == ["room0", "room1"]
        assert store.ack("me", 2) is True
        assert [e["channel"] for e in store.claim("me", 5, 10)] == ["room2", "room3", "room4"]

    def test_a_full_queue_drops_and_counts_what_does_not_fit(self, make_store):
        store = make_store(grace=GRACE, queue_limit=2)
        assert store.occupy("a", "c1")[1] == 0
        assert store.occupy("b", "c1")[1] == 0
        queued, dropped = store.occupy("c", "c1")
        assert (queued, dropped) == ([], 1)
        assert store.queue_length() == 2
        drain(store)
        assert names(store.occupy("d", "c1")) == [("channel_occupied", "d")]
