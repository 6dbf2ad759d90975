"""A local cluster as child processes: redis, N nodes and nginx in front of them.

``python run.py cluster`` runs one for development, with a :class:`Supervisor` that starts a
part that dies again; integration tests use :class:`LocalCluster` as a fixture. Every child runs
in a session of its own, so that a Ctrl-C in the terminal reaches only the orchestrating process,
which then stops the children in order (nginx, nodes, redis), and so that a child's own children
(nginx workers) can be swept up with it.

The nginx configuration comes from ``nginx/realtime.conf.template`` (see ``nginx/README.md``):
sessions stick to their node through the node id at the start of every Engine.IO session id.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

from .config import NODE_ID_RE, REPO_ROOT

logger = logging.getLogger(__name__)

NGINX_TEMPLATE = REPO_ROOT / "nginx" / "realtime.conf.template"
RUN_PY = REPO_ROOT / "run.py"
PLACEHOLDER_RE = re.compile(r"\{\{\s*([A-Za-z0-9_]+)\s*\}\}")
DEFAULT_PROXY_TIMEOUT = "75s"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
# Between the two SIGTERMs that stop a node without its drain (see stop_children).
SECOND_SIGNAL_DELAY = 0.2
# How long an external redis may take to accept a connection: it is already running, or not.
EXTERNAL_REDIS_TIMEOUT = 5.0
POLL_INTERVAL = 0.05
# Open files per nginx worker: both sides of 20000 worker_connections, plus slack.
WORKER_RLIMIT_NOFILE = 45000
# A part that ran this long before it died is started again at once; one that keeps dying
# sooner waits longer and longer before each start, up to RESTART_MAX_DELAY.
RESTART_STABLE_AFTER = 10.0
RESTART_MAX_DELAY = 30.0
# Failure accounting of the upstream of new sessions and plain HTTP (see nginx/README.md,
# "When a node fails"): this many failed attempts within NODE_FAIL_TIMEOUT take a node out of
# rotation for NODE_FAIL_TIMEOUT. Every node is also listed as a backup that is never taken out.
NODE_MAX_FAILS = 3
NODE_FAIL_TIMEOUT = "5s"
# Idle keep-alive connections per nginx worker: to all nodes together, and to each node for its
# sessions; nginx closes them before the nodes' --idle-timeout (60 s) would.
UPSTREAM_KEEPALIVE = 16
NODE_UPSTREAM_KEEPALIVE = 8
UPSTREAM_KEEPALIVE_TIMEOUT = "50s"
# Words with a meaning of their own as keys of an nginx `map`: a node id spelled like one must be
# escaped with a backslash to be taken literally.
_NGINX_MAP_KEYWORDS = frozenset({"default", "hostnames", "include", "volatile"})
# Characters that would end or reinterpret a quoted nginx path.
_UNSAFE_PATH_CHARS = frozenset('"\'\\;{}$\n\r')
# Urllib without any proxy from the environment: the cluster is always on this machine.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ClusterError(RuntimeError):
    """A part of the cluster failed to start or died; the message includes its log tail."""


class ClusterAborted(ClusterError):
    """:meth:`LocalCluster.start` was asked to give up (e.g. by Ctrl-C) before it was done."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def find_executable(name: str) -> str:
    """The path of ``name`` on PATH, or in the sbin directories that PATH often lacks."""
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/bin", "/usr/local/bin"):
        candidate = Path(directory) / name
        if os.access(candidate, os.X_OK):
            return str(candidate)
    raise ClusterError(f"{name} is not installed (not on PATH nor in /usr/sbin): install it first")


