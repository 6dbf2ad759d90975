"""Numbered streams for the reliability tests: publishers, subscribers of every kind, a checker.

Publishers publish numbered messages (data ``{"pub": <publisher>, "seq": <n>}``) on a few
channels and record every acknowledged publication in a :class:`Ledger` (channel, epoch,
offset, seq). Subscribers of every kind (python-socketio on WebSocket and long-polling, JSON
and msgpack; the official JS client with its default start, WebSocket or long-polling, JSON or
msgpack) subscribe to every channel, reconnect by themselves with ``since`` as an app does, and
record every event they get, in order, as dicts: ``connect``, ``disconnect``, ``subscribed``
(the ack, with the ``since`` that was sent), ``message``, ``reset``, ``join``/``leave``.

:func:`check_streams` then walks each subscriber's record per channel and reports, precisely
(subscriber, channel, offsets), every gap not announced by a ``reset`` or a ``recovered: false``,
every duplicate, every reordering, every message that contradicts what its publisher was
answered, and every acknowledged publication never delivered nor covered by an announced gap.
With ``data_kept`` (Redis kept its data and history holds everything sent during the run) no
announced gap is allowed either: every acknowledged publication reaches every subscriber.

Everything runs in the test process under gevent (tests/conftest.py patches it): "threads" are
greenlets. Waits are on conditions with deadlines; the only timed pauses are the publishers'
pace and the back-off between reconnection attempts, both cut short when a run stops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
import socketio

from tests.helpers import wait_until
from tests.integration.clients import OFFICIAL_CLIENT, WAYS, _InOrderEngineIOClient

JS_DIR = Path(__file__).parent / "js"
JS_SUBSCRIBER = JS_DIR / "stream_subscriber.js"
REPO = Path(__file__).resolve().parents[2]
# Each publisher's pace: a publication every this many seconds, round robin over the channels.
PUBLISH_INTERVAL = 0.03
# A request or an ack that takes longer than this counts as lost (the node died under it).
REQUEST_TIMEOUT = 5.0
RECONNECT_PAUSE = 0.2
# Problems reported per subscriber and channel: the first ones say what broke.
MAX_PROBLEMS_PER_CHANNEL = 8


class Clock:
    """Seconds since the run started: every record and every failure message uses it."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self) -> float:
        return round(time.monotonic() - self.start, 3)


def node_of(sid: str | None) -> str:
    """The node id at the start of an Engine.IO session id (``n2.AbC...`` -> ``n2``)."""
    return sid.split(".", 1)[0] if sid else "?"


def short(epoch: str | None) -> str:
    """An epoch short enough to read in a failure message."""
    if epoch is None:
        return "None"
    return repr(epoch) if len(epoch) <= 10 else epoch[:8] + "…"


def ranges(numbers: Iterable[int]) -> str:
    """``[1, 2, 3, 7, 9, 10]`` -> ``"1-3, 7, 9-10"``."""
    parts: list[str] = []
    ordered = sorted(set(numbers))
    start = prev = None
    for number in ordered:
        if start is None:
            start = prev = number
        elif number == prev + 1:
            prev = number
        else:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = prev = number
    if start is not None:
        parts.append(str(start) if start == prev else f"{start}-{prev}")
    return ", ".join(parts)


# -- what publishers were answered ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Acked:
    """A publication its publisher was answered for: where it stands in its channel's stream."""

    publisher: str
    seq: int
    channel: str
    epoch: str
    offset: int
    at: float
    retried: bool = False  # answered to a retry with the same idempotency key

    @property
    def data_key(self) -> tuple[str, int]:
        return (self.publisher, self.seq)

    def describe(self) -> str:
        retried = ", answered to a retry" if self.retried else ""
        return (f"{{pub: {self.publisher}, seq: {self.seq}}} acked at +{self.at:.2f}s"
                f"{retried}")


@dataclasses.dataclass(frozen=True)
class Failed:
    """A publication attempt that got no positive answer (it may still have been published)."""

    publisher: str
    seq: int
    channel: str
    at: float
    error: str


class Ledger:
    """Every acknowledged publication and every failed attempt, from every publisher."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self.acked: list[Acked] = []
        self.failed: list[Failed] = []

    def ack(self, publisher: str, seq: int, channel: str, answer: dict,
            retried: bool = False) -> Acked:
        entry = Acked(publisher, seq, channel, answer["epoch"], answer["offset"], self.clock(),
                      retried)
        with self._lock:
            self.acked.append(entry)
        return entry

    def fail(self, publisher: str, seq: int, channel: str, error: str) -> None:
        with self._lock:
            self.failed.append(Failed(publisher, seq, channel, self.clock(), error))

    def acks(self, publisher: str | None = None, after: float = -1.0) -> list[Acked]:
        with self._lock:
            return [a for a in self.acked
                    if (publisher is None or a.publisher == publisher) and a.at > after]

    def failures(self, publisher: str | None = None, after: float = -1.0) -> list[Failed]:
        with self._lock:
            return [f for f in self.failed
                    if (publisher is None or f.publisher == publisher) and f.at > after]

    def failure_summary(self, publisher: str | None = None, after: float = -1.0,
                        limit: int = 5) -> str:
        failures = self.failures(publisher, after)
        if not failures:
            return "no failures"
        shown = "; ".join(f"+{f.at:.2f}s {f.publisher} seq {f.seq}: {f.error}"
                          for f in failures[-limit:])
        return f"{len(failures)} failures, the last: {shown}"


def same_position(held: tuple[str, int] | None, stream: tuple[str, int]) -> bool:
    """Whether a subscriber holding ``held`` stands at ``stream``. A held epoch "" (the stream
    did not exist when the subscriber was placed) stands for whatever epoch was created next,
    as a ``since`` of epoch "" does."""
    return held is not None and held[1] == stream[1] and held[0] in (stream[0], "")


def data_key(data: Any) -> tuple[str, int] | None:
    """``(pub, seq)`` of a numbered message's data, None for anything else."""
    if isinstance(data, dict) and isinstance(data.get("pub"), str) \
            and isinstance(data.get("seq"), int):
        return (data["pub"], data["seq"])
    return None


