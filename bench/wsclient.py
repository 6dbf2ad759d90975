"""A minimal, cheap Socket.IO v5 / Engine.IO v4 client over a raw WebSocket, on an asyncio loop.

No library: the HTTP Upgrade handshake, masked client frames, unmasked server frames (7, 16 and
64-bit lengths, fragments, ping/pong/close), Engine.IO open/ping/close and Socket.IO
connect/event/ack. The hot path, a ``42["message",{...}]`` frame carrying a benchmark payload,
costs one regex search over the frame in place (no slicing, no JSON decoding) to extract the
publisher id, the sequence number and the send timestamp, then a few integer operations to count
it (see :class:`Recorder`). Everything else takes the slow path through ``json.loads``.

Many WebSocket frames in one read and frames split across reads are both handled; each frame
carries one Engine.IO packet, as Engine.IO v4 over WebSocket specifies.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from .stats import BUCKETS, LINEAR, SUB, SUB_BITS, new_histogram, sparse

logger = logging.getLogger(__name__)

# Linux: let connect() pick the source port per destination after bind((address, 0)), so that
# one source address serves the whole ephemeral range towards each server port.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
MESSAGE_PREFIX = b'42["message",'
# The benchmark payload {"p": publisher, "s": sequence, "t": time_ns, "x": padding}, in the
# key order every server keeps (JSON encoders of Python and JavaScript keep insertion order).
PAYLOAD_RE = re.compile(rb'"p":\s*(\d+),\s*"s":\s*(\d+),\s*"t":\s*(\d+)')
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
# TCP states (tcp_states.h) of a socket whose peer closed: CLOSE_WAIT, or CLOSE after a reset.
TCP_CLOSE, TCP_CLOSE_WAIT = 7, 8
# Linux SO_TIMESTAMPNS (= SCM_TIMESTAMPNS): the kernel's receive time of what recvmsg returns,
# as a struct timespec of CLOCK_REALTIME. Python's socket module has no name for it.
SO_TIMESTAMPNS = 35
TIMESPEC = struct.Struct("qq")
ANCILLARY_SIZE = socket.CMSG_SPACE(TIMESPEC.size)
READ_SIZE = 65536


class ProtocolError(Exception):
    """The server said something this client does not accept."""


def payload(publisher: int, seq: int, size: int = 100) -> dict[str, Any]:
    """A benchmark message of about ``size`` bytes of compact JSON, stamped now.

    ``t`` is CLOCK_REALTIME in ns: the clock of the kernel's receive timestamps.
    """
    data = {"p": publisher, "s": seq, "t": time.time_ns(), "x": ""}
    base = len(json.dumps(data, separators=(",", ":")))
    data["x"] = "x" * max(0, size - base)
    return data


def encode_frame(data: bytes, opcode: int = OP_TEXT) -> bytes:
    """A masked, final client frame (RFC 6455 section 5.2) carrying ``data``."""
    length = len(data)
    if length < 126:
        header = bytes((0x80 | opcode, 0x80 | length))
    elif length < 1 << 16:
        header = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + length.to_bytes(8, "big")
    mask = os.urandom(4)
    if not length:
        return header + mask
    repeated = (mask * (length // 4 + 1))[:length]
    masked = (int.from_bytes(data, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        length, "big")
    return header + mask + masked


class Recorder:
    """Counts the benchmark messages one worker process receives, per publisher id.

    For each publisher id: deliveries, duplicates (a sequence number seen before by the same
    connection), reordered (arrived after a later sequence number of the same publisher on the
    same connection), a latency histogram (receive time - the ``t`` stamp) and the maximum, and
    the first and last arrival times. Lost messages are what the publisher sent minus what
    arrived, worked out by the orchestrator.
    """

    def __init__(self) -> None:
        # publisher id -> [deliveries, duplicates, reordered, histogram, max_us, first_ns, last_ns]
        self.publishers: dict[int, list[Any]] = {}
        self.other_events = 0

    def aggregate(self, publisher: int) -> list[Any]:
        agg = self.publishers.get(publisher)
        if agg is None:
            agg = self.publishers[publisher] = [0, 0, 0, new_histogram(), 0, 0, 0]
        return agg

    def report(self, publishers: list[int] | None = None) -> dict[int, dict[str, Any]]:
        """Totals per publisher id (all of them when ``publishers`` is None)."""
        result = {}
        for pub, agg in self.publishers.items():
            if publishers is not None and pub not in publishers:
                continue
            result[pub] = {"deliveries": agg[0], "duplicated": agg[1], "reordered": agg[2],
                           "histogram": sparse(agg[3]), "max_us": agg[4],
                           "first_ns": agg[5], "last_ns": agg[6]}
        return result

    def forget(self, publishers: list[int]) -> None:
        for pub in publishers:
            self.publishers.pop(pub, None)


class SocketIOClient:
    """One Socket.IO connection on a non-blocking socket, read through ``loop.add_reader``.

    ``await ready`` resolves once the Socket.IO CONNECT is acknowledged; ``closed`` once the
    connection is gone. Benchmark messages are counted into ``recorder`` with the kernel's
    receive timestamp of the read that brought them (SO_TIMESTAMPNS): latencies then leave out
    however long this process took to get to the socket. Other events go to ``on_event``.
    """

    def __init__(self, sock: socket.socket, host_header: str, path: str,
                 auth: dict[str, Any] | None, recorder: Recorder | None,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.host_header = host_header
        self.path = path
        self.auth = auth
        self.recorder = recorder
        self.loop = loop
        self.ready: asyncio.Future[str] = loop.create_future()
        self.closed: asyncio.Future[str] = loop.create_future()
        self.sid: str | None = None
        self.ws_key = base64.b64encode(os.urandom(16)).decode()
        self._head: bytes | None = b""
        self._buf = b""
        self._out = bytearray()
        self._reading = False
        self._fragments: list[bytes] = []
        self._fragment_op = 0
        self._acks: dict[int, asyncio.Future[Any]] = {}
        self._next_ack = 0
        # publisher id -> [highest seq, bitmap of seqs seen, recorder aggregate]
        self._seen: dict[int, list[Any]] = {}
        self.close_reason: str | None = None
        self.on_event: Callable[[str, Any], None] | None = None
        self.paused = False
        # The load generator's number for this client ({i} in its user and channel names).
        self.number: int | None = None

    def start(self) -> None:
        """Send the Upgrade request and start reading (the socket is connected)."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self._resume()
        request = (f"GET {self.path} HTTP/1.1\r\nHost: {self.host_header}\r\n"
                   "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {self.ws_key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self._write(request.encode())

    # -- reading -----------------------------------------------------------------------------

    def _resume(self) -> None:
        if not self._reading and not self.closed.done():
            self.loop.add_reader(self.fd, self._on_readable)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            self.loop.remove_reader(self.fd)
            self._reading = False

    def _on_readable(self) -> None:
        try:
            data, ancillary, _, _ = self.sock.recvmsg(READ_SIZE, ANCILLARY_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(f"connection lost: {exc}")
            return
        if not data:
            self._lost(self.close_reason or "closed by server")
            return
        if self._head is not None:
            self._handshake(data)
            return
        stamp = 0
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
                seconds, nanoseconds = TIMESPEC.unpack_from(value)
                stamp = seconds * 1_000_000_000 + nanoseconds
        self._frames(data, stamp or time.time_ns())

    def _handshake(self, data: bytes) -> None:
        # The HTTP response to the Upgrade request; then frames, perhaps in the same read.
        head = self._head + data  # type: ignore[operator]
        end = head.find(b"\r\n\r\n")
        if end < 0:
            self._head = head
            if len(head) > 65536:
                self._fail("handshake response too long")
            return
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            self._fail(f"handshake refused: {status.decode(errors='replace')}")
            return
        self._head = None
        rest = head[end + 4:]
        if rest:
            self._frames(rest, time.time_ns())

    def _lost(self, reason: str) -> None:
        """The connection is gone: fail whatever waits on it and close the socket."""
        self.close_reason = self.close_reason or reason
        self._stop_reading()
        if self._out:
            self.loop.remove_writer(self.fd)
            self._out.clear()
        self.sock.close()
        if not self.ready.done():
            self.ready.set_exception(ProtocolError(self.close_reason))
        if not self.closed.done():
            self.closed.set_result(self.close_reason)
        for future in self._acks.values():
            if not future.done():
                future.set_exception(ProtocolError(self.close_reason))
        self._acks.clear()

    # -- frames ------------------------------------------------------------------------------

    def _frames(self, data: bytes, now: int) -> None:
        if self._buf:
            data = self._buf + data
            self._buf = b""
        size = len(data)
        pos = 0
        recording = self.recorder is not None
        search = PAYLOAD_RE.search
        while size - pos >= 2:
            first = data[pos]
            length = data[pos + 1]
            if length & 0x80:
                self._fail("the server masked a frame")
                return
            header = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                header = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2:pos + 10], "big")
                header = 10
            start = pos + header
            end = start + length
            if end > size:
                break
            pos = end
            if first == 0x81 and recording and data.startswith(MESSAGE_PREFIX, start):
                match = search(data, start, end)
                if match is not None:
                    pub, seq, sent_ns = match.groups()
                    self._count(int(pub), int(seq), int(sent_ns), now)
                    continue
            self._frame(first, data[start:end])
        if pos < size:
            self._buf = data[pos:]

    def _count(self, pub: int, seq: int, sent_ns: int, now: int) -> None:
        """Count one benchmark message (the hot path: keep it lean)."""
        seen = self._seen.get(pub)
        if seen is None:
            seen = self._seen[pub] = [-1, bytearray(1024), self.recorder.aggregate(pub)]  # type: ignore[union-attr]
        last, bitmap, agg = seen
        agg[0] += 1
        index = seq >> 3
        if index >= len(bitmap):
            bitmap.extend(bytes(index - len(bitmap) + 1024))
        bit = 1 << (seq & 7)
        if bitmap[index] & bit:
            agg[1] += 1
            return
        bitmap[index] |= bit
        if seq < last:
            agg[2] += 1
        else:
            seen[0] = seq
        us = (now - sent_ns) // 1000
        if us > agg[4]:
            agg[4] = us
        if us < LINEAR:
            agg[3][us if us > 0 else 0] += 1
        else:
            shift = us.bit_length() - SUB_BITS - 1
            agg[3][min(BUCKETS - 1, LINEAR + (shift - 1) * SUB + (us >> shift) - SUB)] += 1
        if not agg[5]:
            agg[5] = now
        agg[6] = now

    def _frame(self, first: int, body: bytes) -> None:
        opcode = first & 0x0F
        final = first & 0x80
        if opcode == OP_CONT:
            self._fragments.append(body)
            if final:
                body = b"".join(self._fragments)
                self._fragments = []
                opcode = self._fragment_op
                if opcode == OP_TEXT:
                    self._packet(body)
            return
        if opcode in (OP_TEXT, OP_BINARY):
            if not final:
                self._fragment_op = opcode
                self._fragments = [body]
            elif opcode == OP_TEXT:
                self._packet(body)
            return
        if opcode == OP_PING:
            self._write(encode_frame(body, OP_PONG))
        elif opcode == OP_CLOSE:
            code = int.from_bytes(body[:2], "big") if len(body) >= 2 else 1005
            self.close_reason = f"close frame {code} {body[2:].decode(errors='replace')}".strip()
            self._write(encode_frame(body[:2], OP_CLOSE))
            self._shutdown()

    # -- Engine.IO / Socket.IO ---------------------------------------------------------------

    def _packet(self, body: bytes) -> None:
        if not body:
            return
        kind = body[0]
        if kind == 0x34:  # "4" message: a Socket.IO packet
            self._socketio(body[1:])
        elif kind == 0x32:  # "2" ping
            self.send_text(b"3" + body[1:])
        elif kind == 0x30:  # "0" open
            auth = b"" if self.auth is None else json.dumps(self.auth).encode()
            self.send_text(b"40" + auth)
        elif kind == 0x31:  # "1" close
            self.close_reason = "engine.io close"
            self._shutdown()

    def _socketio(self, body: bytes) -> None:
        kind = body[:1]
        rest = body[1:]
        if rest.startswith(b"/"):  # a namespace other than "/" would be "/name,": not ours
            rest = rest.split(b",", 1)[1] if b"," in rest else b""
        if kind == b"0":  # CONNECT acknowledged
            info = json.loads(rest) if rest else {}
            self.sid = info.get("sid")
            if not self.ready.done():
                self.ready.set_result(self.sid or "")
        elif kind == b"4":  # CONNECT_ERROR
            self._fail(f"connect refused: {rest.decode(errors='replace')}")
        elif kind in (b"2", b"3"):  # EVENT / ACK
            digits = 0
            while digits < len(rest) and 0x30 <= rest[digits] <= 0x39:
                digits += 1
            ack_id = int(rest[:digits]) if digits else None
            args = json.loads(rest[digits:])
            if kind == b"3":
                future = self._acks.pop(ack_id, None) if ack_id is not None else None
                if future is not None and not future.done():
                    future.set_result(args[0] if args else None)
            else:
                if self.recorder is not None:
                    self.recorder.other_events += 1
                if self.on_event is not None and args:
                    self.on_event(args[0], args[1] if len(args) > 1 else None)
        elif kind == b"1":  # DISCONNECT from the server
            self.close_reason = "socket.io disconnect"
            self._shutdown()

    # -- sending -----------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.closed.done():
            return
        if self._out:  # earlier bytes are still waiting for the socket
            self._out += data
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._lost(f"connection lost: {exc}")
            return
        if sent < len(data):
            self._out += data[sent:]
            self.loop.add_writer(self.fd, self._on_writable)

    def _on_writable(self) -> None:
        try:
            sent = self.sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(f"connection lost: {exc}")
            return
        del self._out[:sent]
        if not self._out:
            self.loop.remove_writer(self.fd)

    def send_text(self, text: bytes) -> None:
        """Send one Engine.IO packet in a text frame."""
        self._write(encode_frame(text))

    def emit(self, event: str, data: Any, ack: bool = True) -> asyncio.Future[Any] | None:
        """Emit ``event`` with one argument; with ``ack``, a future of the server's answer."""
        if not ack:
            self.send_text(b"42" + json.dumps([event, data], separators=(",", ":")).encode())
            return None
        self._next_ack += 1
        ack_id = self._next_ack
        future: asyncio.Future[Any] = self.loop.create_future()
        if self.closed.done():
            future.set_exception(ProtocolError(self.close_reason or "closed"))
            return future
        self._acks[ack_id] = future
        self.send_text(b"42%d" % ack_id
                       + json.dumps([event, data], separators=(",", ":")).encode())
        return future

    @property
    def pending_acks(self) -> int:
        return len(self._acks)

    def _shutdown(self) -> None:
        # No more sending; keep reading until the server closes its side (EOF -> _lost).
        if self.closed.done():
            return
        if not self._out:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
        self._resume()

    def close(self) -> None:
        """Socket.IO disconnect and a WebSocket close frame; ``closed`` resolves at the EOF."""
        if self.closed.done():
            return
        self.close_reason = self.close_reason or "closed by client"
        self.paused = False
        self._write(encode_frame(b"41"))
        self._write(encode_frame((1000).to_bytes(2, "big"), OP_CLOSE))
        self._shutdown()

    def abort(self) -> None:
        """Drop the TCP connection at once (RST)."""
        if self.closed.done():
            return
        self.close_reason = self.close_reason or "aborted by client"
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._lost(self.close_reason)

    def pause(self) -> None:
        """Stop reading: the client turns into a slow consumer."""
        if not self.closed.done():
            self._stop_reading()
            self.paused = True

    def resume(self) -> None:
        """Read again after :meth:`pause`."""
        self.paused = False
        self._resume()

    def tcp_state(self) -> int | None:
        """The kernel's TCP state of the socket (CLOSE_WAIT: the server closed its side)."""
        if self.closed.done():
            return None
        try:
            return self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
        except OSError:
            return None

    def _fail(self, reason: str) -> None:
        self.close_reason = reason
        if not self.ready.done():
            self.ready.set_exception(ProtocolError(reason))
        self.abort()


async def connect(loop: asyncio.AbstractEventLoop, host: str, port: int, *, source: str | None,
                  auth: dict[str, Any] | None, recorder: Recorder | None,
                  timeout: float = 15.0, rcvbuf: int | None = None) -> SocketIOClient:
    """Open a Socket.IO connection to ``host:port`` from ``source``; wait for the CONNECT ack.

    ``rcvbuf`` shrinks the socket's receive buffer (a slow consumer fills up sooner).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client = None
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (host, port))
            client = SocketIOClient(sock, f"{host}:{port}", "/socket.io/?EIO=4&transport=websocket",
                                    auth, recorder, loop)
            client.start()
            await client.ready
    except BaseException:
        if client is not None:
            client.abort()
        else:
            sock.close()
        raise
    return client
