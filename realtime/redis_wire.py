"""Redis on the node's hot paths, without redis-py's per-command overhead.

redis-py checks every pooled connection for stray data with a zero-timeout ``poll`` before each
command and parses replies through several Python layers; under gevent each such ``poll``
creates and destroys event-loop watchers. A node publishes and reads pub/sub messages for every
publication, so it talks to Redis through this module instead:

* :class:`CommandPipe` multiplexes the commands of every greenlet over one connection with
  automatic pipelining: commands that come while a write is under way leave together in one
  ``send``, and one ``recv`` brings many replies back (parsed by hiredis in C).
* :func:`open_connection` is the handshake both the pipe and the pub/sub reader use.

Commands are sent in call order on one connection, so two commands issued one after the other
by any greenlets reach Redis in that order: the per-channel ordering of publications holds.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import gevent
import gevent.event
import gevent.lock
import gevent.socket
import hiredis
import redis

from .redis_support import LuaScript
from .sockets import recv_when_readable, sendall

logger = logging.getLogger(__name__)

RECV_SIZE = 1 << 16
# after a failed connection attempt, calls fail at once for this long (seconds)
RECONNECT_INTERVAL = 0.5

pack_command = hiredis.pack_command


def open_connection(url: str, timeout: float) -> gevent.socket.socket:
    """A connected, authenticated socket to the Redis of ``redis://[user:password@]host:port/db``.

    Raises ``redis.ConnectionError`` when Redis cannot be reached or refuses the handshake
    within ``timeout`` seconds.
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "localhost", parts.port or 6379
    db = int(parts.path.lstrip("/") or 0)
    try:
        sock = gevent.socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise redis.ConnectionError(f"cannot connect to redis at {host}:{port}: {exc}") from exc
    try:
        sock.setsockopt(gevent.socket.IPPROTO_TCP, gevent.socket.TCP_NODELAY, 1)
        handshake = []
        if parts.password is not None:
            handshake.append(("AUTH", unquote(parts.username), unquote(parts.password))
                             if parts.username else ("AUTH", unquote(parts.password)))
        if db:
            handshake.append(("SELECT", db))
        if handshake:
            sock.sendall(b"".join(pack_command(command) for command in handshake))
            reader = hiredis.Reader()
            for _ in handshake:
                reply = _read_reply(sock, reader)
                if isinstance(reply, hiredis.ReplyError):
                    raise redis.ConnectionError(f"redis refused the handshake: {reply}")
    except (OSError, redis.ConnectionError) as exc:
        sock.close()
        if isinstance(exc, redis.ConnectionError):
            raise
        raise redis.ConnectionError(f"redis handshake failed: {exc}") from exc
    return sock


def _read_reply(sock: gevent.socket.socket, reader: hiredis.Reader) -> Any:
    while True:
        reply = reader.gets()
        if reply is not False:
            return reply
        data = sock.recv(RECV_SIZE)
        if not data:
            raise redis.ConnectionError("redis closed the connection")
        reader.feed(data)


