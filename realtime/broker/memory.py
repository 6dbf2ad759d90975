"""The embedded broker for a single node: streams and fan-out in this process's memory."""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import logging
import random
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .base import (
    DEFAULT_IDEMPOTENCY_TTL,
    NO_STREAM,
    Broker,
    BrokerEventHandler,
    HistoryOptions,
    HistoryResult,
    Publication,
    StreamPosition,
)

if TYPE_CHECKING:
    import gevent

logger = logging.getLogger(__name__)

# How often (seconds) the sweeper looks for expired publications and streams: a publication
# stays in memory at most this long after its TTL (reads never return it once expired).
SWEEP_INTERVAL = 1.0
# Work one sweep call may do before it gives the other greenlets a turn: one unit per stream
# visited and per publication dropped. A thousand units take about a millisecond, so even a
# node whose 100k channels expire at once never stalls its clients for longer than that.
SWEEP_BUDGET = 1000
MAX_SWEEP_BACKOFF = 30.0


class _Stream:
    __slots__ = ("channel", "epoch", "offset", "entries", "meta_expires_at", "scheduled")

    def __init__(self, channel: str, epoch: str) -> None:
        self.channel = channel
        self.epoch = epoch
        self.offset = 0
        # (expires_at, publication), oldest first
        self.entries: collections.deque[tuple[float, Publication]] = collections.deque()
        self.meta_expires_at = 0.0
        # True while the broker's expiry heap holds this stream's one item
        self.scheduled = False

    def drop_expired(self, now: float) -> int:
        """Drop the expired publications at the front; return how many."""
        entries = self.entries
        dropped = 0
        while entries and entries[0][0] <= now:
            entries.popleft()
            dropped += 1
        return dropped


@dataclasses.dataclass(frozen=True, slots=True)
class MemoryUsage:
    """What a :class:`MemoryBroker` holds: streams and the publications kept in them."""

    streams: int
    publications: int
    idempotency_keys: int = 0


