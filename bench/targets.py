"""The servers under test: realtime and its two peers, each as redis + N nodes (+ nginx).

Every target speaks the same client protocol as far as the bench uses it: Socket.IO v5 on
``/socket.io/``, events ``subscribe {channel}`` and ``publish {channel, data}`` acked with
``{ok: true, ...}``, server event ``message {channel, data, user}``, ``POST /api/publish
{channel, data}`` and ``GET /readyz``.

- ``realtime``: :class:`realtime_dev.cluster.LocalCluster` (it always runs nginx too).
- ``flask``: ``bench/peers/flask_socketio_peer.py``, a plain Flask-SocketIO app as its docs
  recommend (gevent, gevent-websocket, ``message_queue`` on Redis).
- ``node``: ``bench/peers/node/server.js``, socket.io 4.8 with ``@socket.io/redis-adapter``,
  installed from npm by :func:`ensure_node_peer` when ``node`` and ``npm`` are present.

Every process is started in a session of its own and stopped by pid
(:class:`realtime_dev.processes.Child`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

from realtime_dev.cluster import LocalCluster
from realtime_dev.nginx import nginx_command, render_nginx_config
from realtime_dev.processes import (
    Child,
    ProcessError,
    find_executable,
    free_port,
    http_ok,
    redis_pings,
    stop_children,
    wait_for,
)

logger = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent
FLASK_PEER = BENCH_DIR / "peers" / "flask_socketio_peer.py"
NODE_PEER_DIR = BENCH_DIR / "peers" / "node"
TARGET_NAMES = ("realtime", "flask", "node")
LABELS = {"realtime": "realtime", "flask": "Flask-SocketIO", "node": "Node socket.io"}
READY_TIMEOUT = 60.0


@dataclasses.dataclass
class Deployment:
    """A running target: where to connect and which processes to measure."""

    target: str
    node_urls: list[str]
    redis_url: str
    nginx_url: str | None
    node_pids: list[int]
    redis_pids: list[int]
    nginx_pids: list[int]
    stop_callback: Callable[[], None] | None = dataclasses.field(default=None, repr=False)

    @property
    def node_addresses(self) -> list[list[object]]:
        """``[host, port]`` of every node."""
        return [address(url) for url in self.node_urls]

    @property
    def nginx_address(self) -> list[object]:
        if self.nginx_url is None:
            raise ValueError(f"{self.target} runs without nginx")
        return address(self.nginx_url)

    def crashed(self) -> list[int]:
        """Pids of nodes that are no longer running."""
        from .procstat import alive

        return [pid for pid in self.node_pids if not alive(pid)]

    def stop(self) -> None:
        """Stop every process of the deployment (idempotent)."""
        if self.stop_callback is not None:
            callback, self.stop_callback = self.stop_callback, None
            callback()


def address(url: str) -> list[object]:
    parts = urlsplit(url)
    return [parts.hostname or "127.0.0.1", parts.port or 80]


def node_available() -> str | None:
    """Why the Node peer cannot run here, or None when ``node`` and ``npm`` are installed."""
    if not shutil.which("node"):
        return "node is not installed (apt-get install nodejs npm)"
    if not shutil.which("npm"):
        return "npm is not installed (apt-get install npm)"
    return None


def ensure_node_peer() -> str | None:
    """Install the Node peer's packages if missing; None when ready, else why it is skipped."""
    reason = node_available()
    if reason:
        return reason
    if (NODE_PEER_DIR / "node_modules" / "@socket.io" / "redis-adapter").is_dir() and (
            NODE_PEER_DIR / "node_modules" / "socket.io").is_dir():
        return None
    logger.warning("installing the Node peer's packages: npm install --prefix %s", NODE_PEER_DIR)
    try:
        result = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(NODE_PEER_DIR)],
            cwd=NODE_PEER_DIR, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"npm install failed: {exc}"
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-5:])
        return f"npm install failed (status {result.returncode}): {tail}"
    return None


def _wait_ready(children: list[Child], ready: Callable[[], bool], what: str) -> None:
    """Wait until ``ready()``; ProcessError with the log tails if a child exits or time is up."""
    def check() -> bool:
        for child in children:
            if not child.alive():
                raise ProcessError(f"{child.name} exited with status {child.returncode} while "
                                   f"waiting for {what}\n{child.log_tail()}")
        return ready()

    try:
        wait_for(check, READY_TIMEOUT, what)
    except ProcessError as exc:
        if "timed out" not in str(exc):
            raise
        tails = "\n".join(child.log_tail() for child in children)
        raise ProcessError(f"{exc}\n{tails}") from None


