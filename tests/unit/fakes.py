"""An in-memory transport for unit tests of the hub and the node."""

from __future__ import annotations


class FakeTransport:
    """Records frames per connection; runs ``after_reply`` callbacks only when told to."""

    def __init__(self):
        self.encoded: list[tuple[str, object]] = []
        self.sent: dict[str, list[tuple[str, object]]] = {}
        self.closed: list[str] = []
        self.deferred: list = []
        self.node = None

    def encode_event(self, event, payload):
        frame = (event, payload)
        self.encoded.append(frame)
        return frame

    def send(self, connection, frame):
        self.sent.setdefault(connection.client_id, []).append(frame)

    def close(self, connection, reason):
        self.closed.append(connection.client_id)
        if self.node is not None:  # a real transport reports the disconnect back
            self.node.disconnect(connection)

    def after_reply(self, callback):
        self.deferred.append(callback)

    def reply_sent(self):
        callbacks, self.deferred = self.deferred, []
        for callback in callbacks:
            callback()

    def events(self, client_id, name=None):
        return [payload for event, payload in self.sent.get(client_id, [])
                if name is None or event == name]
