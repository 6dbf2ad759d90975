"""What the node calls: the transitions it sees, turned into queued webhook events."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import gevent

from ..config import Config
from ..errors import RealtimeError
from ..faults import FaultLog
from .base import Result, TransitionStore
from .events import MEMBER_ADDED, MEMBER_REMOVED
from .sender import Post, WebhookSender, http_post

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The webhook queue was full: events were dropped."""


class Webhooks:
    """The node's webhooks: records connections and subscriptions in the transition store
    (which decides, once cluster-wide, which events happen and queues them) and runs the
    sender. No call raises: a store that cannot be reached loses the events of that call
    (logged once per outage), and the node's clients carry on."""

    def __init__(self, config: Config, store: TransitionStore, *, post: Post = http_post,
                 ) -> None:
        self.store = store
        self.sender = WebhookSender(store, config.webhook_urls, config.webhook_secret,
                                    owner=f"{config.node_id}-{id(self):x}", post=post)
        self.dropped = 0  # events dropped because the queue was full, since start
        self._drops = FaultLog(logger, "the webhook queue (full: events dropped)")
        self._store_faults = FaultLog(logger, "recording webhook events")
        self._task: gevent.Greenlet | None = None

    def start(self) -> None:
        self._task = gevent.spawn(self.sender.run)

    def stop(self) -> None:
        self.sender.stop()
        if self._task is not None:
            self._task.kill()
            self._task = None
        self.store.close()

    # -- what the node saw --------------------------------------------------------------------

    def connected(self, client_id: str, user: str) -> None:
        self._record(lambda: self.store.connect(client_id, user))

    def disconnected(self, client_id: str) -> None:
        self._record(lambda: self.store.disconnect(client_id))

    def occupied(self, channel: str, client_id: str) -> None:
        """A connection of this node subscribed to ``channel``."""
        self._record(lambda: self.store.occupy(channel, client_id))

    def vacated(self, channel: str, client_id: str) -> None:
        """A connection of this node left ``channel`` (unsubscribed or went away)."""
        self._record(lambda: self.store.vacate(channel, client_id))

    def member_added(self, channel: str, user: str) -> None:
        """Presence saw ``user`` join ``channel`` (its first connection there, cluster-wide)."""
        self._record(lambda: self.store.enqueue(
            [{"name": MEMBER_ADDED, "channel": channel, "user": user}]))

    def member_removed(self, channel: str, user: str) -> None:
        """Presence saw ``user`` leave ``channel`` (its last connection there, cluster-wide)."""
        self._record(lambda: self.store.enqueue(
            [{"name": MEMBER_REMOVED, "channel": channel, "user": user}]))

    def members_expired(self, channel: str, users: Iterable[str]) -> None:
        """Presence entries of a dead node expired: the store reports each user once."""
        self._record(lambda: self.store.enqueue(
            [{"name": MEMBER_REMOVED, "channel": channel, "user": user} for user in users]))

    def heartbeat(self, client_ids: list[str], subscriptions: list[tuple[str, str]]) -> None:
        """Refresh this node's entries, then queue what is due (offline users, expiries)."""
        def refresh() -> Result:
            self.store.refresh(client_ids, subscriptions)
            return [], 0

        self._record(refresh)
        self._record(self.store.sweep)

    # -----------------------------------------------------------------------------------------

    def _record(self, call: Callable[[], Result]) -> None:
        try:
            queued, dropped = call()
        except RealtimeError as exc:
            self._store_faults.failed(exc)
            return
        except Exception as exc:  # a bug: logged with its traceback, once per run
            self._store_faults.failed(exc, unexpected=True)
            return
        self._store_faults.recovered()
        if dropped:
            self.dropped += dropped
            self._drops.failed(QueueFull(f"{dropped} events dropped ({self.dropped} in all)"))
        elif queued:
            self._drops.recovered()
        if queued:
            self.sender.wake()
