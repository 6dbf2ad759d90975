from realtime.broker import Publication
from realtime.broker.base import NO_STREAM, StreamPosition
from realtime.hub import Hub, Subscribed
from tests.unit.fakes import FakeSubscriber


def make_hub(*users):
    hub = Hub()
    connections = [FakeSubscriber(f"c{i}", user) for i, user in enumerate(users)]
    for connection in connections:
        hub.add_session(connection)
    return hub, connections


def test_a_publication_is_encoded_once_for_all_subscribers():
    hub, connections = make_hub("a", "b", "c")
    for connection in connections:
        hub.add_subscriber(connection, "ch")
        hub.activate(connection, "ch", NO_STREAM)
    hub.deliver_publications([Publication("ch", 1, "x", "a")])
    frames = {id(frame) for c in connections for frame in c.sent}
    assert len(frames) == 1
    assert all(c.events("message") == [{"channel": "ch", "offset": 1, "data": "x", "user": "a"}]
               for c in connections)


def test_pending_subscription_holds_frames_until_activated_and_drops_known_offsets():
    hub, (conn,) = make_hub("a")
    assert hub.add_subscriber(conn, "ch") is Subscribed.FIRST_ON_NODE
    hub.deliver_publications([Publication("ch", 3, "old", None, "e1")])
    hub.deliver_presence_event("join", "ch", "a")
    hub.deliver_publications([Publication("ch", 4, "new", None, "e1")])
    assert conn.events() == []
    hub.activate(conn, "ch", StreamPosition("e1", 3))
    assert conn.events() == [{"channel": "ch", "user": "a"},
                             {"channel": "ch", "offset": 4, "data": "new", "user": None}]
    hub.deliver_publications([Publication("ch", 5, "live", None)])
    assert conn.events()[-1]["offset"] == 5


def test_activation_keeps_a_reset_and_the_new_epochs_publications_whatever_their_offsets():
    hub, (conn,) = make_hub("a")
    hub.add_subscriber(conn, "ch")
    hub.deliver_publications([Publication("ch", 5, "known", None, "e1")])
    hub.deliver_reset("ch", "e2", 0)
    hub.deliver_publications([Publication("ch", 1, "fresh", None, "e2")])
    hub.activate(conn, "ch", StreamPosition("e1", 5))
    assert [(name, payload.get("offset")) for name, payload in conn.named_events()] == [
        ("reset", 0), ("message", 1)]


def test_subscriber_bookkeeping():
    hub, (a, b) = make_hub("a", "b")
    assert hub.add_subscriber(a, "ch") is Subscribed.FIRST_ON_NODE
    assert hub.add_subscriber(b, "ch") is Subscribed.ADDED
    assert hub.add_subscriber(b, "ch") is Subscribed.ALREADY
    assert hub.subscription_count == 2
    assert hub.remove_subscriber(a, "ch") == (True, False)
    assert hub.remove_subscriber(a, "ch") == (False, False)
    assert hub.remove_subscriber(b, "ch") == (True, True)
    assert hub.channels() == [] and hub.subscription_count == 0


def test_removing_a_connection_reports_its_channels_and_forgets_its_user():
    hub, (a, a2) = make_hub("alice", "alice")
    hub.add_subscriber(a, "x")
    hub.add_subscriber(a, "y")
    assert sorted(hub.remove_session(a)) == ["x", "y"]
    assert hub.sessions_of("alice") == [a2]
    assert hub.remove_session(a) == []
    hub.remove_session(a2)
    assert hub.sessions_of("alice") == [] and hub.session_count == 0


def test_publications_that_arrive_together_leave_in_one_write_per_channel():
    hub, (a, b) = make_hub("a", "b")
    for connection, channel in ((a, "x"), (b, "x"), (b, "y")):
        hub.add_subscriber(connection, channel)
        hub.activate(connection, channel, NO_STREAM)
    hub.deliver_publications([Publication("x", 1, 1, None), Publication("y", 1, 2, None),
                              Publication("x", 2, 3, None)])
    assert [len(frame.events) for frame in a.sent] == [2]
    assert a.sent[0] is b.sent[0]  # joined once for every subscriber
    assert [m["data"] for m in a.events("message")] == [1, 3]
    assert [(m["channel"], m["data"]) for m in b.events("message")] == [("x", 1), ("x", 3),
                                                                         ("y", 2)]


def test_presence_entries_split_into_slices_that_cover_every_connection_once():
    hub, connections = make_hub(*[f"u{i}" for i in range(50)])
    for connection in connections:
        for channel in ("a", "b"):
            hub.add_subscriber(connection, channel)
            hub.activate(connection, channel, StreamPosition("", 0))  # set up: refreshed
    everything = sorted(hub.presence_entries())
    slices = [hub.presence_entries(part, 5) for part in range(5)]
    assert sorted(entry for part in slices for entry in part) == everything
    assert len(everything) == 100 and all(len(part) < 100 for part in slices)
