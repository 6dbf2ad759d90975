"""Child processes for the local cluster, the tests and the bench: started, waited on, stopped.

Every process is started in a session of its own and stopped by pid, never by name, by one
class: :class:`Child`, a part of a :class:`~realtime_dev.cluster.LocalCluster` (or of a bench
target) that can be started again with the same command line. :class:`ManagedProcess` and its
:class:`NodeProcess` and :class:`RedisProcess`, the processes of one integration test, are a
Child with a test's interface (a fresh log, ``stop()`` answering the exit status, readiness
checks). The functions poll what a process offers: a TCP port, a Redis PING, an HTTP 200.

A node runs the realtime this process imported (:func:`node_command`): the installed one, or
the one of the source checkout, whichever ``import realtime`` found.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import realtime

logger = logging.getLogger(__name__)

STOP_TIMEOUT = 10.0
# Between the two SIGTERMs that stop a node without its drain (see stop_children).
SECOND_SIGNAL_DELAY = 0.2
POLL_INTERVAL = 0.05
# Urllib without any proxy from the environment: these processes are always on this machine.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

T = TypeVar("T")


class ProcessError(RuntimeError):
    """A process could not be started, died, or did not get ready; the message says which."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def find_executable(name: str) -> str:
    """The path of ``name`` on PATH, or in the sbin directories that PATH often lacks.

    Raises ProcessError when it is in neither.
    """
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/bin", "/usr/local/bin"):
        candidate = Path(directory) / name
        if os.access(candidate, os.X_OK):
            return str(candidate)
    raise ProcessError(f"{name} is not installed (not on PATH nor in /usr/sbin): install it first")


def node_command(*args: str) -> list[str]:
    """The argv of a realtime node (``realtime serve`` with ``args``) run by this interpreter.

    Pair it with :func:`node_environment`, which lets the child import the same realtime.
    """
    return [sys.executable, "-m", "realtime", *args]


def node_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) for a child that imports realtime.

    When realtime is not installed (it runs from a source checkout), the folder holding the
    imported package goes first on ``PYTHONPATH``, so that the child imports that same one
    whatever its working directory; an installed realtime needs nothing.
    """
    env = dict(os.environ if base is None else base)
    package_root = Path(realtime.__file__).resolve().parent.parent
    installed = {Path(sysconfig.get_path(name)).resolve() for name in ("purelib", "platlib")}
    if package_root not in installed:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(package_root), *filter(None, [env.get("PYTHONPATH")])])
    return env


def wait_for(predicate: Callable[[], T], timeout: float, what: str,
             interval: float = POLL_INTERVAL,
             sleep: Callable[[float], object] = time.sleep) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Raises ProcessError naming ``what`` after ``timeout`` seconds. Exceptions of ``predicate``
    (e.g. "the process died") go through. ``sleep`` waits between polls (``gevent.sleep`` lets
    greenlets of the caller's process run meanwhile).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise ProcessError(f"timed out after {timeout:g}s waiting for {what}")
        sleep(interval)


def http_ok(url: str) -> bool:
    """True when GET ``url`` answers 200 within two seconds (no proxy from the environment)."""
    try:
        with _NO_PROXY_OPENER.open(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        # HTTPError (a 503 while not ready) is a URLError too.
        return False


def tcp_connects(host: str, port: int) -> bool:
    """True when a TCP connection to ``host:port`` opens within a second."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def can_listen(host: str, port: int) -> bool:
    """True when this process could listen on ``host:port`` now (as nginx binds: reusing
    addresses whose last connections linger in TIME_WAIT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def redis_pings(host: str, port: int) -> bool:
    """True when a Redis server answers PING at ``host:port`` within a second."""
    try:
        with socket.create_connection((host, port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def wait_port_closed(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    """Wait until nothing accepts connections on ``host:port`` any more."""
    wait_for(lambda: not tcp_connects(host, port), timeout, f"port {port} to close")


class Child:
    """One process the cluster started, in a session of its own, with its output in a log file."""

    def __init__(self, kind: str, name: str, argv: Sequence[str], log_path: Path, *,
                 url: str | None = None, extra_log: Path | None = None,
                 env: Mapping[str, str] | None = None, cwd: Path | str | None = None,
                 fresh_log: bool = False) -> None:
        self.kind = kind
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.url = url
        self.extra_log = extra_log
        self.env = None if env is None else dict(env)
        self.cwd = cwd
        # The child keeps its own copy of the descriptor. Appending keeps the log of an
        # earlier run of the same node when it is started again; ``fresh_log`` starts it over.
        with open(log_path, "wb" if fresh_log else "ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env, cwd=cwd, start_new_session=True)
        self.pid = self.process.pid
        self.started_at = time.monotonic()
        self._stop_logged = False
        self._group_gone = False
        logger.info("started %s (pid %d), log %s", name, self.pid, log_path)

    def __repr__(self) -> str:
        return f"<Child {self.name} pid={self.pid} returncode={self.returncode}>"

    def alive(self) -> bool:
        """Whether the process is still running (reaps it if it has exited)."""
        return self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def respawn(self) -> Child:
        """A new process of this child: the same command line, environment and log files."""
        return Child(self.kind, self.name, self.argv, self.log_path, url=self.url,
                     extra_log=self.extra_log, env=self.env, cwd=self.cwd)

    def exit_description(self) -> str:
        """How the process ended: ``status 1``, ``signal SIGKILL``; ``running`` if it has not."""
        code = self.returncode
        if code is None:
            return "running"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"signal {signal.Signals(-code).name}"
            return f"signal {-code}"
        return f"status {code}"

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the child's log (and of its extra log, if any)."""
        parts = []
        for path in (self.log_path, self.extra_log):
            if path is None:
                continue
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            tail = "\n".join(text.splitlines()[-lines:])
            parts.append(f"--- last lines of {path} ---\n{tail or '(empty)'}")
        return "\n".join(parts)

    def send_signal(self, signum: int) -> None:
        """Signal the process itself, by pid, if it has not exited yet."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def kill(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGKILL the process and whatever it started, then reap it."""
        self._kill_group()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        # The whole group has had its SIGKILL: nothing of it outlives this for long.
        self._group_gone = self._group_gone or not self.alive()

    def _kill_group(self) -> None:
        # The group is the session this child leads (start_new_session): its id is the child's
        # pid, which Linux does not hand out again while the group has members, so this reaches
        # only processes that this child started. Once the child is reaped and its group killed,
        # the id may go to an unrelated process some day: never signal it again.
        if self._group_gone:
            return
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            self._group_gone = True
        except PermissionError:
            pass


