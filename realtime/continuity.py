"""No silent gap: what this node delivered of each channel's stream, and how it stays whole.

The broker delivers each publication at most once (Redis pub/sub drops what it cannot send, and
everything published while a node's subscriber connection is down). :class:`Continuity` stands
between the broker and the hub and makes the node's subscribers see each channel's stream as the
broker's history holds it: consecutive offsets, no duplicates, nothing reordered, or else a
``reset`` event that says where the stream now stands.

For every channel with local subscribers it keeps the epoch and offset last delivered. A
publication that follows them goes straight to the hub (the fast path: a dictionary lookup and
two comparisons per publication, nothing per recipient). Anything else takes the slow path:

* an offset already delivered (same epoch) is a duplicate and is dropped;
* a gap, or another epoch, starts a *fill*: what arrives for the channel is held back while
  the missed publications are read from history; they are delivered, then what was held back.
  When history cannot fill the gap (a new epoch, a gap older than history, a stream that went
  back), subscribers get ``reset`` ``{channel, epoch, offset}`` and the stream continues from
  there;
* when the broker's delivery resumes after an outage (:meth:`Continuity.resume`), every channel
  is filled the same way, so a gap at the end of a stream (nothing published since) is found
  too. A stream whose last publication delivered here is no longer what history holds at that
  offset (Redis restarted from an append-only file that missed its last writes, then took new
  publications) is announced by ``reset`` rather than taken for the same stream.

A new subscriber's reply carries the stream's position read from history; the node may not have
delivered that far yet (publications in flight, or a fill under way). Its subscription is
activated (:meth:`Hub.activate`) only once the node delivered through that position, so it gets
neither a publication twice nor one out of order.

Fills run in a few greenlets of their own, never in the broker's reader, which must not block.
A fill that cannot read history (the broker is down) retries with back-off for
:data:`FILL_PATIENCE` seconds; then, rather than hold publications back any longer, it
announces a ``reset`` at the first held publication and delivers from there.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

import gevent

from .broker.base import HistoryResult, Publication, StreamPosition
from .errors import RealtimeError
from .faults import Backoff, FaultLog
from .hub import Hub, Subscriber

logger = logging.getLogger(__name__)

# Greenlets filling gaps at once: after an outage every channel of the node is checked, a few
# at a time, each one history read.
MAX_FILLERS = 16
# How long a fill keeps trying to read history before it gives up and announces a reset.
FILL_PATIENCE = 10.0
# How long a new subscriber may wait for the node to deliver through its reply's position
# before the node reads history to catch up (it is normally a publication in flight).
CATCH_UP_AFTER = 1.0

ReadHistory = Callable[[str, int], HistoryResult]
"""``read(channel, since_offset)``: the publications after ``since_offset`` that the broker's
history holds for ``channel``, and the stream's position (may raise RealtimeError)."""


class _Stream:
    """What the node delivered of one channel: the epoch and offset of its last publication."""

    __slots__ = ("channel", "epoch", "offset", "last", "held", "recheck", "waiting",
                 "catch_up_scheduled")

    def __init__(self, channel: str, epoch: str, offset: int,
                 last: Publication | None = None) -> None:
        self.channel = channel
        self.epoch = epoch
        self.offset = offset
        self.last = last  # the publication at ``offset`` when it was delivered here
        # Not None while a fill is due or under way: the publications that arrived meanwhile.
        self.held: list[Publication] | None = None
        self.recheck = False  # the broker resumed during the fill: fill again after it
        # Subscribers whose reply told them a position the node has not delivered through yet.
        self.waiting: list[tuple[Subscriber, StreamPosition]] = []
        self.catch_up_scheduled = False

    def can_activate(self, position: StreamPosition) -> bool:
        """Whether a subscriber told ``position`` may be activated now: the node delivered
        through it. Another epoch does not hold it back: :meth:`Hub.activate` sends it every
        publication of another epoch, and the reset that announced it, if any."""
        return self.held is None and (
            self.offset >= position.offset or not _same_epoch(position.epoch, self.epoch))


