"""The Redis broker: history in Redis, fan-out through Redis pub/sub, one node among many."""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import gevent
import gevent.event
import gevent.lock
import hiredis
import redis

from ..errors import RealtimeError, Unavailable
from ..faults import Backoff, FaultLog
from ..redis_support import (
    CONTROL_CHANNEL,
    PUBSUB_CHANNEL_PREFIX,
    pubsub_channel,
    redacted_url,
    translate_redis_errors,
)
from ..redis_wire import RECV_SIZE, CommandPipe, open_connection, pack_command
from ..sockets import recv_when_readable, sendall
from .base import (
    DEFAULT_IDEMPOTENCY_TTL,
    Broker,
    BrokerEventHandler,
    BrokerMetrics,
    HistoryOptions,
    HistoryResult,
    Publication,
    PublishRequest,
    StreamPosition,
)
from .redis_streams import (
    MessageDecoder,
    RedisStreams,
    WireFormatError,
    encode_presence_message,
)

logger = logging.getLogger(__name__)

PING_INTERVAL = 5.0
# Reconnect attempts while Redis is away: every half second at most, so that a node is
# resubscribed (and fills its subscribers' gaps) within a second of Redis answering again.
FIRST_BACKOFF = 0.05
MAX_BACKOFF = 0.5
CONTROL_KEY = CONTROL_CHANNEL.encode()


