"""The broker and presence contracts against the in-memory implementations."""

import pytest

from realtime.broker import MemoryBroker
from realtime.presence import MemoryPresenceStore
from tests.contract.broker_contract import BrokerContract
from tests.contract.presence_contract import PresenceContract
from tests.helpers import RecordingHandler


class TestMemoryBroker(BrokerContract):
    @pytest.fixture
    def broker_factory(self):
        # One process, one broker: every "node" of the contract is the same one.
        broker, handler = MemoryBroker(), RecordingHandler()
        broker.start(handler)
        yield lambda: (broker, handler)
        broker.close()


class TestMemoryPresence(PresenceContract):
    @pytest.fixture
    def store(self):
        return MemoryPresenceStore()
