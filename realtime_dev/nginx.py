"""The nginx configuration in front of realtime nodes, rendered from its template.

The template is ``nginx/realtime.conf.template`` of the source tree (``nginx/README.md``
documents it), shipped in the wheel as ``realtime_dev/templates/realtime.conf.template``: sessions
stick to their node through the node id at the start of every Engine.IO session id.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
from collections.abc import Mapping
from pathlib import Path

from realtime.config import NODE_ID_RE


def _template_path() -> Path:
    """The template shipped in this package, else the source checkout's ``nginx/`` copy."""
    packaged = Path(__file__).resolve().parent / "templates" / "realtime.conf.template"
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parent.parent / "nginx" / "realtime.conf.template"


NGINX_TEMPLATE = _template_path()
PLACEHOLDER_RE = re.compile(r"\{\{\s*([A-Za-z0-9_]+)\s*\}\}")
DEFAULT_PROXY_TIMEOUT = "75s"
# Open files per nginx worker: both sides of 20000 worker_connections, plus slack.
WORKER_RLIMIT_NOFILE = 45000
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

