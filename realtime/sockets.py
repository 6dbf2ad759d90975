"""Reading and writing gevent's cooperative sockets without gevent's cost per call.

gevent's ``socket.sendall`` asks the kernel for the socket's send buffer size (a
``getsockopt`` system call) on every call, to size the chunks it writes: on a node answering
``POST /api/publish`` that system call was 7% of the node's time (py-spy ``--native``), on
every HTTP answer and every write to Redis. :func:`sendall` writes what the kernel takes at
once with one ``send`` and leaves only the rest, if any, to gevent.

gevent's ``socket.recv`` first tries to read, and waits for the socket to be readable only
when that finds nothing: a ``recv`` system call that fails with ``EAGAIN`` and an ``OSError``
raised and caught each time. A reader that has just handled everything it was sent usually
finds nothing: :func:`recv_when_readable` waits first.
"""

from __future__ import annotations

from typing import Any

import gevent.socket

# Exactly gevent's plain TCP socket: its subclasses (gevent.ssl.SSLSocket) must encrypt what
# they send, and other objects (a test's fake) have only sendall.
_PLAIN_SOCKET = gevent.socket.socket


def sendall(sock: Any, data: bytes) -> None:
    """Send all of ``data`` on gevent socket ``sock``, as ``sock.sendall(data)`` does.

    The common case, a write the kernel takes whole, is one ``send`` on the non-blocking
    socket under gevent's (``sock._sock``); what it leaves goes through ``sock.sendall``,
    which waits for the socket to be writable, cooperatively, within the socket's timeout.
    Any other kind of socket (TLS, say) just gets ``sock.sendall``. Raises ``OSError`` as
    ``sock.sendall`` would.
    """
    if type(sock) is not _PLAIN_SOCKET:
        sock.sendall(data)
        return
    try:
        sent = sock._sock.send(data)
    except BlockingIOError:
        sent = 0
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])


def wait_readable(sock: Any) -> None:
    """Wait, cooperatively, until gevent's event loop sees ``sock`` readable (or closed).

    Within the socket's timeout (``TimeoutError``, as ``sock.recv`` raises). Returns at once
    for any other kind of socket than gevent's plain one: TLS may hold decrypted bytes that
    the kernel no longer shows as readable, so it must be read to know.
    """
    if type(sock) is _PLAIN_SOCKET:
        sock._wait(sock._read_event)


def recv_when_readable(sock: Any, size: int) -> bytes:
    """``sock.recv(size)`` for a reader that expects nothing to be there yet: waits first
    (:func:`wait_readable`), then reads. Data already waiting costs one turn of the event loop
    instead of an ``EAGAIN``."""
    wait_readable(sock)
    return sock.recv(size)
