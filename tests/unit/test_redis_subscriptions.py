"""The Redis broker's subscription bookkeeping, driven without a Redis (no I/O happens)."""

import gevent
import hiredis
import pytest

from realtime.broker.redis import RedisBroker
from realtime.errors import Unavailable
from realtime.redis_support import pubsub_channel


class RecordingSocket:
    """Stands in for the subscriber socket: decodes the commands written to it."""

    def __init__(self):
        self._reader = hiredis.Reader()
        self.commands = []

    def sendall(self, data):
        self._reader.feed(data)
        while (command := self._reader.gets()) is not False:
            self.commands.append(tuple(command))


@pytest.fixture
def broker():
    broker = RedisBroker("redis://127.0.0.1:1/0", timeout=0.2)  # never connected
    broker._subscriber = RecordingSocket()
    broker._connected.set()
    return broker


def answer_subscribe(broker, channel):
    broker._dispatch(b"subscribe", pubsub_channel(channel).encode(), 1, [])


def test_subscribe_returns_once_redis_confirms(broker):
    waiter = gevent.spawn(broker.subscribe, "c")
    gevent.sleep(0.01)
    assert not waiter.ready()
    answer_subscribe(broker, "c")
    waiter.get(timeout=1)
    assert broker._subscriber.commands == [(b"SUBSCRIBE", pubsub_channel("c").encode())]


def test_a_late_answer_to_an_abandoned_subscribe_does_not_confirm_the_next_one(broker):
    with pytest.raises(Unavailable):
        broker.subscribe("c")  # Redis is slow: nobody answers within the timeout
    broker.unsubscribe("c")  # what the node does after a failed subscribe
    waiter = gevent.spawn(broker.subscribe, "c")
    gevent.sleep(0.01)
    answer_subscribe(broker, "c")  # the answer to the FIRST subscribe, at last
    gevent.sleep(0.01)
    assert not waiter.ready(), "confirmed before Redis processed the second SUBSCRIBE"
    answer_subscribe(broker, "c")
    waiter.get(timeout=1)
    key = pubsub_channel("c").encode()
    assert broker._subscriber.commands == [(b"SUBSCRIBE", key), (b"UNSUBSCRIBE", key),
                                           (b"SUBSCRIBE", key)]
