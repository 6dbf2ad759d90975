import pytest

from realtime.app import create_app
from realtime.config import Config


@pytest.fixture
def realtime():
    """A node on the in-memory broker, started, with no server around it."""
    instance = create_app(Config(node_id="unit", history_size=5))
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture
def connect(realtime):
    """``connect(user=...)``: a Flask-SocketIO test client connected to the node."""
    clients = []

    def make(user=None, auth=None):
        if auth is None and user is not None:
            auth = {"user": user}
        client = realtime.socketio.test_client(realtime.app, auth=auth)
        assert client.is_connected()
        clients.append(client)
        return client

    yield make
    for client in clients:
        if client.is_connected():
            client.disconnect()
