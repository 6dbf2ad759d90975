"""Real processes for integration tests: started on free loopback ports, stopped by pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.helpers import free_port, wait_until

REPO = Path(__file__).resolve().parents[2]


class ManagedProcess:
    """A child process with its log file; :meth:`stop` ends it by pid and reaps it."""

    def __init__(self, name: str, argv: list[str], log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                        cwd=REPO, env=env, start_new_session=True)
        self.pid = self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        if self.alive():
            os.kill(self.pid, signum)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; return the exit status."""
        self.signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            code = self.process.wait(timeout)
        self._log.close()
        return code

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.process.wait(10)
        self._log.close()


class NodeProcess(ManagedProcess):
    """A realtime node started with ``run.py serve``."""

    def __init__(self, log_dir: Path, node_id: str, *extra: str, port: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.node_id = node_id
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Stopping a node drains it (SIGTERM): a short drain keeps teardowns quick when a test
        # leaves clients connected. Tests of the drain pass their own.
        drain = () if "--drain-timeout" in extra else ("--drain-timeout", "2")
        argv = [sys.executable, "run.py", "serve", "--port", str(self.port),
                "--node-id", node_id, *drain, *extra]
        environ = {**os.environ, **(env or {})}
        super().__init__(f"node {node_id}", argv, log_dir / f"{node_id}.log", environ)

    def wait_ready(self, timeout: float = 20.0) -> NodeProcess:
        def ready() -> bool:
            if not self.alive():
                raise AssertionError(f"{self.name} exited:\n{self.log()}")
            try:
                return requests.get(self.url + "/readyz", timeout=1).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(ready, timeout, interval=0.05, message=f"{self.name} to be ready")
        return self


class RedisProcess(ManagedProcess):
    """A throw-away redis-server on a free loopback port (never the machine's 6379)."""

    def __init__(self, log_dir: Path, port: int | None = None,
                 persistence: tuple[str, ...] = ("--appendonly", "no")) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", *persistence, "--dir", str(log_dir)]
        super().__init__("redis", argv, log_dir / "redis.log")

    def wait_ready(self, timeout: float = 10.0) -> RedisProcess:
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=1)

        def ready() -> bool:
            if not self.alive():
                raise AssertionError(f"redis-server exited:\n{self.log()}")
            try:
                return client.ping()
            except redis.ConnectionError:
                return False

        wait_until(ready, timeout, interval=0.05, message="redis-server")
        client.close()
        return self


def wait_port_closed(port: int, timeout: float = 10.0) -> None:
    import socket

    def closed() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) != 0

    wait_until(closed, timeout, message=f"port {port} to close")


def time_left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())