def render_template(template: str, values: Mapping[str, str]) -> str:
    """Replace every ``{{name}}`` in ``template`` with ``values[name]``.

    Raises ValueError when a placeholder has no value, a value has no placeholder (a typo on
    either side) or a placeholder is left after rendering. Lines after the first of a multi-line
    value get the indentation of the line holding the placeholder.
    """
    names = set(PLACEHOLDER_RE.findall(template))
    missing = sorted(names - set(values))
    unknown = sorted(set(values) - names)
    if missing or unknown:
        problems = []
        if missing:
            problems.append("no value for " + ", ".join(missing))
        if unknown:
            problems.append("the template has no placeholder " + ", ".join(unknown))
        raise ValueError("cannot render the template: " + "; ".join(problems))

    def substitute(match: re.Match[str]) -> str:
        line_start = template.rfind("\n", 0, match.start()) + 1
        indent = re.match(r"[ \t]*", template[line_start:]).group()  # type: ignore[union-attr]
        first, *rest = values[match.group(1)].split("\n")
        return "\n".join([first, *(indent + line if line else "" for line in rest)])

    rendered = PLACEHOLDER_RE.sub(substitute, template)
    if "{{" in rendered:
        line = rendered[rendered.index("{{"):].splitlines()[0]
        raise ValueError(f"a placeholder is left after rendering: {line!r}")
    return rendered


def upstream_name(node_id: str) -> str:
    """The name of the nginx upstream that holds only ``node_id``."""
    return f"realtime_node_{node_id}"


def render_nginx_config(
    nodes: Mapping[str, str],
    listen: str,
    prefix: Path | str,
    *,
    proxy_timeout: str = DEFAULT_PROXY_TIMEOUT,
    worker_processes: str = "1",
    worker_rlimit_nofile: int | None = None,
    template: str | None = None,
) -> str:
    """A complete nginx.conf for ``nodes`` (node id -> ``host:port``) from the template.

    ``listen`` is nginx's listen address (``127.0.0.1:8080``, ``80``...), ``prefix`` an absolute
    directory for its pid file, error log and temp directories. ``template`` defaults to
    ``nginx/realtime.conf.template``. ``worker_rlimit_nofile`` defaults to
    :data:`WORKER_RLIMIT_NOFILE` or this process's hard limit, whichever is lower.
    """
    if not nodes:
        raise ValueError("an nginx configuration needs at least one node")
    seen: dict[str, str] = {}
    for node_id in nodes:
        if not NODE_ID_RE.fullmatch(node_id):
            raise ValueError(f"node id must match [A-Za-z0-9_-]{{1,32}}, not {node_id!r}")
        # nginx matches map keys case-insensitively: n1 and N1 would be the same key.
        clash = seen.setdefault(node_id.lower(), node_id)
        if clash != node_id:
            raise ValueError(f"node ids {clash!r} and {node_id!r} differ only in case")
    prefix = str(prefix)
    if not os.path.isabs(prefix) or _UNSAFE_PATH_CHARS & set(prefix):
        raise ValueError(f"the nginx prefix must be an absolute path without quotes, "
                         f"backslashes, ';', braces or '$': {prefix!r}")
    for name, value in (("listen", listen), ("proxy_timeout", proxy_timeout),
                        ("worker_processes", worker_processes)):
        if not value or not re.fullmatch(r"[A-Za-z0-9_.:\[\]-]+", value):
            raise ValueError(f"{name} is not a plain nginx value: {value!r}")

    addresses = list(nodes.values())
    upstreams = [
        "# New handshakes and plain HTTP: any node, the one with the fewest connections first.",
        "upstream realtime_all {",
        "    least_conn;",
        f"    # {NODE_MAX_FAILS} failed attempts (no connection, a reset, a timeout) within "
        f"{NODE_FAIL_TIMEOUT} take a node",
        f"    # out of rotation for {NODE_FAIL_TIMEOUT}; then one request tries it again.",
        *(f"    server {address} max_fails={NODE_MAX_FAILS} fail_timeout={NODE_FAIL_TIMEOUT};"
          for address in addresses),
        "    # The same nodes again, as backups that are never taken out: when every node above",
        "    # is out at once (a rolling restart, a few errors from each), requests still try",
        "    # them all rather than get 502 \"no live upstreams\". See nginx/README.md.",
        *(f"    server {address} backup max_fails=0;" for address in addresses),
        "    # Idle connections kept open to the nodes for the next requests. The nodes keep them",
        "    # alive as well and say `Connection: close` when they end one; they close an idle one",
        "    # after their --idle-timeout (60 s), and nginx lets it go before that, so that it",
        "    # never sends a request on a connection that the node is closing.",
        f"    keepalive {UPSTREAM_KEEPALIVE};",
        f"    keepalive_timeout {UPSTREAM_KEEPALIVE_TIMEOUT};",
        "}",
    ]
    for node_id, address in nodes.items():
        # A single server: nginx never takes it out of rotation (there is nowhere else to go).
        upstreams += ["", f"upstream {upstream_name(node_id)} {{", f"    server {address};",
                      "    # (its sessions' requests: kept-alive connections as above)",
                      f"    keepalive {NODE_UPSTREAM_KEEPALIVE};",
                      f"    keepalive_timeout {UPSTREAM_KEEPALIVE_TIMEOUT};", "}"]
    node_map = []
    for node_id in nodes:
        key = "\\" + node_id if node_id.lower() in _NGINX_MAP_KEYWORDS else node_id
        node_map.append(f"{key} {upstream_name(node_id)};")
    if template is None:
        template = NGINX_TEMPLATE.read_text()
    return render_template(template, {
        "prefix": prefix.rstrip("/") or "/",
        "listen": listen,
        "worker_processes": worker_processes,
        "worker_rlimit_nofile": str(worker_rlimit_nofile or _default_rlimit_nofile()),
        "proxy_timeout": proxy_timeout,
        "upstreams": "\n".join(upstreams),
        "node_map": "\n".join(node_map),
    })


