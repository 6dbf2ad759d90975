"""Presence for a single node, in this process's memory."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import PresenceMember, PresenceStore


class MemoryPresenceStore(PresenceStore):
    """:class:`PresenceStore` for one node. Entries never expire: they die with the process."""

    def __init__(self) -> None:
        super().__init__()
        # channel -> user -> client ids
        self._channels: dict[str, dict[str, set[str]]] = {}
        # (channel, user) -> info, for users whose token had one
        self._info: dict[tuple[str, str], Mapping[str, Any]] = {}

    def add(self, channel: str, client_id: str, user: str,
            info: Mapping[str, Any] | None = None) -> bool:
        if info is not None:
            self._info[channel, user] = info
        users = self._channels.setdefault(channel, {})
        clients = users.get(user)
        if clients is None:
            users[user] = {client_id}
            return True
        clients.add(client_id)
        return False

    def remove(self, channel: str, client_id: str, user: str) -> bool:
        users = self._channels.get(channel)
        if not users or user not in users:
            return False
        clients = users[user]
        if client_id not in clients:
            return False
        clients.discard(client_id)
        if clients:
            return False
        del users[user]
        self._info.pop((channel, user), None)
        if not users:
            del self._channels[channel]
        return True

    def members(self, channel: str) -> list[PresenceMember]:
        users = self._channels.get(channel, {})
        return [PresenceMember(user, len(clients), self._info.get((channel, user)))
                for user, clients in sorted(users.items())]
