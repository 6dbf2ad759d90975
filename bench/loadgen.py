"""The load generator: worker processes, each an asyncio loop with thousands of raw clients.

:class:`LoadGen` (in the orchestrating process) starts the workers and sends them commands over
pipes; :func:`worker_main` runs in each worker. A worker raises its open-file limit to the hard
limit and binds every client socket to one of its own loopback source addresses
(``127.10.<worker>.<n>``), so that tens of thousands of connections get past the ephemeral port
range of a single (source, destination) pair. The last worker is the publisher: its pacing must
not suffer from thousands of subscribers sharing its loop.

Commands (dicts with an ``op``) run as tasks in the worker; each answers one result. Long ones
send progress counts on the way, which the orchestrator turns into progress bars.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import multiprocessing
import random
import resource
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from .stats import bucket_of, new_histogram, sparse
from .wsclient import TCP_CLOSE, TCP_CLOSE_WAIT, Recorder, SocketIOClient, connect, payload

logger = logging.getLogger(__name__)

SOURCES_PER_WORKER = 8
# Client workers sleep this long (ms) between event loop iterations, so that one iteration
# handles the messages of many sockets: on the 2-core machine, receiving and counting a 150-byte
# message cost ~12 µs of client CPU without it and ~9-10 µs with it. Latencies do not suffer:
# they are taken from the kernel's receive timestamps. (uvloop measured no better here, and its
# add_reader breaks when a reset connection's descriptor number is reused: plain asyncio.)
DEFAULT_NAP_MS = 1.0
PROGRESS_EVERY = 0.2  # seconds between progress messages of a worker
SUBSCRIBE_ATTEMPTS = 3


def source_addresses(worker: int, count: int = SOURCES_PER_WORKER) -> list[str]:
    """The loopback source addresses of worker ``worker``."""
    return [f"127.10.{worker}.{n + 1}" for n in range(count)]


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class WorkerError(RuntimeError):
    """A command failed inside a worker; the message holds the worker's traceback."""


# -- the orchestrator's side ----------------------------------------------------------------


class LoadGen:
    """``subscriber_workers`` client workers plus one publisher worker, started at once."""

    def __init__(self, subscriber_workers: int, *, nap_ms: float = DEFAULT_NAP_MS) -> None:
        context = multiprocessing.get_context("spawn")
        self.subscriber_workers = list(range(subscriber_workers))
        self.publisher = subscriber_workers
        self._conns: list[Connection] = []
        self._processes: list[multiprocessing.process.BaseProcess] = []
        self._ids = itertools.count(1)
        self._results: dict[int, tuple[str, Any]] = {}
        for index in range(subscriber_workers + 1):
            ours, theirs = context.Pipe()
            nap = nap_ms if index < subscriber_workers else 0.0
            process = context.Process(target=worker_main, args=(theirs, index, nap),
                                      name=f"bench-loadgen-{index}", daemon=True)
            process.start()
            theirs.close()
            self._conns.append(ours)
            self._processes.append(process)
        logger.info("load generator: %d workers, pids %s", len(self._processes),
                    [p.pid for p in self._processes])

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes if p.pid is not None]

    def submit(self, worker: int, op: str, **args: Any) -> tuple[int, int]:
        """Send a command to ``worker``; returns a handle for :meth:`wait`."""
        command_id = next(self._ids)
        self._conns[worker].send({"op": op, "id": command_id, **args})
        return worker, command_id

    def wait(self, handles: Sequence[tuple[int, int]], *, timeout: float | None = None,
             progress: Callable[[int], None] | None = None, tick: Callable[[], None] | None = None,
             ) -> list[Any]:
        """The results of ``handles``, in order; ``progress`` gets the workers' counts."""
        deadline = None if timeout is None else time.monotonic() + timeout
        wanted = {command_id for _, command_id in handles}
        while not wanted <= self._results.keys():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"load generator workers did not answer in {timeout:g}s")
            ready = wait(self._conns, timeout=0.1 if remaining is None else min(0.1, remaining))
            for conn in ready:
                try:
                    message = conn.recv()  # type: ignore[union-attr]
                except EOFError:
                    index = self._conns.index(conn)  # type: ignore[arg-type]
                    raise WorkerError(f"load generator worker {index} died") from None
                kind = message[0]
                if kind == "progress":
                    if progress is not None and message[1] in wanted:
                        progress(message[2])
                else:
                    self._results[message[1]] = (kind, message[2])
            if tick is not None:
                tick()
        results = []
        for worker, command_id in handles:
            kind, value = self._results.pop(command_id)
            if kind == "error":
                raise WorkerError(f"worker {worker}: {value}")
            results.append(value)
        return results

    def call(self, worker: int, op: str, timeout: float | None = None, **args: Any) -> Any:
        """Run one command on one worker and return its result."""
        return self.wait([self.submit(worker, op, **args)], timeout=timeout)[0]

    def call_each(self, workers: Iterable[int], op: str, args: Callable[[int], dict[str, Any]],
                  *, timeout: float | None = None,
                  progress: Callable[[int], None] | None = None) -> list[Any]:
        """Run ``op`` on every worker with ``args(worker)``; results in the same order."""
        handles = [self.submit(worker, op, **args(worker)) for worker in workers]
        return self.wait(handles, timeout=timeout, progress=progress)

    def close(self) -> None:
        """Stop every worker (by its pid, if it does not quit by itself)."""
        for conn in self._conns:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send({"op": "quit", "id": 0})
        for process in self._processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
        for conn in self._conns:
            conn.close()

    def __enter__(self) -> LoadGen:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def split(total: int, parts: int) -> list[tuple[int, int]]:
    """``(start, count)`` slices of ``range(total)`` for ``parts`` workers."""
    base, extra = divmod(total, parts)
    slices, start = [], 0
    for part in range(parts):
        count = base + (1 if part < extra else 0)
        slices.append((start, count))
        start += count
    return slices


