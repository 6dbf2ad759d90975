"""The node-local hub: the connections of this node and the channels they subscribe to.

The hub is the only place that knows which connection wants which channel on this node. The
broker hands it publications; the hub encodes each one ONCE and hands the same frame to every
local subscriber, whatever its transport. Nothing here blocks or switches greenlets.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable

from .broker.base import Publication
from .frames import EncodedEvent, EventBatch

logger = logging.getLogger(__name__)


class Connection:
    """One client connection on this node; each transport subclasses it.

    ``client_id`` is the Socket.IO session id the client knows. ``channels`` holds every
    channel the connection is subscribed to, including the ones still being set up, which also
    appear in ``pending`` with the frames held back until the subscribe reply has gone out.
    """

    __slots__ = ("client_id", "user", "channels", "pending")

    def __init__(self, client_id: str, user: str) -> None:
        self.client_id = client_id
        self.user = user
        self.channels: set[str] = set()
        # channel -> frames held back while the subscription is set up: (offset or None, frame)
        self.pending: dict[str, list[tuple[int | None, EncodedEvent]]] = {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.client_id} user={self.user!r}>"

    def send(self, frame: EncodedEvent | EventBatch) -> None:
        """Queue ``frame`` (one event or a batch). Never blocks, switches greenlets or raises."""
        raise NotImplementedError

    def close(self, reason: str) -> None:
        """Disconnect from the server side; the node forgets the connection."""
        raise NotImplementedError

    def after_reply(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the reply (ack) to the event being handled has been queued."""
        raise NotImplementedError


class Subscribed(enum.Enum):
    """What :meth:`Hub.add_subscriber` did."""

    ALREADY = "already"      # the connection already had (or was setting up) the channel
    FIRST_ON_NODE = "first"  # the first subscriber of the channel on this node
    ADDED = "added"          # another subscriber of a channel the node already receives


class Hub:
    """Connections of this node, their subscriptions, and the fan-out to them."""

    def __init__(self) -> None:
        self._connections: dict[str, Connection] = {}
        self._subscribers: dict[str, set[Connection]] = {}
        self._by_user: dict[str, set[Connection]] = {}
        self._subscription_count = 0

    # -- connections -------------------------------------------------------------------------

    def add_connection(self, connection: Connection) -> None:
        self._connections[connection.client_id] = connection
        self._by_user.setdefault(connection.user, set()).add(connection)

    def remove_connection(self, connection: Connection) -> list[str]:
        """Forget ``connection``; return the channels it was subscribed to (for cleanup)."""
        if self._connections.pop(connection.client_id, None) is None:
            return []
        same_user = self._by_user.get(connection.user)
        if same_user is not None:
            same_user.discard(connection)
            if not same_user:
                del self._by_user[connection.user]
        return list(connection.channels)

    def get(self, client_id: str) -> Connection | None:
        return self._connections.get(client_id)

    def connections_of(self, user: str) -> list[Connection]:
        return list(self._by_user.get(user, ()))

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    @property
    def subscription_count(self) -> int:
        """Client subscriptions on this node (one per connection and channel)."""
        return self._subscription_count

    def channels(self) -> list[str]:
        """Channels with at least one local subscriber."""
        return list(self._subscribers)

    def presence_entries(self, part: int = 0, parts: int = 1) -> list[tuple[str, str, str]]:
        """The live ``(channel, client_id, user)`` of this node, for presence refreshes.

        With ``parts`` > 1, only the connections of slice ``part`` of that many (each
        connection always falls in the same slice).
        """
        return [(channel, c.client_id, c.user)
                for c in self._connections.values()
                if parts == 1 or hash(c.client_id) % parts == part
                for channel in c.channels]

    # -- subscriptions -----------------------------------------------------------------------

    def add_subscriber(self, connection: Connection, channel: str) -> Subscribed:
        """Subscribe ``connection`` to ``channel`` in the pending state.

        Frames for the channel are held back for this connection until :meth:`activate`.
        """
        if channel in connection.channels:
            return Subscribed.ALREADY
        connection.channels.add(channel)
        connection.pending[channel] = []
        self._subscription_count += 1
        subscribers = self._subscribers.get(channel)
        if subscribers is None:
            self._subscribers[channel] = {connection}
            return Subscribed.FIRST_ON_NODE
        subscribers.add(connection)
        return Subscribed.ADDED

    def activate(self, connection: Connection, channel: str, after_offset: int) -> None:
        """End the set-up of a subscription: send what was held back, newer than ``after_offset``.

        Publications up to ``after_offset`` were already accounted for in the subscribe reply
        (recovered, or before the client's starting point), so they are dropped here; join and
        leave events are always sent.
        """
        held = connection.pending.pop(channel, None)
        if held is None or connection.client_id not in self._connections:
            return
        for offset, frame in held:
            if offset is None or offset > after_offset:
                connection.send(frame)

    def remove_subscriber(self, connection: Connection, channel: str) -> tuple[bool, bool]:
        """Unsubscribe; return ``(was_subscribed, was_last_on_node)``."""
        if channel not in connection.channels:
            return False, False
        connection.channels.discard(channel)
        connection.pending.pop(channel, None)
        self._subscription_count -= 1
        subscribers = self._subscribers.get(channel)
        if subscribers is None:
            return True, False
        subscribers.discard(connection)
        if subscribers:
            return True, False
        del self._subscribers[channel]
        return True, True

    # -- fan-out -----------------------------------------------------------------------------

    def deliver_publications(self, publications: list[Publication]) -> None:
        """Send publications to every local subscriber of their channels, each encoded once.

        Publications of one channel that arrived together leave in one write per WebSocket
        subscriber.
        """
        if len(publications) == 1:
            by_channel = {publications[0].channel: publications}
        else:
            by_channel = {}
            for publication in publications:
                by_channel.setdefault(publication.channel, []).append(publication)
        for channel, batch in by_channel.items():
            subscribers = self._subscribers.get(channel)
            if not subscribers:
                continue
            events = [EncodedEvent("message", p.to_event()) for p in batch]
            frame = events[0] if len(events) == 1 else EventBatch(events)
            for connection in subscribers:
                pending = connection.pending
                if pending and channel in pending:
                    pending[channel].extend(
                        (p.offset, event) for p, event in zip(batch, events, strict=True))
                else:
                    connection.send(frame)

    def deliver_presence_event(self, event: str, channel: str, user: str) -> None:
        """Send a ``join`` or ``leave`` event to every local subscriber of ``channel``."""
        subscribers = self._subscribers.get(channel)
        if not subscribers:
            return
        frame = EncodedEvent(event, {"channel": channel, "user": user})
        self._fan_out(channel, subscribers, None, frame)

    def _fan_out(self, channel: str, subscribers: set[Connection], offset: int | None,
                 frame: EncodedEvent) -> None:
        for connection in subscribers:
            pending = connection.pending
            if pending and channel in pending:
                pending[channel].append((offset, frame))
            else:
                connection.send(frame)