def _all_ok(urls: list[str]) -> Callable[[], bool]:
    """A check that every URL in ``urls`` answers 200 (each is asked until it has once)."""
    pending = list(urls)

    def check() -> bool:
        pending[:] = [url for url in pending if not http_ok(url)]
        return not pending

    return check


def start(target: str, workdir: Path, nodes: int, *, nginx: bool = False,
          node_args: list[str] | None = None) -> Deployment:
    """Start ``target`` with ``nodes`` nodes sharing one fresh redis-server (and nginx)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if target == "realtime":
        return _start_realtime(workdir, nodes, node_args or [])
    if target in ("flask", "node"):
        return _start_peer(target, workdir, nodes, nginx)
    raise ValueError(f"unknown target {target!r}: one of {', '.join(TARGET_NAMES)}")


# The bench measures capacity, not the limits that protect a node from its clients: its
# publisher sends up to thousands of events a second on one connection, and the fanout and
# browser scenarios connect thousands of clients as one user. Limits no scenario reaches.
BENCH_LIMITS = ["--events-per-second", "1000000", "--events-burst", "1000000",
                "--max-connections-per-user", "1000000"]


def _start_realtime(workdir: Path, nodes: int, node_args: list[str]) -> Deployment:
    cluster = LocalCluster(workdir=workdir, nodes=nodes, port=0,
                           node_args=["--log-level", "warning", *BENCH_LIMITS, *node_args])
    cluster.start()
    by_kind: dict[str, list[int]] = {"node": [], "redis": [], "nginx": []}
    for child in cluster.children:
        by_kind[child.kind].append(child.pid)
    return Deployment("realtime", list(cluster.node_urls.values()), str(cluster.redis_url),
                      cluster.url, by_kind["node"], by_kind["redis"], by_kind["nginx"],
                      cluster.stop)


def _start_peer(target: str, workdir: Path, nodes: int, nginx: bool) -> Deployment:
    children: list[Child] = []

    def stop() -> None:
        for kind in ("nginx", "node", "redis"):
            stop_children([c for c in children if c.kind == kind])

    try:
        redis_port = free_port()
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        children.append(Child("redis", "redis", [
            find_executable("redis-server"), "--port", str(redis_port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(workdir)], workdir / "redis.log"))
        _wait_ready(children, lambda: redis_pings("127.0.0.1", redis_port), "redis")
        node_urls = {}
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for n in range(1, nodes + 1):
            node_id = f"{target[0]}{n}"
            port = free_port()
            if target == "flask":
                argv = [sys.executable, str(FLASK_PEER), "--port", str(port), "--redis",
                        redis_url]
            else:
                argv = [find_executable("node"), str(NODE_PEER_DIR / "server.js"), "--port",
                        str(port), "--redis", redis_url]
            url = f"http://127.0.0.1:{port}"
            children.append(Child("node", f"{target} {node_id}", argv,
                                  workdir / f"{node_id}.log", url=url, env=env))
            node_urls[node_id] = url
        _wait_ready(children, _all_ok([f"{u}/readyz" for u in node_urls.values()]),
                    f"{target} nodes")
        nginx_url = None
        if nginx:
            port = free_port()
            nginx_url = f"http://127.0.0.1:{port}"
            conf = workdir / "nginx.conf"
            conf.write_text(render_nginx_config(
                {node_id: url.removeprefix("http://") for node_id, url in node_urls.items()},
                f"127.0.0.1:{port}", workdir))
            children.append(Child("nginx", "nginx", nginx_command(
                find_executable("nginx"), workdir, conf), workdir / "nginx.log", url=nginx_url,
                extra_log=workdir / "nginx-error.log"))
            _wait_ready(children, _all_ok([f"{nginx_url}/readyz"]), "nginx")
    except BaseException:
        stop()
        raise
    return Deployment(
        target, list(node_urls.values()), redis_url, nginx_url,
        [c.pid for c in children if c.kind == "node"],
        [c.pid for c in children if c.kind == "redis"],
        [c.pid for c in children if c.kind == "nginx"], stop)


@contextlib.contextmanager
def deployed(target: str, workdir: Path, nodes: int, *, nginx: bool = False,
             node_args: list[str] | None = None) -> Iterator[Deployment]:
    """``with deployed(...) as deployment:`` start, yield, always stop."""
    deployment = start(target, workdir, nodes, nginx=nginx, node_args=node_args)
    try:
        yield deployment
    finally:
        deployment.stop()