class RedisBroker(Broker):
    """:class:`Broker` over Redis, for any number of nodes sharing one Redis.

    * Publishing runs one Lua script (see :mod:`.redis_streams`): the append to history, the
      offset and the PUBLISH are one atomic step. Commands of all greenlets share one
      pipelined connection (:class:`~realtime.redis_wire.CommandPipe`), so publishes that
      arrive together cost Redis one read and the node one write.
    * Each node holds one pub/sub connection subscribed to the control channel and to exactly
      the channels it has local subscribers for, so a node receives one Redis message per
      publication on those channels and nothing else. One greenlet reads it and calls the
      handler in the order Redis delivers, which is offset order per channel; everything one
      ``recv`` brought is handed over as one batch.
    * ``subscribe`` returns once Redis has confirmed the subscription: every publication
      after that reaches this node.
    * Redis down: calls raise :class:`~realtime.errors.Unavailable` within the socket timeout;
      the reader reconnects with jittered back-off (at most :data:`MAX_BACKOFF` between
      attempts) and resubscribes everything in one command. Publications made while the
      subscriber connection was down are not delivered live: once the resubscription is
      confirmed, and before any message that follows it, the handler's
      ``on_delivery_resumed`` is called so that the node compares what it delivered with the
      streams' history. The outage is logged once when it starts and once when it ends.
    """

    def __init__(self, url: str, *, timeout: float = 5.0,
                 idempotency_ttl: float = DEFAULT_IDEMPOTENCY_TTL) -> None:
        self._url = url
        self._timeout = timeout
        self._pipe = CommandPipe(url, timeout=timeout)
        self._streams = RedisStreams(self._pipe, idempotency_ttl=idempotency_ttl)
        self._handler: BrokerEventHandler | None = None
        # pub/sub channel -> set once Redis confirmed it on the current connection
        self._wanted: dict[bytes, gevent.event.Event] = {}
        # SUBSCRIBE commands sent on the current connection and not answered yet, per channel.
        # Counted apart from _wanted: after subscribe, unsubscribe and subscribe again, the
        # first answer must not pass for the second one.
        self._unanswered: collections.Counter[bytes] = collections.Counter()
        self._subscriber: Any = None  # the pub/sub socket
        self._connected = gevent.event.Event()
        self._send_lock = gevent.lock.Semaphore()
        self._reader: gevent.Greenlet | None = None
        self._running = False
        self._outage = FaultLog(logger, f"the redis pub/sub connection to {redacted_url(url)}")
        # True from a reconnection until Redis confirmed its subscriptions
        self._resuming = False
        self._ever_connected = False
        self._metrics: BrokerMetrics | None = None
        self._decoder = MessageDecoder()  # the reader's

    # -- life cycle --------------------------------------------------------------------------

    def start(self, handler: BrokerEventHandler) -> None:
        self._handler = handler
        self._running = True
        self._reader = gevent.spawn(self._read_forever)
        # A node starts without Redis too (the reader logs the outage and keeps trying); it
        # is not ready (is_healthy) until connected.
        self._connected.wait(self._timeout)

    def instrument(self, metrics: BrokerMetrics) -> None:
        self._metrics = metrics
        self._pipe.on_round_trip = metrics.observe_round_trip

    def close(self) -> None:
        self._running = False
        if self._reader is not None:
            self._reader.kill()
        self._close_subscriber()
        self._pipe.close()

    def is_healthy(self) -> bool:
        return self._running and self._connected.is_set()

    # -- publishing --------------------------------------------------------------------------

    def publish(self, channel: str, data: Any, *, user: str | None, history: HistoryOptions,
                idempotency_key: str | None = None) -> StreamPosition:
        return self._streams.publish(channel, data, user, history, idempotency_key)

    def publish_many(self, requests: Sequence[PublishRequest], *,
                     history: HistoryOptions) -> list[StreamPosition | RealtimeError]:
        return self._streams.publish_many(requests, history)

    def publish_join(self, channel: str, user: str) -> None:
        self._publish_raw(pubsub_channel(channel), encode_presence_message("j", user))

    def publish_leave(self, channel: str, user: str) -> None:
        self._publish_raw(pubsub_channel(channel), encode_presence_message("l", user))

    def publish_control(self, payload: bytes) -> None:
        self._publish_raw(CONTROL_CHANNEL, payload)

    def _publish_raw(self, redis_channel: str, payload: bytes) -> None:
        with translate_redis_errors("publish"):
            self._pipe.call("PUBLISH", redis_channel, payload)

    def history(self, channel: str, *, since_offset: int | None = None,
                limit: int | None = None, options: HistoryOptions) -> HistoryResult:
        return self._streams.history(channel, since_offset=since_offset, limit=limit,
                                     options=options)

    # -- subscriptions -----------------------------------------------------------------------

    def subscribe(self, channel: str) -> None:
        key = pubsub_channel(channel).encode()
        confirmed = self._wanted.get(key)
        if confirmed is None:
            if not self._connected.is_set():
                raise Unavailable("not connected to redis")
            confirmed = self._wanted[key] = gevent.event.Event()
            self._unanswered[key] += 1
            self._send("SUBSCRIBE", key)
        if not confirmed.wait(self._timeout):
            raise Unavailable("redis did not confirm the subscription in time")

    def unsubscribe(self, channel: str) -> None:
        key = pubsub_channel(channel).encode()
        if self._wanted.pop(key, None) is not None and self._connected.is_set():
            # On failure the reader reconnects and resubscribes only what is still wanted.
            with contextlib.suppress(Unavailable):
                self._send("UNSUBSCRIBE", key)

    def _send(self, command: str, *channels: bytes) -> None:
        with self._send_lock, translate_redis_errors(command.lower()):
            subscriber = self._subscriber
            if subscriber is None:
                raise redis.ConnectionError("no subscriber connection")
            sendall(subscriber, pack_command((command, *channels)))

    # -- the reader --------------------------------------------------------------------------

    def _read_forever(self) -> None:
        """Read the subscriber connection; on any failure reconnect with back-off, forever."""
        backoff = Backoff(FIRST_BACKOFF, MAX_BACKOFF)
        while self._running:
            try:
                self._connect()
                self._read()
            except Exception as exc:
                if not self._running:
                    return
                expected = isinstance(exc, redis.ConnectionError | redis.TimeoutError | OSError
                                      | Unavailable)
                self._outage.failed(exc, unexpected=not expected)
            if self._connected.is_set():
                backoff.reset()  # the connection worked for a while: retry soon
            self._connected.clear()
            self._close_subscriber()
            gevent.sleep(backoff.next_delay())

    def _connect(self) -> None:
        """Open a subscriber connection and subscribe to control and every wanted channel."""
        subscriber = open_connection(self._url, self._timeout)
        channels = [CONTROL_KEY, *self._wanted]
        self._unanswered = collections.Counter(list(self._wanted))  # one SUBSCRIBE each
        for confirmed in self._wanted.values():
            confirmed.clear()
        with self._send_lock:
            self._subscriber = subscriber
            subscriber.sendall(pack_command(("SUBSCRIBE", *channels)))
        self._resuming = self._ever_connected
        logger.debug("subscribing to redis at %s (%d channels)", redacted_url(self._url),
                     len(channels))

    def _read(self) -> None:
        subscriber = self._subscriber
        subscriber.settimeout(PING_INTERVAL)
        reader = hiredis.Reader()
        ping_sent = False
        while self._running:
            try:
                data = recv_when_readable(subscriber, RECV_SIZE)
            except TimeoutError:
                if ping_sent:
                    raise redis.TimeoutError(
                        "no answer to PING on the subscriber connection") from None
                self._send("PING")
                ping_sent = True
                continue
            if not data:
                raise redis.ConnectionError("redis closed the subscriber connection")
            ping_sent = False
            reader.feed(data)
            # Everything this recv brought leaves as one batch, so publications that piled
            # up while the last batch was fanned out leave together (see on_publications).
            batch: list[Publication] = []
            while (response := reader.gets()) is not False:
                if isinstance(response, list) and len(response) == 3:
                    self._dispatch(response[0], response[1], response[2], batch)
            if batch:
                self._handler.on_publications(batch)

    def _dispatch(self, kind: bytes, redis_channel: bytes, payload: Any,
                  batch: list[Publication]) -> None:
        if kind == b"message":
            if redis_channel == CONTROL_KEY:
                self._handler.on_control(payload)
            else:
                self._dispatch_channel_message(redis_channel, payload, batch)
        elif kind == b"subscribe":
            if redis_channel == CONTROL_KEY:
                self._on_connected()
                return
            unanswered = self._unanswered[redis_channel] - 1
            if unanswered > 0:
                self._unanswered[redis_channel] = unanswered
                return
            self._unanswered.pop(redis_channel, None)
            confirmed = self._wanted.get(redis_channel)
            if confirmed is not None:
                confirmed.set()

    def _on_connected(self) -> None:
        """Redis confirmed the control channel, the first of the connection's SUBSCRIBE.

        Redis runs one SUBSCRIBE command at once, so every channel of it is subscribed by now,
        and every message read after this confirmation was published after it.
        """
        self._connected.set()
        self._ever_connected = True
        self._outage.recovered()
        if self._resuming:
            self._resuming = False
            if self._metrics is not None:
                self._metrics.broker_reconnected()
            self._handler.on_delivery_resumed()

    def _dispatch_channel_message(self, redis_channel: bytes, blob: bytes,
                                  batch: list[Publication]) -> None:
        if redis_channel not in self._wanted:
            return  # still arriving after an UNSUBSCRIBE
        channel = redis_channel[len(PUBSUB_CHANNEL_PREFIX):].decode()
        try:
            kind, value = self._decoder.decode(channel, blob)
        except WireFormatError as exc:
            logger.warning("dropped a message on %s that does not decode: %s", channel, exc)
            return
        if kind == "p":
            batch.append(value)
            return
        if batch:  # keep joins and leaves in order with the publications before them
            self._handler.on_publications(batch[:])
            batch.clear()
        if kind == "j":
            self._handler.on_join(channel, value)
        else:
            self._handler.on_leave(channel, value)

    def _close_subscriber(self) -> None:
        subscriber, self._subscriber = self._subscriber, None
        if subscriber is not None:
            subscriber.close()

