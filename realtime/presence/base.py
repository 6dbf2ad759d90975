"""The presence store: which users are connected to which channel, across the deployment."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

ExpiredHandler = Callable[[str, list[str]], None]
"""``on_expired(channel, users)``: users left without a connection in ``channel`` because the
entries of a node that stopped refreshing them expired."""


@dataclasses.dataclass(frozen=True, slots=True)
class PresenceMember:
    """A distinct user present in a channel, with how many of its connections are there, and
    the ``info`` of its token (None without one)."""

    user: str
    connections: int
    info: Mapping[str, Any] | None = None

    def to_dict(self) -> dict:
        member: dict[str, Any] = {"user": self.user, "connections": self.connections}
        if self.info is not None:
            member["info"] = self.info
        return member


class PresenceStore(abc.ABC):
    """Connections present in channels, counted per user.

    Contract, common to every implementation:

    * An entry is one ``(channel, client_id)`` with its ``user``; a user's ``info`` is the one
      its latest ``add`` gave (kept while the user has entries). ``add`` and ``remove`` are
      atomic with their answer: exactly one of several concurrent ``add`` calls for a user's
      connections sees the user as new, and exactly one ``remove`` sees it leave, so join and
      leave events are neither doubled nor lost while the store is reachable.
    * Entries written by a node expire ``ttl`` seconds after the node last wrote or refreshed
      them (:meth:`refresh`), so a node that dies without cleaning up stops being counted.
      The users whose last entry in a channel expired are handed to ``on_expired`` (set by
      the node, which publishes their ``leave``) exactly once across every store sharing the
      backend: by the one call that dropped the entries, whichever it is, or by
      :meth:`sweep`, which each node calls every heartbeat so that expiry is noticed even on
      channels nobody touches.
    * A call that cannot reach the backing store raises :class:`~realtime.errors.Unavailable`.
    """

    def __init__(self) -> None:
        self.on_expired: ExpiredHandler | None = None

    @abc.abstractmethod
    def add(self, channel: str, client_id: str, user: str,
            info: Mapping[str, Any] | None = None) -> bool:
        """Record the connection; True when it is the user's first one in ``channel``."""

    @abc.abstractmethod
    def remove(self, channel: str, client_id: str, user: str) -> bool:
        """Forget the connection; True when the user has no connection left in ``channel``."""

    @abc.abstractmethod
    def members(self, channel: str) -> list[PresenceMember]:
        """The distinct users present in ``channel``, sorted by user id."""

    def refresh(self, entries: list[tuple[str, str, str]]) -> None:  # noqa: B027
        """Extend the life of this node's live ``(channel, client_id, user)`` entries.

        Stores whose entries do not expire need not do anything.
        """

    def sweep(self) -> None:  # noqa: B027
        """Drop the entries that expired on channels nobody touched, reporting who left.

        Stores whose entries do not expire need not do anything.
        """

    def close(self) -> None:  # noqa: B027
        """Release connections. Idempotent."""
