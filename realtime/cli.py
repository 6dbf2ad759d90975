"""``python run.py [serve|cluster] ...``: the command line of realtime."""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from .config import ENV_PREFIX, LOG_FORMATS, LOG_LEVELS, Config, ConfigError
from .logs import configure_logging

if TYPE_CHECKING:
    from .cluster import LocalCluster

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run.py", description="realtime: a real-time WebSocket server (Socket.IO v5).")
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser(
        "serve", help="run one node (the default command)",
        description="Run one node. Every flag also reads REALTIME_<FLAG> from the environment "
                    "(e.g. REALTIME_PORT); flags win over the environment, which wins over the "
                    "--config file, which wins over the defaults. Secrets can come from files: "
                    "--jwt-secret-file, REALTIME_JWT_SECRET_FILE, ...")
    serve.add_argument("--config", metavar="FILE", help="TOML file with configuration keys")
    add_config_flags(serve)
    _add_cluster_parser(commands)
    return parser


def add_config_flags(parser: argparse.ArgumentParser, sections: tuple[str, ...] | None = None,
                     ) -> None:
    """A flag per config field (of ``sections`` only, when given), grouped by section."""
    groups = {"": parser}
    for section in ("auth", "limits"):
        groups[section] = parser.add_argument_group(
            {"auth": "authentication and the HTTP API", "limits": "limits"}[section])
    for field in Config.fields():
        section = field.metadata["section"]
        if sections is not None and section not in sections:
            continue
        group = groups[section]
        flag = field.metadata["flag"] or "--" + field.name.replace("_", "-")
        kind = str(field.type)
        help_text = field.metadata.get("help")
        if kind == "bool":
            group.add_argument(flag, dest=field.name, action="store_const", const=True,
                               default=None, help=help_text)
        elif kind.startswith("list"):
            group.add_argument(flag, dest=field.name, action="append", default=None,
                               metavar=field.name.upper().rstrip("S"), help=help_text)
        else:
            group.add_argument(flag, dest=field.name, default=None,
                               type={"int": int, "float": float}.get(kind, str),
                               metavar=field.name.upper(), help=help_text)
        if field.metadata["secret"]:
            group.add_argument("--" + field.name.replace("_", "-") + "-file",
                               dest=field.name + "_file", default=None, metavar="FILE",
                               help=f"read {field.name} from FILE"
                                    + (" (one per line)" if kind.startswith("list") else ""))


