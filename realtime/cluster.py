"""A local cluster as child processes: redis, N nodes and nginx in front of them.

``python run.py cluster`` runs one for development; integration tests use :class:`LocalCluster`
as a fixture. Every child runs in a session of its own, so that a Ctrl-C in the terminal reaches
only the orchestrating process, which then stops the children in order (nginx, nodes, redis), and
so that a child's own children (nginx workers) can be swept up with it.

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
# How long an external redis may take to accept a connection: it is already running, or not.
EXTERNAL_REDIS_TIMEOUT = 5.0
POLL_INTERVAL = 0.05
# Open files per nginx worker: both sides of 20000 worker_connections, plus slack.
WORKER_RLIMIT_NOFILE = 45000
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
        *(f"    server {address};" for address in addresses),
        "    # Idle connections kept open to the nodes for the `/` location; nginx lets them go",
        "    # before the nodes' --idle-timeout (60 s) does, so that it never sends a request",
        "    # on a connection the node is closing.",
        "    keepalive 16;",
        "    keepalive_timeout 50s;",
        "}",
    ]
    for node_id, address in nodes.items():
        upstreams += ["", f"upstream {upstream_name(node_id)} {{", f"    server {address};", "}"]
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
        # The child keeps its own copy of the descriptor; appending keeps the log of an earlier
        # run of the same node when it is started again.
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=REPO_ROOT, env=None if env is None else dict(env), start_new_session=True)
        self.pid = self.process.pid
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


def stop_children(children: Sequence[Child], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM every child, SIGKILL those still running after ``timeout`` s, reap them all."""
    for child in children:
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
    (logs, ``nginx.conf``) go to ``workdir``, which is neither created empty nor removed here.
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
            stop_children([c for c in self.children if c.kind == kind], timeout)

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
        old = self.node(node_id)
        if old.alive():
            raise RuntimeError(f"node {node_id} is still running (pid {old.pid})")
        self.children.remove(old)
        child = self._spawn_node(node_id)
        self._wait_ready([child], f"node {node_id} to be ready", self.ready_timeout, [child])
        return child

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
        argv = [find_executable("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
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
