"""Raw-socket clients for hostile-input tests, and what to watch of a node process meanwhile.

The clients send whatever bytes they are given, valid or not, give every wait a deadline, and
keep everything the node answered: :class:`RawWebSocket` (the upgrade request, then frames
built by the caller), :class:`RawHttp` (one HTTP/1.1 connection, e.g. long-polling requests
with any body and any ``Content-Length``), and the Engine.IO handshakes over both
(:func:`websocket_session`, :func:`polling_open`, :func:`upgraded_websocket`).

:class:`NodeWatch` measures a node process's RSS and open descriptors and reads its log from a
point on.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

from realtime.transports.framing import OP_BINARY, OP_CLOSE, OP_TEXT
from tests.fuzzing import client_frame_bytes
from tests.helpers import wait_until

HOST = "127.0.0.1"


def text_frame(text: str | bytes, opcode: int = OP_TEXT, **options: object) -> bytes:
    """One masked client frame (random mask) carrying ``text``."""
    payload = text.encode() if isinstance(text, str) else text
    return client_frame_bytes(payload, opcode, mask=os.urandom(4), **options)  # type: ignore[arg-type]


# -- WebSocket --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ServerFrame:
    """A frame the node sent (servers send unmasked, final frames)."""

    opcode: int
    payload: bytes

    @property
    def text(self) -> str:
        return self.payload.decode()

    @property
    def close_code(self) -> int | None:
        if self.opcode != OP_CLOSE or len(self.payload) < 2:
            return None
        return struct.unpack_from("!H", self.payload)[0]


def take_server_frames(buffer: bytearray) -> list[ServerFrame]:
    """Remove the complete server frames at the front of ``buffer`` and return them."""
    frames = []
    while len(buffer) >= 2:
        first, second = buffer[0], buffer[1]
        assert not second & 0x80, "the node sent a masked frame"
        assert first & 0x80, "the node sent a fragmented frame"
        length, header = second & 0x7F, 2
        if length == 126:
            if len(buffer) < 4:
                break
            length, header = struct.unpack_from("!H", buffer, 2)[0], 4
        elif length == 127:
            if len(buffer) < 10:
                break
            length, header = struct.unpack_from("!Q", buffer, 2)[0], 10
        if len(buffer) < header + length:
            break
        frames.append(ServerFrame(first & 0x0F, bytes(buffer[header:header + length])))
        del buffer[:header + length]
    return frames


class RawWebSocket:
    """A WebSocket to the node over a plain socket: the upgrade, then any bytes at all.

    ``frames`` holds every frame the node sent, in order; ``closed`` turns true when the node
    ended the connection (``reset`` when it reset it, after its last frames were read).
    """

    def __init__(self, port: int, query: str = "EIO=4&transport=websocket",
                 timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.frames: list[ServerFrame] = []
        self.closed = False
        self.reset = False
        self.opened_at = time.monotonic()
        self._buffer = bytearray()
        self._read = 0  # frames handed out by next_frame()
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET /socket.io/?{query} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n\r\n".encode())
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self._buffer:
            if not self._receive(deadline, parse=False):
                raise AssertionError(f"no upgrade response: {bytes(self._buffer)!r}")
        head, _, rest = bytes(self._buffer).partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101 "):
            raise AssertionError(f"upgrade refused: {head!r} {rest!r}")
        self._buffer = bytearray(rest)
        self.frames += take_server_frames(self._buffer)

    def __repr__(self) -> str:
        return f"<RawWebSocket frames={len(self.frames)} closed={self.closed}>"

    # -- sending ---------------------------------------------------------------------------

    def send(self, data: bytes) -> bool:
        """Send ``data``; False when the node has closed the connection already (what it
        answered before that is still read by the read methods)."""
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True

    def send_text(self, text: str | bytes, opcode: int = OP_TEXT) -> bool:
        return self.send(text_frame(text, opcode))

    def send_binary(self, data: bytes) -> bool:
        return self.send(text_frame(data, OP_BINARY))

    def finish(self) -> None:
        """Half-close: the node reads the end of the stream after everything sent."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    # -- reading ---------------------------------------------------------------------------

    def _receive(self, deadline: float, parse: bool = True) -> bool:
        """One read, waiting until ``deadline``; False when nothing came (or can come)."""
        if self.closed:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        except ConnectionResetError:
            self.closed = self.reset = True
            return False
        except OSError:
            self.closed = True
            return False
        if not data:
            self.closed = True
            return False
        self._buffer += data
        if parse:
            self.frames += take_server_frames(self._buffer)
        return True

    def next_frame(self, timeout: float = 5.0) -> ServerFrame:
        """The next frame not handed out yet; fails after ``timeout`` or when closed."""
        deadline = time.monotonic() + timeout
        while self._read >= len(self.frames):
            if not self._receive(deadline):
                raise AssertionError(f"no frame from the node (closed={self.closed}); "
                                     f"frames so far: {self.frames[-5:]}")
        self._read += 1
        return self.frames[self._read - 1]

    def next_text(self, timeout: float = 5.0) -> str:
        frame = self.next_frame(timeout)
        assert frame.opcode == OP_TEXT, f"expected a text frame, got {frame}"
        return frame.text

    def wait_for_text(self, predicate: Callable[[str], bool], timeout: float = 5.0) -> str:
        """Skip frames (pings, events) until a text frame matching ``predicate``."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.next_frame(max(0.0, deadline - time.monotonic()))
            if frame.opcode == OP_CLOSE:
                raise AssertionError(f"closed by the node ({frame.close_code}: "
                                     f"{frame.payload[2:]!r}) while waiting")
            if frame.opcode == OP_TEXT and predicate(frame.text):
                return frame.text

    def read_until(self, predicate: Callable[[list[ServerFrame]], bool],
                   timeout: float) -> bool:
        """Read until ``predicate(frames)`` holds (True) or ``timeout`` passes or the node
        ends the connection (False)."""
        deadline = time.monotonic() + timeout
        while not predicate(self.frames):
            if not self._receive(deadline):
                return predicate(self.frames)
        return True

    def read_until_closed(self, timeout: float) -> bool:
        """Read until the node ends the connection or ``timeout`` passes; True if it ended."""
        deadline = time.monotonic() + timeout
        while self._receive(deadline):
            pass
        return self.closed

    @property
    def close_frames(self) -> list[ServerFrame]:
        return [frame for frame in self.frames if frame.opcode == OP_CLOSE]

    @property
    def close_code(self) -> int | None:
        """The code of the node's close frame, if it sent one."""
        closes = self.close_frames
        return closes[0].close_code if closes else None


