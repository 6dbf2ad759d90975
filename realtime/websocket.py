"""Direct WebSocket connections (Engine.IO v4, Socket.IO v5) without a greenlet per connection.

Clients that open a WebSocket straight away (``transports: ['websocket']``, the bench, most
backends) are served here instead of by python-engineio:

* **No parked greenlet per connection.** After the HTTP upgrade the socket is taken from the
  WSGI handler, whose greenlet ends; reads are an event-loop watcher callback. A greenlet is
  spawned only while the connection has client events to handle, one at a time, in order.
* **Writes without a greenlet switch.** :meth:`WebSocketConnection.send` writes the frame that
  the hub encoded once for every recipient straight to the non-blocking socket. Only when the
  kernel would block do bytes wait in a per-connection buffer, which a write watcher flushes in
  ONE ``send`` however many frames it holds. Past ``max_outbound_buffer`` bytes the client is
  too slow and is disconnected with reason ``slow``.
* **Limits while reading.** A frame longer than the message limit is refused from its header,
  before its payload is read.

Long-polling clients, and clients that upgrade from long-polling, stay on python-engineio
(:mod:`realtime.transport`).
"""

from __future__ import annotations

import _socket
import base64
import collections
import contextlib
import hashlib
import json
import logging
import secrets
import struct
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import gevent

from .config import Config
from .frames import (
    EIO_CLOSE,
    EIO_MESSAGE,
    EIO_OPEN,
    EIO_PING,
    EIO_PONG,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    SIO_ACK,
    SIO_BINARY_EVENT,
    SIO_CONNECT,
    SIO_CONNECT_ERROR,
    SIO_DISCONNECT,
    SIO_EVENT,
    EncodedEvent,
    EventBatch,
    dumps,
    new_session_id,
    socketio_text_frame,
    websocket_frame,
)
from .hub import Connection
from .protocol import ClientProtocol, user_id_from_auth

logger = logging.getLogger(__name__)

WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
RECV_SIZE = 65536
# Client events waiting for their connection's handler greenlet; past this the connection
# stops being read until the backlog halves (TCP then pushes back on the client).
MAX_INBOX = 256
# publish events queued back to back that go to the broker together (see _handle_publishes)
MAX_PUBLISH_RUN = 64
# Close codes (RFC 6455 section 7.4.1)
CLOSE_NORMAL, CLOSE_PROTOCOL_ERROR, CLOSE_BAD_DATA, CLOSE_TOO_BIG = 1000, 1002, 1007, 1009

_READ, _WRITE = 1, 2