def _default_rlimit_nofile() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return WORKER_RLIMIT_NOFILE if hard == resource.RLIM_INFINITY else min(
        WORKER_RLIMIT_NOFILE, hard)


def nginx_command(nginx: str, prefix: Path, conf: Path) -> list[str]:
    """The argv that runs nginx in the foreground on ``conf`` with everything in ``prefix``."""
    argv = [nginx, "-p", f"{prefix}/", "-c", str(conf)]
    if _nginx_version(nginx) >= (1, 19, 5):
        # -e: the error log nginx writes to before it has read the configuration. Without it,
        # that is /var/log/nginx/error.log, which an ordinary user cannot open.
        argv += ["-e", str(prefix / "nginx-error.log")]
    return [*argv, "-g", "daemon off;"]


def _nginx_version(nginx: str) -> tuple[int, ...]:
    try:
        result = subprocess.run([nginx, "-v"], capture_output=True, text=True, timeout=10,
                                check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", result.stderr + result.stdout)
    return tuple(int(part) for part in match.groups()) if match else ()


class Child:
    """One process the cluster started, in a session of its own, with its output in a log file."""

    def __init__(self, kind: str, name: str, argv: Sequence[str], log_path: Path, *,
                 url: str | None = None, extra_log: Path | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.kind = kind
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.url = url
        self.extra_log = extra_log
        self.env = None if env is None else dict(env)
        # The child keeps its own copy of the descriptor; appending keeps the log of an earlier
        # run of the same node when it is started again.
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=REPO_ROOT, env=self.env, start_new_session=True)
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
                     extra_log=self.extra_log, env=self.env)

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
        if self.port and not _can_listen(self._bind_host, self.port):
            # Before starting anything: nginx would only find out after its bind retries.
            raise ClusterError(f"cannot listen on {self.host}:{self.port}: the port is in use")
        self._abort = abort
        try:
            self._start_redis()
            self._start_nodes()
            self._start_nginx()
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
        return _http_ok(f"{child.url}/readyz")

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
            self._wait(lambda: _tcp_connects(host, port),
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
        argv = [sys.executable, str(RUN_PY), "serve", "--host", self.host, "--port", str(port),
                "--node-id", node_id, "--broker", str(self.redis_url), *self.node_args]
        child = Child("node", f"node {node_id}", argv, self.workdir / f"{node_id}.log", url=url,
                      env={**os.environ, **self.node_env, "PYTHONUNBUFFERED": "1"})
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
            pending[:] = [c for c in pending if not _http_ok(f"{c.url}/readyz")]
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


def _can_listen(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        # As nginx does: a port whose last connections linger in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _tcp_connects(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def redis_pings(host: str, port: int) -> bool:
    """True when a Redis server answers PING at ``host:port`` within a second."""
    try:
        with socket.create_connection((host, port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _http_ok(url: str) -> bool:
    try:
        with _NO_PROXY_OPENER.open(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        # HTTPError (a 503 while not ready) is a URLError too.
        return False
