"""What every transport offers a session, and what it calls back.

A transport moves one session's bytes and nothing else: no codec, no limits, no auth. The
session (:class:`realtime.session.Session`) decides what to write and when to give up on a
client; the transport reports how much it is holding back so that the session can enforce the
outbound limit in one place for every transport.

Engine.IO packets cross this boundary as ``str`` (a text packet, type character first, e.g.
``"42[...]"`` or ``"3"``) or ``bytes`` (a binary ``message`` packet). A transport kind's
``encode_packets`` turns a list of them into its *wire* form, which ``write`` takes: ready-made
WebSocket frames, or long-polling payload records.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..session import Session

# Transport kinds: the index of a kind's wire form in per-form caches (realtime.frames).
WEBSOCKET = 0
POLLING = 1


class Transport(Protocol):
    """One session's connection to its client.

    * ``write(wire)`` hands bytes to the client now, or buffers them in order behind what is
      already waiting, and returns how many bytes are buffered. It never blocks, never
      switches greenlets and never raises; after ``close`` it drops what it is given.
    * ``pause_reading``/``resume_reading`` stop and restart taking the client's packets (the
      session's inbound backlog is full), which pushes back on the client.
    * ``close(final, code)`` writes ``final`` (a wire, may be empty) if it can, then ends the
      connection; ``code`` is the WebSocket close code (long-polling ends with an Engine.IO
      ``close`` packet whatever it is). Idempotent.

    What it receives goes to ``session.on_packet``; when the connection is lost it calls
    ``session.on_transport_closed(self, reason)`` once (not after its own ``close``).
    """

    kind: int
    name: str
    session: Session

    def write(self, wire: Any) -> int: ...

    @property
    def buffered_bytes(self) -> int:
        """Bytes written that the client has not taken yet (read by the metrics)."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self, final: Any, code: int) -> None: ...