class ProtocolError(ValueError):
    """The peer broke the WebSocket, Engine.IO or Socket.IO protocol; carries a close code."""

    def __init__(self, message: str, close_code: int = CLOSE_PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.close_code = close_code


def unmask(payload: bytes | bytearray, mask: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte client ``mask`` (one big-integer XOR, in C)."""
    length = len(payload)
    if not length:
        return b""
    key = (mask * (length // 4 + 1))[:length]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        length, "little")


def parse_socketio_packet(text: str) -> tuple[str, str, int, int | None, Any]:
    """Split a Socket.IO v5 packet into (type, namespace, attachments, ack id, data)."""
    if not text or text[0] not in "0123456":
        raise ProtocolError(f"unknown Socket.IO packet type {text[:1]!r}")
    kind, index, end = text[0], 1, len(text)
    attachments = 0
    if kind in (SIO_BINARY_EVENT, "6"):
        dash = text.find("-", index)
        if dash == -1 or not text[index:dash].isdigit():
            raise ProtocolError("binary packet without an attachment count")
        attachments, index = int(text[index:dash]), dash + 1
    namespace = "/"
    if index < end and text[index] == "/":
        comma = text.find(",", index)
        namespace, index = (text[index:], end) if comma == -1 else (text[index:comma], comma + 1)
    digits = index
    while digits < end and text[digits].isdigit():
        digits += 1
    ack_id = int(text[index:digits]) if digits > index else None
    try:
        data = json.loads(text[digits:]) if digits < end else None
    except ValueError as exc:
        raise ProtocolError(f"packet data is not JSON: {exc}") from None
    return kind, namespace, attachments, ack_id, data


class WebSocketTransport:
    """Accepts direct WebSocket connections and keeps their heartbeats."""

    def __init__(self, protocol: ClientProtocol, config: Config) -> None:
        self.protocol = protocol
        self.node = protocol.node
        self.node_id = config.node_id
        self.ping_interval = config.ping_interval
        self.ping_timeout = config.ping_timeout
        self.max_message = config.max_message_size + config.frame_overhead
        self.max_outbound_buffer = config.max_outbound_buffer
        self.allowed_origins = config.cors_allowed_origins
        self._open_packet_fields = {
            "upgrades": [], "pingInterval": int(self.ping_interval * 1000),
            "pingTimeout": int(self.ping_timeout * 1000), "maxPayload": self.max_message}
        self.connections: set[WebSocketConnection] = set()
        # greenlets making the node forget closed connections (see WebSocketConnection._shut)
        self.cleanups: set[gevent.Greenlet] = set()
        # due second -> connections to check then (pings, pong deadlines, connect timeouts)
        self._wheel: dict[int, list[WebSocketConnection]] = collections.defaultdict(list)
        self._ticker: gevent.Greenlet | None = None

    def start(self) -> None:
        self._ticker = gevent.spawn(self._tick_forever)

    def stop(self, timeout: float = 5.0) -> None:
        """Close every connection and wait (up to ``timeout``) until the node forgot them.

        The node's presence and subscriptions are cleaned up before its broker closes, instead
        of failing half-way on closed Redis connections.
        """
        if self._ticker is not None:
            self._ticker.kill()
        for connection in list(self.connections):
            connection.close("server shutting down")
        gevent.joinall(list(self.cleanups), timeout=timeout)

    def forget_later(self, connection: WebSocketConnection) -> None:
        """Make the node forget ``connection`` from a greenlet of its own."""
        cleanup = gevent.spawn(self.node.disconnect, connection)
        self.cleanups.add(cleanup)
        cleanup.link(self.cleanups.discard)

    # -- the handshake, in the WSGI handler's greenlet --------------------------------------

    @staticmethod
    def wants(environ: dict) -> bool:
        """True for a direct WebSocket request for a new Engine.IO v4 session."""
        if environ.get("HTTP_UPGRADE", "").lower() != "websocket":
            return False
        if environ.get("PATH_INFO", "").rstrip("/") != "/socket.io":
            return False
        query = parse_qs(environ.get("QUERY_STRING", ""))
        return (query.get("transport") == ["websocket"] and query.get("EIO") == ["4"]
                and "sid" not in query)

    def accept(self, handler: Any) -> None:
        """Answer the upgrade on ``handler``'s socket and take the socket over."""
        environ = handler.environ
        key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "")
        problem = None
        if environ.get("HTTP_SEC_WEBSOCKET_VERSION") != "13" or len(key) != 24:
            problem = "Bad WebSocket handshake"
        elif not self._origin_allowed(environ):
            problem = "Not an accepted origin."
        try:
            if problem is not None:
                body = json.dumps({"error": {"code": "bad_request", "message": problem}})
                handler.socket.sendall(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(body), body.encode()))
                return
            accept_key = base64.b64encode(hashlib.sha1(key.encode() + WEBSOCKET_GUID).digest())
            eio_sid = new_session_id(self.node_id)
            open_packet = EIO_OPEN + dumps({"sid": eio_sid, **self._open_packet_fields})
            handler.socket.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept_key + b"\r\n\r\n"
                + websocket_frame(open_packet.encode()))
        except OSError:
            return  # the client left during the handshake
        # Take the descriptor: the handler's socket object forgets it (and does not close
        # it), so the handler and its greenlet end while the connection lives on.
        sock = _socket.socket(fileno=handler.socket.detach())
        handler.socket = None
        sock.setblocking(False)
        # Frames leave as soon as they are written: the fan-out already batches what piled
        # up, and Nagle's algorithm would hold the next frame until the client's delayed ACK
        # (up to 40 ms on Linux).
        sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        connection = WebSocketConnection(self, sock, eio_sid)
        self.connections.add(connection)
        self.schedule(connection, time.monotonic() + self.ping_interval)
        connection.start_reading()

    def _origin_allowed(self, environ: dict) -> bool:
        origin = environ.get("HTTP_ORIGIN")
        allowed = self.allowed_origins
        if not origin or allowed == "*":
            return True
        if allowed is None:  # same origin, as python-engineio checks it
            host = environ.get("HTTP_X_FORWARDED_HOST") or environ.get("HTTP_HOST", "")
            return origin in (f"http://{host}", f"https://{host}")
        return origin in allowed

    # -- heartbeats --------------------------------------------------------------------------

    def schedule(self, connection: WebSocketConnection, when: float) -> None:
        self._wheel[int(when) + 1].append(connection)

    def _tick_forever(self) -> None:
        while True:
            try:
                self._tick(time.monotonic())
            except Exception:
                logger.exception("heartbeat tick failed")
            gevent.sleep(1.0)

    def _tick(self, now: float) -> None:
        for second in [s for s in self._wheel if s <= now]:
            for connection in self._wheel.pop(second):
                if not connection.closed:
                    connection.check_heartbeat(now)


