import uuid

import pytest

from realtime_dev.processes import NodeProcess, RedisProcess


@pytest.fixture(scope="session")
def single_node(tmp_path_factory):
    """One node process on the embedded broker, shared by the single-node tests."""
    node = NodeProcess(tmp_path_factory.mktemp("single"), "single",
                       "--history-size", "1000").wait_ready()
    yield node
    node.stop()


@pytest.fixture
def channel():
    """A channel name no other test uses."""
    return "t:" + uuid.uuid4().hex[:12]


@pytest.fixture
def clients():
    """Collects clients to disconnect after the test."""
    made = []
    yield made
    for client in made:
        client.disconnect()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A redis-server of the tests' own, on a free port."""
    server = RedisProcess(tmp_path_factory.mktemp("redis")).wait_ready()
    yield server
    server.stop()
