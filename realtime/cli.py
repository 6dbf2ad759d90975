"""``python run.py [serve|cluster] ...``: the command line of realtime."""

from __future__ import annotations

import argparse
import logging
import sys

from .config import Config, ConfigError

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run.py", description="realtime: a real-time WebSocket server (Socket.IO v5).")
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser(
        "serve", help="run one node (the default command)",
        description="Run one node. Every flag also reads REALTIME_<FLAG> from the environment "
                    "(e.g. REALTIME_PORT); flags win over the environment, which wins over the "
                    "--config file, which wins over the defaults.")
    serve.add_argument("--config", metavar="FILE", help="TOML file with configuration keys")
    for field in Config.fields():
        flag = "--" + field.name.replace("_", "-")
        kind = {"int": int, "float": float}.get(str(field.type), str)
        serve.add_argument(flag, dest=field.name, type=kind, default=None,
                           metavar=field.name.upper(), help=field.metadata.get("help"))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["serve", *argv]
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        overrides = {field.name: getattr(args, field.name) for field in Config.fields()}
        try:
            config = Config.load(overrides, config_file=args.config)
            configure_logging(config.log_level)
            from .server import serve as serve_node

            serve_node(config)
        except ConfigError as exc:
            print(f"run.py: configuration error: {exc}", file=sys.stderr)
            return 2
        return 0
    build_parser().print_help()
    return 2


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # gevent-websocket logs one access line per HTTP request at INFO: far too chatty for
    # long-polling clients.
    logging.getLogger("geventwebsocket.handler").setLevel(logging.WARNING)