# -- publishers ------------------------------------------------------------------------------


class Publisher:
    """Publishes ``{"pub": name, "seq": n}`` round robin over ``channels`` until stopped."""

    kind = "?"

    def __init__(self, name: str, url: str, channels: Sequence[str], ledger: Ledger, *,
                 interval: float = PUBLISH_INTERVAL, pad: int = 0) -> None:
        self.name = name
        self.url = url
        self.channels = list(channels)
        self.ledger = ledger
        self.interval = interval
        self.pad = "x" * pad
        self.seq = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.crashed: BaseException | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    def data(self, seq: int) -> dict:
        data: dict[str, Any] = {"pub": self.name, "seq": seq}
        if self.pad:
            data["pad"] = self.pad
        return data

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(REQUEST_TIMEOUT * 3)
        self.close()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.seq += 1
                channel = self.channels[self.seq % len(self.channels)]
                self.publish_one(channel, self.seq)
                self._stop.wait(self.interval)
        except BaseException as exc:  # reported by the test, not lost in a greenlet
            self.crashed = exc
            raise

    def publish_one(self, channel: str, seq: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class HttpPublisher(Publisher):
    """``POST /api/publish`` through nginx on one keep-alive connection (a requests.Session).

    With ``lose_every=k`` every publication carries an ``idempotency_key``, and every k-th one
    is first sent on a connection of its own that is closed once the answer has arrived,
    unread (the answer is lost); it is then retried through nginx with the same key, and the
    retry's answer is what the ledger records (``retried``).
    """

    kind = "http"

    def __init__(self, *args: Any, lose_every: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lose_every = lose_every
        self.session = requests.Session()
        self.session.trust_env = False  # the cluster is on this machine: no proxy
        self.lost_answers = 0

    def body(self, channel: str, seq: int) -> dict:
        body: dict[str, Any] = {"channel": channel, "data": self.data(seq)}
        if self.lose_every:
            body["idempotency_key"] = f"{self.name}-{seq}"
        return body

    def publish_one(self, channel: str, seq: int) -> None:
        body = self.body(channel, seq)
        retried = False
        if self.lose_every and seq % self.lose_every == 0:
            error = send_and_drop_answer(self.url, "/api/publish", body)
            if error:
                self.ledger.fail(self.name, seq, channel, f"the attempt to lose: {error}")
            else:
                self.lost_answers += 1
            retried = True
        deadline = time.monotonic() + (REQUEST_TIMEOUT * 2 if retried else 0)
        while True:
            answer, error = self._post(body)
            if answer is not None:
                self.ledger.ack(self.name, seq, channel, answer, retried=retried)
                return
            self.ledger.fail(self.name, seq, channel, error)
            # A publication whose answer was lost is retried until it is answered (what an
            # app with an idempotency key does); others are not: the next seq goes on.
            if time.monotonic() > deadline or self._stop.wait(RECONNECT_PAUSE):
                return

    def _post(self, body: dict) -> tuple[dict | None, str]:
        try:
            response = self.session.post(self.url + "/api/publish", json=body,
                                         timeout=REQUEST_TIMEOUT)
        except requests.RequestException as exc:
            return None, f"{type(exc).__name__}: {exc}"
        if response.status_code == 200:
            answer = response.json()
            if isinstance(answer.get("offset"), int) and isinstance(answer.get("epoch"), str):
                return answer, ""
        return None, f"HTTP {response.status_code} {response.text[:200]!r}"

    def close(self) -> None:
        self.session.close()


def send_and_drop_answer(url: str, target: str, body: dict,
                         timeout: float = REQUEST_TIMEOUT) -> str:
    """POST ``body`` on a connection of its own, wait for the answer to arrive, close unread.

    Returns "" once the answer arrived (and was dropped), else what went wrong. Waiting for
    the answer (without reading it) makes sure the request was carried out: closing earlier
    could make nginx abandon it before a node ever saw it.
    """
    parts = urlsplit(url)
    payload = json.dumps(body).encode()
    request = (f"POST {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
               f"Connection: close\r\n\r\n").encode() + payload
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
            sock.sendall(request)
            readable, _, _ = select.select([sock], [], [], timeout)
            if not readable:
                return f"no answer within {timeout}s"
            first = sock.recv(16, socket.MSG_PEEK)
            if not first.startswith(b"HTTP/1.1 200"):
                return f"answered {first!r}"
            # Closed with the answer unread: a reset instead of a FIN, as when a client dies.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


class SocketIOPublisher(Publisher):
    """The client ``publish`` event from a python-socketio client through nginx (WebSocket).

    When its connection breaks it connects again (through nginx, so to any live node). With
    ``lose_every=k`` every publication carries an ``idempotency_key`` and every k-th one is
    first emitted without asking for an ack (its answer is lost), then sent again with the same
    key, answered.
    """

    kind = "socketio"

    def __init__(self, *args: Any, lose_every: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lose_every = lose_every
        self.client: socketio.Client | None = None
        self.sids: list[str] = []

    def _connected_client(self) -> socketio.Client | None:
        if self.client is not None and self.client.connected:
            return self.client
        self.close()
        client = socketio.Client(reconnection=False)
        try:
            client.connect(self.url, transports=["websocket"], auth={"user": self.name},
                           wait_timeout=REQUEST_TIMEOUT)
        except Exception:
            with contextlib.suppress(Exception):
                client.disconnect()
            return None
        self.client = client
        self.sids.append(client.eio.sid)
        return client

    def publish_one(self, channel: str, seq: int) -> None:
        client = self._connected_client()
        if client is None:
            self.ledger.fail(self.name, seq, channel, "could not connect through nginx")
            self._stop.wait(RECONNECT_PAUSE)
            return
        payload: dict[str, Any] = {"channel": channel, "data": self.data(seq)}
        retried = False
        if self.lose_every:
            payload["idempotency_key"] = f"{self.name}-{seq}"
            if seq % self.lose_every == 0:
                try:
                    client.emit("publish", payload)  # no ack asked: the answer is lost
                except Exception as exc:
                    self.ledger.fail(self.name, seq, channel, f"the attempt to lose: {exc}")
                retried = True
        try:
            answer = client.call("publish", payload, timeout=REQUEST_TIMEOUT)
        except Exception as exc:
            self.ledger.fail(self.name, seq, channel, f"{type(exc).__name__}: {exc}")
            self.close()
            return
        if isinstance(answer, dict) and answer.get("ok"):
            self.ledger.ack(self.name, seq, channel, answer, retried=retried)
        else:
            self.ledger.fail(self.name, seq, channel, f"ack {answer!r}")

    def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.disconnect()
            self.client = None


# -- subscribers -----------------------------------------------------------------------------


class Subscriber:
    """A subscriber of every channel, with the ordered record of every event it got."""

    language = "?"

    def __init__(self, name: str, url: str, way: str, channels: Sequence[str],
                 clock: Clock) -> None:
        self.name = name
        self.url = url
        self.way = way
        self.channels = list(channels)
        self.clock = clock
        self._lock = threading.Lock()
        self._records: list[dict] = []

    def __repr__(self) -> str:
        return f"<{self.label}>"

    @property
    def label(self) -> str:
        return f"{self.name} ({self.language} {self.way})"

    def record(self, kind: str, **fields: Any) -> None:
        with self._lock:
            self._records.append({"kind": kind, "t": self.clock(), **fields})

    def records(self) -> list[dict]:
        with self._lock:
            return list(self._records)

    def state(self) -> SubscriberState:
        return SubscriberState.of(self.records())

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def wait_subscribed(self, timeout: float = 20.0) -> None:
        """Wait until connected and subscribed to every channel."""

        def subscribed() -> bool:
            state = self.state()
            return state.connected and state.subscribed >= set(self.channels)

        try:
            wait_until(subscribed, timeout, interval=0.05,
                       message=f"{self.label} to be subscribed to {self.channels}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{timeline(self)}") from None


@dataclasses.dataclass
class SubscriberState:
    """Where a subscriber stands, from its records: connection, subscriptions, positions."""

    connected: bool = False
    connected_at: float = -1.0
    sid: str | None = None
    subscribed: set[str] = dataclasses.field(default_factory=set)
    positions: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, records: Iterable[dict]) -> SubscriberState:
        state = cls()
        for rec in records:
            kind = rec["kind"]
            if kind == "connect":
                state.connected, state.connected_at, state.sid = True, rec["t"], rec.get("sid")
                state.subscribed.clear()
            elif kind in ("disconnect", "exited"):
                state.connected = False
                state.subscribed.clear()
            elif kind == "subscribed":
                ack = rec["ack"]
                if isinstance(ack, dict) and ack.get("ok"):
                    state.subscribed.add(rec["channel"])
                    state.positions[rec["channel"]] = (ack["epoch"], ack["offset"])
            elif kind == "message":
                epoch = state.positions.get(rec["channel"], ("?", 0))[0]
                state.positions[rec["channel"]] = (epoch, rec["offset"])
            elif kind == "reset":
                state.positions[rec["channel"]] = (rec["epoch"], rec["offset"])
        return state

    @property
    def node(self) -> str:
        return node_of(self.sid)


class _StreamClient(socketio.Client):
    """A python-socketio client whose handlers record into a :class:`Subscriber`, in order."""

    def __init__(self, subscriber: PySubscriber, serializer: str) -> None:
        super().__init__(reconnection=False, serializer=serializer)
        self.gone = threading.Event()

        def record_event(kind: str) -> Callable[[Any], None]:
            def handler(payload: Any) -> None:
                fields = payload if isinstance(payload, dict) else {"payload": payload}
                subscriber.record(kind, **fields)
            return handler

        for kind in ("message", "reset", "join", "leave"):
            self.on(kind, record_event(kind))

        def on_disconnect(*args: Any) -> None:
            subscriber.record("disconnect", reason=str(args[0]) if args else "")
            self.gone.set()

        self.on("disconnect", on_disconnect)

    def _engineio_client_class(self) -> type:
        # Handlers run on the reading thread in arrival order (see clients.py).
        return _InOrderEngineIOClient


class PySubscriber(Subscriber):
    """A python-socketio subscriber through nginx that reconnects by itself with ``since``."""

    language = "py"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.transports, self.serializer = WAYS[self.way]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.client: _StreamClient | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        client = self.client
        if client is not None:
            client.gone.set()  # the subscriber's thread disconnects it and ends
        if self._thread is not None:
            self._thread.join(REQUEST_TIMEOUT * 2)

    def _run(self) -> None:
        while not self._stop.is_set():
            client = _StreamClient(self, self.serializer)
            try:
                client.connect(self.url, transports=self.transports, auth={"user": self.name},
                               wait_timeout=REQUEST_TIMEOUT)
            except Exception as exc:
                self.record("connect_error", message=f"{type(exc).__name__}: {exc}")
                with contextlib.suppress(Exception):
                    client.disconnect()
                self._stop.wait(RECONNECT_PAUSE)
                continue
            self.client = client
            self.record("connect", sid=client.eio.sid, transport=client.transport())
            for channel in self.channels:
                if not self._subscribe(client, channel):
                    break
            client.gone.wait()
            with contextlib.suppress(Exception):
                client.disconnect()

    def _subscribe(self, client: _StreamClient, channel: str) -> bool:
        """Subscribe with ``since`` = the position held; retry refusals while connected."""
        while client.connected and not self._stop.is_set():
            position = self.state().positions.get(channel)
            since = {"epoch": position[0], "offset": position[1]} if position else None
            payload: dict[str, Any] = {"channel": channel}
            if since is not None:
                payload["since"] = since
            answered = threading.Event()
            answers: list[Any] = []
            try:
                client.emit("subscribe", payload,
                            callback=self._ack_recorder(channel, since, answers, answered))
            except Exception:
                return False
            if not answered.wait(REQUEST_TIMEOUT * 2):
                self.record("subscribe_timeout", channel=channel)
                return False
            if isinstance(answers[0], dict) and answers[0].get("ok"):
                return True
            self._stop.wait(RECONNECT_PAUSE)
        return False

    def _ack_recorder(self, channel: str, since: dict | None, answers: list[Any],
                      answered: threading.Event) -> Callable[..., None]:
        def on_ack(ack: Any = None, *_: Any) -> None:
            # Recorded on the reading thread: in order with the messages around it.
            self.record("subscribed", channel=channel, since=since, ack=ack)
            answers.append(ack)
            answered.set()
        return on_ack


class JsSubscriber(Subscriber):
    """The official socket.io-client (js/stream_subscriber.js) with its default options."""

    language = "js"

    def __init__(self, *args: Any, log_dir: Path, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log_dir = log_dir
        self.process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        # scripts/setup installs both; a machine without them must fail here, not skip
        assert shutil.which("node") and OFFICIAL_CLIENT.is_dir(), \
            "node or socket.io-client is missing"
        stderr = open(self.log_dir / f"{self.name}.stderr", "wb")  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                ["node", str(JS_SUBSCRIBER), self.url, self.way, self.name,
                 ",".join(self.channels)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, cwd=REPO)
        finally:
            stderr.close()
        self._reader = threading.Thread(target=self._read, name=self.name, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            try:
                rec = json.loads(line)
            except ValueError:
                self.record("garbage", line=line[:200].decode(errors="replace"))
                continue
            self.record(rec.pop("kind"), **rec)
        self.record("exited", code=self.process.wait())

    def command(self, command: str) -> None:
        """Send ``pause``, ``resume`` or ``quit`` to the driver."""
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(command.encode() + b"\n")
        self.process.stdin.flush()

    def stop(self) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.command("quit")
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        if self._reader is not None:
            self._reader.join(5)
        with contextlib.suppress(OSError, ValueError):
            process.stdin.close()  # type: ignore[union-attr]
        with contextlib.suppress(OSError, ValueError):
            process.stdout.close()  # type: ignore[union-attr]

    @property
    def stderr_tail(self) -> str:
        path = self.log_dir / f"{self.name}.stderr"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-10:])


# -- a run: publishers, subscribers, waits ---------------------------------------------------


def unique_channels(count: int, prefix: str = "rel") -> list[str]:
    run = uuid.uuid4().hex[:8]
    return [f"{prefix}-{run}-{i}" for i in range(count)]


class Traffic:
    """Publishers and subscribers of numbered streams on ``channels`` through ``url`` (nginx).

    Use as a context manager: every publisher and subscriber is stopped on the way out.
    """

    def __init__(self, url: str, channels: Sequence[str], log_dir: Path) -> None:
        self.url = url
        self.channels = list(channels)
        self.log_dir = log_dir
        self.clock = Clock()
        self.ledger = Ledger(self.clock)
        self.publishers: list[Publisher] = []
        self.subscribers: list[Subscriber] = []
        self.publishing = False
        self.phases: list[tuple[float, str]] = []

    def phase(self, what: str) -> float:
        """Note a step of the scenario (shown in failure messages); return its time."""
        now = self.clock()
        self.phases.append((now, what))
        if os.environ.get("RELIABILITY_VERBOSE"):
            print(f"+{now:.2f}s {what}", flush=True)
        return now

    def __enter__(self) -> Traffic:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # building

    def http_publisher(self, name: str, **options: Any) -> HttpPublisher:
        publisher = HttpPublisher(name, self.url, self.channels, self.ledger, **options)
        self.publishers.append(publisher)
        return publisher

    def socketio_publisher(self, name: str, **options: Any) -> SocketIOPublisher:
        publisher = SocketIOPublisher(name, self.url, self.channels, self.ledger, **options)
        self.publishers.append(publisher)
        return publisher

    def py_subscriber(self, name: str, way: str) -> PySubscriber:
        subscriber = PySubscriber(name, self.url, way, self.channels, self.clock)
        self.subscribers.append(subscriber)
        return subscriber

    def js_subscriber(self, name: str, way: str) -> JsSubscriber:
        subscriber = JsSubscriber(name, self.url, way, self.channels, self.clock,
                                  log_dir=self.log_dir)
        self.subscribers.append(subscriber)
        return subscriber

    def standard_mix(self) -> None:
        """3 publishers (2 over HTTP, 1 over Socket.IO), 8 subscribers of mixed kinds."""
        self.http_publisher("http-1")
        self.http_publisher("http-2")
        self.socketio_publisher("sio-1")
        for way in ("websocket", "polling", "msgpack-websocket", "msgpack-polling"):
            self.py_subscriber(f"py-{way}", way)
        for way in ("default", "msgpack-websocket", "polling", "msgpack-default"):
            self.js_subscriber(f"js-{way}", way)

    # running

    def seed(self) -> None:
        """Publish once on every channel before anyone subscribes, so that every subscribe
        ack names a real epoch (a stream that does not exist yet has epoch "")."""
        session = requests.Session()
        session.trust_env = False
        for seq, channel in enumerate(self.channels, 1):
            response = session.post(self.url + "/api/publish",
                                    json={"channel": channel, "data": {"pub": "seed", "seq": seq}},
                                    timeout=REQUEST_TIMEOUT)
            assert response.status_code == 200, response.text
            self.ledger.ack("seed", seq, channel, response.json())
        session.close()

    def start(self) -> None:
        """Seed the channels, start every subscriber (subscribed everywhere), then publish."""
        self.phase("seed")
        self.seed()
        for subscriber in self.subscribers:
            subscriber.start()
        for subscriber in self.subscribers:
            subscriber.wait_subscribed()
        self.phase("every subscriber subscribed")
        self.start_publishers()

    def start_publishers(self) -> None:
        self.publishing = True
        for publisher in self.publishers:
            publisher.start()

    def stop_publishers(self) -> None:
        self.phase("stop publishing")
        for publisher in self.publishers:
            publisher.stop()
        self.publishing = False
        crashed = [f"{p}: {p.crashed!r}" for p in self.publishers if p.crashed]
        assert not crashed, "publishers crashed: " + "; ".join(crashed)

    def wait_published(self, count: int, after: float = -1.0, timeout: float = 15.0,
                       publishers: Sequence[Publisher] | None = None) -> None:
        """Wait until every publisher (or those given) has ``count`` acknowledged publications
        made after ``after`` (seconds of the run's clock)."""
        publishers = list(publishers or self.publishers)

        def enough() -> bool:
            return all(len(self.ledger.acks(p.name, after)) >= count for p in publishers)

        try:
            wait_until(enough, timeout, interval=0.05,
                       message=f"{count} acknowledged publications per publisher after "
                               f"+{after:.2f}s")
            self.phase(f"{count} acks per publisher after +{after:.2f}s")
        except AssertionError as exc:
            counts = "; ".join(
                f"{p.name}: {len(self.ledger.acks(p.name, after))} acked, "
                f"{self.ledger.failure_summary(p.name, after)}" for p in publishers)
            raise AssertionError(f"{exc}: {counts}") from None

    def stream_positions(self) -> dict[str, tuple[str, int]]:
        """Each channel's current (epoch, offset), read through nginx."""
        positions = {}
        for channel in self.channels:
            response = requests.get(f"{self.url}/api/history/{channel}", params={"limit": 0},
                                    timeout=REQUEST_TIMEOUT)
            assert response.status_code == 200, f"history of {channel}: {response.text}"
            body = response.json()
            positions[channel] = (body["epoch"], body["offset"])
        return positions

    def settle(self, timeout: float = 20.0) -> None:
        """Wait (at most ``timeout``) until every subscriber is connected, subscribed and at
        each channel's current position. Returns either way: the checker says what is wrong."""
        assert not self.publishing, "stop the publishers first"
        positions = self.stream_positions()

        def caught_up() -> bool:
            for subscriber in self.subscribers:
                state = subscriber.state()
                if not state.connected or state.subscribed != set(self.channels):
                    return False
                if not all(same_position(state.positions.get(ch), positions[ch])
                           for ch in self.channels):
                    return False
            return True

        self.phase("settle")
        try:
            wait_until(caught_up, timeout, interval=0.05, message="subscribers to catch up")
        except AssertionError:
            self.phase(f"not caught up after {timeout}s")
        else:
            self.phase("caught up")

    def check(self, *, data_kept: bool) -> None:
        """Fail with every problem in every subscriber's streams (see :func:`check_streams`)."""
        self.phase("check")
        assert_streams(self.subscribers, self.ledger, self.channels, data_kept=data_kept,
                       positions=self.stream_positions(), phases=self.phases)

    def subscribers_on(self, node_id: str) -> list[Subscriber]:
        return [s for s in self.subscribers if s.state().node == node_id]

    def busiest_node(self, among: Iterable[str]) -> str:
        """The node (of ``among``) that holds the most subscribers."""
        return max(among, key=lambda node: (len(self.subscribers_on(node)), node))

    def close(self) -> None:
        for publisher in self.publishers:
            with contextlib.suppress(Exception):
                publisher.stop()
        for subscriber in self.subscribers:
            with contextlib.suppress(Exception):
                subscriber.stop()


# -- the checker -----------------------------------------------------------------------------


@dataclasses.dataclass
class _Gap:
    """An announced gap: the stream went from ``(from_epoch, from_offset)`` to
    ``(to_epoch, to_offset)``; whatever lies between may be missing."""

    from_epoch: str
    from_offset: int
    to_epoch: str
    to_offset: int
    how: str

    def covers(self, epoch: str, offset: int, order: dict[str, int]) -> bool:
        if self.from_epoch == self.to_epoch:
            return epoch == self.from_epoch and self.from_offset < offset <= self.to_offset
        if epoch == self.from_epoch:
            return offset > self.from_offset
        if epoch == self.to_epoch:
            return offset <= self.to_offset
        # An epoch that came and went between the two (ordered by when it was first seen).
        low, high = order.get(self.from_epoch, -1), order.get(self.to_epoch, 1 << 30)
        return low < order.get(epoch, -2) < high


class _ChannelWalk:
    """One subscriber's stream of one channel, walked record by record."""

    def __init__(self, who: str, channel: str, ledger_positions: dict, ledger_data: dict,
                 data_kept: bool) -> None:
        self.where = f"{who}: {channel}"
        self.channel = channel
        self.by_position = ledger_positions
        self.by_data = ledger_data
        self.data_kept = data_kept
        self.problems: list[str] = []
        self.more_problems = 0
        self.subscribed = False
        self.start: tuple[str, int] | None = None
        self.epoch: str | None = None
        self.offset = 0
        self.received: dict[tuple[str, int], tuple[str, int] | None] = {}
        self.seen_data: dict[tuple[str, int], tuple[str, int]] = {}
        self.gaps: list[_Gap] = []
        self.resubscribes: list[dict] = []

    def problem(self, t: float, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS_PER_CHANNEL:
            self.problems.append(f"{self.where}: at +{t:.2f}s {text}")
        else:
            self.more_problems += 1

    def all_problems(self) -> list[str]:
        more = [f"{self.where}: … and {self.more_problems} more problems"] \
            if self.more_problems else []
        return [*self.problems, *more]

    def disconnected(self) -> None:
        self.subscribed = False

    def subscribed_ack(self, rec: dict) -> None:
        ack, t = rec["ack"], rec["t"]
        if not (isinstance(ack, dict) and ack.get("ok")):
            return  # refused (e.g. unavailable): the subscriber asks again
        epoch, offset = ack["epoch"], ack["offset"]
        publications = ack.get("publications") or []
        if self.start is None:
            self.start = (epoch, offset)
            self.epoch, self.offset = epoch, offset
            if publications:
                self.problem(t, f"a subscribe without since returned {len(publications)} "
                                f"publications")
            self.subscribed = True
            return
        self.resubscribes.append(rec)
        since = rec.get("since")
        held = (self.epoch, self.offset)
        if since is not None and (since.get("epoch"), since.get("offset")) != held:
            self.problem(t, f"(harness) resubscribed with since {since} but held {held}")
        self.subscribed = True
        if ack.get("recovered"):
            if epoch != self.epoch and self.epoch != "":
                self.problem(t, f"recovered: true in epoch {short(epoch)}, but the subscriber "
                                f"was in epoch {short(self.epoch)}")
            for publication in publications:
                self.message(t, publication.get("offset"), publication.get("data"),
                             "a recovered publication")
            if self.offset != offset:
                self.problem(t, f"recovered: true with publications up to offset {self.offset} "
                                f"but the ack's offset is {offset}")
            self.offset = offset
            if self.epoch == "":
                self._bind_epoch(epoch)
            self.epoch = epoch
            return
        if publications:
            self.problem(t, f"recovered: false with {len(publications)} publications")
        self.announced(t, epoch, offset, "recovered: false")

    def announced(self, t: float, epoch: str, offset: int, how: str) -> None:
        assert self.epoch is not None
        gap = _Gap(self.epoch, self.offset, epoch, offset, how)
        if self.data_kept:
            self.problem(t, f"{how} moved the stream from {short(self.epoch)}:{self.offset} to "
                            f"{short(epoch)}:{offset} although Redis kept its data and history "
                            f"holds every publication of the run")
        self.gaps.append(gap)
        self.epoch, self.offset = epoch, offset

    def reset(self, rec: dict) -> None:
        if self.start is None:
            self.problem(rec["t"], f"reset {rec} before the first subscribe ack")
            return
        self.announced(rec["t"], rec["epoch"], rec["offset"], "reset")

    def message(self, t: float, offset: Any, data: Any, what: str = "message") -> None:
        if self.start is None or not self.subscribed:
            state = "before its subscribe ack" if self.start is None else \
                "while not subscribed (after a disconnect, before the resubscribe ack)"
            self.problem(t, f"{what} at offset {offset} {data_key(data)} arrived {state}")
            if self.start is None:
                return
        if not isinstance(offset, int):
            self.problem(t, f"{what} without an integer offset: {offset!r}")
            return
        key = data_key(data)
        if self.epoch == "":
            # Epoch "": the stream did not exist when the subscriber was placed; the first
            # publication created it. Its epoch is the one the publisher was answered.
            acked_as = self.by_data.get(key) if key is not None else None
            if acked_as is not None and acked_as.channel == self.channel:
                self._bind_epoch(acked_as.epoch)
        acked_as = self.by_data.get(key) if key is not None else None
        if acked_as is not None and acked_as.channel == self.channel and \
                acked_as.epoch != self.epoch and acked_as.offset == offset:
            # Another stream, silently: report it once and follow the new stream from here.
            self.problem(t, f"the stream changed epoch without a reset nor recovered: false: "
                            f"{what} at offset {offset} {key} belongs to epoch "
                            f"{short(acked_as.epoch)}, the subscriber was at "
                            f"{short(self.epoch)}:{self.offset}"
                            + self._what_was_missed(self.epoch or "", range(self.offset + 1,
                                                                            self.offset + 10**6)))
            self.epoch, self.offset = acked_as.epoch, offset - 1
        epoch = self.epoch
        assert epoch is not None
        expected = self.offset + 1
        if (epoch, offset) in self.received:
            first_time = self.received[(epoch, offset)]
            self.problem(t, f"duplicate: offset {offset} (epoch {short(epoch)}) delivered again"
                            f" ({what}, data {key}; the first time {first_time})")
        elif offset < expected:
            self.problem(t, f"reordered: {what} at offset {offset} {key} after offset "
                            f"{self.offset} (epoch {short(epoch)})")
        elif offset > expected:
            self.problem(t, f"unannounced gap: offsets {ranges(range(expected, offset))} "
                            f"(epoch {short(epoch)}) missing, no reset nor recovered: false "
                            f"— {what} at offset {offset} came after offset {self.offset}"
                            + self._what_was_missed(epoch, range(expected, offset)))
        self.received.setdefault((epoch, offset), key)
        acked = self.by_position.get((self.channel, epoch, offset))
        if acked is not None and acked.data_key != key:
            self.problem(t, f"offset {offset} (epoch {short(epoch)}) carried {key}, but that "
                            f"position was acknowledged for {acked.describe()}")
        if key is not None:
            first = self.seen_data.get(key)
            if first is not None and first != (epoch, offset):
                self.problem(t, f"publication {key} delivered twice: at {short(first[0])}:"
                                f"{first[1]} and at {short(epoch)}:{offset}")
            self.seen_data.setdefault(key, (epoch, offset))
            acked_as = self.by_data.get(key)
            if acked_as is not None and acked_as.channel == self.channel and \
                    (acked_as.epoch, acked_as.offset) != (epoch, offset):
                self.problem(t, f"publication {key} arrived as {short(epoch)}:{offset} but its "
                                f"publisher was answered {short(acked_as.epoch)}:"
                                f"{acked_as.offset}")
        self.offset = max(self.offset, offset)

    def _bind_epoch(self, epoch: str) -> None:
        """The stream of epoch "" turned out to be ``epoch``: rename what was held as ""."""
        self.received = {(epoch if e == "" else e, o): k for (e, o), k in self.received.items()}
        self.seen_data = {k: (epoch if e == "" else e, o) for k, (e, o) in self.seen_data.items()}
        for gap in self.gaps:
            gap.from_epoch = epoch if gap.from_epoch == "" else gap.from_epoch
            gap.to_epoch = epoch if gap.to_epoch == "" else gap.to_epoch
        self.epoch = epoch

    def _what_was_missed(self, epoch: str, offsets: range) -> str:
        acked = [entry for (channel, e, o), entry in self.by_position.items()
                 if channel == self.channel and e == epoch and o in offsets]
        acked.sort(key=lambda entry: entry.offset)
        if not acked:
            return ""
        return (f"; {len(acked)} of them acknowledged, e.g. offset {acked[0].offset} = "
                f"{acked[0].describe()}")

    def missing(self, acked: Sequence[Acked], order: dict[str, int]) -> list[Acked]:
        """The acknowledged publications of this channel neither received nor excused."""
        if self.start is None:
            return list(acked)
        start_epoch, start_offset = self.start
        missing = []
        for entry in acked:
            if (entry.epoch, entry.offset) in self.received:
                continue
            if entry.epoch == start_epoch and entry.offset <= start_offset:
                continue  # before this subscriber subscribed
            if order.get(entry.epoch, 0) < order.get(start_epoch, 0):
                continue  # an epoch that ended before this subscriber subscribed
            if any(gap.covers(entry.epoch, entry.offset, order) for gap in self.gaps):
                continue
            missing.append(entry)
        return missing


def check_streams(subscribers: Sequence[Subscriber], ledger: Ledger, channels: Sequence[str],
                  *, data_kept: bool,
                  positions: dict[str, tuple[str, int]] | None = None) -> list[str]:
    """Every problem in every subscriber's stream of every channel (see the module doc)."""
    acked = ledger.acks()
    by_position: dict[tuple[str, str, int], Acked] = {}
    problems: list[str] = []
    for entry in acked:
        other = by_position.setdefault((entry.channel, entry.epoch, entry.offset), entry)
        if other is not entry:
            problems.append(f"{entry.channel}: two publications acknowledged at "
                            f"{short(entry.epoch)}:{entry.offset}: {other.describe()} and "
                            f"{entry.describe()}")
    by_data = {entry.data_key: entry for entry in acked}
    # Epochs in the order they were first acknowledged (then first seen by a subscriber).
    order: dict[str, int] = {}
    for entry in sorted(acked, key=lambda a: a.at):
        order.setdefault(entry.epoch, len(order))
    for subscriber in subscribers:
        walks = {ch: _ChannelWalk(subscriber.label, ch, by_position, by_data, data_kept)
                 for ch in channels}
        records = subscriber.records()
        for rec in records:
            kind = rec["kind"]
            if kind in ("disconnect", "exited"):
                for walk in walks.values():
                    walk.disconnected()
            elif kind == "subscribed" and rec["channel"] in walks:
                ack = rec["ack"]
                if isinstance(ack, dict) and isinstance(ack.get("epoch"), str):
                    order.setdefault(ack["epoch"], len(order))
                walks[rec["channel"]].subscribed_ack(rec)
            elif kind == "message" and rec.get("channel") in walks:
                walks[rec["channel"]].message(rec["t"], rec.get("offset"), rec.get("data"))
            elif kind == "reset" and rec.get("channel") in walks:
                order.setdefault(rec["epoch"], len(order))
                walks[rec["channel"]].reset(rec)
            elif kind == "garbage":
                problems.append(f"{subscriber.label}: the driver printed {rec['line']!r}")
        state = SubscriberState.of(records)
        if not state.connected:
            last = [r for r in records if r["kind"] in ("disconnect", "connect_error", "exited")]
            problems.append(f"{subscriber.label}: ended disconnected (last: {last[-3:]})")
        for channel, walk in walks.items():
            problems += walk.all_problems()
            if walk.start is None:
                problems.append(f"{walk.where}: never subscribed")
                continue
            missing = walk.missing([a for a in acked if a.channel == channel], order)
            if missing:
                problems.append(_describe_missing(walk, missing))
            if positions is not None and not same_position(state.positions.get(channel),
                                                           positions[channel]):
                now = positions[channel]
                held = state.positions.get(channel)
                problems.append(f"{walk.where}: ended at {held and short(held[0])}:"
                                f"{held and held[1]} while the stream is at {short(now[0])}:"
                                f"{now[1]}")
    return problems


def _describe_missing(walk: _ChannelWalk, missing: list[Acked]) -> str:
    per_epoch: dict[str, list[int]] = {}
    for entry in missing:
        per_epoch.setdefault(entry.epoch, []).append(entry.offset)
    where = "; ".join(f"epoch {short(epoch)} offsets {ranges(offsets)}"
                      for epoch, offsets in per_epoch.items())
    first = missing[0]
    return (f"{walk.where}: {len(missing)} acknowledged publications never delivered and never "
            f"announced: {where} (e.g. offset {first.offset} = {first.describe()}); the "
            f"subscriber received up to {short(walk.epoch)}:{walk.offset}")


def timeline(subscriber: Subscriber, limit: int = 40) -> str:
    """A subscriber's record in short: connections, acks, resets, runs of messages."""
    lines: list[str] = []
    run: dict[str, list[int]] = {}
    run_start = 0.0

    def flush() -> None:
        if run:
            parts = ", ".join(f"{ch.rsplit('-', 1)[-1]}:{ranges(offsets)}"
                              for ch, offsets in run.items())
            lines.append(f"  +{run_start:.2f}s messages {parts}")
            run.clear()

    for rec in subscriber.records():
        kind, t = rec["kind"], rec["t"]
        if kind == "message":
            if not run:
                run_start = t
            run.setdefault(str(rec.get("channel")), []).append(rec.get("offset"))  # type: ignore[arg-type]
            continue
        flush()
        if kind == "connect":
            lines.append(f"  +{t:.2f}s connect {node_of(rec.get('sid'))} ({rec.get('transport')})")
        elif kind == "subscribed":
            ack = rec["ack"] if isinstance(rec["ack"], dict) else {"ok": rec["ack"]}
            since = rec.get("since")
            since_text = f" since {short(since['epoch'])}:{since['offset']}" if since else ""
            if ack.get("ok"):
                text = (f"-> {short(ack.get('epoch'))}:{ack.get('offset')} recovered="
                        f"{ack.get('recovered')} ({len(ack.get('publications') or [])} pubs)")
            else:
                text = f"-> refused {ack.get('error')}"
            lines.append(f"  +{t:.2f}s subscribe {rec['channel'].rsplit('-', 1)[-1]}"
                         f"{since_text} {text}")
        elif kind in ("join", "leave"):
            continue
        else:
            fields = {k: v for k, v in rec.items() if k not in ("kind", "t")}
            lines.append(f"  +{t:.2f}s {kind} {fields}")
    flush()
    stderr = getattr(subscriber, "stderr_tail", "")
    if stderr:
        lines.append(f"  its stderr: {stderr}")
    if len(lines) > limit:
        lines = [*lines[:limit // 2], f"  … {len(lines) - limit} more", *lines[-limit // 2:]]
    return f"{subscriber.label}:\n" + "\n".join(lines)


def assert_streams(subscribers: Sequence[Subscriber], ledger: Ledger, channels: Sequence[str],
                   *, data_kept: bool, positions: dict[str, tuple[str, int]] | None = None,
                   phases: Sequence[tuple[float, str]] = ()) -> None:
    """Fail with every problem :func:`check_streams` finds, and each subscriber's timeline."""
    problems = check_streams(subscribers, ledger, channels, data_kept=data_kept,
                             positions=positions)
    if not problems:
        return
    shown = problems[:60]
    more = f"\n… and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    acks = len(ledger.acks())
    at = {ch.rsplit("-", 1)[-1]: f"{short(p[0])}:{p[1]}" for ch, p in (positions or {}).items()}
    raise AssertionError(
        f"{len(problems)} problems in the streams of {len(subscribers)} subscribers "
        f"({acks} acknowledged publications; data_kept={data_kept}; streams at {at}):\n"
        + "\n".join(shown) + more + "\n\nThe scenario: "
        + "; ".join(f"+{t:.2f}s {what}" for t, what in phases)
        + "\n\nTimelines (channels by their last part):\n"
        + "\n".join(timeline(s) for s in subscribers))