class WebSocketConnection(Connection):
    """One direct WebSocket client; see the module docstring for how it reads and writes."""

    __slots__ = (
        "transport", "sock", "eio_sid", "reader", "writer", "inbuf", "fragments",
        "fragment_opcode", "outbuf", "outsize", "inbox", "worker", "deferred",
        "awaiting_pong", "next_ping", "opened_at", "binary_attachments", "binary_ack_id",
        "closed")

    def __init__(self, transport: WebSocketTransport, sock: Any, eio_sid: str) -> None:
        super().__init__("", "")  # client id and user come with the Socket.IO CONNECT
        self.transport = transport
        self.sock = sock
        self.eio_sid = eio_sid
        self.reader: Any = None
        self.writer: Any = None
        self.inbuf = bytearray()
        self.fragments: list[bytes] | None = None
        self.fragment_opcode = OP_TEXT
        self.outbuf: list[bytes] | None = None
        self.outsize = 0
        self.inbox: collections.deque | None = None
        self.worker: gevent.Greenlet | None = None
        self.deferred: list[Callable[[], None]] | None = None
        self.awaiting_pong = False
        self.opened_at = time.monotonic()
        self.next_ping = self.opened_at + transport.ping_interval
        self.binary_attachments = 0
        self.binary_ack_id: int | None = None
        self.closed = False

    # -- writing (the hot path) --------------------------------------------------------------

    def send(self, frame: EncodedEvent | EventBatch) -> None:
        # The fan-out calls this once per recipient: the common case (nothing queued, the
        # kernel takes the frame) is one C call with no further Python frames.
        data = frame.websocket_frame
        if self.outbuf is not None or self.closed:
            self.write(data)
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.close("transport error")
            return
        if sent != len(data):
            self._queue_rest(data, sent)

    def write(self, data: bytes) -> None:
        """Write ``data`` now if the socket takes it, else queue it behind what waits."""
        if self.closed:
            return
        outbuf = self.outbuf
        if outbuf is not None:
            outbuf.append(data)
            self.outsize += len(data)
            if self.outsize > self.transport.max_outbound_buffer:
                self.close("slow")
            return
        sent = self._send_now(data)
        if sent is not None and sent < len(data):
            self._queue_rest(data, sent)

    def _queue_rest(self, data: bytes, sent: int) -> None:
        """Keep what the kernel did not take and flush it when the socket is writable."""
        self.outbuf = [data[sent:]]
        self.outsize = len(data) - sent
        if self.writer is None:
            self.writer = gevent.get_hub().loop.io(self.sock.fileno(), _WRITE)
        self.writer.start(self._flush)

    def _flush(self) -> None:
        """Write watcher: send everything queued in one call (coalescing the frames)."""
        if self.closed or self.outbuf is None:
            return
        data = b"".join(self.outbuf) if len(self.outbuf) > 1 else self.outbuf[0]
        sent = self._send_now(data)
        if sent is None:
            return
        if sent == len(data):
            self.outbuf, self.outsize = None, 0
            self.writer.stop()
        else:
            self.outbuf, self.outsize = [data[sent:]], len(data) - sent

    def _send_now(self, data: bytes) -> int | None:
        """Send what the socket takes now: bytes sent, or None once the connection broke."""
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0
        except OSError:
            self.close("transport error")
            return None

    def write_packet(self, socketio_packet: str) -> None:
        self.write(socketio_text_frame(socketio_packet))

    # -- reading ----------------------------------------------------------------------------

    def start_reading(self) -> None:
        self.reader = gevent.get_hub().loop.io(self.sock.fileno(), _READ)
        self.reader.start(self._on_readable)

    def _on_readable(self) -> None:
        """Read watcher (runs in the event loop: must not block or raise)."""
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            self.close("transport error")
            return
        if not data:
            self.close("transport close")
            return
        self.inbuf += data
        try:
            self._parse_frames()
        except ProtocolError as exc:
            self._close_with(exc.close_code, str(exc)[:100], f"protocol error ({exc})")
        except Exception:
            logger.exception("closing %s: reading failed", self._name())
            self.close("internal error")

    def _parse_frames(self) -> None:
        buf = self.inbuf
        while len(buf) >= 2 and not self.closed:
            first, second = buf[0], buf[1]
            if not second & 0x80:
                raise ProtocolError("client frames must be masked")
            if first & 0x70:
                raise ProtocolError("reserved bits set (no extension was negotiated)")
            length, header = second & 0x7F, 2
            if length == 126:
                if len(buf) < 4:
                    return
                length, header = struct.unpack_from("!H", buf, 2)[0], 4
            elif length == 127:
                if len(buf) < 10:
                    return
                length, header = struct.unpack_from("!Q", buf, 2)[0], 10
            if length > self.transport.max_message:
                raise ProtocolError(f"frame of {length} bytes is over the limit",
                                    CLOSE_TOO_BIG)
            end = header + 4 + length
            if len(buf) < end:
                return
            payload = unmask(buf[header + 4:end], bytes(buf[header:header + 4]))
            del buf[:end]
            self._on_frame(first & 0x80, first & 0x0F, payload)

    def _on_frame(self, final: int, opcode: int, payload: bytes) -> None:
        if opcode == OP_CLOSE:
            self._close_with(CLOSE_NORMAL, "", "client closed")
        elif opcode == OP_PING:
            self.write(websocket_frame(payload, OP_PONG))
        elif opcode == OP_PONG:
            pass
        elif opcode in (OP_TEXT, OP_BINARY):
            if self.fragments is not None:
                raise ProtocolError("a new message started inside a fragmented one")
            if final:
                self._on_message(opcode, payload)
            else:
                self.fragments, self.fragment_opcode = [payload], opcode
        elif opcode == OP_CONTINUATION:
            if self.fragments is None:
                raise ProtocolError("continuation frame without a message")
            self.fragments.append(payload)
            if sum(map(len, self.fragments)) > self.transport.max_message:
                raise ProtocolError("message over the limit", CLOSE_TOO_BIG)
            if final:
                message, self.fragments = b"".join(self.fragments), None
                self._on_message(self.fragment_opcode, message)
        else:
            raise ProtocolError(f"unknown opcode {opcode}")

    def _on_message(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_BINARY:
            self._on_binary_attachment()
            return
        try:
            text = payload.decode()
        except UnicodeDecodeError:
            raise ProtocolError("text frame is not UTF-8", CLOSE_BAD_DATA) from None
        kind = text[:1]
        if kind == EIO_MESSAGE:
            self._on_socketio_packet(text[1:])
        elif kind == EIO_PONG:
            self.awaiting_pong = False
        elif kind == EIO_PING:
            self.write_packet_raw(EIO_PONG + text[1:])
        elif kind == EIO_CLOSE:
            self._close_with(CLOSE_NORMAL, "", "client closed")
        # Other Engine.IO packets (upgrade, noop) mean nothing on a direct WebSocket and are
        # ignored, as python-engineio does.

    def write_packet_raw(self, engineio_packet: str) -> None:
        self.write(websocket_frame(engineio_packet.encode()))

    def _on_socketio_packet(self, text: str) -> None:
        kind, namespace, attachments, ack_id, data = parse_socketio_packet(text)
        if kind == SIO_CONNECT:
            self._enqueue(("connect", namespace, data))
        elif namespace != "/" or not self.client_id:
            logger.info("%s sent a packet for a namespace it is not connected to",
                        self._name())
        elif kind == SIO_EVENT:
            if not isinstance(data, list) or not data:
                raise ProtocolError("event packet without an event name")
            self._enqueue(("event", data[0], data[1:], ack_id))
        elif kind == SIO_BINARY_EVENT:
            self.binary_attachments, self.binary_ack_id = attachments, ack_id
            if not attachments:
                self._answer_binary_event()
        elif kind == SIO_DISCONNECT:
            self.close("client namespace disconnect")
        elif kind == SIO_ACK:
            pass  # the server never asks clients for acks
        else:
            raise ProtocolError(f"unexpected Socket.IO packet type {kind}")

    def _on_binary_attachment(self) -> None:
        if self.binary_attachments <= 0:
            raise ProtocolError("binary frame without a binary packet")
        self.binary_attachments -= 1
        if not self.binary_attachments:
            self._answer_binary_event()

    def _answer_binary_event(self) -> None:
        # Publications are JSON; an event with binary attachments is answered like any other
        # bad argument, once its attachments are in.
        if self.binary_ack_id is not None:
            self._enqueue(("event", "", [b""], self.binary_ack_id))
        self.binary_ack_id = None

    # -- handling client events, one greenlet at a time per connection ----------------------

    def _enqueue(self, item: tuple) -> None:
        if self.inbox is None:
            self.inbox = collections.deque()
        self.inbox.append(item)
        if len(self.inbox) >= MAX_INBOX:
            self.reader.stop()
        if self.worker is None:
            self.worker = gevent.spawn(self._work)

    def _work(self) -> None:
        handled = 0
        try:
            while self.inbox and not self.closed:
                handled += 1
                if handled % 32 == 0:
                    gevent.sleep(0)  # a client with a long backlog must not starve the others
                    if not self.inbox or self.closed:
                        break
                item = self.inbox.popleft()
                if item[0] == "connect":
                    self._connect(item[1], item[2])
                elif _is_publish(item) and self.inbox and _is_publish(self.inbox[0]):
                    self._handle_publishes(item)
                else:
                    self._handle_event(*item[1:])
                if self.closed:
                    break
                if len(self.inbox) <= MAX_INBOX // 2 and not self.reader.active:
                    self.reader.start(self._on_readable)  # it was paused by _enqueue
        except Exception:
            logger.exception("closing %s: handling an event failed", self._name())
            self.close("internal error")
        finally:
            self.worker = None
            if not self.inbox:
                self.inbox = None

    def _connect(self, namespace: str, auth: Any) -> None:
        if namespace != "/":
            self.write_packet(f"{SIO_CONNECT_ERROR}{namespace},"
                              + dumps({"message": "Invalid namespace"}))
            return
        if not self.client_id:
            self.client_id = secrets.token_urlsafe(15)
            self.user = user_id_from_auth(auth, self.client_id)
            self.transport.node.connect(self)
        self.write_packet(SIO_CONNECT + dumps({"sid": self.client_id}))

    def _handle_event(self, event: Any, args: list, ack_id: int | None) -> None:
        self._answer([(ack_id, self.transport.protocol.handle(self, event, args))])

    def _handle_publishes(self, first: tuple) -> None:
        """Handle ``first`` and the publish events queued right behind it as one run.

        A fast publisher's events go to the broker together (one round trip, not one each);
        its acks still leave in event order.
        """
        run = [first]
        inbox = self.inbox
        while inbox and _is_publish(inbox[0]) and len(run) < MAX_PUBLISH_RUN:
            run.append(inbox.popleft())
        answers = self.transport.protocol.handle_publishes(self, [item[2] for item in run])
        self._answer([(item[3], answer) for item, answer in zip(run, answers, strict=True)])

    def _answer(self, acks: list[tuple[int | None, Any]]) -> None:
        """Write the acks of handled events (those that asked for one), then what the node
        deferred until after them (see after_reply)."""
        for ack_id, answer in acks:
            if ack_id is not None:
                self.write_packet(f"{SIO_ACK}{ack_id}" + dumps([answer]))
        deferred, self.deferred = self.deferred, None
        for callback in deferred or ():
            callback()

    def after_reply(self, callback: Callable[[], None]) -> None:
        # Called by the node while this connection's worker handles the event: the ack is
        # written right after the handler returns, then these run (see _answer).
        if self.deferred is None:
            self.deferred = []
        self.deferred.append(callback)

    # -- heartbeats and closing -------------------------------------------------------------

    def check_heartbeat(self, now: float) -> None:
        transport = self.transport
        if self.awaiting_pong:
            self.close("ping timeout")
        elif not self.client_id and now - self.opened_at > transport.ping_timeout:
            self.close("no Socket.IO connect")
        elif now >= self.next_ping:
            self.write_packet_raw(EIO_PING)
            self.awaiting_pong = True
            self.next_ping = now + transport.ping_interval
            transport.schedule(self, now + transport.ping_timeout)
        else:
            transport.schedule(self, self.next_ping)

    def close(self, reason: str) -> None:
        """Close now; the node forgets the connection from a greenlet of its own."""
        if self.closed:
            return
        if reason not in ("transport close", "client closed", "client namespace disconnect"):
            # Tell the client the server ended the session (no automatic reconnect), then
            # close the WebSocket; best effort, without waiting.
            self._write_final(socketio_text_frame(SIO_DISCONNECT)
                              + websocket_frame(struct.pack("!H", CLOSE_NORMAL), OP_CLOSE))
        self._shut(reason)

    def _close_with(self, code: int, message: str, reason: str) -> None:
        if self.closed:
            return
        self._write_final(websocket_frame(struct.pack("!H", code) + message.encode(), OP_CLOSE))
        self._shut(reason)

    def _write_final(self, data: bytes) -> None:
        if self.outbuf is not None and self.outsize > self.transport.max_outbound_buffer:
            return  # a slow client would not read it anyway
        pending = b"".join(self.outbuf) if self.outbuf else b""
        with contextlib.suppress(OSError):
            self.sock.send(pending + data)

    def _shut(self, reason: str) -> None:
        self.closed = True
        for watcher in (self.reader, self.writer):
            if watcher is not None:
                watcher.stop()
                watcher.close()
        self.reader = self.writer = None
        self.outbuf, self.inbox, self.inbuf = None, None, bytearray()
        self.sock.close()
        self.transport.connections.discard(self)
        if reason not in ("client closed", "transport close", "client namespace disconnect"):
            logger.info("closed %s: %s", self._name(), reason)
        if self.client_id:
            # Closing may happen inside the hub's fan-out loop or the event loop itself:
            # forgetting the connection (which may wait on Redis) runs on its own.
            self.transport.forget_later(self)

    def _name(self) -> str:
        return f"websocket {self.eio_sid}" + (f" ({self.user})" if self.user else "")


def _is_publish(item: tuple) -> bool:
    return item[0] == "event" and item[1] == "publish"
