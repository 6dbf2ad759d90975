import pytest

from realtime.app import create_app
from realtime.codecs import JSON, MSGPACK, PacketType
from realtime.config import Config
from tests.unit.sessions import SessionClient


@pytest.fixture
def realtime():
    """A node on the in-memory broker, started, with no server around it."""
    instance = create_app(Config(node_id="unit", history_size=5))
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture(params=[JSON, MSGPACK], ids=["json", "msgpack"])
def codec(request):
    """Each codec in turn: the protocol must not depend on it."""
    return request.param


@pytest.fixture
def connect(realtime, codec):
    """``connect(user=...)``: a connected :class:`SessionClient` of the node."""
    def make(user=None, auth=None):
        if auth is None and user is not None:
            auth = {"user": user}
        client = SessionClient(realtime.engine, codec)
        assert client.connect(auth).type is PacketType.CONNECT
        return client

    return make