def config_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The config fields (and secret files) given on the command line."""
    overrides: dict[str, object] = {}
    for field in Config.fields():
        for name in (field.name, field.name + "_file"):
            value = getattr(args, name, None)
            if value is not None:
                overrides[name] = value
    return overrides


def _add_cluster_parser(commands: argparse._SubParsersAction) -> None:
    cluster = commands.add_parser(
        "cluster", help="run a local cluster: redis, N nodes and nginx in front of them",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Run a local cluster for development: redis-server (unless --redis is given),\n"
            "nodes n1..nN on free ports sharing that redis as their broker, and nginx on\n"
            "--port in front of them. nginx sends every Engine.IO session to the node that\n"
            "issued it (the session id starts with the node id) and new sessions to the\n"
            "node with the fewest connections: see nginx/README.md.\n\n"
            "It prints the URLs and pids, then runs until Ctrl-C or SIGTERM (exit status 0).\n"
            "A part that dies meanwhile (redis, a node, nginx) is logged with its exit status\n"
            "and log tail and started again: same port, node id and command line, after a\n"
            "growing delay if it keeps dying. On the way out it stops every process it\n"
            "started. Exit status 1 if the cluster cannot start. Needs redis-server and nginx\n"
            "installed."),
        epilog="Flags after -- go to every node, e.g.: run.py cluster --nodes 2 -- "
               "--presence-ttl 3 --log-level debug")
    cluster.add_argument("--nodes", type=_positive_int, default=3, metavar="N",
                         help="number of nodes (default: 3)")
    cluster.add_argument("--port", type=_port, default=8080,
                         help="nginx's port, the one to open in a browser; 0 picks a free one "
                              "(default: 8080)")
    cluster.add_argument("--host", default="127.0.0.1",
                         help="address nginx and the nodes listen on (default: 127.0.0.1)")
    cluster.add_argument("--redis", metavar="URL",
                         help="use this running redis (redis://host:port/db) instead of "
                              "starting a redis-server")
    cluster.add_argument("--redis-appendonly", action="store_true",
                         help="run the cluster's redis-server with an append-only file "
                              "(appendfsync everysec) in the work directory, so that history "
                              "survives a restart of redis (not with --redis)")
    cluster.add_argument("--workdir", metavar="DIR",
                         help="keep logs and nginx.conf in DIR (default: a temporary directory, "
                              "removed on exit)")
    cluster.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                         help="logging level of this command (default: info)")
    cluster.add_argument("--log-format", choices=LOG_FORMATS, default=None,
                         help="every node's log format (their --log-format; default: text)")
    cluster.add_argument("--log-connections", action="store_true",
                         help="every node logs connection lifecycle events (their "
                              "--log-connections)")
    add_config_flags(cluster, sections=("auth",))
    cluster.add_argument("node_args", nargs="*", metavar="-- NODE_FLAGS",
                         help="flags for every node's `run.py serve`")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def _positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _port(text: str) -> int:
    value = _integer(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535, not {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["serve", *argv]
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        overrides = config_overrides(args)
        try:
            config = Config.load(overrides, config_file=args.config)
            configure_logging(config.log_level, config.log_format, config.node_id)
            from .server import serve as serve_node

            serve_node(config)
        except ConfigError as exc:
            print(f"run.py: configuration error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "cluster":
        return run_cluster(args)
    build_parser().print_help()
    return 2


def run_cluster(args: argparse.Namespace) -> int:
    """``run.py cluster``: start a :class:`~realtime.cluster.LocalCluster` and supervise it.

    A part that dies is started again (:class:`~realtime.cluster.Supervisor`). Returns 0 after
    a stop by SIGINT/SIGTERM, 1 when the cluster fails to start, 2 for contradictory flags.
    """
    from .cluster import ClusterAborted, ClusterError, LocalCluster, Supervisor

    if args.redis_appendonly and args.redis:
        print("run.py cluster: --redis-appendonly is for the cluster's own redis-server; "
              "configure persistence on the redis at --redis yourself", file=sys.stderr)
        return 2
    configure_logging(args.log_level)
    keep_workdir = args.workdir is not None
    workdir = Path(args.workdir) if keep_workdir else Path(
        tempfile.mkdtemp(prefix="realtime-cluster-"))
    # The handlers only note the signal and set an event, so that a signal never interrupts
    # the stopping itself; the main loop polls the event. They take no lock (not even logging's):
    # under run.py's gevent monkey patching a handler may run inside gevent's hub, which must
    # not block on a lock that the main greenlet holds.
    stop_requested = threading.Event()
    received: list[int] = []

    def request_stop(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        stop_requested.set()

    previous = {signum: signal.signal(signum, request_stop)
                for signum in (signal.SIGINT, signal.SIGTERM)}
    node_flags, node_env = node_auth_settings(args)
    cluster = LocalCluster(workdir=workdir, nodes=args.nodes, port=args.port,
                           redis_url=args.redis,
                           node_args=[*node_flags, *node_log_flags(args), *args.node_args],
                           node_env=node_env, host=args.host,
                           redis_appendonly=args.redis_appendonly)
    try:
        try:
            cluster.start(abort=stop_requested.is_set)
        except ClusterAborted:
            logger.info("received %s during startup; stopped", signal.Signals(received[0]).name)
            return 0
        except ClusterError as exc:
            print(f"run.py cluster: {exc}", file=sys.stderr)
            return 1
        _print_cluster(cluster, removed_on_exit=not keep_workdir)
        supervisor = Supervisor(cluster)
        # Wake up now and then to notice a part that died on its own, and start it again.
        while not stop_requested.wait(0.25):
            supervisor.check()
        logger.info("received %s; stopping the cluster", signal.Signals(received[0]).name)
        return 0
    finally:
        cluster.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if not keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def node_auth_settings(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The auth settings given to ``run.py cluster``, for every node: (flags, environment).

    Secrets travel in the nodes' environment (``REALTIME_JWT_SECRET``, ...), never on their
    command lines, which any user of the machine can read.
    """
    flags: list[str] = []
    env: dict[str, str] = {}
    auth = {f.name: f for f in Config.fields() if f.metadata["section"] == "auth"}
    for name, value in config_overrides(args).items():
        field = auth.get(name.removesuffix("_file"))
        if field is None:  # the cluster's own --host, --port, --log-level
            continue
        if field.metadata["secret"]:
            env[ENV_PREFIX + name.upper()] = ",".join(value) if isinstance(value, list) \
                else str(value)
        elif value is True:
            flags.append("--" + name.replace("_", "-"))
        else:
            flags += ["--" + name.replace("_", "-"), str(value)]
    return flags, env


def node_log_flags(args: argparse.Namespace) -> list[str]:
    """The log flags given to ``run.py cluster`` (``--log-format``, ``--log-connections``),
    as every node's ``run.py serve`` takes them."""
    flags = ["--log-format", args.log_format] if args.log_format else []
    if args.log_connections:
        flags.append("--log-connections")
    return flags


def _print_cluster(cluster: LocalCluster, removed_on_exit: bool) -> None:
    pids = cluster.pids
    rows = [("chat page", cluster.url + "/", f"nginx pid {pids['nginx']}")]
    rows += [(f"node {node_id}", url, f"pid {pids[f'node {node_id}']}")
             for node_id, url in cluster.node_urls.items()]
    redis = (f"pid {pids['redis']}" if cluster.owns_redis else "external, not started here")
    rows.append(("redis", str(cluster.redis_url), redis))
    width = max(len(url) for _, url, _ in rows)
    lines = [f"realtime cluster of {len(cluster.node_urls)} nodes is ready:"]
    lines += [f"  {name:<10} {url:<{width}}  {note}" for name, url, note in rows]
    where = "removed on exit" if removed_on_exit else "kept"
    if cluster.redis_appendonly:
        lines.append(f"redis keeps its data in an append-only file in {cluster.workdir}.")
    lines.append(f"Logs and nginx.conf in {cluster.workdir} ({where}). A part that dies is "
                 "started again; Ctrl-C or SIGTERM stops everything.")
    print("\n".join(lines), flush=True)

