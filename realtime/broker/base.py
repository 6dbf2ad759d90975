"""The broker: publications, history streams and fan-out between nodes.

The broker never sees a client. It moves publications between the nodes that have local
subscribers for a channel, keeps each channel's recent history as an ordered stream, and carries
the cluster's join/leave and control messages. The node-local hub turns what the broker delivers
into frames for connections.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..errors import RealtimeError


@dataclasses.dataclass(frozen=True, slots=True)
class StreamPosition:
    """A place in a channel's history stream.

    ``epoch`` names the stream: it changes whenever the stream's history is lost (a restart of a
    broker without persistence, an evicted or expired stream), so an ``offset`` from another epoch
    means nothing. ``offset`` is the offset of the newest publication (0 for an empty stream).

    The epoch ``""`` (:data:`NO_STREAM`, always with offset 0 from a broker) means "no stream
    yet": nothing was ever published on the channel, or its stream was forgotten. Reads do not
    create streams; the first publication does, with a fresh epoch and offset 1.
    """

    epoch: str
    offset: int


NO_STREAM = StreamPosition("", 0)
"""The position of a channel that has no stream: nothing published yet, or forgotten."""


@dataclasses.dataclass(frozen=True, slots=True)
class Publication:
    """One message published on a channel, with its place in the channel's stream (``epoch``
    and ``offset``: a node that receives it can tell a gap from a new stream)."""

    channel: str
    offset: int
    data: Any
    user: str | None = None
    epoch: str = ""

    def to_event(self) -> dict[str, Any]:
        """The payload of the ``message`` event that clients receive."""
        return {"channel": self.channel, "offset": self.offset, "data": self.data,
                "user": self.user}


@dataclasses.dataclass(slots=True)
class PublishRequest:
    """One publication to make, whoever asks (a client, the HTTP API, the emitter).

    ``user`` is the publishing client's user (None: a backend). ``idempotency_key`` (optional,
    1 to 64 characters) makes retries safe: a second request with the same key on the same
    channel within the broker's idempotency TTL publishes nothing and gets the first one's
    position.
    """

    channel: str
    data: Any
    user: str | None = None
    idempotency_key: str | None = None


DEFAULT_IDEMPOTENCY_TTL = 300.0
"""Seconds a broker remembers an idempotency key (``--idempotency-ttl``)."""


@dataclasses.dataclass(frozen=True, slots=True)
class HistoryOptions:
    """How much of a channel's stream to keep: the last ``size`` publications for ``ttl`` s.

    The stream's position (epoch and offset) outlives the publications by ``meta_ttl`` seconds so
    that a client returning after a quiet spell learns it missed messages instead of seeing
    offsets restart in a new epoch.
    """

    size: int
    ttl: float
    meta_ttl: float = 86400.0


def publish_by_history(
        requests: Sequence[PublishRequest], history_of: Callable[[PublishRequest], HistoryOptions],
        publish_many: Callable[[list[PublishRequest], HistoryOptions],
                               list[StreamPosition | RealtimeError]],
) -> list[StreamPosition | RealtimeError]:
    """Make ``requests`` in order, the ones of each history setting together.

    ``history_of(request)`` checks a request (raising the :class:`RealtimeError` that refuses
    it) and answers how much of its channel's stream is kept; each setting's requests go to
    ``publish_many(requests, history)`` at once (one round trip on Redis). A channel belongs to
    one namespace, so its requests keep their order. Each request gets its position or the
    error that refused it, in order.
    """
    results: list[StreamPosition | RealtimeError | None] = [None] * len(requests)
    groups: dict[HistoryOptions, tuple[list[PublishRequest], list[int]]] = {}
    for slot, request in enumerate(requests):
        try:
            history = history_of(request)
        except RealtimeError as exc:
            results[slot] = exc
            continue
        accepted, slots = groups.setdefault(history, ([], []))
        accepted.append(request)
        slots.append(slot)
    for history, (accepted, slots) in groups.items():
        for slot, result in zip(slots, publish_many(accepted, history), strict=True):
            results[slot] = result
    return results  # type: ignore[return-value]  # every slot is filled by now


@dataclasses.dataclass(frozen=True, slots=True)
class HistoryResult:
    """Publications read from a stream, oldest first, and the stream's current position."""

    publications: list[Publication]
    position: StreamPosition


class BrokerEventHandler(Protocol):
    """What a broker calls when something arrives for this node.

    Calls for one channel come in publication order from a single greenlet; a handler must not
    block (it only hands frames to connections) and must not raise.
    """

    def on_publications(self, publications: list[Publication]) -> None:
        """Publications that arrived together, in arrival (so per-channel offset) order.

        A broker hands over what it received in one read, so that the hub can write several
        publications to a subscriber in one send when they pile up.
        """
        ...

    def on_delivery_resumed(self) -> None:
        """Delivery was interrupted (the connection to the backing store was lost) and is
        back: whatever was published meanwhile was not delivered. Called once the broker is
        resubscribed, before anything published after that is handed over."""
        ...

    def on_join(self, channel: str, user: str) -> None: ...

    def on_leave(self, channel: str, user: str) -> None: ...

    def on_control(self, payload: bytes) -> None: ...


