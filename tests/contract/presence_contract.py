"""The PresenceStore contract, run against every implementation (fixture ``store``)."""

from __future__ import annotations

import uuid

from realtime.presence import PresenceMember


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


class PresenceContract:
    def test_first_connection_of_a_user_joins_later_ones_do_not(self, store):
        channel = unique("room")
        assert store.add(channel, "c1", "alice") is True
        assert store.add(channel, "c2", "alice") is False
        assert store.add(channel, "c3", "bob") is True
        assert store.members(channel) == [PresenceMember("alice", 2), PresenceMember("bob", 1)]

    def test_adding_the_same_connection_twice_counts_it_once(self, store):
        channel = unique("room")
        store.add(channel, "c1", "alice")
        assert store.add(channel, "c1", "alice") is False
        assert store.members(channel) == [PresenceMember("alice", 1)]

    def test_last_connection_of_a_user_leaves(self, store):
        channel = unique("room")
        store.add(channel, "c1", "alice")
        store.add(channel, "c2", "alice")
        assert store.remove(channel, "c1", "alice") is False
        assert store.members(channel) == [PresenceMember("alice", 1)]
        assert store.remove(channel, "c2", "alice") is True
        assert store.members(channel) == []

    def test_removing_an_unknown_connection_is_not_a_leave(self, store):
        channel = unique("room")
        assert store.remove(channel, "nope", "alice") is False
        store.add(channel, "c1", "alice")
        assert store.remove(channel, "c2", "alice") is False
        assert store.members(channel) == [PresenceMember("alice", 1)]

    def test_channels_are_independent(self, store):
        a, b = unique("a"), unique("b")
        store.add(a, "c1", "alice")
        assert store.add(b, "c1", "alice") is True
        store.remove(a, "c1", "alice")
        assert store.members(a) == []
        assert store.members(b) == [PresenceMember("alice", 1)]

    def test_refresh_keeps_entries(self, store):
        channel = unique("room")
        store.add(channel, "c1", "alice")
        store.refresh([(channel, "c1", "alice")])
        assert store.members(channel) == [PresenceMember("alice", 1)]

    def test_a_users_info_is_shown_while_it_is_present(self, store):
        channel = unique("room")
        store.add(channel, "c1", "alice", {"name": "Alice", "role": "admin"})
        store.add(channel, "c2", "bob")
        assert store.members(channel) == [
            PresenceMember("alice", 1, {"name": "Alice", "role": "admin"}),
            PresenceMember("bob", 1)]
        store.add(channel, "c3", "alice", {"name": "Alice B."})  # the latest connection's
        assert store.members(channel)[0].info == {"name": "Alice B."}
        store.remove(channel, "c1", "alice")
        store.remove(channel, "c3", "alice")
        store.add(channel, "c4", "alice")  # back without info: none left over
        assert store.members(channel)[0] == PresenceMember("alice", 1)
