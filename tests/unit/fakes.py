"""In-memory stand-ins for unit tests of the hub, the node and sessions."""

from __future__ import annotations

import json

from realtime.frames import EncodedEvent


class FakeSubscriber:
    """A hub subscriber that records frames; runs ``after_reply`` callbacks only when the test
    says the reply left."""

    def __init__(self, client_id, user, node=None, identity=None):
        self.client_id = client_id
        self.user = user
        self.identity = identity
        self.channels: set[str] = set()
        self.pending: dict = {}
        self.sent: list = []
        self.closed: list[tuple[str, bool]] = []
        self.deferred: list = []
        self.node = node

    def __repr__(self):
        return f"<FakeSubscriber {self.client_id}>"

    def send(self, frame):
        self.sent.append(frame)

    def close(self, reason, *, notify=False):
        self.closed.append((reason, notify))
        if self.node is not None:  # a real session reports the disconnect back
            self.node.disconnect(self)

    def after_reply(self, callback):
        self.deferred.append(callback)

    def reply_sent(self):
        callbacks, self.deferred = self.deferred, []
        for callback in callbacks:
            callback()

    def named_events(self):
        """``(name, payload)`` of every event sent so far, in order."""
        return [(event.name, event.payload) for frame in self.sent for event in frame.events]

    def events(self, name=None):
        """Payloads of the events sent so far (of ``name`` only, when given)."""
        return [payload for event, payload in self.named_events()
                if name is None or event == name]


def decode_event_text(event: EncodedEvent) -> list:
    """The [name, payload] an EncodedEvent carries for JSON clients (its encoded text)."""
    text = event.message(0)
    assert text.startswith("42")
    return json.loads(text[2:])
