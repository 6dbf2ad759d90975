"""The transition store of a single node, in this process's memory."""

from __future__ import annotations

import collections
import secrets
import time
from collections.abc import Callable, Sequence

from .base import QUEUE_LIMIT, Event, Result, TransitionStore
from .events import CHANNEL_OCCUPIED, CHANNEL_VACATED, USER_OFFLINE, USER_ONLINE


class MemoryTransitionStore(TransitionStore):
    """:class:`TransitionStore` for one node: entries never expire (they die with the process,
    and so does the queue: a single node that crashes loses the events not yet delivered)."""

    def __init__(self, *, grace: float, queue_limit: int = QUEUE_LIMIT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._grace = grace
        self._queue_limit = queue_limit
        self._clock = clock
        self._client_user: dict[str, str] = {}
        self._user_clients: dict[str, set[str]] = {}
        self._channel_clients: dict[str, set[str]] = {}
        self._offline_due: dict[str, float] = {}  # user -> when its grace ends
        self._queue: collections.deque[Event] = collections.deque()
        self._lease: tuple[str, float] | None = None  # (owner, until)
        self._prefix = secrets.token_hex(4)
        self._seq = 0

    def connect(self, client_id: str, user: str) -> Result:
        if client_id in self._client_user:
            return [], 0
        self._client_user[client_id] = user
        clients = self._user_clients.setdefault(user, set())
        clients.add(client_id)
        if len(clients) == 1 and self._offline_due.pop(user, None) is None:
            return self._push([{"name": USER_ONLINE, "user": user}])
        return [], 0

    def disconnect(self, client_id: str) -> Result:
        user = self._client_user.pop(client_id, None)
        if user is None:
            return [], 0
        clients = self._user_clients[user]
        clients.discard(client_id)
        if not clients:
            del self._user_clients[user]
            self._offline_due[user] = self._clock() + self._grace
        return [], 0

    def occupy(self, channel: str, client_id: str) -> Result:
        clients = self._channel_clients.setdefault(channel, set())
        if client_id in clients:
            return [], 0
        clients.add(client_id)
        if len(clients) == 1:
            return self._push([{"name": CHANNEL_OCCUPIED, "channel": channel}])
        return [], 0

    def vacate(self, channel: str, client_id: str) -> Result:
        clients = self._channel_clients.get(channel)
        if not clients or client_id not in clients:
            return [], 0
        clients.discard(client_id)
        if clients:
            return [], 0
        del self._channel_clients[channel]
        return self._push([{"name": CHANNEL_VACATED, "channel": channel}])

    def enqueue(self, events: Sequence[Event]) -> Result:
        return self._push([dict(event) for event in events])

    def sweep(self) -> Result:
        now = self._clock()
        due = [user for user, at in self._offline_due.items() if at <= now]
        for user in due:
            del self._offline_due[user]
        return self._push([{"name": USER_OFFLINE, "user": user} for user in due
                           if user not in self._user_clients])

    def claim(self, owner: str, lease: float, limit: int = 50) -> list[Event] | None:
        now = self._clock()
        if self._lease is not None and self._lease[0] != owner and self._lease[1] > now:
            return None
        self._lease = (owner, now + lease)
        return [dict(event) for event in list(self._queue)[:limit]]

    def ack(self, owner: str, count: int) -> bool:
        if self._lease is None or self._lease[0] != owner:
            return False
        for _ in range(min(count, len(self._queue))):
            self._queue.popleft()
        return True

    def queue_length(self) -> int:
        return len(self._queue)

    def _push(self, events: list[Event]) -> Result:
        queued: list[Event] = []
        dropped = 0
        for event in events:
            if len(self._queue) >= self._queue_limit:
                dropped += 1
                continue
            self._seq += 1
            event["id"] = f"{self._prefix}-{self._seq}"
            self._queue.append(event)
            queued.append(event)
        return queued, dropped
