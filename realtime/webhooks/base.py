"""The transition store: decides, once for the whole deployment, which webhook events happen,
and queues them durably until a sender delivers them."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

Event = dict[str, Any]
"""A queued event: ``{"id", "name", "channel"?, "user"?}``."""

Result = tuple[list[Event], int]
"""What a store call queued, and how many events it dropped because the queue was full."""

# Events a sender takes from the queue's head per POST: small batches, as Pusher sends.
BATCH_SIZE = 50
# Events the queue holds at most; more are dropped (counted), so that a receiver down for
# hours cannot fill the store's memory.
QUEUE_LIMIT = 100_000


class TransitionStore(abc.ABC):
    """Connections and subscriptions of every node, and the webhook queue.

    Contract, common to every implementation:

    * Each call is atomic with the events it queues: of concurrent calls on any node, exactly
      one sees a user's first connection (``user_online``), a channel's first subscriber
      (``channel_occupied``) or last (``channel_vacated``); an event is queued by the call
      that decided it, never twice.
    * A user whose last connection went away is offline only when it is still without a
      connection ``grace`` seconds later: :meth:`sweep` (every node calls it every heartbeat)
      queues that ``user_offline``. A reconnect within the grace queues nothing (no
      ``user_online`` either: the user never went offline).
    * Entries live ``ttl`` seconds past their last write or :meth:`refresh` (stores whose
      entries die with the process need not expire them): the connections and subscriptions
      of a node that died are dropped by a later :meth:`sweep`, which queues the
      ``channel_vacated`` and ``user_offline`` they leave behind, once.
    * The queue is bounded (``queue_limit``): an event that does not fit is dropped and
      counted in the answer of the call that queued it. Every queued event gets an ``id``
      unique to it, kept through retries, so that a receiver can drop a duplicate.
    * Delivery: one sender at a time (whoever holds the lease, ``owner``) reads the queue's
      head with :meth:`claim` and removes it with :meth:`ack` once delivered; a sender that
      dies loses its lease after ``lease`` seconds and another one delivers the same events
      again (at least once).
    * A call that cannot reach the backing store raises :class:`~realtime.errors.Unavailable`.

    Calls answer a :data:`Result`: ``(events queued, events dropped)``.
    """

    @abc.abstractmethod
    def connect(self, client_id: str, user: str) -> Result:
        """Record a connection of ``user``; ``user_online`` when it is its first."""

    @abc.abstractmethod
    def disconnect(self, client_id: str) -> Result:
        """Forget a connection; its user's last one starts the offline grace."""

    @abc.abstractmethod
    def occupy(self, channel: str, client_id: str) -> Result:
        """Record a subscription; ``channel_occupied`` when it is the channel's first."""

    @abc.abstractmethod
    def vacate(self, channel: str, client_id: str) -> Result:
        """Forget a subscription; ``channel_vacated`` when it was the channel's last."""

    @abc.abstractmethod
    def enqueue(self, events: Sequence[Event]) -> Result:
        """Queue events decided elsewhere (presence: ``member_added``, ``member_removed``)."""

    def refresh(self, client_ids: Sequence[str],  # noqa: B027
                subscriptions: Sequence[tuple[str, str]]) -> None:
        """Extend the life of this node's live connections and ``(channel, client_id)``
        subscriptions. Stores whose entries do not expire need not do anything."""

    @abc.abstractmethod
    def sweep(self) -> Result:
        """Queue the ``user_offline`` that are due, and the events of expired entries."""

    @abc.abstractmethod
    def claim(self, owner: str, lease: float, limit: int = BATCH_SIZE) -> list[Event] | None:
        """The queue's first ``limit`` events (oldest first) for ``owner``, which holds the
        lease for ``lease`` seconds more; None while another sender holds it."""

    @abc.abstractmethod
    def ack(self, owner: str, count: int) -> bool:
        """Remove the first ``count`` events, delivered; False (nothing removed) when
        ``owner`` lost its lease meanwhile."""

    @abc.abstractmethod
    def queue_length(self) -> int:
        """Events waiting in the queue."""

    def close(self) -> None:  # noqa: B027
        """Release connections. Idempotent."""
