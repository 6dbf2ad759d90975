"""``realtime cluster`` (``python run.py cluster``): a local cluster until Ctrl-C or SIGTERM.

:func:`realtime.cli.main` parses the command line and calls :func:`run_cluster`.
"""

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

from realtime.cli import config_overrides
from realtime.config import ENV_PREFIX, Config
from realtime.logs import configure_logging

from .cluster import ClusterAborted, ClusterError, LocalCluster, Supervisor

logger = logging.getLogger(__name__)


def run_cluster(args: argparse.Namespace, prog: str = "realtime") -> int:
    """``realtime cluster``: start a :class:`~realtime_dev.cluster.LocalCluster`, supervise it.

    ``args`` come from the ``cluster`` parser of :func:`realtime.cli.build_parser`; ``prog``
    names the program in error messages. A part that dies is started again
    (:class:`~realtime_dev.cluster.Supervisor`). Returns 0 after a stop by SIGINT/SIGTERM, 1
    when the cluster fails to start, 2 for contradictory flags.
    """
    if args.redis_appendonly and args.redis:
        print(f"{prog} cluster: --redis-appendonly is for the cluster's own redis-server; "
              "configure persistence on the redis at --redis yourself", file=sys.stderr)
        return 2
    configure_logging(args.log_level)
    keep_workdir = args.workdir is not None
    workdir = Path(args.workdir) if keep_workdir else Path(
        tempfile.mkdtemp(prefix="realtime-cluster-"))
    # The handlers only note the signal and set an event, so that a signal never interrupts
    # the stopping itself; the main loop polls the event. They take no lock (not even logging's):
    # under the entry point's gevent monkey patching a handler may run inside gevent's hub,
    # which must not block on a lock that the main greenlet holds.
    stop_requested = threading.Event()
    received: list[int] = []

    def request_stop(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        stop_requested.set()

    previous = {signum: signal.signal(signum, request_stop)
                for signum in (signal.SIGINT, signal.SIGTERM)}
    node_flags, node_env = node_shared_settings(args)
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
            print(f"{prog} cluster: {exc}", file=sys.stderr)
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


def node_shared_settings(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The auth, webhook and backend proxy settings given to ``realtime cluster``, for every
    node: (flags, environment).

    Secrets travel in the nodes' environment (``REALTIME_JWT_SECRET``,
    ``REALTIME_WEBHOOK_SECRET``, ...), never on their command lines, which any user of the
    machine can read.
    """
    flags: list[str] = []
    env: dict[str, str] = {}
    shared = {f.name: f for f in Config.fields()
              if f.metadata["section"] in ("auth", "webhooks", "proxy")}
    for name, value in config_overrides(args).items():
        field = shared.get(name.removesuffix("_file"))
        if field is None:  # the cluster's own --host, --port, --log-level
            continue
        if field.metadata["secret"]:
            env[ENV_PREFIX + name.upper()] = ",".join(value) if isinstance(value, list) \
                else str(value)
        elif value is True:
            flags.append("--" + name.replace("_", "-"))
        elif isinstance(value, list):  # --webhook-url, repeated
            flag = field.metadata["flag"] or "--" + name.replace("_", "-")
            for item in value:
                flags += [flag, str(item)]
        else:
            flags += ["--" + name.replace("_", "-"), str(value)]
    return flags, env


def node_log_flags(args: argparse.Namespace) -> list[str]:
    """The log flags given to ``realtime cluster`` (``--log-format``, ``--log-connections``),
    as every node's ``realtime serve`` takes them."""
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
