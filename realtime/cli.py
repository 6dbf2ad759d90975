"""``realtime [serve|cluster] ...`` (or ``python run.py ...``): the command line of realtime.

``cluster`` is a development tool: its code is in :mod:`realtime_dev`, imported only when it runs.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .config import LOG_FORMATS, LOG_LEVELS, SECTIONS, Config, ConfigError
from .logs import configure_logging

logger = logging.getLogger(__name__)


def build_parser(prog: str = "run.py") -> argparse.ArgumentParser:
    """The parser of both entry points: ``prog`` is ``run.py`` or ``realtime``."""
    parser = argparse.ArgumentParser(
        prog=prog, description="realtime: a real-time WebSocket server (Socket.IO v5).")
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
    titles = {"auth": "authentication and the HTTP API", "limits": "limits",
              "webhooks": "webhooks", "proxy": "backend proxy"}
    for section in SECTIONS:
        groups[section] = parser.add_argument_group(titles[section])
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
        epilog="Flags after -- go to every node, e.g.: %(prog)s --nodes 2 -- "
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
    add_config_flags(cluster, sections=("auth", "webhooks", "proxy"))
    cluster.add_argument("node_args", nargs="*", metavar="-- NODE_FLAGS",
                         help="flags for every node's `realtime serve`")


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


def main(argv: list[str] | None = None, prog: str = "run.py") -> int:
    """Run the command in ``argv`` (default: ``sys.argv[1:]``; ``serve`` when none is named);
    return the exit status. ``prog`` names the program in help and error messages."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["serve", *argv]
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.command == "serve":
        overrides = config_overrides(args)
        try:
            config = Config.load(overrides, config_file=args.config)
            configure_logging(config.log_level, config.log_format, config.node_id)
            from .server import serve as serve_node

            serve_node(config)
        except ConfigError as exc:
            print(f"{prog}: configuration error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "cluster":
        # Lazily: a node never needs the development tools.
        from realtime_dev.command import run_cluster

        return run_cluster(args, prog)
    parser.print_help()
    return 2


