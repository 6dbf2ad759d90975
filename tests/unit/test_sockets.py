"""realtime.sockets.sendall: one send when the kernel takes everything, gevent for the rest."""

from __future__ import annotations

import socket

import gevent

from realtime.sockets import sendall


def test_a_small_write_arrives_whole():
    left, right = socket.socketpair()
    with left, right:
        sendall(left, b"hello")
        assert right.recv(100) == b"hello"


def test_a_write_bigger_than_the_kernel_takes_at_once_waits_and_arrives_whole():
    left, right = socket.socketpair()
    with left, right:
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        data = bytes(range(256)) * 8192  # 2 MiB: far more than both buffers hold
        writer = gevent.spawn(sendall, left, data)
        received = bytearray()
        while len(received) < len(data):
            chunk = right.recv(65536)
            assert chunk, "closed early"
            received += chunk
        writer.get(timeout=10)
        assert bytes(received) == data


def test_a_write_to_a_closed_peer_raises_oserror():
    left, right = socket.socketpair()
    right.close()
    with left:
        try:
            for _ in range(3):  # the first send may succeed into the buffer
                sendall(left, b"x" * 100_000)
        except OSError:
            return
        raise AssertionError("no OSError")


def test_a_tls_socket_or_anything_else_is_left_to_its_own_sendall():
    class Other:
        def __init__(self):
            self.sent = []

        def sendall(self, data):
            self.sent.append(data)

    other = Other()
    sendall(other, b"through sendall")
    assert other.sent == [b"through sendall"]
