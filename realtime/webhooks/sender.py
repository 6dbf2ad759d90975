"""The sender: a background greenlet that POSTs the queued events to every webhook URL."""

from __future__ import annotations

import http.client
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

import gevent
import gevent.event

from ..errors import RealtimeError
from ..faults import Backoff, FaultLog
from .base import BATCH_SIZE, TransitionStore
from .events import SIGNATURE_HEADER, encode_body, sign

logger = logging.getLogger(__name__)

# Seconds a receiver has to answer a POST before it counts as failed (and is retried).
POST_TIMEOUT = 5.0
# Seconds a sender holds the queue without renewing its lease; another node's sender takes
# over after that (its node died). Longer than a POST and the longest back-off together, so
# that a sender alive and retrying keeps the queue.
LEASE = 10.0
# How often the sender looks at the queue when nothing woke it (events queued by another node).
POLL_INTERVAL = 0.25
RETRY_FIRST, RETRY_CEILING = 0.25, 5.0


class DeliveryError(Exception):
    """A receiver did not take a batch: down, too slow, or answered other than 2xx."""


Post = Callable[[str, bytes, dict[str, str]], None]
"""``post(url, body, headers)``: deliver or raise :class:`DeliveryError`."""


def http_post(url: str, body: bytes, headers: dict[str, str]) -> None:
    """POST ``body`` to ``url``; :class:`DeliveryError` unless the answer is 2xx in time."""
    parts = urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = kind(parts.hostname or "", parts.port, timeout=POST_TIMEOUT)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise DeliveryError(f"{url}: {type(exc).__name__}: {exc}") from exc
    finally:
        connection.close()
    if not 200 <= response.status < 300:
        raise DeliveryError(f"{url} answered {response.status}")


class WebhookSender:
    """Delivers the store's queue to ``urls``, signed with ``secret``, at least once.

    One batch (the queue's head, :data:`~.base.BATCH_SIZE` events at most) at a time, to every
    URL; it leaves the queue once every URL took it. A URL that fails is retried, alone, with
    jittered exponential back-off, until it takes the batch: events queue up behind it (up to
    the store's bound) rather than being lost. Only one node's sender delivers at a time
    (the store's lease); the others stand by. :meth:`wake` starts a look at the queue at once.
    """

    def __init__(self, store: TransitionStore, urls: Sequence[str], secret: str, *,
                 owner: str | None = None, post: Post = http_post,
                 batch_size: int = BATCH_SIZE) -> None:
        self.store = store
        self.urls = list(urls)
        self.secret = secret
        self.owner = owner or secrets.token_hex(8)
        self._post = post
        self._batch_size = batch_size
        self._wakeup = gevent.event.Event()
        self._faults = FaultLog(logger, "webhook delivery")
        self._backoff = Backoff(RETRY_FIRST, RETRY_CEILING)
        # The batch being delivered (its event ids) and the URLs that already took it.
        self._batch: tuple[str, ...] = ()
        self._delivered: set[str] = set()
        self.delivered_events = 0  # events every URL took, since start
        self.failed_posts = 0  # POSTs that failed (each retried later), since start
        self._running = False

    def wake(self) -> None:
        self._wakeup.set()

    def run(self) -> None:
        """Deliver until :meth:`stop`; never raises (failures are logged, then retried)."""
        self._running = True
        while self._running:
            try:
                busy = self.deliver_once()
            except Exception as exc:  # a bug, or the store away: log once, back off, go on
                expected = isinstance(exc, RealtimeError | DeliveryError)
                self._faults.failed(exc, unexpected=not expected)
                gevent.sleep(self._backoff.next_delay())
                continue
            if not busy:
                self._wakeup.wait(POLL_INTERVAL)
                self._wakeup.clear()

    def stop(self) -> None:
        self._running = False
        self.wake()

    def deliver_once(self) -> bool:
        """Deliver the queue's head batch; True when there was one and every URL took it.

        Raises :class:`DeliveryError` when a URL did not (the URLs that did are not sent it
        again) and :class:`~realtime.errors.RealtimeError` when the store is away.
        """
        events = self.store.claim(self.owner, LEASE, self._batch_size)
        if not events:
            return False
        ids = tuple(str(event["id"]) for event in events)
        if ids != self._batch:
            self._batch, self._delivered = ids, set()
        body = encode_body(events, int(time.time() * 1000))
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(body, self.secret),
                   "User-Agent": "realtime-webhooks"}
        failures: list[str] = []
        for url in self.urls:
            if url in self._delivered:
                continue
            try:
                self._post(url, body, headers)
            except DeliveryError as exc:
                self.failed_posts += 1
                failures.append(str(exc))
            else:
                self._delivered.add(url)
        if failures:
            raise DeliveryError("; ".join(failures))
        self.store.ack(self.owner, len(events))
        self.delivered_events += len(events)
        self._batch, self._delivered = (), set()
        self._faults.recovered()
        self._backoff.reset()
        return True

