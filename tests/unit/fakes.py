"""In-memory connections for unit tests of the hub and the node."""

from __future__ import annotations

from realtime.hub import Connection


class FakeConnection(Connection):
    """Records frames; runs ``after_reply`` callbacks only when the test says the reply left."""

    __slots__ = ("sent", "closed", "deferred", "node")

    def __init__(self, client_id, user, node=None):
        super().__init__(client_id, user)
        self.sent: list = []
        self.closed: list[str] = []
        self.deferred: list = []
        self.node = node

    def send(self, frame):
        self.sent.append(frame)

    def close(self, reason):
        self.closed.append(reason)
        if self.node is not None:  # a real transport reports the disconnect back
            self.node.disconnect(self)

    def after_reply(self, callback):
        self.deferred.append(callback)

    def reply_sent(self):
        callbacks, self.deferred = self.deferred, []
        for callback in callbacks:
            callback()

    def events(self, name=None):
        """(event, payload) pairs decoded from the frames, or payloads of ``name``."""
        import json

        decoded = [json.loads(event.encode()[1:]) for frame in self.sent
                   for event in frame.events]
        return [payload for event, payload in decoded if name is None or event == name]