class BrokerMetrics(Protocol):
    """What a broker reports to the node's metrics (:class:`realtime.metrics.Metrics`)."""

    def observe_round_trip(self, seconds: float) -> None:
        """One round trip to the backing store took ``seconds``."""
        ...

    def broker_reconnected(self) -> None:
        """Delivery reconnected to the backing store after losing it."""
        ...


class Broker(abc.ABC):
    """Fan-out, history and control messages shared by every node of a deployment.

    Contract, common to every implementation:

    * **Atomic publish.** ``publish`` appends to the channel's stream, assigns the next offset
      (previous + 1, gap-free across the whole deployment) and hands the publication to the
      fan-out as one step: a publication is in history before any node can deliver it, and every
      node sees a channel's publications in offset order.
    * **Delivery.** At most once per node that is subscribed to the channel when the
      publication is made, in offset order per channel, each publication carrying its epoch and
      offset. A node never receives channels it did not subscribe to. Nothing is retried: when
      delivery was interrupted, the handler's ``on_delivery_resumed`` says so, and the node
      fills what it missed from history (:mod:`realtime.continuity`).
    * **Subscribe.** When ``subscribe`` returns, every later publication on the channel reaches
      the handler; it is idempotent per channel (a repeated call returns once the subscription
      is confirmed), and so is ``unsubscribe``.
    * **Outages.** A call that cannot reach the backing store raises
      :class:`~realtime.errors.Unavailable` (``temporary``); it never blocks longer than the
      backend's timeout. Background delivery reconnects and resubscribes by itself.
    * **Idempotency.** A publication with an ``idempotency_key`` is made at most once per
      channel and key within the broker's idempotency TTL, across every node and emitter
      sharing the backing store: a repeat returns the first one's position and publishes
      nothing. The check and the publication are one atomic step.
    * **Control** messages go to every node, the sender included, at most once, unordered with
      respect to publications.
    * **Bounded state.** Only publishing creates a stream; reads never store anything. Expired
      publications, and streams whose position outlived ``meta_ttl``, are dropped by time, also
      on channels nobody touches again.
    """

    @abc.abstractmethod
    def start(self, handler: BrokerEventHandler) -> None:
        """Begin delivering to ``handler``. Called once, before anything else."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop delivering and release connections. Idempotent."""

    def instrument(self, metrics: BrokerMetrics) -> None:  # noqa: B027 - optional hook
        """Report round trips and reconnections to ``metrics`` from now on (brokers with
        no backing store have none to report: the default does nothing)."""

    @abc.abstractmethod
    def publish(self, channel: str, data: Any, *, user: str | None, history: HistoryOptions,
                idempotency_key: str | None = None) -> StreamPosition:
        """Append ``data`` to ``channel``'s stream and fan it out; return its position.

        With an ``idempotency_key`` already used on ``channel`` within the idempotency TTL:
        publish nothing and return the position that publication got.
        """

    def publish_many(self, requests: Sequence[PublishRequest], *,
                     history: HistoryOptions) -> list[StreamPosition | RealtimeError]:
        """Make ``requests`` in order, as ``publish`` one after the other.

        Each request gets its position or the error that refused it; one request's failure
        does not stop the others (though an outage fails all that follow it). Offsets within a
        channel follow the requests' order. Brokers with a remote store send the requests
        together, so a client that publishes faster than the round trip to the store is not
        held to one publication per round trip; this default publishes them one at a time.
        """
        results: list[StreamPosition | RealtimeError] = []
        for request in requests:
            try:
                results.append(self.publish(request.channel, request.data, user=request.user,
                                            history=history,
                                            idempotency_key=request.idempotency_key))
            except RealtimeError as exc:
                results.append(exc)
        return results

    @abc.abstractmethod
    def publish_join(self, channel: str, user: str) -> None:
        """Tell every node subscribed to ``channel`` that ``user`` joined it (not kept)."""

    @abc.abstractmethod
    def publish_leave(self, channel: str, user: str) -> None:
        """Tell every node subscribed to ``channel`` that ``user`` left it (not kept)."""

    @abc.abstractmethod
    def publish_control(self, payload: bytes) -> None:
        """Send an opaque control message to every node, this one included."""

    @abc.abstractmethod
    def subscribe(self, channel: str) -> None:
        """Start receiving ``channel``'s publications, joins and leaves on this node."""

    @abc.abstractmethod
    def unsubscribe(self, channel: str) -> None:
        """Stop receiving ``channel`` on this node."""

    @abc.abstractmethod
    def history(self, channel: str, *, since_offset: int | None = None,
                limit: int | None = None, options: HistoryOptions) -> HistoryResult:
        """Read ``channel``'s stream.

        With ``since_offset``, the publications after it (all that are kept); otherwise the last
        ``limit`` ones (all kept when ``limit`` is None, none when it is 0). Never a publication
        past the TTL it was published with. Always the current position.

        A read stores nothing: for a channel without a stream (never published on, or forgotten
        after ``meta_ttl``) it returns no publications at position :data:`NO_STREAM` and leaves
        no trace in the backend, so that reading (or subscribing to) any number of channels
        nobody publishes to costs nothing once the call is over.
        """

    def is_healthy(self) -> bool:
        """True while the broker can serve calls (used by ``/readyz``)."""
        return True