def _same_epoch(a: str, b: str) -> bool:
    """Whether epochs ``a`` and ``b`` may name the same stream.

    ``""`` is "no stream yet" on a position, and "unknown" on a publication from a node of an
    earlier release (which did not send epochs): it matches any epoch.
    """
    return a == b or not a or not b


class Continuity:
    """Keeps each channel's delivery on this node continuous (see the module's docstring).

    Runs in the broker's reader greenlet (``deliver``) and in the node's greenlets
    (``subscribed``, ``forget``); nothing here blocks except inside its own fill greenlets.
    """

    def __init__(self, hub: Hub, read_history: ReadHistory, *,
                 fill_patience: float = FILL_PATIENCE,
                 catch_up_after: float = CATCH_UP_AFTER) -> None:
        self._hub = hub
        self._read_history = read_history
        self._fill_patience = fill_patience
        self._catch_up_after = catch_up_after
        self._streams: dict[str, _Stream] = {}
        self._to_fill: collections.deque[_Stream] = collections.deque()
        self._fillers: set[gevent.Greenlet] = set()
        self._waiting: set[_Stream] = set()  # streams with subscribers waiting to be activated
        self._fill_faults = FaultLog(logger, "reading history to fill gaps in channel streams")
        self.gaps_filled = 0  # fills that delivered missed publications
        self.resets = 0  # reset events announced (per channel, not per subscriber)

    # -- what the broker delivers ------------------------------------------------------------

    def deliver(self, publications: list[Publication]) -> None:
        """Hand ``publications`` (in per-channel offset order) to the hub, keeping each
        channel's stream continuous."""
        if len(publications) == 1:  # the common case: one publication that follows the last
            publication = publications[0]
            stream = self._streams.get(publication.channel)
            if stream is not None and stream.held is None and \
                    publication.offset == stream.offset + 1 and publication.epoch == stream.epoch:
                stream.offset = publication.offset
                stream.last = publication
                self._hub.deliver_publications(publications)
                if self._waiting:
                    self._activate_due()
                return
        deliverable = [p for p in publications if self._accept(p)]
        if deliverable:
            self._hub.deliver_publications(deliverable)
        if self._waiting:
            self._activate_due()

    def _accept(self, publication: Publication) -> bool:
        """Whether ``publication`` goes to the hub now; else it was held back or dropped."""
        stream = self._streams.get(publication.channel)
        if stream is None:
            if not self._hub.has_subscribers(publication.channel):
                return False
            # The first publication since the node subscribed: the subscribe path reads the
            # position after the broker confirmed, so nothing before this one is missing.
            self._streams[publication.channel] = _Stream(
                publication.channel, publication.epoch, publication.offset, publication)
            return True
        if stream.held is not None:
            stream.held.append(publication)
            return False
        if _same_epoch(publication.epoch, stream.epoch):
            if publication.offset == stream.offset + 1:
                stream.offset = publication.offset
                stream.epoch = publication.epoch or stream.epoch
                stream.last = publication
                return True
            if publication.offset <= stream.offset:
                return False  # delivered already (a fill read it from history)
        # A gap, or a stream of another epoch: fill from history before anything else.
        stream.held = [publication]
        self._queue_fill(stream)
        return False

    # -- subscriptions -----------------------------------------------------------------------

    def subscribed(self, session: Subscriber, channel: str, position: StreamPosition) -> None:
        """``session``'s subscribe reply went out with ``position``: activate its subscription
        (send what the hub held back for it) once the node delivered through ``position``."""
        if not self._hub.has_subscribers(channel):
            return
        stream = self._streams.get(channel)
        if stream is None:
            # Nothing arrived since the node subscribed: ``position`` is where it stands.
            stream = self._streams[channel] = _Stream(channel, position.epoch, position.offset)
        if stream.can_activate(position):
            self._hub.activate(session, channel, position)
            return
        stream.waiting.append((session, position))
        self._waiting.add(stream)
        self._schedule_catch_up(stream)

    def forget(self, channel: str) -> None:
        """The node has no subscriber of ``channel`` left (a fill under way is abandoned)."""
        stream = self._streams.pop(channel, None)
        if stream is not None:
            self._waiting.discard(stream)

    def resume(self) -> None:
        """The broker's delivery was interrupted and is back: whatever was published meanwhile
        was not delivered. Check every channel against history."""
        for stream in self._streams.values():
            if stream.held is None:
                stream.held = []
                self._queue_fill(stream)
            else:
                stream.recheck = True  # its fill may have read history before the outage

    def close(self) -> None:
        self._streams.clear()  # catch-up timers still due find nothing to do
        self._waiting.clear()
        self._to_fill.clear()
        gevent.killall(list(self._fillers), block=False)
        self._fillers.clear()

    @property
    def channel_count(self) -> int:
        return len(self._streams)

    def position(self, channel: str) -> StreamPosition | None:
        """Where the node's delivery of ``channel`` stands (None: no local subscriber)."""
        stream = self._streams.get(channel)
        return None if stream is None else StreamPosition(stream.epoch, stream.offset)

    def _activate_due(self) -> None:
        for stream in list(self._waiting):
            self._settle(stream)

    def _settle(self, stream: _Stream) -> None:
        """Activate the waiting subscribers of ``stream`` that the node caught up with."""
        if not stream.waiting or stream.held is not None:
            return
        still_waiting = []
        for session, position in stream.waiting:
            if stream.can_activate(position):
                self._hub.activate(session, stream.channel, position)
            else:
                still_waiting.append((session, position))
        stream.waiting = still_waiting
        if still_waiting:
            self._schedule_catch_up(stream)
        else:
            self._waiting.discard(stream)

    def _activate_all(self, stream: _Stream) -> None:
        """Activate every waiting subscriber of ``stream`` with what it holds (before a reset,
        after which their positions no longer matter)."""
        waiting, stream.waiting = stream.waiting, []
        self._waiting.discard(stream)
        for session, position in waiting:
            self._hub.activate(session, stream.channel, position)

    def _schedule_catch_up(self, stream: _Stream) -> None:
        if not stream.catch_up_scheduled and stream.held is None:
            stream.catch_up_scheduled = True
            gevent.spawn_later(self._catch_up_after, self._catch_up, stream)

    def _catch_up(self, stream: _Stream) -> None:
        """A subscriber still waits after :data:`CATCH_UP_AFTER`: the node may have missed the
        end of the stream (nothing published since to reveal it): read history."""
        stream.catch_up_scheduled = False
        if self._streams.get(stream.channel) is stream and stream.waiting and \
                stream.held is None:
            stream.held = []
            self._queue_fill(stream)

    # -- fills -------------------------------------------------------------------------------

    def _queue_fill(self, stream: _Stream) -> None:
        self._to_fill.append(stream)
        if len(self._fillers) < MAX_FILLERS:
            filler = gevent.spawn(self._fill_queued)
            self._fillers.add(filler)
            filler.link(self._fillers.discard)

    def _fill_queued(self) -> None:
        while self._to_fill:
            stream = self._to_fill.popleft()
            if self._streams.get(stream.channel) is not stream:
                continue  # unsubscribed meanwhile
            try:
                self._fill(stream)
            except Exception:  # a bug: the stream must not stay held back forever
                logger.exception("filling a gap in %r failed", stream.channel)
                self._give_up(stream)

    def _fill(self, stream: _Stream) -> None:
        """Read what ``stream`` missed, deliver it (or a reset), then what was held back."""
        while True:
            stream.recheck = False
            # With the last delivered publication known, read from it, to check it is still
            # what history holds there.
            since = stream.offset - 1 if stream.last is not None else stream.offset
            result = self._read(stream, since)
            if self._streams.get(stream.channel) is not stream:
                return
            if result is None:
                self._give_up(stream)
                return
            self._catch_up_from(stream, result)
            if not stream.recheck:
                break
        held, stream.held = stream.held or [], None
        deliverable = [p for p in held if self._accept(p)]  # a new gap starts the next fill
        if deliverable:
            self._hub.deliver_publications(deliverable)
        self._settle(stream)

    def _read(self, stream: _Stream, since: int) -> HistoryResult | None:
        """History of ``stream`` after ``since``, retried for a while; None if it never came."""
        deadline = time.monotonic() + self._fill_patience
        backoff = Backoff(0.05, 1.0)
        while True:
            try:
                result = self._read_history(stream.channel, max(0, since))
            except RealtimeError as exc:
                self._fill_faults.failed(exc)
                if time.monotonic() >= deadline or self._streams.get(stream.channel) is not stream:
                    return None
                gevent.sleep(backoff.next_delay())
                continue
            self._fill_faults.recovered()
            return result

    def _catch_up_from(self, stream: _Stream, result: HistoryResult) -> None:
        """Bring ``stream`` to where ``result`` (its history past the node's offset, or past
        the one before when the last delivered publication is known) says it stands."""
        position, publications = result.position, result.publications
        same_epoch = _same_epoch(position.epoch, stream.epoch)
        last = stream.last
        if last is not None and publications and publications[0].offset == stream.offset:
            first = publications[0]
            if same_epoch and first.data == last.data and first.user == last.user:
                publications = publications[1:]
            else:
                # Same offset, other content: the stream went back (Redis restarted from an
                # append-only file without its last writes) and took new publications since.
                self._reset(stream, position, self._read_all(stream))
                return
        missed = position.offset - stream.offset
        if same_epoch and missed >= 0 and len(publications) == missed and (
                not publications or publications[0].offset == stream.offset + 1):
            if publications:
                self.gaps_filled += 1
                self._hub.deliver_publications(publications)
                stream.last = publications[-1]
            stream.epoch = position.epoch or stream.epoch
            stream.offset = position.offset
            return
        if not same_epoch:
            self._reset(stream, position, self._read_all(stream))  # a new stream
        elif missed < 0:
            self._reset(stream, position, [])  # the stream went back: nothing new in it
        else:  # the gap is older than history: deliver what it still holds
            self._reset(stream, position, [p for p in publications if p.offset > stream.offset])

    def _read_all(self, stream: _Stream) -> list[Publication]:
        """Every publication history holds for ``stream`` (after a reset, for a new start)."""
        try:
            return self._read_history(stream.channel, 0).publications
        except RealtimeError:
            return []

    def _reset(self, stream: _Stream, position: StreamPosition,
               publications: list[Publication]) -> None:
        """Announce that ``stream`` broke and now stands where ``position`` says, then deliver
        ``publications`` (the newest part of it that history holds)."""
        start = publications[0].offset - 1 if publications else position.offset
        self._activate_all(stream)
        self.resets += 1
        logger.info("the stream of %r broke (delivered %s/%d, history at %s/%d): reset to %d",
                    stream.channel, stream.epoch, stream.offset, position.epoch,
                    position.offset, start)
        self._hub.deliver_reset(stream.channel, position.epoch, start)
        if publications:
            self._hub.deliver_publications(publications)
        stream.epoch = position.epoch
        stream.offset = max(position.offset, publications[-1].offset if publications else 0)
        stream.last = publications[-1] if publications and \
            publications[-1].offset == stream.offset else None

    def _give_up(self, stream: _Stream) -> None:
        """History cannot be read: announce a reset at the first held publication (if any)
        and go on from there, rather than hold the channel back any longer."""
        held, stream.held = stream.held or [], None
        self._activate_all(stream)
        if not held:
            return  # nothing arrived: the next publication shows whether anything is missing
        first = held[0]
        self.resets += 1
        logger.info("the stream of %r broke and history cannot be read: reset to %d",
                    stream.channel, first.offset - 1)
        self._hub.deliver_reset(stream.channel, first.epoch, first.offset - 1)
        stream.epoch, stream.offset, stream.last = first.epoch, first.offset - 1, None
        deliverable = [p for p in held if self._accept(p)]
        if deliverable:
            self._hub.deliver_publications(deliverable)
