"""The embedded broker for a single node: streams and fan-out in this process's memory."""

from __future__ import annotations

import collections
import secrets
import time
from collections.abc import Callable
from typing import Any

from .base import (
    Broker,
    BrokerEventHandler,
    HistoryOptions,
    HistoryResult,
    Publication,
    StreamPosition,
)

SWEEP_INTERVAL = 60.0


class _Stream:
    __slots__ = ("epoch", "offset", "entries", "meta_expires_at")

    def __init__(self, epoch: str) -> None:
        self.epoch = epoch
        self.offset = 0
        # (expires_at, publication), oldest first
        self.entries: collections.deque[tuple[float, Publication]] = collections.deque()
        self.meta_expires_at = 0.0

    def drop_expired(self, now: float) -> None:
        entries = self.entries
        while entries and entries[0][0] <= now:
            entries.popleft()


class MemoryBroker(Broker):
    """:class:`Broker` for one node: everything lives in this process and dies with it.

    Publishing delivers synchronously, in the publisher's greenlet, before ``publish`` returns;
    nothing yields, so every call is atomic under gevent. A restart loses all streams, and new
    streams get new epochs, which is exactly what clients need to notice it. Never unavailable.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._handler: BrokerEventHandler | None = None
        self._streams: dict[str, _Stream] = {}
        self._subscribed: set[str] = set()
        self._next_sweep = clock() + SWEEP_INTERVAL

    def start(self, handler: BrokerEventHandler) -> None:
        self._handler = handler

    def close(self) -> None:
        self._handler = None
        self._subscribed.clear()

    def publish(self, channel: str, data: Any, *, user: str | None,
                history: HistoryOptions) -> StreamPosition:
        now = self._clock()
        stream = self._stream(channel, now, history)
        stream.meta_expires_at = now + history.meta_ttl
        stream.offset += 1
        publication = Publication(channel, stream.offset, data, user)
        stream.entries.append((now + history.ttl, publication))
        while len(stream.entries) > history.size:
            stream.entries.popleft()
        position = StreamPosition(stream.epoch, stream.offset)
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
        stream = self._stream(channel, self._clock(), options)
        publications = [publication for _, publication in stream.entries]
        if since_offset is not None:
            publications = [p for p in publications if p.offset > since_offset]
        elif limit is not None:
            publications = publications[-limit:] if limit > 0 else []
        return HistoryResult(publications, StreamPosition(stream.epoch, stream.offset))

    def _stream(self, channel: str, now: float, options: HistoryOptions) -> _Stream:
        """The live stream of ``channel``, trimmed to ``now``, created when missing or expired.

        Only publishing extends a stream's life: readers alone do not keep an epoch alive.
        """
        if now >= self._next_sweep:
            self._sweep(now)
        stream = self._streams.get(channel)
        if stream is None or stream.meta_expires_at <= now:
            stream = self._streams[channel] = _Stream(secrets.token_urlsafe(6))
            stream.meta_expires_at = now + options.meta_ttl
        else:
            stream.drop_expired(now)
        return stream

    def _sweep(self, now: float) -> None:
        """Forget streams nobody touched for their meta TTL, so idle channels cost nothing."""
        self._next_sweep = now + SWEEP_INTERVAL
        expired = [name for name, s in self._streams.items() if s.meta_expires_at <= now]
        for name in expired:
            del self._streams[name]
