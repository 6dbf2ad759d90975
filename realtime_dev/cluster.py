"""A local cluster as child processes: redis, N nodes and nginx in front of them.

``realtime cluster`` (:mod:`realtime_dev.command`) runs one for development, with a
:class:`Supervisor` that starts a part that dies again; integration tests and the bench use
:class:`LocalCluster` as a fixture. Every child runs in a session of its own, so that a Ctrl-C in
the terminal reaches only the orchestrating process, which then stops the children in order
(nginx, nodes, redis), and so that a child's own children (nginx workers) can be swept up with
it. The nodes run the realtime this process imported (:func:`~realtime_dev.processes.node_command`).

The nginx configuration comes from :mod:`realtime_dev.nginx` (see ``nginx/README.md``): sessions
stick to their node through the node id at the start of every Engine.IO session id.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

from .nginx import DEFAULT_PROXY_TIMEOUT, nginx_command, render_nginx_config
from .processes import (
    POLL_INTERVAL,
    STOP_TIMEOUT,
    Child,
    ProcessError,
    can_listen,
    find_executable,
    free_port,
    http_ok,
    node_command,
    node_environment,
    redis_pings,
    stop_children,
    tcp_connects,
)

logger = logging.getLogger(__name__)

READY_TIMEOUT = 30.0
# How long an external redis may take to accept a connection: it is already running, or not.
EXTERNAL_REDIS_TIMEOUT = 5.0
# A part that ran this long before it died is started again at once; one that keeps dying
# sooner waits longer and longer before each start, up to RESTART_MAX_DELAY.
RESTART_STABLE_AFTER = 10.0
RESTART_MAX_DELAY = 30.0


class ClusterError(ProcessError):
    """A part of the cluster failed to start or died; the message includes its log tail."""


class ClusterAborted(ClusterError):
    """:meth:`LocalCluster.start` was asked to give up (e.g. by Ctrl-C) before it was done."""


class LocalCluster:
    """redis (unless ``redis_url`` is given), nodes ``n1..nN`` and nginx, on free local ports.

    ``start()`` returns once every part is ready, ``stop()`` ends every child it started. After
    ``start()``: ``url`` is nginx's URL, ``node_urls`` maps node ids to node URLs, ``redis_url``
    is the broker URL the nodes use, ``children`` lists the processes (``pids`` by name). Files
    (logs, ``nginx.conf``, redis's append-only file with ``redis_appendonly``) go to
    ``workdir``, which is neither created empty nor removed here. :meth:`restart` starts a part
    that died again, the same way; :class:`Supervisor` does it for every part that dies.
    """

    def __init__(
        self,
        *,
        workdir: Path | str,
        nodes: int = 3,
        port: int = 0,
        redis_url: str | None = None,
        node_args: Sequence[str] = (),
        node_env: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        ready_timeout: float = READY_TIMEOUT,
        proxy_timeout: str = DEFAULT_PROXY_TIMEOUT,
        redis_appendonly: bool = False,
    ) -> None:
        if nodes < 1:
            raise ValueError(f"a cluster needs at least one node, not {nodes}")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be 0..65535, not {port}")
        self.workdir = Path(workdir).resolve()
        self.node_ids = [f"n{i}" for i in range(1, nodes + 1)]
        self.port = port
        self.redis_url = redis_url
        # Whether start() runs a redis-server of its own (False: redis_url is somebody else's).
        self.owns_redis = redis_url is None
        if redis_appendonly and not self.owns_redis:
            raise ValueError("redis_appendonly is for the cluster's own redis-server, "
                             "not for one given by redis_url")
        # The own redis-server writes an append-only file (fsync every second) into workdir.
        self.redis_appendonly = redis_appendonly
        self.node_args = list(node_args)
        # Variables every node gets on top of this process's environment: secrets go here,
        # where other users of the machine cannot read them (a command line they can).
        self.node_env = dict(node_env or {})
        self.host = host
        self.ready_timeout = ready_timeout
        self.proxy_timeout = proxy_timeout
        self.nginx_conf = self.workdir / "nginx.conf"
        self.url = ""
        self.node_urls: dict[str, str] = {}
        self.children: list[Child] = []
        self._node_ports: dict[str, int] = {}
        self._abort: Callable[[], bool] | None = None

    # -- public API -------------------------------------------------------------------------

    @property
    def pids(self) -> dict[str, int]:
        """Child name (``redis``, ``node n1``, ``nginx``) -> pid."""
        return {child.name: child.pid for child in self.children}

    @property
    def nginx_error_log(self) -> Path:
        return self.workdir / "nginx-error.log"

    def node(self, node_id: str) -> Child:
        """The current process of node ``node_id``."""
        for child in self.children:
            if child.kind == "node" and child.name == f"node {node_id}":
                return child
        raise KeyError(f"no node {node_id!r} in this cluster ({', '.join(self.node_ids)})")

    def start(self, abort: Callable[[], bool] | None = None) -> LocalCluster:
        """Start every part and wait until each is ready; return ``self``.

        Each stage (redis, the nodes, nginx) has ``ready_timeout`` seconds. On any failure every
        child started so far is stopped and :class:`ClusterError` names the part, with its log
        tail. ``abort`` is polled while waiting: once it returns True, startup is undone and
        :class:`ClusterAborted` raised.
        """
        if any(child.alive() for child in self.children):
            raise RuntimeError("this cluster is already running")
        self.children = []
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.port and not can_listen(self._bind_host, self.port):
            # Before starting anything: nginx would only find out after its bind retries.
            raise ClusterError(f"cannot listen on {self.host}:{self.port}: the port is in use")
        self._abort = abort
        try:
            self._start_redis()
            self._start_nodes()
            self._start_nginx()
        except ClusterError:
            self.stop()
            raise
        except ProcessError as exc:  # e.g. nginx is not installed
            self.stop()
            raise ClusterError(str(exc)) from exc
        except BaseException:
            self.stop()
            raise
        finally:
            self._abort = None
        logger.info("cluster ready at %s (nodes %s)", self.url, ", ".join(self.node_urls))
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop every child by pid: nginx first, then the nodes, then redis. Idempotent.

        SIGTERM first, SIGKILL for whatever still runs ``timeout`` seconds later; every child is
        reaped, and its session swept, before this returns.
        """
        for kind in ("nginx", "node", "redis"):
            stop_children([c for c in self.children if c.kind == kind], timeout,
                          skip_drain=kind == "node")

    def kill_node(self, node_id: str) -> None:
        """SIGKILL node ``node_id`` (a crash: no clean shutdown) and reap it."""
        self.node(node_id).kill()

    def stop_node(self, node_id: str, timeout: float = STOP_TIMEOUT) -> int | None:
        """Stop node ``node_id`` cleanly with SIGTERM; return its exit status."""
        child = self.node(node_id)
        stop_children([child], timeout)
        return child.returncode

    def start_node(self, node_id: str) -> Child:
        """Start node ``node_id`` again (after kill_node/stop_node), same port; wait until ready."""
        child = self.restart(self.node(node_id))
        self._wait_ready([child], f"node {node_id} to be ready", self.ready_timeout, [child])
        return child

    def restart(self, child: Child) -> Child:
        """Start ``child``, a part of this cluster that has exited, again; return the new one.

        The same command line: the same port, node id, environment and redis data directory
        (with ``redis_appendonly``, redis reads its append-only file back), and the same log
        files, appended to. Whatever the old process left behind (the workers of a killed
        nginx master, which hold its port) is killed first. Does not wait for the new process
        to be ready: see :meth:`is_ready`.
        """
        if child not in self.children:
            raise ValueError(f"{child!r} is not a part of this cluster")
        if child.alive():
            raise RuntimeError(f"{child.name} is still running (pid {child.pid})")
        child.kill()
        replacement = child.respawn()
        self.children[self.children.index(child)] = replacement
        return replacement

    def is_ready(self, child: Child) -> bool:
        """Whether ``child`` answers: redis PING, a node's or nginx's ``/readyz`` with 200."""
        if not child.alive():
            return False
        if child.kind == "redis":
            return redis_pings(*_redis_address(child.url or ""))
        return http_ok(f"{child.url}/readyz")

    def dead_children(self) -> list[Child]:
        """The children that have exited, e.g. for a supervisor to notice a crash."""
        return [child for child in self.children if not child.alive()]

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- stages -----------------------------------------------------------------------------

    def _start_redis(self) -> None:
        if not self.owns_redis:
            host, port = _redis_address(self.redis_url or "")
            self._wait(lambda: tcp_connects(host, port),
                       f"redis at {host}:{port} to accept connections",
                       min(self.ready_timeout, EXTERNAL_REDIS_TIMEOUT))
            return
        port = free_port("127.0.0.1")
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        # No snapshots: without the append-only file a restarted redis starts empty.
        persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] \
            if self.redis_appendonly else ["--appendonly", "no"]
        argv = [find_executable("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                "--save", "", *persistence, "--dir", str(self.workdir)]
        child = Child("redis", "redis", argv, self.workdir / "redis.log", url=self.redis_url)
        self.children.append(child)
        self._wait(lambda: redis_pings("127.0.0.1", port), "redis to answer PING",
                   self.ready_timeout, [child])

    def _start_nodes(self) -> None:
        self._node_ports = {node_id: free_port(self._bind_host) for node_id in self.node_ids}
        self.node_urls = {}
        started = [self._spawn_node(node_id) for node_id in self.node_ids]
        self._wait_ready(started, "the nodes to be ready", self.ready_timeout)

    def _spawn_node(self, node_id: str) -> Child:
        port = self._node_ports[node_id]
        url = f"http://{self._url_host}:{port}"
        argv = node_command("serve", "--host", self.host, "--port", str(port),
                            "--node-id", node_id, "--broker", str(self.redis_url),
                            *self.node_args)
        env = node_environment({**os.environ, **self.node_env, "PYTHONUNBUFFERED": "1"})
        child = Child("node", f"node {node_id}", argv, self.workdir / f"{node_id}.log", url=url,
                      env=env)
        self.children.append(child)
        self.node_urls[node_id] = url
        return child

    def _start_nginx(self) -> None:
        port = self.port or free_port(self._bind_host)
        self.url = f"http://{self._url_host}:{port}"
        listen = f"{_bracket(self.host)}:{port}"
        upstream_host = _bracket(self._url_host)
        config = render_nginx_config(
            {node_id: f"{upstream_host}:{self._node_ports[node_id]}" for node_id in self.node_ids},
            listen, self.workdir, proxy_timeout=self.proxy_timeout)
        self.nginx_conf.write_text(config)
        argv = nginx_command(find_executable("nginx"), self.workdir, self.nginx_conf)
        child = Child("nginx", "nginx", argv, self.workdir / "nginx.log", url=self.url,
                      extra_log=self.nginx_error_log)
        self.children.append(child)
        self._wait_ready([child], "nginx to be ready", self.ready_timeout)

    # -- waiting ----------------------------------------------------------------------------

    @property
    def _bind_host(self) -> str:
        return self.host or "0.0.0.0"

    @property
    def _url_host(self) -> str:
        # Where this machine reaches a server listening on self.host.
        return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)

    def _wait_ready(self, children: Sequence[Child], what: str, timeout: float,
                    watch: Sequence[Child] | None = None) -> None:
        pending = list(children)

        def all_ready() -> bool:
            pending[:] = [c for c in pending if not http_ok(f"{c.url}/readyz")]
            return not pending

        self._wait(all_ready, what, timeout, pending, watch)

    def _wait(self, ready: Callable[[], bool], what: str, timeout: float,
              waiting_on: Sequence[Child] = (), watch: Sequence[Child] | None = None) -> None:
        """Poll ``ready`` until it is true; fail if ``timeout`` s pass or a child exits.

        ``watch``: the children that must not exit meanwhile (default: all of them);
        ``waiting_on``: those whose log tails explain a timeout.
        """
        deadline = time.monotonic() + timeout
        while True:
            for child in self.children if watch is None else watch:
                if not child.alive():
                    raise ClusterError(f"{child.name} exited with status {child.returncode} "
                                       f"while waiting for {what}\n{child.log_tail()}")
            if self._abort is not None and self._abort():
                raise ClusterAborted(f"cluster startup interrupted while waiting for {what}")
            if ready():
                return
            if time.monotonic() > deadline:
                tails = "\n".join(child.log_tail() for child in waiting_on)
                raise ClusterError(f"timed out after {timeout:g}s waiting for {what}"
                                   + (f"\n{tails}" if tails else ""))
            time.sleep(POLL_INTERVAL)


class Supervisor:
    """Starts the parts of a running :class:`LocalCluster` again when they die on their own.

    Call :meth:`check` every fraction of a second. A part (redis, a node, nginx) that has
    exited is logged, one warning with its exit status followed by its log tail, and started
    again with :meth:`LocalCluster.restart`: the same port, node id and command line. A part
    that dies within ``stable_after`` seconds of its start is started again at once the first
    time; when it keeps doing so, after 1, 2, 4... up to ``max_delay`` seconds (the warning
    says so), so that a part that cannot start costs a start now and then, not a busy loop.
    When a restarted part answers again, an info line says so. The supervisor never stops the
    cluster: that is for its owner (``run.py cluster`` on Ctrl-C or SIGTERM).
    """

    def __init__(self, cluster: LocalCluster, *, stable_after: float = RESTART_STABLE_AFTER,
                 max_delay: float = RESTART_MAX_DELAY) -> None:
        self.cluster = cluster
        self.stable_after = stable_after
        self.max_delay = max_delay
        # Per part name: deaths in a row that each came within stable_after of a start.
        self._quick_deaths: dict[str, int] = {}
        # Per part name: when a dead part is due to be started again.
        self._due: dict[str, float] = {}
        # Per part name: when it died, for parts started again that have not answered yet.
        self._restarted: dict[str, float] = {}
        self._slow_noted: set[str] = set()

    def check(self) -> None:
        """Notice dead parts, start the due ones again, and note those that answer again."""
        now = time.monotonic()
        for child in list(self.cluster.children):
            name = child.name
            if name in self._due:
                if now >= self._due[name]:
                    del self._due[name]
                    self._start_again(child)
            elif not child.alive():
                self._died(child, now)
            elif name in self._restarted:
                self._watch_restart(child, now)

    def _died(self, child: Child, now: float) -> None:
        ran = now - child.started_at
        quick = self._quick_deaths.get(child.name, 0) + 1 if ran < self.stable_after else 1
        self._quick_deaths[child.name] = quick
        delay = self._delay(quick)
        self._restarted.setdefault(child.name, now)
        if delay:
            plan = (f"it keeps dying ({quick} times in a row within {self.stable_after:g} s of "
                    f"its start): starting it again in {delay:g} s")
        else:
            plan = "starting it again"
        logger.warning("%s (pid %d) exited on its own with %s after %.1f s; %s\n%s",
                       child.name, child.pid, child.exit_description(), ran, plan,
                       child.log_tail())
        if delay:
            self._due[child.name] = now + delay
        else:
            self._start_again(child)

    def _delay(self, quick_deaths: int) -> float:
        """Seconds to wait before the next start after ``quick_deaths`` quick deaths in a row."""
        return 0.0 if quick_deaths <= 1 else min(2.0 ** (quick_deaths - 2), self.max_delay)

    def _start_again(self, child: Child) -> None:
        try:
            # (the new Child logs "started <name> (pid N)")
            self.cluster.restart(child)
        except OSError as exc:
            # Not even started (its executable was removed...): as if it had died at once.
            quick = self._quick_deaths[child.name] = self._quick_deaths.get(child.name, 0) + 1
            delay = max(self._delay(quick), 1.0)
            logger.error("cannot start %s again (%s); trying again in %g s", child.name, exc,
                         delay)
            self._due[child.name] = time.monotonic() + delay

    def _watch_restart(self, child: Child, now: float) -> None:
        if self.cluster.is_ready(child):
            died = self._restarted.pop(child.name)
            self._slow_noted.discard(child.name)
            logger.info("%s (pid %d) is back, %.1f s after it died", child.name, child.pid,
                        time.monotonic() - died)
        elif (now - child.started_at > self.cluster.ready_timeout
              and child.name not in self._slow_noted):
            self._slow_noted.add(child.name)
            logger.warning("%s (pid %d) is not ready %.0f s after its start; see %s",
                           child.name, child.pid, now - child.started_at, child.log_path)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _redis_address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ClusterError(f"not a redis URL: {url!r} (expected redis://host:port/db)")
    return parts.hostname, parts.port or 6379