class CommandPipe:
    """Commands from many greenlets over one Redis connection, pipelined automatically.

    * :meth:`call` returns the reply, raises ``redis.ResponseError`` for an error reply and
      ``redis.ConnectionError`` / ``redis.TimeoutError`` when Redis is down or does not answer
      within ``timeout``; nothing is retried (the caller decides).
    * Commands leave in call order: a command to an idle connection is written at once by its
      caller, commands that come while a write is under way leave together in the next
      ``sendall``; one reader greenlet hands replies back in the same order.
    * A lost or timed-out connection fails every command waiting on it; the next call opens
      a new connection. A failed attempt to connect makes calls fail at once for
      ``RECONNECT_INTERVAL`` seconds, so that an unreachable Redis costs each call at most
      ``timeout``, not a turn behind every other greenlet's attempt.
    """

    def __init__(self, url: str, *, timeout: float = 5.0) -> None:
        self._url = url
        self._timeout = timeout
        self._connect_lock = gevent.lock.Semaphore()
        self._connection: _PipeConnection | None = None
        self._closed = False
        self._last_failure = (-RECONNECT_INTERVAL, "")  # (monotonic time, message)
        # Told the seconds of every answered round trip (the node's metrics), when set.
        self.on_round_trip: Callable[[float], None] | None = None

    def call(self, *args: Any) -> Any:
        connection = self._connection
        if connection is None or connection.broken:
            connection = self._connect()
        started = time.perf_counter()
        replies = connection.submit([pack_command(args)])
        try:
            (value,) = replies.get(timeout=self._timeout)
        except gevent.Timeout:
            connection.fail(redis.TimeoutError(
                f"redis did not answer within {self._timeout:g}s"))
            raise redis.TimeoutError(f"redis did not answer within {self._timeout:g}s") from None
        if self.on_round_trip is not None:
            self.on_round_trip(time.perf_counter() - started)
        if isinstance(value, hiredis.ReplyError):
            raise redis.ResponseError(str(value))
        return value

    def call_many(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send ``commands`` in one write and return their replies in order.

        An error reply is returned in its place as a ``redis.ResponseError`` (not raised); a
        lost connection or a timeout raises, as in :meth:`call`.
        """
        if not commands:
            return []
        connection = self._connection
        if connection is None or connection.broken:
            connection = self._connect()
        started = time.perf_counter()
        replies = connection.submit([pack_command(tuple(args)) for args in commands])
        try:
            values = replies.get(timeout=self._timeout)
        except gevent.Timeout:
            error = redis.TimeoutError(f"redis did not answer within {self._timeout:g}s")
            connection.fail(error)
            raise error from None
        for index, value in enumerate(values):
            if isinstance(value, hiredis.ReplyError):
                values[index] = redis.ResponseError(str(value))
        if self.on_round_trip is not None:  # one round trip for the whole pipeline
            self.on_round_trip(time.perf_counter() - started)
        return values

    def run_script(self, script: LuaScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        try:
            return self.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except redis.ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return self.call("EVAL", script.source, len(keys), *keys, *args)

    def run_scripts(self, script: LuaScript,
                    calls: Sequence[tuple[Sequence[Any], Sequence[Any]]]) -> list[Any]:
        """Run ``script`` once per ``(keys, args)``, pipelined; results as in :meth:`call_many`.

        Calls that find the script missing (``NOSCRIPT``) are run again with ``EVAL``, one by
        one, in order.
        """
        results = self.call_many(
            [("EVALSHA", script.sha, len(keys), *keys, *args) for keys, args in calls])
        for index, result in enumerate(results):
            if isinstance(result, redis.ResponseError) and str(result).startswith("NOSCRIPT"):
                keys, args = calls[index]
                try:
                    results[index] = self.call("EVAL", script.source, len(keys), *keys, *args)
                except redis.ResponseError as exc:
                    results[index] = exc
        return results

    def close(self) -> None:
        self._closed = True
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.fail(redis.ConnectionError("the command pipe was closed"))

    def _connect(self) -> _PipeConnection:
        # One greenlet connects while the others wait for it; after a failed attempt, calls
        # fail at once for RECONNECT_INTERVAL instead of each waiting out its own attempt
        # behind the lock (which, with Redis unreachable, would queue them up for minutes).
        if not self._connect_lock.acquire(timeout=self._timeout):
            raise redis.TimeoutError("timed out waiting for another greenlet to reach redis")
        try:
            if self._closed:
                raise redis.ConnectionError("the command pipe was closed")
            connection = self._connection
            if connection is not None and not connection.broken:
                return connection
            failed_at, failure = self._last_failure
            if time.monotonic() - failed_at < RECONNECT_INTERVAL:
                raise redis.ConnectionError(failure)
            try:
                sock = open_connection(self._url, self._timeout)
            except redis.ConnectionError as exc:
                self._last_failure = (time.monotonic(), str(exc))
                raise
            connection = self._connection = _PipeConnection(sock)
            return connection
        finally:
            self._connect_lock.release()


class _PipeConnection:
    """One socket of a :class:`CommandPipe`, with its reader greenlet.

    The greenlet that submits a command to an idle connection writes it at once (a publish
    must not wait for the event loop to come round to a writer); commands submitted while a
    write is under way join the next ``sendall`` of the greenlet that is writing.
    """

    def __init__(self, sock: gevent.socket.socket) -> None:
        sock.settimeout(None)
        self.sock = sock
        self.broken = False
        self._outgoing: list[bytes] = []
        self._writing = False
        # What each submission waits for, in the order Redis answers: (how many replies, the
        # replies so far, set to them all once complete). One waiter per submission, not per
        # command: an AsyncResult per command was 5% of a batch's CPU (py-spy,
        # bench/profile_http.py --batch 100).
        self._waiting: collections.deque[tuple[int, list[Any], gevent.event.AsyncResult]] = \
            collections.deque()
        self._reader = gevent.spawn(self._read_forever)

    def submit(self, commands: list[bytes]) -> gevent.event.AsyncResult:
        """Send ``commands`` (packed); the result is set to their replies, in order, or fails
        with the connection's error."""
        if self.broken:
            raise redis.ConnectionError("the redis connection broke")
        replies = gevent.event.AsyncResult()
        self._waiting.append((len(commands), [], replies))
        self._outgoing.extend(commands)
        if not self._writing:
            # Yield once before writing: the greenlets the event loop has ready in this turn
            # (say, HTTP publishes that arrived together) add their commands meanwhile, and
            # one sendall carries them all; a send per command cost a publish a third of its
            # CPU under load (bench/RESULTS.md, issue 12). The wait is one loop turn.
            self._writing = True
            try:
                gevent.sleep(0)
            finally:
                self._writing = False
                self._write_out()  # also when killed while yielding: others' commands wait
        return replies

    def _write_out(self) -> None:
        self._writing = True
        try:
            while self._outgoing and not self.broken:
                outgoing = self._outgoing
                self._outgoing = []
                sendall(self.sock, b"".join(outgoing) if len(outgoing) > 1 else outgoing[0])
        except OSError as exc:
            self.fail(redis.ConnectionError(f"writing to redis failed: {exc}"))
        except BaseException:
            # Interrupted part-way (a timeout or kill of the writing greenlet): what reached
            # the socket may end mid-command, so the connection cannot be trusted any more.
            self.fail(redis.ConnectionError("a write to redis was interrupted"))
            raise
        finally:
            self._writing = False

    def fail(self, exc: Exception) -> None:
        """Close the connection and fail every command still waiting on it with ``exc``."""
        if self.broken:
            return
        self.broken = True
        self._outgoing.clear()
        waiting, self._waiting = self._waiting, collections.deque()
        for _, _, replies in waiting:
            replies.set_exception(exc)
        self.sock.close()
        if self._reader is not gevent.getcurrent():
            self._reader.kill(block=False)

    def _read_forever(self) -> None:
        reader = hiredis.Reader()
        try:
            while not self.broken:
                data = recv_when_readable(self.sock, RECV_SIZE)
                if not data:
                    raise redis.ConnectionError("redis closed the connection")
                reader.feed(data)
                waiting = self._waiting
                while (reply := reader.gets()) is not False:
                    if not waiting:
                        raise redis.ConnectionError("redis sent a reply nobody asked for")
                    expected, values, replies = waiting[0]
                    values.append(reply)
                    if len(values) == expected:
                        waiting.popleft()
                        replies.set(values)
        except redis.ConnectionError as exc:
            self.fail(exc)
        except OSError as exc:
            self.fail(redis.ConnectionError(f"reading from redis failed: {exc}"))
        except Exception as exc:
            logger.exception("the redis reply reader failed")
            self.fail(redis.ConnectionError(f"reading from redis failed: {exc}"))