# -- the worker's side ----------------------------------------------------------------------


def worker_main(conn: Connection, index: int, nap_ms: float) -> None:
    """Entry point of a worker process: serve commands from ``conn`` until ``quit``.

    With ``nap_ms`` > 0 the event loop sleeps that long between iterations (see
    :data:`DEFAULT_NAP_MS`).
    """
    logging.basicConfig(level=logging.WARNING, format=f"loadgen[{index}] %(message)s")
    raise_fd_limit()
    worker = Worker(conn, index, nap_ms / 1000)
    asyncio.run(worker.run())


class Worker:
    """The clients of one worker process and the commands that drive them."""

    def __init__(self, conn: Connection, index: int, nap: float = 0.0) -> None:
        self.conn = conn
        self.nap = nap
        self.index = index
        self.sources = source_addresses(index)
        self.recorder = Recorder()
        self.groups: dict[str, list[SocketIOClient]] = {}
        self.loop: asyncio.AbstractEventLoop
        self.done: asyncio.Future[None]
        self.tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.done = self.loop.create_future()
        self.loop.add_reader(self.conn.fileno(), self._on_command)
        if self.nap > 0:
            self.loop.call_soon(self._nap)
        await self.done
        for client in itertools.chain.from_iterable(self.groups.values()):
            client.abort()

    def _nap(self) -> None:
        # Runs once per loop iteration: while it sleeps, messages pile up in the sockets, and
        # the next iteration reads them with far fewer wake-ups and system calls.
        if not self.done.done():
            time.sleep(self.nap)
            self.loop.call_soon(self._nap)

    def _on_command(self) -> None:
        try:
            command = self.conn.recv()
        except EOFError:
            command = {"op": "quit", "id": 0}
        if command["op"] == "quit":
            self.loop.remove_reader(self.conn.fileno())
            if not self.done.done():
                self.done.set_result(None)
            return
        task = self.loop.create_task(self._run_command(command))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run_command(self, command: dict[str, Any]) -> None:
        command_id = command.pop("id")
        op = command.pop("op")
        try:
            result = await getattr(self, "op_" + op)(command_id, **command)
            self.conn.send(("result", command_id, result))
        except Exception:
            self.conn.send(("error", command_id, traceback.format_exc()))

    def _progress(self, command_id: int, count: int) -> None:
        self.conn.send(("progress", command_id, count))

    # -- connections -------------------------------------------------------------------------

    async def op_connect(self, command_id: int, *, group: str, urls: list[list[Any]],
                         start: int, count: int, user: str | None = None,
                         channel: str | None = None, concurrency: int = 100,
                         timeout: float = 20.0, record: bool = True,
                         rcvbuf: int | None = None) -> dict[str, Any]:
        """Open ``count`` clients numbered from ``start`` (client i -> ``urls[i % len]``).

        ``user`` and ``channel`` are templates with ``{i}`` (the client number); with a
        ``channel`` each client subscribes to it once connected.
        """
        clients = self.groups.setdefault(group, [])
        errors: dict[str, int] = {}
        semaphore = asyncio.Semaphore(concurrency)
        reported = [0, time.monotonic()]
        done = [0]
        handshake_done: list[float] = []
        subscribe_errors = [0]
        retries = [0]
        refused: list[int] = []

        async def one(i: int) -> None:
            host, port = urls[i % len(urls)]
            source = self.sources[i % len(self.sources)]
            auth = {"user": user.format(i=i)} if user is not None else None
            async with semaphore:
                try:
                    client = await connect(self.loop, host, port, source=source, auth=auth,
                                           recorder=self.recorder if record else None,
                                           timeout=timeout, rcvbuf=rcvbuf)
                    client.number = i
                    handshake_done.append(time.monotonic())
                    if channel is not None:
                        for attempt in range(SUBSCRIBE_ATTEMPTS):
                            answer = await asyncio.wait_for(
                                client.emit("subscribe", {"channel": channel.format(i=i)}),  # type: ignore[arg-type]
                                timeout)
                            if isinstance(answer, dict) and answer.get("ok"):
                                break
                            # Refused (e.g. unavailable under load): counted, then retried as
                            # a real client would.
                            reason = f"subscribe refused: {answer}"[:200]
                            errors[reason] = errors.get(reason, 0) + 1
                            retries[0] += 1
                            if attempt == 0 and len(refused) < 100:
                                refused.append(i)
                            await asyncio.sleep(0.2 * (attempt + 1))
                        else:
                            subscribe_errors[0] += 1
                    clients.append(client)
                except Exception as exc:
                    reason = f"{type(exc).__name__}: {exc}"[:200]
                    errors[reason] = errors.get(reason, 0) + 1
            done[0] += 1
            now = time.monotonic()
            if now - reported[1] > PROGRESS_EVERY:
                self._progress(command_id, done[0] - reported[0])
                reported[0], reported[1] = done[0], now

        began = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(start, start + count)))
        ended = time.monotonic()
        self._progress(command_id, done[0] - reported[0])
        return {
            "connected": len(handshake_done),
            "subscribed": len(handshake_done) - subscribe_errors[0] if channel else 0,
            "subscribe_refusals": retries[0],
            "refused_clients": refused,
            "failed": count - len(handshake_done),
            "errors": errors,
            "began": began,
            "handshakes_done": max(handshake_done) if handshake_done else ended,
            "elapsed_s": ended - began,
        }

    async def op_close(self, command_id: int, *, group: str, wait_s: float = 5.0
                       ) -> dict[str, Any]:
        """Close every client of ``group`` cleanly and forget them."""
        clients = self.groups.pop(group, [])
        for client in clients:
            if client.paused:
                client.abort()
            else:
                client.close()
        waiting = [c.closed for c in clients if not c.closed.done()]
        if waiting:
            await asyncio.wait(waiting, timeout=wait_s)
        return {"closed": len(clients)}

    async def op_status(self, command_id: int, *, group: str) -> dict[str, Any]:
        """How many clients of ``group`` are open, closed by the server, paused."""
        clients = self.groups.get(group, [])
        closed = [c for c in clients if c.closed.done()]
        reasons: dict[str, int] = {}
        for client in closed:
            reasons[client.close_reason or "?"] = reasons.get(client.close_reason or "?", 0) + 1
        paused = [c for c in clients if c.paused]
        return {
            "clients": len(clients),
            "closed": len(closed),
            "close_reasons": reasons,
            "paused": len(paused),
            # A paused client does not read, so it notices the server closing only this way.
            "paused_closed_by_server": sum(1 for c in paused if c.closed.done()
                                           or c.tcp_state() in (TCP_CLOSE, TCP_CLOSE_WAIT)),
            "other_events": self.recorder.other_events,
        }

    async def op_pause(self, command_id: int, *, group: str, count: int) -> int:
        """Make ``count`` clients of ``group`` stop reading (slow consumers)."""
        paused = 0
        for client in self.groups.get(group, []):
            if paused >= count:
                break
            client.pause()
            paused += 1
        return paused

    async def op_resume(self, command_id: int, *, group: str, wait_s: float = 2.0
                        ) -> dict[str, int]:
        """Read again on the paused clients of ``group``; how they were closed, if they were."""
        paused = [c for c in self.groups.get(group, []) if c.paused]
        for client in paused:
            client.resume()
        waiting = [c.closed for c in paused if not c.closed.done()]
        if waiting:
            await asyncio.wait(waiting, timeout=wait_s)
        reasons: dict[str, int] = {}
        for client in paused:
            reason = client.close_reason if client.closed.done() else "still open"
            reasons[reason or "?"] = reasons.get(reason or "?", 0) + 1
        return reasons

    async def op_subscribe(self, command_id: int, *, group: str, channel: str,
                           timeout: float = 20.0) -> int:
        """Subscribe every client of ``group`` to ``channel`` too; how many were acked ok."""
        answers = await asyncio.gather(*(
            asyncio.wait_for(c.emit("subscribe", {"channel": channel}), timeout)  # type: ignore[arg-type]
            for c in self.groups.get(group, [])), return_exceptions=True)
        return sum(1 for a in answers if isinstance(a, dict) and a.get("ok"))

    async def op_short(self, command_id: int, *, group: str, publisher: int, sent: int,
                       users: int, limit: int = 100) -> list[int]:
        """Clients of ``group`` that got fewer distinct messages from ``publisher`` than sent.

        For per-user channels: message i of ``sent`` went to client number i % ``users``.
        """
        short = []
        for client in self.groups.get(group, []):
            number = client.number
            if number is None or number >= users:
                continue
            expected = sent // users + (1 if number < sent % users else 0)
            seen = client._seen.get(publisher)
            got = int.from_bytes(seen[1], "little").bit_count() if seen else 0
            if got < expected:
                short.append(number)
        return sorted(short)[:limit]

    async def op_stats(self, command_id: int, *, publishers: list[int] | None = None
                       ) -> dict[int, dict[str, Any]]:
        return self.recorder.report(publishers)

    async def op_forget(self, command_id: int, *, publishers: list[int]) -> None:
        self.recorder.forget(publishers)
        for client in itertools.chain.from_iterable(self.groups.values()):
            for pub in publishers:
                client._seen.pop(pub, None)

    async def op_cpu(self, command_id: int) -> float:
        """This worker's CPU seconds (user + system) so far."""
        return time.process_time()

    # -- publishing --------------------------------------------------------------------------

    async def _paced(self, rate: float, duration: float, send: Callable[[int], Any],
                     command_id: int) -> tuple[int, float, float, float]:
        """Call ``send(i)`` for i = 0.. on an absolute schedule of ``rate`` per second.

        Returns (sent, started, ended, worst lateness in seconds), times from time.monotonic.
        """
        total = max(1, int(rate * duration))
        started = time.monotonic()
        sent = 0
        worst = 0.0
        last_report = started
        reported = 0
        while sent < total:
            now = time.monotonic()
            due = started + sent / rate
            if due > now:
                await asyncio.sleep(due - now)
                continue
            worst = max(worst, now - due)
            while sent < total and started + sent / rate <= now:
                send(sent)
                sent += 1
            if now - last_report > PROGRESS_EVERY:
                self._progress(command_id, sent - reported)
                last_report, reported = now, sent
        self._progress(command_id, sent - reported)
        return sent, started, time.monotonic(), worst

    async def op_publish_ws(self, command_id: int, *, group: str, channel: str, rate: float,
                            duration: float, pub_id: int, size: int = 100,
                            ack_timeout: float = 30.0) -> dict[str, Any]:
        """Publish on ``channel`` through the ``publish`` event of the group's first client."""
        client = self.groups[group][0]
        futures: list[asyncio.Future[Any]] = []

        def send(i: int) -> None:
            futures.append(client.emit(  # type: ignore[arg-type]
                "publish", {"channel": channel, "data": payload(pub_id, i, size)}))

        sent, started, ended, worst = await self._paced(rate, duration, send, command_id)
        return {**await _ack_summary(futures, ack_timeout), "sent": sent, "started": started,
                "started_wall": _wall(started),
                "ended": ended, "worst_lateness_ms": round(worst * 1000, 3)}

    async def _paced_through_lanes(
            self, command_id: int, rate: float, duration: float,
            lanes: Sequence[Callable[[int], Awaitable[None]]]) -> tuple[int, float, float, float]:
        """Pace message numbers at ``rate`` into a queue that ``lanes`` work off concurrently.

        Each lane handles one message at a time (one keep-alive connection, one thread); the
        schedule does not wait for them. Returns what :meth:`_paced` returns.
        """
        queue: asyncio.Queue[int | None] = asyncio.Queue()

        async def work(handle: Callable[[int], Awaitable[None]]) -> None:
            while (i := await queue.get()) is not None:
                await handle(i)

        runners = [asyncio.ensure_future(work(lane)) for lane in lanes]
        paced = await self._paced(rate, duration, queue.put_nowait, command_id)
        for _ in runners:
            queue.put_nowait(None)
        await asyncio.gather(*runners)
        return paced

    async def op_publish_http(self, command_id: int, *, urls: list[list[Any]], channel: str,
                              users: int, rate: float, duration: float, pub_id: int,
                              size: int = 100, connections: int = 8, path: str = "/api/publish",
                              batch: int = 1) -> dict[str, Any]:
        """POST publications to ``urls`` (round robin), message i to ``channel`` of user i % users.

        ``rate`` 0 means as fast as ``connections`` keep-alive connections go. Sequence numbers
        count per user, so that each subscriber sees 0, 1, 2... ``batch`` > 1: each request is a
        ``POST /api/batch`` of that many publish commands (``rate`` still counts publications).
        """
        clients = [await HttpClient.open(*urls[n % len(urls)], self.sources[n % len(self.sources)])
                   for n in range(connections)]
        stats = {"ok": 0, "errors": 0, "error_samples": {}}
        latencies: list[float] = []

        def publication(i: int) -> dict[str, Any]:
            user = i % users
            return {"channel": channel.format(i=user), "data": payload(pub_id, i // users, size)}

        def batch_body(publications: Iterable[dict[str, Any]]) -> bytes:
            return json.dumps({"commands": [{"method": "publish", "params": publication}
                                            for publication in publications]},
                              separators=(",", ":")).encode()

        def body(i: int) -> bytes:
            if batch <= 1:
                return json.dumps(publication(i), separators=(",", ":")).encode()
            return batch_body(publication(n) for n in range(i * batch, (i + 1) * batch))

        async def post(http: HttpClient, i: int) -> None:
            await send(http, body(i))

        async def send(http: HttpClient, request: bytes) -> None:
            began = time.monotonic()
            try:
                status, answer = await http.post(path, request)
                if status != 200:
                    for _ in range(batch):
                        _count_error(stats, f"HTTP {status}: {answer[:100]!r}")
                elif batch <= 1:
                    stats["ok"] += 1
                else:
                    for reply in json.loads(answer)["replies"]:
                        if "result" in reply:
                            stats["ok"] += 1
                        else:
                            _count_error(stats, f"batch reply {reply}")
            except Exception as exc:
                for _ in range(batch):
                    _count_error(stats, f"{type(exc).__name__}: {exc}")
            latencies.append(time.monotonic() - began)

        batch = max(1, batch)
        if rate > 0:
            sent, started, ended, worst = await self._paced_through_lanes(
                command_id, rate / batch, duration,
                [functools.partial(post, http) for http in clients])
            sent *= batch
        else:
            counter = itertools.count()
            started = time.monotonic()
            deadline = started + duration
            worst = 0.0

            # Flat out, each connection publishes to users of its own, so that a user's
            # publications are never in two requests in flight at once (which would cross on
            # the way and count as reordered, though the server keeps each request's order).
            lanes = min(len(clients), users)

            async def flat_out(http: HttpClient, lane: int) -> None:
                mine, made = range(lane, users, lanes), 0
                while time.monotonic() < deadline:
                    next(counter)
                    publications = [{"channel": channel.format(i=mine[n % len(mine)]),
                                     "data": payload(pub_id, n // len(mine), size)}
                                    for n in range(made, made + batch)]
                    made += batch
                    await send(http, batch_body(publications) if batch > 1 else json.dumps(
                        publications[0], separators=(",", ":")).encode())

            await asyncio.gather(*(flat_out(clients[lane], lane) for lane in range(lanes)))
            ended = time.monotonic()
            sent = next(counter) * batch
        for http in clients:
            http.close()
        return _publish_summary(sent, stats, latencies, started, ended, worst)

    async def op_publish_emitter(self, command_id: int, *, redis_url: str, channel: str,
                                 users: int, rate: float, duration: float, pub_id: int,
                                 size: int = 100, threads: int = 4) -> dict[str, Any]:
        """Publish through ``realtime.emitter.Emitter`` (blocking calls, in ``threads`` threads).

        Like :meth:`op_publish_http`: message i to ``channel`` of user i % users; ``rate`` 0 is
        as fast as the threads go.
        """
        from realtime.emitter import Emitter

        emitter = Emitter(redis_url, pool_size=threads)
        stats = {"ok": 0, "errors": 0, "error_samples": {}}
        latencies: list[float] = []

        def publish(i: int) -> None:
            publish_to(i % users, i // users)

        def publish_to(user: int, sequence: int) -> None:
            began = time.monotonic()
            try:
                emitter.publish(channel.format(i=user), payload(pub_id, sequence, size))
                stats["ok"] += 1
            except Exception as exc:
                _count_error(stats, f"{type(exc).__name__}: {exc}")
            latencies.append(time.monotonic() - began)

        async def publish_in_thread(i: int) -> None:
            await asyncio.to_thread(publish, i)

        try:
            if rate > 0:
                sent, started, ended, worst = await self._paced_through_lanes(
                    command_id, rate, duration, [publish_in_thread] * threads)
            else:
                counter = itertools.count()
                started = time.monotonic()
                deadline = started + duration
                worst = 0.0

                # Each thread publishes to users of its own: a thread that takes a number and
                # is preempted before it publishes must not see a later publication to the same
                # user overtake it (that would be the bench's reordering, not the server's).
                lanes = min(threads, users)

                def flat_out(lane: int) -> None:
                    mine, made = range(lane, users, lanes), 0
                    while time.monotonic() < deadline:
                        next(counter)
                        publish_to(mine[made % len(mine)], made // len(mine))
                        made += 1

                await asyncio.gather(*(asyncio.to_thread(flat_out, lane)
                                       for lane in range(lanes)))
                ended = time.monotonic()
                sent = next(counter)
        finally:
            emitter.close()
        return _publish_summary(sent, stats, latencies, started, ended, worst)

    # -- churn -------------------------------------------------------------------------------

    async def op_churn(self, command_id: int, *, urls: list[list[Any]], duration: float,
                       concurrency: int, user: str, channel: str | None,
                       timeout: float = 10.0) -> dict[str, Any]:
        """Connect, (subscribe), disconnect, over and over from ``concurrency`` loops."""
        cycles = [0]
        errors: dict[str, int] = {}
        deadline = time.monotonic() + duration
        numbers = itertools.count(self.index * 10_000_000)
        latencies: list[float] = []

        async def loop_() -> None:
            while time.monotonic() < deadline:
                i = next(numbers)
                host, port = urls[i % len(urls)]
                began = time.monotonic()
                try:
                    client = await connect(self.loop, host, port,
                                           source=self.sources[i % len(self.sources)],
                                           auth={"user": user.format(i=i)}, recorder=None,
                                           timeout=timeout)
                    if channel is not None:
                        answer = await asyncio.wait_for(
                            client.emit("subscribe", {"channel": channel.format(i=i)}),  # type: ignore[arg-type]
                            timeout)
                        if not (isinstance(answer, dict) and answer.get("ok")):
                            raise RuntimeError(f"subscribe refused: {answer}")
                    client.close()
                    await asyncio.wait_for(asyncio.shield(client.closed), timeout)
                    cycles[0] += 1
                    latencies.append(time.monotonic() - began)
                except Exception as exc:
                    reason = f"{type(exc).__name__}: {exc}"[:200]
                    errors[reason] = errors.get(reason, 0) + 1

        started = time.monotonic()
        await asyncio.gather(*(loop_() for _ in range(concurrency)))
        latencies.sort()
        return {"cycles": cycles[0], "errors": sum(errors.values()), "error_samples": errors,
                "elapsed_s": time.monotonic() - started,
                "cycle_p50_ms": _quantile_ms(latencies, 0.5),
                "cycle_p99_ms": _quantile_ms(latencies, 0.99)}

    # -- soak --------------------------------------------------------------------------------

    async def op_soak(self, command_id: int, *, urls: list[list[Any]], duration: float,
                      start: int, concurrency: int, user: str, channels: dict[str, str],
                      hold_max: float, abort_every: int = 4, leave_timeout: float = 10.0,
                      timeout: float = 10.0) -> dict[str, Any]:
        """Connect, subscribe, receive, disconnect, over and over; check every stream.

        ``concurrency`` loops numbered from ``start``: loop n connects as ``user`` (``{i}`` is
        n) to ``urls[n % len(urls)]``, subscribes to every channel of ``channels`` (kind ->
        name template, ``{i}`` is n), stays subscribed a random 0..``hold_max`` s, reads each
        channel's current offset (``history`` with limit 0), waits until it has received
        everything up to it (at most ``leave_timeout`` s) and disconnects: cleanly, or with a
        TCP reset every ``abort_every``-th cycle. New cycles start until ``duration`` s
        have passed.

        A cycle's window of a channel is (the offset its subscribe answered, the offset read
        before leaving]: every publication in it was stored while the client was subscribed,
        so every one must arrive, once and in order. Lost = the window's size - the distinct
        offsets received in it. The offsets come from the ``message`` events (decoded on the
        slow path: the hot-path counter knows publisher sequences, not channel offsets).
        """
        tallies = {kind: _SoakTally() for kind in channels}
        errors: dict[str, int] = {}
        lost_samples: list[dict[str, Any]] = []
        counts = {"cycles": 0, "aborted": 0, "resets": 0, "other_events": 0}
        setups: list[float] = []
        numbers = itertools.count()
        deadline = time.monotonic() + duration
        reported = [0, time.monotonic()]

        def on_event(streams: dict[str, _SoakStream], event: str, data: Any) -> None:
            if event == "message" and isinstance(data, dict):
                stream = streams.get(data.get("channel"))  # type: ignore[arg-type]
                offset = data.get("offset")
                if stream is None or not isinstance(offset, int):
                    counts["other_events"] += 1
                    return
                stream.received(offset)
                body = data.get("data")
                if isinstance(body, dict) and isinstance(body.get("t"), int):
                    tallies[stream.kind].latency((time.time_ns() - body["t"]) // 1000)
            elif event == "reset":
                counts["resets"] += 1
            else:
                counts["other_events"] += 1

        async def ask_each(client: SocketIOClient, event: str, streams: dict[str, _SoakStream],
                           extra: dict[str, Any]) -> list[dict[str, Any]]:
            answers = await asyncio.wait_for(asyncio.gather(*(
                client.emit(event, {"channel": name, **extra})  # type: ignore[arg-type]
                for name in streams)), timeout)
            for name, answer in zip(streams, answers, strict=True):
                if not (isinstance(answer, dict) and answer.get("ok")):
                    raise RuntimeError(f"{event} {name} refused: {answer}")
            return answers

        async def cycle(n: int, number: int) -> None:
            host, port = urls[n % len(urls)]
            streams = {name.format(i=n): _SoakStream(kind) for kind, name in channels.items()}
            began = time.monotonic()
            client = await connect(self.loop, host, port,
                                   source=self.sources[number % len(self.sources)],
                                   auth={"user": user.format(i=n)}, recorder=None,
                                   timeout=timeout)
            try:
                client.on_event = functools.partial(on_event, streams)
                for stream, answer in zip(streams.values(),
                                          await ask_each(client, "subscribe", streams, {}),
                                          strict=True):
                    stream.epoch, stream.since = answer["epoch"], answer["offset"]
                setups.append(time.monotonic() - began)
                await asyncio.sleep(random.uniform(0, hold_max))
                if client.closed.done():
                    raise RuntimeError(f"closed while subscribed: {client.close_reason}")
                marks = await ask_each(client, "history", streams, {"limit": 0})
                waiting = []
                for stream, mark in zip(streams.values(), marks, strict=True):
                    stream.until_epoch, stream.until = mark["epoch"], mark["offset"]
                    if max(stream.offsets, default=stream.since) < stream.until:
                        stream.reached = self.loop.create_future()
                        waiting.append(stream.reached)
                if waiting:
                    # What is still missing after this is lost: the accounting says so.
                    await asyncio.wait(waiting, timeout=leave_timeout)
            except BaseException:
                client.abort()
                raise
            aborted = abort_every > 0 and number % abort_every == abort_every - 1
            if aborted:
                client.abort()
            else:
                client.close()
                await asyncio.wait_for(asyncio.shield(client.closed), timeout)
            counts["cycles"] += 1
            counts["aborted"] += aborted
            for name, stream in streams.items():
                lost = tallies[stream.kind].account(stream)
                if lost and len(lost_samples) < 20:
                    inside = set(stream.offsets)
                    lost_samples.append({
                        "channel": name, "since": stream.since, "until": stream.until,
                        "missing": [o for o in range(stream.since + 1, stream.until + 1)
                                    if o not in inside][:10]})

        async def loop_(n: int) -> None:
            while time.monotonic() < deadline:
                try:
                    await cycle(n, next(numbers))
                except Exception as exc:
                    reason = f"{type(exc).__name__}: {exc}"[:200]
                    errors[reason] = errors.get(reason, 0) + 1
                    # A node that refuses must not be hammered by a loop that spins.
                    await asyncio.sleep(0.1)
                now = time.monotonic()
                if now - reported[1] > PROGRESS_EVERY:
                    self._progress(command_id, counts["cycles"] - reported[0])
                    reported[0], reported[1] = counts["cycles"], now

        started = time.monotonic()
        await asyncio.gather(*(loop_(n) for n in range(start, start + concurrency)))
        self._progress(command_id, counts["cycles"] - reported[0])
        setups.sort()
        return {**counts, "errors": sum(errors.values()), "error_samples": errors,
                "lost_samples": lost_samples, "elapsed_s": time.monotonic() - started,
                "setup_p50_ms": _quantile_ms(setups, 0.5),
                "setup_p99_ms": _quantile_ms(setups, 0.99),
                "streams": {kind: tally.report() for kind, tally in tallies.items()}}


class _SoakStream:
    """One channel of one soak cycle: its window of offsets and the offsets that arrived."""

    __slots__ = ("kind", "epoch", "since", "until_epoch", "until", "offsets", "reached")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.epoch = self.until_epoch = ""
        self.since = self.until = 0
        self.offsets: list[int] = []
        # Resolved when an offset >= until arrives (set once ``until`` is known).
        self.reached: asyncio.Future[None] | None = None

    def received(self, offset: int) -> None:
        self.offsets.append(offset)
        if self.reached is not None and offset >= self.until and not self.reached.done():
            self.reached.set_result(None)


class _SoakTally:
    """What one worker's soak cycles saw on one kind of channel (shared, user)."""

    def __init__(self) -> None:
        self.windows = self.expected = self.received = self.lost = 0
        self.duplicated = self.reordered = self.before_window = self.deliveries = 0
        self.epoch_changes = 0
        self.histogram = new_histogram()
        self.max_us = 0

    def latency(self, us: int) -> None:
        self.histogram[bucket_of(us)] += 1
        self.max_us = max(self.max_us, us)

    def account(self, stream: _SoakStream) -> int:
        """Add one finished cycle's stream; returns the publications it lost."""
        offsets = stream.offsets
        distinct = set(offsets)
        self.deliveries += len(offsets)
        self.duplicated += len(offsets) - len(distinct)
        self.reordered += sum(1 for a, b in itertools.pairwise(offsets) if b < a)
        self.before_window += sum(1 for o in distinct if o <= stream.since)
        # Epoch "" at subscribe time: the channel had no stream yet, and the first publication
        # creates it; any other change of epoch means the history broke (not a loss to count).
        if stream.epoch and stream.until_epoch != stream.epoch:
            self.epoch_changes += 1
            return 0
        window = max(0, stream.until - stream.since)
        got = sum(1 for o in distinct if stream.since < o <= stream.until)
        self.windows += 1
        self.expected += window
        self.received += got
        self.lost += window - got
        return window - got

    def report(self) -> dict[str, Any]:
        return {"windows": self.windows, "expected": self.expected, "received": self.received,
                "lost": self.lost, "duplicated": self.duplicated, "reordered": self.reordered,
                "before_window": self.before_window, "deliveries": self.deliveries,
                "epoch_changes": self.epoch_changes, "histogram": sparse(self.histogram),
                "max_us": self.max_us}



async def _ack_summary(futures: list[asyncio.Future[Any]], timeout: float) -> dict[str, Any]:
    pending = [f for f in futures if not f.done()]
    if pending:
        await asyncio.wait(pending, timeout=timeout)
    ok = errors = 0
    samples: dict[str, int] = {}
    for future in futures:
        if not future.done():
            future.cancel()
            continue
        if future.exception() is not None:
            errors += 1
            key = f"{type(future.exception()).__name__}: {future.exception()}"[:200]
            samples[key] = samples.get(key, 0) + 1
            continue
        answer = future.result()
        if isinstance(answer, dict) and answer.get("ok"):
            ok += 1
        else:
            errors += 1
            key = str(answer)[:200]
            samples[key] = samples.get(key, 0) + 1
    return {"acked_ok": ok, "ack_errors": errors, "unacked": len(futures) - ok - errors,
            "error_samples": samples}


def _publish_summary(sent: int, stats: dict[str, Any], latencies: list[float], started: float,
                     ended: float, worst: float) -> dict[str, Any]:
    """What the publishing ops through the HTTP API and the emitter report."""
    latencies.sort()
    return {"sent": sent, "acked_ok": stats["ok"], "ack_errors": stats["errors"],
            "unacked": sent - stats["ok"] - stats["errors"],
            "error_samples": stats["error_samples"], "started": started, "ended": ended,
            "started_wall": _wall(started),
            "worst_lateness_ms": round(worst * 1000, 3),
            "request_p50_ms": _quantile_ms(latencies, 0.5),
            "request_p99_ms": _quantile_ms(latencies, 0.99)}


def _wall(monotonic: float) -> float:
    """The CLOCK_REALTIME time (s) of a time.monotonic() instant in the recent past."""
    return time.time() - (time.monotonic() - monotonic)


def _count_error(stats: dict[str, Any], reason: str) -> None:
    stats["errors"] += 1
    samples = stats["error_samples"]
    samples[reason[:200]] = samples.get(reason[:200], 0) + 1


def _quantile_ms(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)


class HttpClient:
    """A keep-alive HTTP/1.1 connection that POSTs JSON and reads the answers."""

    def __init__(self, host: str, port: int, source: str | None) -> None:
        self.address = (host, port)
        self.source = source
        self.host = f"{host}:{port}"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    @classmethod
    async def open(cls, host: str, port: int, source: str | None = None) -> HttpClient:
        client = cls(host, port, source)
        await client._connect()
        return client

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            *self.address, local_addr=(self.source, 0) if self.source else None)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """POST ``body`` as JSON; (status, body). Reconnects when the server closed."""
        if self.writer is None or self.writer.is_closing():
            await self._connect()
        try:
            return await self._post(path, body)
        except BaseException:
            self.close()
            raise

    async def _post(self, path: str, body: bytes) -> tuple[int, bytes]:
        assert self.reader is not None and self.writer is not None
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            answer = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                parts.append(await self.reader.readexactly(size + 2))
                if size == 0:
                    break
            answer = b"".join(part[:-2] for part in parts)
        else:
            answer = b""
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, answer

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