def websocket_session(port: int, *, connect: bool = True, auth: dict | None = None,
                      ) -> RawWebSocket:
    """A raw WebSocket session: Engine.IO open read, and (``connect``) Socket.IO connected."""
    ws = RawWebSocket(port)
    opened = ws.next_text()
    assert opened.startswith("0{"), opened
    if connect:
        ws.send_text("40" + (json.dumps(auth) if auth else ""))
        ws.wait_for_text(lambda text: text.startswith("40{"))
    return ws


# -- HTTP -------------------------------------------------------------------------------------


@dataclasses.dataclass
class HttpReply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)

    @property
    def records(self) -> list[str]:
        """The Engine.IO packets of a long-polling payload."""
        return self.body.decode().split("\x1e")

    def assert_json_error(self, status: int, code: str | None = None) -> dict:
        """This is a ``status`` answer with a JSON body ``{error: {code, message}}``."""
        assert self.status == status, (self.status, self.body[:300])
        assert self.headers.get("content-type", "").startswith("application/json"), self
        error = json.loads(self.body)["error"]
        assert isinstance(error["message"], str) and error["message"]
        if code is not None:
            assert error["code"] == code, error
        return error


class RawHttp:
    """One HTTP/1.1 connection over a plain socket: requests with any body and any
    ``Content-Length``, each answer read with a deadline."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.port = port
        self.timeout = timeout
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self._buffer = bytearray()

    def __enter__(self) -> RawHttp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def request(self, method: str, target: str, body: bytes = b"", *,
                content_length: str | None = None, send_body: bool = True,
                keep_alive: bool = False, headers: dict[str, str] | None = None,
                timeout: float | None = None) -> HttpReply:
        """Send a request and read its answer. ``content_length`` is sent as given (default:
        the body's length); ``send_body=False`` sends the headers alone."""
        lines = [f"{method} {target} HTTP/1.1", f"Host: {HOST}:{self.port}"]
        if method == "POST":
            lines.append("Content-Type: text/plain;charset=UTF-8")
            declared = len(body) if content_length is None else content_length
            lines.append(f"Content-Length: {declared}")
        if not keep_alive:
            lines.append("Connection: close")
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        # The node may answer (and close) before reading everything: its answer is still read.
        with contextlib.suppress(OSError):
            self.sock.sendall(head + body if send_body else head)
        return self.read_reply(self.timeout if timeout is None else timeout)

    def _fill(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no complete answer in time: {bytes(self._buffer[:300])!r}")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise AssertionError(
                f"no complete answer in time: {bytes(self._buffer[:300])!r}") from None
        except ConnectionResetError:
            data = b""
        if not data:
            return False
        self._buffer += data
        return True

    def read_reply(self, timeout: float) -> HttpReply:
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self._buffer:
            if not self._fill(deadline):
                raise AssertionError(f"connection closed without an answer: "
                                     f"{bytes(self._buffer[:300])!r}")
        head, _, rest = bytes(self._buffer).partition(b"\r\n\r\n")
        self._buffer = bytearray(rest)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            length = int(headers["content-length"])
            while len(self._buffer) < length:
                if not self._fill(deadline):
                    break
            body, self._buffer = bytes(self._buffer[:length]), self._buffer[length:]
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = self._read_chunked(deadline)
        else:
            while self._fill(deadline):
                pass
            body, self._buffer = bytes(self._buffer), bytearray()
        return HttpReply(status, headers, body)

    def _read_chunked(self, deadline: float) -> bytes:
        body = bytearray()
        while True:
            while b"\r\n" not in self._buffer:
                self._fill(deadline)
            size_line, _, rest = bytes(self._buffer).partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(rest) < size + 2:
                self._fill(deadline)
                rest = bytes(self._buffer).partition(b"\r\n")[2]
            body += rest[:size]
            self._buffer = bytearray(rest[size + 2:])
            if size == 0:
                return bytes(body)

    def wait_closed(self, timeout: float) -> bool:
        """True when the node ends this connection within ``timeout`` (unread bytes ignored)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.sock.settimeout(remaining)
            try:
                if not self.sock.recv(65536):
                    return True
            except TimeoutError:
                return False
            except OSError:
                return True


def polling_target(sid: str | None = None) -> str:
    return "/socket.io/?EIO=4&transport=polling" + (f"&sid={sid}" if sid else "")


def polling_open(port: int) -> str:
    """A new long-polling session's id."""
    with RawHttp(port) as http:
        reply = http.request("GET", polling_target())
    assert reply.status == 200 and reply.body.startswith(b"0{"), reply
    return json.loads(reply.body[1:])["sid"]


def polling_post(port: int, sid: str, body: bytes, **options: object) -> HttpReply:
    with RawHttp(port) as http:
        return http.request("POST", polling_target(sid), body, **options)  # type: ignore[arg-type]


def polling_get(port: int, sid: str, timeout: float = 5.0) -> HttpReply:
    with RawHttp(port, timeout) as http:
        return http.request("GET", polling_target(sid))


def polling_session(port: int, *, connect: bool = True) -> str:
    """A long-polling session, Socket.IO connected (its connect reply taken) if ``connect``."""
    sid = polling_open(port)
    if connect:
        assert polling_post(port, sid, b"40").body == b"ok"
        reply = polling_get(port, sid)
        assert any(record.startswith("40{") for record in reply.records), reply
    return sid


def upgraded_websocket(port: int, *, finish: bool = True, connect: bool = True,
                       ) -> tuple[RawWebSocket, str]:
    """A long-polling session upgraded to a raw WebSocket, as the official client does by
    default; with ``finish=False`` the upgrade is left at the probe (``2probe``/``3probe``
    done, no ``5`` yet). Returns the socket and the session id."""
    sid = polling_session(port, connect=connect)
    ws = RawWebSocket(port, f"EIO=4&transport=websocket&sid={sid}")
    ws.send_text("2probe")
    assert ws.next_text() == "3probe"
    if finish:
        ws.send_text("5")
    return ws, sid


# -- the node process -------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class NodeWatch:
    """A node's RSS and descriptor count from now on, and its log from now on."""

    def __init__(self, pid: int, log_path: Path) -> None:
        self.pid = pid
        self.log_path = log_path
        self.rss = rss_mb(pid)
        self.descriptors = open_descriptors(pid)
        self._log_offset = log_path.stat().st_size

    def log(self) -> str:
        """What the node logged since this watch started."""
        with open(self.log_path, "rb") as log:
            log.seek(self._log_offset)
            return log.read().decode(errors="replace")

    def assert_log_clean(self) -> None:
        log = self.log()
        assert "Traceback" not in log, log[-4000:]

    def assert_back_to_start(self, *, rss_margin_mb: float = 15.0, descriptor_margin: int = 3,
                             timeout: float = 15.0) -> None:
        """Wait (up to ``timeout``) until the node holds about the descriptors it held at the
        start (it closes abandoned sessions by itself), then compare its RSS."""
        wait_until(lambda: open_descriptors(self.pid) <= self.descriptors + descriptor_margin,
                   timeout, interval=0.1,
                   message=f"the node's descriptors ({open_descriptors(self.pid)}) to come "
                           f"back near {self.descriptors}")
        grown = rss_mb(self.pid) - self.rss
        assert grown < rss_margin_mb, f"node RSS grew by {grown:.1f} MB"
