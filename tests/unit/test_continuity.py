"""The node's continuity guard: gaps filled from history, duplicates dropped, resets announced."""

import time

import gevent
import pytest

from realtime.broker.base import NO_STREAM, HistoryResult, Publication, StreamPosition
from realtime.continuity import Continuity
from realtime.errors import Unavailable
from realtime.hub import Hub
from tests.unit.fakes import FakeSubscriber


class FakeHistory:
    """Channels' streams as a broker's history holds them; reads can be made to fail."""

    def __init__(self):
        self.streams: dict[str, tuple[str, list[Publication]]] = {}
        self.kept: int | None = None  # keep only the newest N publications
        self.failures = 0  # reads that raise Unavailable before they work again
        self.reads: list[tuple[str, int]] = []

    def publish(self, channel, data, epoch="e1"):
        current_epoch, publications = self.streams.get(channel, (epoch, []))
        if current_epoch != epoch:
            publications = []
        offset = publications[-1].offset + 1 if publications else 1
        publication = Publication(channel, offset, data, None, epoch)
        self.streams[channel] = (epoch, [*publications, publication])
        return publication

    def rewind(self, channel, offset):
        """The stream loses its publications after ``offset`` (an AOF without its tail)."""
        epoch, publications = self.streams[channel]
        self.streams[channel] = (epoch, [p for p in publications if p.offset <= offset])

    def read(self, channel, since):
        self.reads.append((channel, since))
        if self.failures:
            self.failures -= 1
            raise Unavailable("redis is down")
        if channel not in self.streams:
            return HistoryResult([], NO_STREAM)
        epoch, publications = self.streams[channel]
        offset = publications[-1].offset if publications else 0
        kept = publications if self.kept is None else publications[-self.kept:]
        return HistoryResult([p for p in kept if p.offset > since],
                             StreamPosition(epoch, offset))


@pytest.fixture
def history():
    return FakeHistory()


@pytest.fixture
def hub():
    return Hub()


@pytest.fixture
def continuity(hub, history):
    continuity = Continuity(hub, history.read, fill_patience=0.3, catch_up_after=0.05)
    yield continuity
    continuity.close()


def subscribe(hub, continuity, history, channel="ch", name="c1"):
    """A subscriber of ``channel`` whose reply told it the stream's current position."""
    subscriber = FakeSubscriber(name, name)
    hub.add_session(subscriber)
    hub.add_subscriber(subscriber, channel)
    continuity.subscribed(subscriber, channel, history.read(channel, 10**9).position)
    return subscriber