class MemoryBroker(Broker):
    """:class:`Broker` for one node: everything lives in this process and dies with it.

    Publishing delivers synchronously, in the publisher's greenlet, before ``publish`` returns;
    nothing yields, so every call is atomic under gevent, and no call ever blocks. A restart
    loses all streams, and new streams get new epochs, which is exactly what clients need to
    notice it. Never unavailable.

    Only ``publish`` creates a stream. A sweeper greenlet (spawned by :meth:`start`) drops
    expired publications and forgets streams whose position outlived ``meta_ttl``, on every
    channel, touched or not; see :meth:`sweep`.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, *,
                 sweep_interval: float = SWEEP_INTERVAL,
                 idempotency_ttl: float = DEFAULT_IDEMPOTENCY_TTL) -> None:
        self._clock = clock
        self._sweep_interval = sweep_interval
        self._idempotency_ttl = idempotency_ttl
        # (channel, idempotency key) -> (expires_at, position), oldest first: with one TTL for
        # every key, insertion order is expiry order, and the sweep drops from the front.
        self._idempotency: collections.OrderedDict[tuple[str, str],
                                                   tuple[float, StreamPosition]] = \
            collections.OrderedDict()
        self._handler: BrokerEventHandler | None = None
        # Streams in the order of their last publication. With one meta_ttl for every stream
        # (a node uses one) that is the order in which their positions expire, so the sweep
        # finds the streams to forget at the front, in O(1) each, without scanning the rest.
        self._streams: collections.OrderedDict[str, _Stream] = collections.OrderedDict()
        # A heap with one item per stream holding publications, due at (or before) the expiry
        # of the stream's oldest one: the sweep visits only the streams with something to drop,
        # in expiry order, whatever their TTLs. A per-stream item, not a per-publication one,
        # keeps the heap as small as the number of channels with history.
        self._expiries: list[tuple[float, int, _Stream]] = []
        self._tie_breaker = itertools.count()
        self._publication_count = 0
        self._subscribed: set[str] = set()
        self._sweeper: gevent.Greenlet | None = None

    def start(self, handler: BrokerEventHandler) -> None:
        # gevent is imported here, not at the top: the emitter imports this package (for the
        # Redis streams) in processes without gevent.
        import gevent

        self._handler = handler
        if self._sweeper is None:
            self._sweeper = gevent.spawn(self._sweep_forever)

    def close(self) -> None:
        self._handler = None
        self._subscribed.clear()
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.kill()

    def publish(self, channel: str, data: Any, *, user: str | None, history: HistoryOptions,
                idempotency_key: str | None = None) -> StreamPosition:
        now = self._clock()
        if idempotency_key is not None:
            seen = self._idempotency.get((channel, idempotency_key))
            if seen is not None and seen[0] > now:
                return seen[1]
        stream = self._live_stream(channel, now)
        if stream is None:
            stream = self._streams[channel] = _Stream(channel, secrets.token_urlsafe(6))
        else:
            self._streams.move_to_end(channel)
            self._publication_count -= stream.drop_expired(now)
        stream.meta_expires_at = now + history.meta_ttl
        stream.offset += 1
        publication = Publication(channel, stream.offset, data, user, stream.epoch)
        entries = stream.entries
        entries.append((now + history.ttl, publication))
        self._publication_count += 1
        while len(entries) > history.size:
            entries.popleft()
            self._publication_count -= 1
        if not stream.scheduled:
            self._schedule(stream)
        position = StreamPosition(stream.epoch, stream.offset)
        if idempotency_key is not None:
            remembered = (channel, idempotency_key)
            self._idempotency.pop(remembered, None)  # an expired one, not swept yet
            self._idempotency[remembered] = (now + self._idempotency_ttl, position)
        if self._handler is not None and channel in self._subscribed:
            self._handler.on_publications([publication])
        return position

    def publish_join(self, channel: str, user: str) -> None:
        if self._handler is not None and channel in self._subscribed:
            self._handler.on_join(channel, user)

    def publish_leave(self, channel: str, user: str) -> None:
        if self._handler is not None and channel in self._subscribed:
            self._handler.on_leave(channel, user)

    def publish_control(self, payload: bytes) -> None:
        if self._handler is not None:
            self._handler.on_control(payload)

    def subscribe(self, channel: str) -> None:
        self._subscribed.add(channel)

    def unsubscribe(self, channel: str) -> None:
        self._subscribed.discard(channel)

    def history(self, channel: str, *, since_offset: int | None = None,
                limit: int | None = None, options: HistoryOptions) -> HistoryResult:
        now = self._clock()
        stream = self._live_stream(channel, now)
        if stream is None:
            return HistoryResult([], NO_STREAM)  # and nothing stored for the channel
        self._publication_count -= stream.drop_expired(now)
        # Filtered too, not only trimmed at the front: publications made with different TTLs
        # need not expire in offset order.
        publications = [publication for expires_at, publication in stream.entries
                        if expires_at > now]
        if since_offset is not None:
            publications = [p for p in publications if p.offset > since_offset]
        elif limit is not None:
            publications = publications[-limit:] if limit > 0 else []
        return HistoryResult(publications, StreamPosition(stream.epoch, stream.offset))

    def usage(self) -> MemoryUsage:
        """How many streams, publications and idempotency keys this broker holds (O(1))."""
        return MemoryUsage(len(self._streams), self._publication_count, len(self._idempotency))

    def sweep(self, budget: int = SWEEP_BUDGET) -> bool:
        """Drop expired publications, and forget streams and idempotency keys past their TTL.

        Stops once it has done ``budget`` units of work (a stream visited, a publication
        dropped; one stream's visit is not split, so it may overrun by a history size) and
        returns True when it stopped for the budget with expired state left, so that the caller
        lets other greenlets run before calling again: the sweep is never a stall, however many
        channels expire at once. The sweeper greenlet calls it every ``sweep_interval``; tests
        call it directly, with the broker's clock driven.
        """
        now = self._clock()
        work = 0
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            if work >= budget:
                return True
            _, _, stream = heapq.heappop(expiries)
            stream.scheduled = False
            work += 1
            if self._streams.get(stream.channel) is not stream:
                continue  # forgotten (or forgotten and created anew) since it was scheduled
            dropped = stream.drop_expired(now)
            self._publication_count -= dropped
            work += dropped
            self._schedule(stream)
        idempotency = self._idempotency
        while idempotency:
            if work >= budget:
                return True
            remembered, (expires_at, _) = next(iter(idempotency.items()))
            if expires_at > now:
                break
            del idempotency[remembered]
            work += 1
        streams = self._streams
        while streams:
            channel, stream = next(iter(streams.items()))
            if stream.meta_expires_at > now:
                # With differing meta TTLs a stream further back may have expired already:
                # reads and publishes treat it as gone, and it is dropped when it reaches the
                # front.
                break
            if work >= budget:
                return True
            work += 1 + len(stream.entries)
            self._forget(channel, stream)
        return False

    def _sweep_forever(self) -> None:
        """Sweep every ``sweep_interval`` seconds, for as long as the broker runs."""
        import gevent

        delay = self._sweep_interval
        while True:
            try:
                while self.sweep():
                    gevent.sleep(0)  # a backlog: let clients' greenlets run between slices
                delay = self._sweep_interval
            except Exception:
                logger.exception("sweeping expired history failed; retrying")
                delay = min(delay * 2, MAX_SWEEP_BACKOFF) * random.uniform(0.8, 1.2)
            gevent.sleep(delay)

    def _live_stream(self, channel: str, now: float) -> _Stream | None:
        """The stream of ``channel``, or None when it has none (an expired one is forgotten).

        Only publishing extends a stream's life: readers alone do not keep an epoch alive.
        """
        stream = self._streams.get(channel)
        if stream is not None and stream.meta_expires_at <= now:
            self._forget(channel, stream)
            return None
        return stream

    def _forget(self, channel: str, stream: _Stream) -> None:
        # Its heap item, if any, stays until due and is skipped then (it holds no publications).
        del self._streams[channel]
        self._publication_count -= len(stream.entries)
        stream.entries.clear()

    def _schedule(self, stream: _Stream) -> None:
        """Give ``stream`` its heap item, due when its oldest publication expires."""
        if stream.entries:
            heapq.heappush(self._expiries,
                           (stream.entries[0][0], next(self._tie_breaker), stream))
            stream.scheduled = True