def stop_children(children: Sequence[Child], timeout: float = STOP_TIMEOUT, *,
                  skip_drain: bool = False) -> None:
    """SIGTERM every child, SIGKILL those still running after ``timeout`` s, reap them all.

    A node drains on SIGTERM (up to its ``--drain-timeout``); with ``skip_drain`` it gets a
    second SIGTERM a moment later, which ends its drain at once: when the whole cluster stops,
    its clients have nowhere to go.
    """
    for child in children:
        child.send_signal(signal.SIGTERM)
    if skip_drain and children:
        time.sleep(SECOND_SIGNAL_DELAY)  # the first must be handled: signals do not queue
        for child in children:
            if child.alive():
                child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("%s (pid %d) ignored SIGTERM for %.0fs; killing it", child.name,
                           child.pid, timeout)
        # Also sweeps up what the child left behind, e.g. nginx workers of a dead master.
        child.kill()
        if child.alive():
            logger.error("%s (pid %d) is still running after SIGKILL", child.name, child.pid)
        elif not child._stop_logged:
            child._stop_logged = True
            logger.info("%s (pid %d) exited with status %s", child.name, child.pid,
                        child.returncode)


class ManagedProcess:
    """A child process of a test with its log file (a fresh one); :meth:`stop` ends it by pid,
    reaps it, and kills whatever it left in its session (a :class:`Child` underneath).

    It runs in a session of its own, in ``cwd`` (default: this process's working directory).
    """

    def __init__(self, name: str, argv: list[str], log_path: Path,
                 env: Mapping[str, str] | None = None, cwd: Path | str | None = None) -> None:
        self.name = name
        self.log_path = log_path
        self.child = Child("process", name, argv, log_path, env=env, cwd=cwd, fresh_log=True)
        self.process = self.child.process
        self.pid = self.child.pid

    def alive(self) -> bool:
        return self.child.alive()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.child.send_signal(signum)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; return the exit status."""
        self.signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        self.child.kill(timeout)  # the process if it is still there, and what it started
        return self.process.wait(timeout)

    def kill(self) -> None:
        self.child.kill()

    def _check_alive(self) -> None:
        if not self.alive():
            raise ProcessError(f"{self.name} exited with status {self.process.returncode}:\n"
                               f"{self.log()}")


class NodeProcess(ManagedProcess):
    """A realtime node (``realtime serve``) on a free loopback port, logging to ``log_dir``."""

    def __init__(self, log_dir: Path, node_id: str, *extra: str, port: int | None = None,
                 env: Mapping[str, str] | None = None, wrapper: Sequence[str] = ()) -> None:
        """``wrapper``: a command the node runs under (``valgrind --tool=callgrind ...``)."""
        self.node_id = node_id
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Stopping a node drains it (SIGTERM): a short drain keeps teardowns quick when a test
        # leaves clients connected. Tests of the drain pass their own.
        drain = () if "--drain-timeout" in extra else ("--drain-timeout", "2")
        argv = [*wrapper, *node_command("serve", "--port", str(self.port), "--node-id",
                                         node_id, *drain, *extra)]
        environ = node_environment({**os.environ, **(env or {})})
        super().__init__(f"node {node_id}", argv, log_dir / f"{node_id}.log", environ)

    def wait_ready(self, timeout: float = 20.0) -> NodeProcess:
        """Wait until ``/readyz`` answers 200; ProcessError if the node exits or time runs out."""
        def ready() -> bool:
            self._check_alive()
            return http_ok(self.url + "/readyz")

        wait_for(ready, timeout, f"{self.name} to be ready")
        return self


class RedisProcess(ManagedProcess):
    """A throw-away redis-server on a free loopback port (never the machine's 6379)."""

    def __init__(self, log_dir: Path, port: int | None = None,
                 persistence: tuple[str, ...] = ("--appendonly", "no")) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        argv = [find_executable("redis-server"), "--port", str(self.port), "--bind",
                "127.0.0.1", "--save", "", *persistence, "--dir", str(log_dir)]
        super().__init__("redis", argv, log_dir / "redis.log")

    def wait_ready(self, timeout: float = 10.0) -> RedisProcess:
        """Wait until it answers PING; ProcessError if it exits or time runs out."""
        def ready() -> bool:
            self._check_alive()
            return redis_pings("127.0.0.1", self.port)

        wait_for(ready, timeout, "redis-server to answer PING")
        return self
