"""The broker and presence contracts against the in-memory implementations; memory-only rules."""

import logging

import pytest

from realtime.broker import NO_STREAM, HistoryOptions, MemoryBroker
from realtime.broker.memory import MemoryUsage
from realtime.presence import MemoryPresenceStore
from tests.contract.broker_contract import BrokerContract
from tests.contract.presence_contract import PresenceContract
from tests.helpers import RecordingHandler, wait_until


class TestMemoryBroker(BrokerContract):
    @pytest.fixture
    def broker_factory(self):
        # One process, one broker: every "node" of the contract is the same one, unless the
        # test asks for other options.
        broker, handler = MemoryBroker(), RecordingHandler()
        broker.start(handler)
        others = []

        def make(**options):
            if not options:
                return broker, handler
            other, other_handler = MemoryBroker(**options), RecordingHandler()
            other.start(other_handler)
            others.append(other)
            return other, other_handler

        yield make
        for other in [broker, *others]:
            other.close()

    @pytest.fixture
    def stored(self, broker_factory):
        # The broker is this test's own: what it holds at all is what it holds for the prefix.
        broker, _ = broker_factory()
        return lambda prefix: broker.usage()


class TestMemoryPresence(PresenceContract):
    @pytest.fixture
    def store(self):
        return MemoryPresenceStore()


class Clock:
    """The broker's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def broker(clock):
    """A broker on a driven clock, not started: no sweeper runs unless the test calls it."""
    return MemoryBroker(clock)


SHORT = HistoryOptions(size=100, ttl=10, meta_ttl=100)


def test_expired_publications_of_untouched_channels_are_swept_by_time(broker, clock):
    for channel in ("a", "b", "c"):
        for i in range(4):
            broker.publish(channel, i, user=None, history=SHORT)
    broker.publish("late", 0, user=None, history=HistoryOptions(size=100, ttl=50, meta_ttl=100))
    assert broker.usage() == MemoryUsage(streams=4, publications=13)
    clock.now += 11
    assert broker.sweep() is False
    # Nobody read or published on a, b or c: the sweep alone dropped their publications, and
    # kept their positions (their meta TTL is not over) and the one that has not expired.
    assert broker.usage() == MemoryUsage(streams=4, publications=1)
    clock.now += 90
    broker.sweep()
    assert broker.usage() == MemoryUsage(streams=0, publications=0)


def test_a_publication_kept_by_the_sweep_is_still_served_until_it_expires(broker, clock):
    broker.publish("a", "old", user=None, history=SHORT)
    clock.now += 5
    position = broker.publish("a", "new", user=None, history=SHORT)
    clock.now += 6  # "old" expired, "new" has 4 s left
    broker.sweep()
    assert broker.usage().publications == 1
    result = broker.history("a", options=SHORT)
    assert [p.data for p in result.publications] == ["new"] and result.position == position
    clock.now += 5
    broker.sweep()
    assert broker.usage() == MemoryUsage(streams=1, publications=0)


def test_a_sweep_does_at_most_its_budget_and_the_next_calls_finish(broker, clock):
    for c in range(50):
        for i in range(10):
            broker.publish(f"c{c}", i, user=None, history=SHORT)
    clock.now += 11
    assert broker.sweep(budget=100) is True
    # One unit per stream visited and per publication dropped, a stream's visit not split:
    # 100 units and at most one stream (11 units) more.
    assert 500 - 110 <= broker.usage().publications < 500
    finished = [False]
    while not finished[-1]:
        finished.append(not broker.sweep(budget=100))
    assert broker.usage() == MemoryUsage(streams=50, publications=0)
    assert len(finished) >= 550 / 110  # 500 publications and 50 visits, in slices
    clock.now += 100
    assert broker.sweep(budget=10) is True
    assert broker.usage().streams == 40
    while broker.sweep(budget=10):
        pass
    assert broker.usage() == MemoryUsage(streams=0, publications=0)


def test_reads_of_many_unknown_channels_hold_no_memory(broker):
    for i in range(10_000):
        assert broker.history(f"nobody-{i}", options=SHORT).position == NO_STREAM
        broker.history(f"nobody-{i}", since_offset=0, options=SHORT)
    assert broker.usage() == MemoryUsage(streams=0, publications=0)


def test_a_read_of_an_expired_stream_forgets_it(broker, clock):
    broker.publish("a", 1, user=None, history=SHORT)
    clock.now += 101
    assert broker.history("a", options=SHORT).position == NO_STREAM
    assert broker.usage() == MemoryUsage(streams=0, publications=0)
    assert broker.publish("a", 2, user=None, history=SHORT).offset == 1


def test_history_never_returns_an_expired_publication_behind_a_live_one(broker, clock):
    broker.publish("a", "long", user=None, history=HistoryOptions(size=10, ttl=60))
    broker.publish("a", "short", user=None, history=HistoryOptions(size=10, ttl=1))
    clock.now += 2
    broker.sweep()
    assert [p.data for p in broker.history("a", options=SHORT).publications] == ["long"]
    assert [p.data for p in broker.history("a", since_offset=0, options=SHORT).publications] \
        == ["long"]


def test_the_sweeper_runs_on_an_idle_broker(clock):
    broker = MemoryBroker(clock, sweep_interval=0.01)
    broker.start(RecordingHandler())
    try:
        broker.publish("a", 1, user=None, history=SHORT)
        clock.now += 11
        # No call on the broker from here on: only its own greenlet can drop the publication.
        wait_until(lambda: broker.usage().publications == 0, message="the sweeper")
    finally:
        broker.close()


def test_a_failing_sweep_is_logged_and_the_sweeper_carries_on(clock, caplog, monkeypatch):
    broker = MemoryBroker(clock, sweep_interval=0.01)
    real_sweep = broker.sweep
    calls = []

    def sweep_failing_once(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real_sweep(*args)

    monkeypatch.setattr(broker, "sweep", sweep_failing_once)
    broker.start(RecordingHandler())
    try:
        broker.publish("a", 1, user=None, history=SHORT)
        clock.now += 11
        wait_until(lambda: broker.usage().publications == 0, message="a sweep after the failure")
    finally:
        broker.close()
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 1 and failures[0].exc_info is not None
