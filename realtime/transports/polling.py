"""The long-polling transport: Engine.IO v4 payloads over GET (server→client) and POST.

A payload is records joined by ``\\x1e``: each record one Engine.IO packet, text as it is,
binary as ``b`` + base64. What the session writes waits in a queue (the outbound limit counts
it) until the client's pending GET takes it; a GET finds it at once or waits for it. POSTs are
decoded and handed to the session packet by packet; while the session's inbound backlog is full
a POST waits before handing over more, which holds the client back (it sends one POST at a time).

The HTTP side (query, origins, status codes) is :mod:`realtime.engineio`'s; this module only
knows payloads and the queue.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import TYPE_CHECKING

import gevent.event

from ..codecs import PacketError
from .base import POLLING
from .framing import CLOSE_BAD_DATA, CLOSE_TOO_BIG

if TYPE_CHECKING:
    from ..session import Session

RECORD_SEPARATOR = b"\x1e"
# python-engineio's client refuses a payload of more than 16 packets (and drops the connection);
# the rest of the queue leaves with the next GET, which clients send at once.
MAX_PACKETS_PER_RESPONSE = 16
NOOP = b"6"
CLOSE = b"1"


class PollingOverlap(Exception):
    """A client sent a second GET (or POST) while its first one was still being served."""


def encode_packets(packets: Sequence[str | bytes]) -> tuple[bytes, ...]:
    """Engine.IO packets as payload records."""
    return tuple(p.encode() if isinstance(p, str) else b"b" + base64.b64encode(p)
                 for p in packets)


def body_limit(max_message: int) -> int:
    """The largest POST body that can carry one message of ``max_message`` bytes.

    Binary packets travel base64-encoded (4/3 of their size, plus the ``b``), so a msgpack
    client's largest message needs more room than a JSON client's.
    """
    return (max_message + 2) // 3 * 4 + 1


def decode_payload(body: bytes, max_message: int | None = None) -> list[str | bytes]:
    """The Engine.IO packets of a POST body; :class:`PacketError` when it is not a payload.

    With ``max_message``, a packet larger than that (decoded) is refused as too big, the same
    limit WebSocket frames have.
    """
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise PacketError("payload is not UTF-8", CLOSE_BAD_DATA) from None
    packets: list[str | bytes] = []
    for record in text.split("\x1e"):
        if not record:
            raise PacketError("empty packet in payload")
        packet: str | bytes
        if record[0] == "b":
            try:
                packet = base64.b64decode(record[1:], validate=True)
            except (binascii.Error, ValueError):
                raise PacketError("binary packet is not base64") from None
        else:
            packet = record
        if max_message is not None and len(packet) > max_message:
            raise PacketError(f"packet of {len(packet)} bytes is over the limit of "
                              f"{max_message}", CLOSE_TOO_BIG)
        packets.append(packet)
    return packets


class PollingTransport:
    """One client's long-polling queue and the state of its GET and POST requests."""

    kind = POLLING
    name = "polling"

    __slots__ = ("session", "max_message", "queue", "queued", "waiter", "closed", "releasing",
                 "reading", "resumed", "posting", "close_after_final")

    def __init__(self, session: Session, max_message: int) -> None:
        self.session = session
        self.max_message = max_message
        self.queue: list[bytes] = []
        self.queued = 0  # bytes in ``queue``
        self.waiter: gevent.event.Event | None = None  # set to wake the pending GET
        self.closed = False
        # An upgrade is under way: GETs are answered at once (a noop when nothing waits), so
        # that the client can pause long-polling and finish the upgrade.
        self.releasing = False
        self.reading = True
        self.resumed: gevent.event.Event | None = None
        self.posting = False
        # The close packet waits until a GET has taken the final packets (see close()).
        self.close_after_final = False

    def __repr__(self) -> str:
        return f"<PollingTransport queued={self.queued}>"

    @property
    def buffered_bytes(self) -> int:
        return self.queued

    @property
    def finished(self) -> bool:
        """Closed, and everything it had to say (the close packet included) was taken."""
        return self.closed and not self.queue

    # -- what the session calls ---------------------------------------------------------------

    def write(self, wire: tuple[bytes, ...]) -> int:
        if self.closed:
            return 0
        self.queue.extend(wire)
        self.queued += sum(map(len, wire))
        if self.waiter is not None:
            self.waiter.set()
        return self.queued

    def pause_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.resumed = gevent.event.Event()

    def resume_reading(self) -> None:
        self.reading = True
        if self.resumed is not None:
            self.resumed.set()
            self.resumed = None

    def close(self, final: tuple[bytes, ...] = (), code: int = 0) -> None:
        """Queue ``final``, then the Engine.IO close packet, and take nothing more.

        The close packet leaves in a later response than ``final``: the official client hands
        decoded Socket.IO packets over on the next tick but closes at once on a close packet,
        so a DISCONNECT in the same response would arrive after the client already reported
        ``transport close`` (and reconnected). The reference server waits the same way.
        """
        if self.closed:
            return
        if final:
            self.write(final)
            self.close_after_final = True
        else:
            self.write((CLOSE,))
        self.closed = True
        self.resume_reading()  # a POST waiting to hand over packets must not wait forever

    def release(self) -> None:
        """An upgrade is being probed: answer the pending GET and later ones at once."""
        self.releasing = True
        if self.waiter is not None:
            self.waiter.set()

    def detach(self) -> list[bytes]:
        """The upgrade finished: stop, and give back the records no GET took (in order)."""
        records, self.queue, self.queued = self.queue, [], 0
        self.closed = True
        self.resume_reading()
        if self.waiter is not None:
            self.waiter.set()
        return records

    # -- what the HTTP side calls, in the request's greenlet ---------------------------------

    def poll(self, timeout: float) -> bytes:
        """Answer a GET: what is queued, waiting up to ``timeout`` for something (else a noop)."""
        if self.waiter is not None:
            raise PollingOverlap("a GET is already pending for this session")
        if not self.queue and not self.releasing and not self.closed:
            waiter = self.waiter = gevent.event.Event()
            try:
                waiter.wait(timeout)
            finally:
                self.waiter = None
        if not self.queue:
            return NOOP
        taken = self.queue[:MAX_PACKETS_PER_RESPONSE]
        del self.queue[:MAX_PACKETS_PER_RESPONSE]
        self.queued -= sum(map(len, taken))
        if self.close_after_final and not self.queue:
            self.close_after_final = False
            self.queue.append(CLOSE)
            self.queued += len(CLOSE)
        return RECORD_SEPARATOR.join(taken)

    def receive(self, body: bytes) -> None:
        """Answer a POST: hand its packets to the session, in order (may wait, see module)."""
        if self.posting:
            raise PollingOverlap("a POST is already being handled for this session")
        packets = decode_payload(body, self.max_message)
        self.posting = True
        try:
            for packet in packets:
                while not self.reading and not self.closed:
                    resumed = self.resumed
                    if resumed is not None:
                        resumed.wait()
                if self.closed:
                    return
                self.session.on_packet(packet)
        finally:
            self.posting = False