def wait_until(condition, timeout=2.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        gevent.sleep(0.005)


def stream_of(subscriber):
    """What a subscriber saw: ("m", offset, data) per message, ("reset", epoch, offset)."""
    seen = []
    for name, payload in subscriber.named_events():
        if name == "message":
            seen.append(("m", payload["offset"], payload["data"]))
        elif name == "reset":
            seen.append(("reset", payload["epoch"], payload["offset"]))
    return seen


def test_publications_that_follow_each_other_are_delivered_at_once(hub, continuity, history):
    subscriber = subscribe(hub, continuity, history)
    for data in "abc":
        continuity.deliver([history.publish("ch", data)])
    assert stream_of(subscriber) == [("m", 1, "a"), ("m", 2, "b"), ("m", 3, "c")]
    assert history.reads == [("ch", 10**9)]  # no fill: only the subscribe's own read


def test_a_publication_delivered_twice_reaches_subscribers_once(hub, continuity, history):
    subscriber = subscribe(hub, continuity, history)
    first = history.publish("ch", "a")
    continuity.deliver([first])
    continuity.deliver([first, history.publish("ch", "b")])
    assert stream_of(subscriber) == [("m", 1, "a"), ("m", 2, "b")]


def test_a_gap_is_filled_from_history_before_what_follows(hub, continuity, history):
    subscriber = subscribe(hub, continuity, history)
    continuity.deliver([history.publish("ch", "a")])
    history.publish("ch", "lost 1")
    history.publish("ch", "lost 2")
    continuity.deliver([history.publish("ch", "d")])
    continuity.deliver([history.publish("ch", "e")])  # arrives while the gap is filled
    wait_until(lambda: len(stream_of(subscriber)) == 5)
    assert stream_of(subscriber) == [("m", 1, "a"), ("m", 2, "lost 1"), ("m", 3, "lost 2"),
                                     ("m", 4, "d"), ("m", 5, "e")]
    assert continuity.gaps_filled == 1 and continuity.resets == 0


def test_a_gap_older_than_history_is_announced_by_reset(hub, continuity, history):
    subscriber = subscribe(hub, continuity, history)
    continuity.deliver([history.publish("ch", "a")])
    for index in range(5):
        history.publish("ch", f"lost {index}")
    history.kept = 3
    continuity.deliver([history.publish("ch", "g")])  # offset 7; history keeps 5..7
    wait_until(lambda: ("m", 7, "g") in stream_of(subscriber))
    assert stream_of(subscriber) == [("m", 1, "a"), ("reset", "e1", 4), ("m", 5, "lost 3"),
                                     ("m", 6, "lost 4"), ("m", 7, "g")]


def test_a_new_epoch_is_announced_by_reset_with_the_new_streams_start(hub, continuity, history):
    subscriber = subscribe(hub, continuity, history)
    continuity.deliver([history.publish("ch", "a")])
    continuity.deliver([history.publish("ch", "b")])
    history.publish("ch", "new 1", epoch="e2")  # the stream was lost and started again
    continuity.deliver([history.publish("ch", "new 2", epoch="e2")])
    wait_until(lambda: len(stream_of(subscriber)) == 5)
    assert stream_of(subscriber) == [("m", 1, "a"), ("m", 2, "b"), ("reset", "e2", 0),
                                     ("m", 1, "new 1"), ("m", 2, "new 2")]
    assert continuity.position("ch") == StreamPosition("e2", 2)


def test_after_delivery_resumes_the_end_of_a_stream_is_filled(hub, continuity, history):
    subscriber = subscribe(hub, continuity, history)
    continuity.deliver([history.publish("ch", "a")])
    history.publish("ch", "published during the outage")
    continuity.resume()
    wait_until(lambda: len(stream_of(subscriber)) == 2)
    assert stream_of(subscriber) == [("m", 1, "a"), ("m", 2, "published during the outage")]


def test_a_stream_that_went_back_is_announced_and_its_new_offsets_delivered(
        hub, continuity, history):
    subscriber = subscribe(hub, continuity, history)
    for data in "abc":
        continuity.deliver([history.publish("ch", data)])
    history.rewind("ch", 1)  # Redis came back from an append-only file without its tail
    continuity.resume()
    wait_until(lambda: len(stream_of(subscriber)) == 4)
    continuity.deliver([history.publish("ch", "after")])
    assert stream_of(subscriber)[3:] == [("reset", "e1", 1), ("m", 2, "after")]


def test_a_stream_rewritten_at_the_same_offsets_is_not_taken_for_the_old_one(
        hub, continuity, history):
    subscriber = subscribe(hub, continuity, history)
    for data in "abc":
        continuity.deliver([history.publish("ch", data)])
    history.rewind("ch", 1)
    for data in ("x", "y", "z"):  # offsets 2..4 again, taken by other nodes meanwhile
        history.publish("ch", data)
    continuity.resume()
    wait_until(lambda: any(event[0] == "reset" for event in stream_of(subscriber)))
    wait_until(lambda: stream_of(subscriber)[-1] == ("m", 4, "z"))
    assert stream_of(subscriber)[3:] == [("reset", "e1", 0), ("m", 1, "a"), ("m", 2, "x"),
                                         ("m", 3, "y"), ("m", 4, "z")]


def test_history_that_cannot_be_read_ends_in_a_reset_not_a_stall(hub, continuity, history):
    subscriber = subscribe(hub, continuity, history)
    continuity.deliver([history.publish("ch", "a")])
    history.publish("ch", "lost")
    history.failures = 10**6
    continuity.deliver([history.publish("ch", "c")])
    wait_until(lambda: len(stream_of(subscriber)) == 3)
    assert stream_of(subscriber) == [("m", 1, "a"), ("reset", "e1", 2), ("m", 3, "c")]
    history.failures = 0
    continuity.deliver([history.publish("ch", "d")])
    assert stream_of(subscriber)[-1] == ("m", 4, "d")


def test_a_fill_retries_history_until_it_answers(hub, continuity, history):
    subscriber = subscribe(hub, continuity, history)
    continuity.deliver([history.publish("ch", "a")])
    history.publish("ch", "b")
    history.failures = 2
    continuity.deliver([history.publish("ch", "c")])
    wait_until(lambda: len(stream_of(subscriber)) == 3)
    assert stream_of(subscriber) == [("m", 1, "a"), ("m", 2, "b"), ("m", 3, "c")]


def test_a_new_subscriber_ahead_of_the_node_waits_and_gets_nothing_twice(
        hub, continuity, history):
    early = subscribe(hub, continuity, history, name="early")
    continuity.deliver([history.publish("ch", "a")])
    in_flight = [history.publish("ch", "b"), history.publish("ch", "c")]
    late = subscribe(hub, continuity, history, name="late")  # its reply says offset 3
    continuity.deliver(in_flight)
    continuity.deliver([history.publish("ch", "d")])
    assert stream_of(late) == [("m", 4, "d")]
    assert [event[1] for event in stream_of(early)] == [1, 2, 3, 4]


def test_a_waiting_subscriber_is_caught_up_when_nothing_else_arrives(hub, continuity, history):
    early = subscribe(hub, continuity, history, name="early")
    continuity.deliver([history.publish("ch", "a")])
    history.publish("ch", "lost at the end of the stream")
    late = subscribe(hub, continuity, history, name="late")
    hub.deliver_presence_event("join", "ch", "someone")  # held until late is activated
    wait_until(lambda: late.events("join"))
    assert stream_of(early) == [("m", 1, "a"), ("m", 2, "lost at the end of the stream")]
    assert stream_of(late) == []


def test_a_channel_left_during_a_fill_is_forgotten(hub, continuity, history):
    subscriber = subscribe(hub, continuity, history)
    continuity.deliver([history.publish("ch", "a")])
    history.publish("ch", "b")
    history.failures = 10**6
    continuity.deliver([history.publish("ch", "c")])
    hub.remove_subscriber(subscriber, "ch")
    continuity.forget("ch")
    gevent.sleep(0.4)  # past the fill's patience: nothing may come of the abandoned fill
    assert stream_of(subscriber) == [("m", 1, "a")]
    assert continuity.channel_count == 0


def test_publications_of_a_node_without_epochs_count_as_the_same_stream(
        hub, continuity, history):
    subscriber = subscribe(hub, continuity, history)
    continuity.deliver([history.publish("ch", "a")])
    continuity.deliver([Publication("ch", 2, "from an older node", None, "")])
    continuity.deliver([history.publish("ch", "c")])  # offset 2 in history: a duplicate
    assert stream_of(subscriber) == [("m", 1, "a"), ("m", 2, "from an older node")]
    assert history.reads == [("ch", 10**9)]
