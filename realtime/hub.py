"""The node-local hub: the sessions of this node and the channels they subscribe to.

The hub is the only place that knows which session wants which channel on this node. The
broker hands it publications; the hub encodes each one ONCE and hands the same frame to every
local subscriber, whatever its transport. Nothing here blocks or switches greenlets.
"""

from __future__ import annotations

import enum
import heapq
import logging
from collections.abc import Callable, ValuesView
from typing import TYPE_CHECKING, Protocol

from .broker.base import Publication, StreamPosition
from .frames import EncodedEvent, EventBatch, OutboundFrame
from .metrics import Counters

if TYPE_CHECKING:
    from .auth import Identity

logger = logging.getLogger(__name__)


class Subscriber(Protocol):
    """What the hub needs of a client session (:class:`realtime.session.Session`).

    ``client_id`` is the Socket.IO session id the client knows. ``channels`` holds every
    channel the session is subscribed to, including the ones still being set up, which also
    appear in ``pending`` with the frames held back until the subscribe reply has gone out.
    """

    client_id: str
    user: str
    identity: Identity | None  # the token's identity, None for anonymous connections
    channels: set[str]
    # frames held back per channel, each with its publication (None for join/leave/reset)
    pending: dict[str, list[tuple[Publication | None, OutboundFrame]]]

    def send(self, frame: OutboundFrame) -> None:
        """Write ``frame`` (one event or a batch). Never blocks, switches greenlets or raises."""

    def close(self, reason: str, *, notify: bool = False) -> None:
        """Disconnect from the server side (``notify``: tell the client not to reconnect)."""

    def after_reply(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the reply (ack) to the event being handled has been written."""


class Subscribed(enum.Enum):
    """What :meth:`Hub.add_subscriber` did."""

    ALREADY = "already"      # the session already had (or was setting up) the channel
    FIRST_ON_NODE = "first"  # the first subscriber of the channel on this node
    ADDED = "added"          # another subscriber of a channel the node already receives


class Hub:
    """The connected sessions of this node, their subscriptions, and the fan-out to them."""

    def __init__(self, counters: Counters | None = None) -> None:
        # The node's counters: the fan-out adds its deliveries, once per batch.
        self.counters = counters or Counters()
        self._sessions: dict[str, Subscriber] = {}
        self._subscribers: dict[str, set[Subscriber]] = {}
        self._by_user: dict[str, set[Subscriber]] = {}
        self._subscription_count = 0

    # -- sessions ----------------------------------------------------------------------------

    def add_session(self, session: Subscriber) -> None:
        self._sessions[session.client_id] = session
        self._by_user.setdefault(session.user, set()).add(session)

    def remove_session(self, session: Subscriber) -> list[str]:
        """Forget ``session``; return the channels it was subscribed to (for cleanup)."""
        if self._sessions.pop(session.client_id, None) is None:
            return []
        same_user = self._by_user.get(session.user)
        if same_user is not None:
            same_user.discard(session)
            if not same_user:
                del self._by_user[session.user]
        return list(session.channels)

    def get(self, client_id: str) -> Subscriber | None:
        return self._sessions.get(client_id)

    def sessions_of(self, user: str) -> list[Subscriber]:
        return list(self._by_user.get(user, ()))

    def session_count_of(self, user: str) -> int:
        """How many sessions ``user`` has on this node (O(1): no list is built)."""
        return len(self._by_user.get(user, ()))

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    def sessions(self) -> ValuesView[Subscriber]:
        """The connected sessions of this node: a live view, to be read without switching
        greenlets (the metrics count them when scraped; copying them would cost more)."""
        return self._sessions.values()

    @property
    def subscription_count(self) -> int:
        """Client subscriptions on this node (one per session and channel)."""
        return self._subscription_count

    def channels(self) -> list[str]:
        """Channels with at least one local subscriber."""
        return list(self._subscribers)

    @property
    def channel_count(self) -> int:
        """Channels with at least one local subscriber."""
        return len(self._subscribers)

    def busiest_channels(self, limit: int) -> list[tuple[str, int]]:
        """The ``limit`` channels with the most local subscribers and their counts, busiest
        first. One pass over the channels, no copy of them."""
        busiest = heapq.nlargest(limit, self._subscribers.items(),
                                 key=lambda item: (len(item[1]), item[0]))
        return [(channel, len(subscribers)) for channel, subscribers in busiest]

    def has_subscribers(self, channel: str) -> bool:
        return channel in self._subscribers

    def presence_entries(self, part: int = 0, parts: int = 1) -> list[tuple[str, str, str]]:
        """The live ``(channel, client_id, user)`` of this node, for presence refreshes.

        With ``parts`` > 1, only the sessions of slice ``part`` of that many (each
        session always falls in the same slice).
        """
        # A subscription still being set up is left out: its presence entry is added by the
        # subscribe itself, whose answer (first connection: a join) a refresh adding the entry
        # first would turn into "not first", losing the join and the member_added webhook.
        return [(channel, c.client_id, c.user)
                for c in self._sessions.values()
                if parts == 1 or hash(c.client_id) % parts == part
                for channel in c.channels if channel not in c.pending]

    def webhook_entries(self, part: int = 0, parts: int = 1,
                        ) -> tuple[list[str], list[tuple[str, str]]]:
        """This node's live client ids and ``(channel, client_id)`` subscriptions, for webhook
        refreshes: of the sessions of slice ``part`` of ``parts``, as :meth:`presence_entries`."""
        sessions = [c for c in self._sessions.values()
                    if parts == 1 or hash(c.client_id) % parts == part]
        return ([c.client_id for c in sessions],
                [(channel, c.client_id) for c in sessions for channel in c.channels])

    # -- subscriptions -----------------------------------------------------------------------

    def add_subscriber(self, session: Subscriber, channel: str) -> Subscribed:
        """Subscribe ``session`` to ``channel`` in the pending state.

        Frames for the channel are held back for this session until :meth:`activate`.
        """
        if channel in session.channels:
            return Subscribed.ALREADY
        session.channels.add(channel)
        session.pending[channel] = []
        self._subscription_count += 1
        subscribers = self._subscribers.get(channel)
        if subscribers is None:
            self._subscribers[channel] = {session}
            return Subscribed.FIRST_ON_NODE
        subscribers.add(session)
        return Subscribed.ADDED

    def activate(self, session: Subscriber, channel: str, after: StreamPosition) -> None:
        """End the set-up of a subscription: send what was held back, past ``after``.

        Publications of ``after``'s stream up to its offset were already accounted for in the
        subscribe reply (recovered, or before the client's starting point), so they are
        dropped here; publications of another epoch (the stream was reset meanwhile) and join,
        leave and reset events are always sent.
        """
        held = session.pending.pop(channel, None)
        if held is None or session.client_id not in self._sessions:
            return
        epoch, offset = after.epoch, after.offset
        for publication, frame in held:
            if publication is None or publication.offset > offset or (
                    epoch and publication.epoch and publication.epoch != epoch):
                session.send(frame)

    def remove_subscriber(self, session: Subscriber, channel: str) -> tuple[bool, bool]:
        """Unsubscribe; return ``(was_subscribed, was_last_on_node)``."""
        if channel not in session.channels:
            return False, False
        session.channels.discard(channel)
        session.pending.pop(channel, None)
        self._subscription_count -= 1
        subscribers = self._subscribers.get(channel)
        if subscribers is None:
            return True, False
        subscribers.discard(session)
        if subscribers:
            return True, False
        del self._subscribers[channel]
        return True, True

    # -- fan-out -----------------------------------------------------------------------------

    def deliver_publications(self, publications: list[Publication]) -> None:
        """Send publications to every local subscriber of their channels, each encoded once.

        Publications of one channel that arrived together leave in one write per WebSocket
        subscriber. Adds ``len(batch) * recipients`` to the delivery counter once per channel,
        outside the per-recipient loop.
        """
        counters = self.counters
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
            counters.deliveries += len(events) * len(subscribers)
            for session in subscribers:
                pending = session.pending
                if pending and channel in pending:
                    pending[channel].extend(zip(batch, events, strict=True))
                else:
                    session.send(frame)

    def deliver_reset(self, channel: str, epoch: str, offset: int) -> None:
        """Tell every local subscriber of ``channel`` that its stream broke (the ``reset``
        event): it now stands at ``epoch``/``offset``, and what came before may be missing."""
        subscribers = self._subscribers.get(channel)
        if not subscribers:
            return
        frame = EncodedEvent("reset", {"channel": channel, "epoch": epoch, "offset": offset})
        self._fan_out(channel, subscribers, frame)

    def deliver_presence_event(self, event: str, channel: str, user: str) -> None:
        """Send a ``join`` or ``leave`` event to every local subscriber of ``channel``."""
        subscribers = self._subscribers.get(channel)
        if not subscribers:
            return
        frame = EncodedEvent(event, {"channel": channel, "user": user})
        self._fan_out(channel, subscribers, frame)

    def _fan_out(self, channel: str, subscribers: set[Subscriber],
                 frame: EncodedEvent) -> None:
        """Send an event that is not a publication (never dropped by :meth:`activate`)."""
        for session in subscribers:
            pending = session.pending
            if pending and channel in pending:
                pending[channel].append((None, frame))
            else:
                session.send(frame)
