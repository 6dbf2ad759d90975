"""The physical floor: CPU per send() of a pre-encoded WebSocket frame to a loopback socket.

A bare Python loop (in a process of its own) over ``sockets`` loopback TCP connections sends a
pre-encoded 150-byte WebSocket frame to every socket ``rate`` times a second for ``duration``
seconds; a sink process reads and discards. The sender's CPU time (user + system, which includes
the kernel's loopback delivery) divided by the sends is the floor that no server written on
sockets can go below per delivery. With 2 or 4 frames per send() (a server that coalesces the
frames queued for one socket), the cost per frame falls.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import select
import socket
import time
from multiprocessing.connection import Connection
from typing import Any

from .loadgen import raise_fd_limit
from .wsclient import IP_BIND_ADDRESS_NO_PORT

logger = logging.getLogger(__name__)

FRAME_SIZE = 150


def websocket_frame(size: int = FRAME_SIZE) -> bytes:
    """An unmasked server text frame of ``size`` bytes carrying a Socket.IO message event."""
    body = (b'42["message",{"channel":"bench.fanout","offset":1,"data":{"p":1,"s":1,'
            b'"t":1234567890123,"x":"')
    tail = b'"},"user":"bench"}]'
    payload_size = size - 2  # a 2-byte header holds lengths up to 125
    if payload_size > 125:
        payload_size = size - 4
    body += b"x" * (payload_size - len(body) - len(tail)) + tail
    if len(body) < 126:
        return bytes((0x81, len(body))) + body
    return bytes((0x81, 126)) + len(body).to_bytes(2, "big") + body


def _sink(conn: Connection, sockets: int) -> None:
    """Accept ``sockets`` connections and read and discard until told to stop."""
    raise_fd_limit()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    conn.send(listener.getsockname()[1])
    accepted: dict[int, socket.socket] = {}
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    poller.register(conn.fileno(), select.EPOLLIN)
    buffer = bytearray(1 << 16)
    while True:
        for fd, _ in poller.poll(1.0):
            if fd == listener.fileno():
                sock, _ = listener.accept()
                sock.setblocking(False)
                accepted[sock.fileno()] = sock
                poller.register(sock.fileno(), select.EPOLLIN)
            elif fd == conn.fileno():
                conn.recv()
                for sock in accepted.values():
                    sock.close()
                return
            else:
                sock = accepted[fd]
                try:
                    if not sock.recv_into(buffer):
                        poller.unregister(fd)
                        sock.close()
                        del accepted[fd]
                except BlockingIOError:
                    pass


def _sender(conn: Connection, port: int, sockets: int, rate: float, duration: float,
            frames_per_send: list[int], repeat: int) -> None:
    """Connect, then time the send loop for each frames-per-send, ``repeat`` times round.

    Each row reports the median of its repetitions (this machine's CPU time is noisy).
    """
    raise_fd_limit()
    socks = []
    for i in range(sockets):
        sock = socket.socket()
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((f"127.11.0.{i % 200 + 1}", 0))
        sock.connect(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(sock)
    time.sleep(0.5)
    frame = websocket_frame()
    measured: dict[int, list[dict[str, Any]]] = {frames: [] for frames in frames_per_send}
    for frames in [f for _ in range(repeat) for f in frames_per_send]:
        message = frame * frames
        rounds = max(1, int(rate * duration))
        sends = 0
        started = time.monotonic()
        cpu_before = time.process_time()
        for n in range(rounds):
            delay = started + n / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            for sock in socks:
                sock.send(message)
            sends += len(socks)
        cpu = time.process_time() - cpu_before
        wall = time.monotonic() - started
        measured[frames].append({
            "frames_per_send": frames,
            "sends": sends,
            "cpu_s": round(cpu, 4),
            "wall_s": round(wall, 3),
            "us_per_send": round(cpu / sends * 1e6, 3),
            "us_per_frame": round(cpu / sends / frames * 1e6, 3),
            # Whether the loop kept its schedule: a loop slower than the rate is CPU-bound.
            "on_schedule": wall < duration * 1.1 + 1 / rate,
        })
        time.sleep(0.3)
    for sock in socks:
        sock.close()
    results = []
    for rows in measured.values():
        rows.sort(key=lambda row: row["us_per_frame"])
        median = dict(rows[len(rows) // 2])
        median["repetitions_us_per_frame"] = [row["us_per_frame"] for row in rows]
        median["on_schedule"] = all(row["on_schedule"] for row in rows)
        results.append(median)
    conn.send(results)


def run_floor(sockets: int = 2000, rate: float = 60.0, duration: float = 3.0,
              frames_per_send: tuple[int, ...] = (1, 2, 4), repeat: int = 3) -> dict[str, Any]:
    """Measure the floor; returns ``{sockets, rate, duration_s, frame_bytes, results: [...]}``.

    Every frames-per-send setting runs ``repeat`` times, interleaved; each row is the median.
    """
    context = multiprocessing.get_context("spawn")
    sink_conn, sink_end = context.Pipe()
    sink = context.Process(target=_sink, args=(sink_end, sockets), name="bench-floor-sink",
                           daemon=True)
    sink.start()
    sender = None
    try:
        if not sink_conn.poll(30):
            raise RuntimeError("the floor's sink process did not start")
        port = sink_conn.recv()
        sender_conn, sender_end = context.Pipe()
        sender = context.Process(
            target=_sender, args=(sender_end, port, sockets, rate, duration,
                                  list(frames_per_send), repeat),
            name="bench-floor-sender", daemon=True)
        sender.start()
        budget = 60 + repeat * len(frames_per_send) * (duration + 2)
        if not sender_conn.poll(budget):
            raise RuntimeError(f"the floor's sender did not finish within {budget:g}s")
        results = sender_conn.recv()
    finally:
        with contextlib.suppress(OSError, BrokenPipeError):
            sink_conn.send("stop")
        for process in (sender, sink):
            if process is None:
                continue
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join(5)
    return {"sockets": sockets, "rate": rate, "duration_s": duration, "repeat": repeat,
            "frame_bytes": len(websocket_frame()), "results": results}


def floor_us(floor: dict[str, Any] | None, frames: int = 1) -> float | None:
    """µs of CPU per frame at ``frames`` frames per send from a :func:`run_floor` result."""
    if not floor:
        return None
    for result in floor.get("results", []):
        if result["frames_per_send"] == frames:
            return result["us_per_frame"]
    return None
