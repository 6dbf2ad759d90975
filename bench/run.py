"""realtime's benchmark suite: ``python bench/run.py --help``."""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script (python bench/run.py): make the repository importable as the package root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import contextlib
import datetime
import importlib.util
import json
import logging
import os
import platform
import shlex
import subprocess
import time
import traceback
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("bench.run")

BENCH_DIR = Path(__file__).resolve().parent
SCENARIOS = ("floor", "idle", "fanout", "notify", "cluster", "churn", "browser", "soak",
             "capacity")
DEFAULT_SCENARIOS = ("floor", "idle", "fanout", "notify", "cluster", "churn", "browser")
# Scenarios that measure realtime against itself (no peer runs them).
REALTIME_ONLY = ("browser", "soak")
DEFAULT_RATES = "10,30,60,120,240,480,960"

DESCRIPTION = """\
Benchmark realtime against the servers users would pick instead, on this machine.

Targets: realtime (its LocalCluster: redis-server, N nodes, nginx), a plain Flask-SocketIO app
(gevent + gevent-websocket + message_queue=redis; bench/peers/flask_socketio_peer.py) and Node
socket.io 4.8 + @socket.io/redis-adapter (bench/peers/node, installed with npm on first use;
skipped with a clear line when node/npm are missing). Each run of a scenario starts the target
fresh on free loopback ports and stops it afterwards; targets are interleaved (A B A B ...) and
medians over --runs are reported, with ratios realtime/peer.

Scenarios (default: all but soak and capacity):
  floor     CPU per send() of a pre-encoded 150-byte WebSocket frame from a bare Python loop over
            --floor-sockets loopback sockets at 60 rounds/s, for 1, 2 and 4 frames per send: the
            floor that server CPU per delivery is compared with.
  idle      --idle-connections Socket.IO clients on ONE node: handshakes/s, KB of node RSS per
            connection, idle CPU, connections dropped while holding.
  fanout    --subscribers clients on one channel, spread over --nodes nodes; a publisher sends
            ~100-byte messages at each --rates step (publishes/s) for --duration s. Per step:
            deliveries/s, latency p50/p99/p99.9/max, server CPU per delivery and its ratio to the
            floor, lost/duplicated/reordered. Saturated: achieved < 90% of offered, or p99 > 1 s;
            the ladder goes one step past saturation while throughput still grows (the best
            achieved is the saturation throughput), then an overload step at 2x the saturating
            rate with --stalled clients that stop reading.
  notify    --notify-users clients, each subscribed to its own user:<id>; publications through
            the HTTP API (and realtime's emitter) at --notify-rate, then as fast as they go.
            On realtime, webhook load after that: up to 2000 more users connect and leave,
            a receiver in the bench counts the six events of each and how late they come.
  cluster   fanout through nginx in front of --cluster-nodes nodes.
  churn     connect, subscribe to user:<id>, disconnect, in loops, for --duration s.
  browser   realtime only: --browser-clients official socket.io-client clients (Node) on one
            node, with the default start (long-polling, then the upgrade) against WebSocket
            first, and socket.io-msgpack-parser against the default parser, each variant on a
            fresh node: connect time (--browser-concurrency at a time), KB per connection,
            server CPU per delivery at --browser-rate publishes/s for --browser-duration s.
  soak      realtime only, not in the default set (it is long): for --soak-duration s,
            --soak-clients loops connect, subscribe to a shared channel and to their own
            user:<id>, receive for up to --soak-hold s, and disconnect (every 4th with a TCP
            reset), while a publisher publishes on the shared channel at --soak-rate/s and
            notifications go to the user channels through the HTTP API at --soak-notify-rate/s.
            Every node's RSS and descriptors are sampled every --soak-sample s. Reports cycles,
            errors, lost publications (every cycle checks it got every offset of its window on
            each channel), RSS at start / after --soak-warmup / at the end and its slope (least
            squares after the warm-up), descriptors before and after; checks "memory flat"
            (every node's slope < --soak-max-slope MB/min) and "descriptors back".
  capacity  --capacity-one-node connections on one node, then --capacity-cluster over
            --capacity-nodes nodes (needs the fd hard limit and several source addresses, which
            the load generator uses: 127.10.<worker>.<n>).

Results go to --out (default bench/results/<UTC time>/): results.json, results.md (headline,
the issue's targets with pass/fail and margins, every table) and PNG plots.
"""

EPILOG = """\
examples:
  python bench/run.py --quick                      # everything, tiny, about a minute
  python bench/run.py floor fanout --targets realtime,node --runs 3
  python bench/run.py fanout --subscribers 5000 --rates 5,10,20,40 --duration 10
  python bench/run.py capacity --targets realtime  # 20,000 on one node, 60,000 on four
  python bench/run.py soak --targets realtime   # node memory over 10 minutes of churn
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                        help=f"any of {', '.join(SCENARIOS)} (default: all but soak and capacity)")
    parser.add_argument("--targets", default="realtime,flask,node",
                        help="comma-separated: realtime, flask, node (default: all; node is "
                             "skipped when node/npm are missing)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny configuration (a few clients, 1-2 s per step, one rate): "
                             "checks that everything runs, measures nothing meaningful")
    parser.add_argument("--runs", type=_positive_int, default=1,
                        help="repeat every scenario this many times per target, interleaved; "
                             "medians are reported (default: 1)")
    parser.add_argument("--out", type=Path,
                        help="output directory (default: bench/results/<UTC timestamp>)")
    parser.add_argument("--subscribers", type=_positive_int, default=2000,
                        help="fanout and cluster subscribers (default: 2000)")
    parser.add_argument("--nodes", type=_positive_int, default=2,
                        help="nodes per target for fanout, notify, churn (default: 2)")
    parser.add_argument("--cluster-nodes", type=_positive_int, default=2,
                        help="nodes behind nginx in the cluster scenario (default: 2)")
    parser.add_argument("--rates", default=DEFAULT_RATES,
                        help=f"fanout publishes/s ladder (default: {DEFAULT_RATES})")
    parser.add_argument("--duration", type=float, default=5.0,
                        help="seconds of publishing per step (default: 5)")
    parser.add_argument("--idle-connections", type=_positive_int, default=8000,
                        help="idle scenario connections on one node (default: 8000)")
    parser.add_argument("--notify-users", type=_positive_int, default=10000,
                        help="notify scenario users (default: 10000)")
    parser.add_argument("--notify-rate", type=float, default=1000.0,
                        help="notify publishes/s for the latency step (default: 1000)")
    parser.add_argument("--notify-connections", type=_positive_int, default=64,
                        help="notify: keep-alive connections of the HTTP publisher, spread "
                             "over the nodes (default: 64; issue 12's setup: 16 to one node, "
                             "--nodes 1)")
    parser.add_argument("--capacity-one-node", type=_positive_int, default=20000,
                        help="capacity connections on one node (default: 20000)")
    parser.add_argument("--capacity-cluster", type=_positive_int, default=60000,
                        help="capacity connections over --capacity-nodes (default: 60000)")
    parser.add_argument("--capacity-nodes", type=_positive_int, default=4,
                        help="capacity cluster nodes (default: 4)")
    parser.add_argument("--browser-clients", type=_positive_int, default=1000,
                        help="browser scenario: official clients per variant (default: 1000)")
    parser.add_argument("--browser-concurrency", type=_positive_int, default=50,
                        help="browser scenario: clients connecting at a time (default: 50)")
    parser.add_argument("--browser-rate", type=float, default=20.0,
                        help="browser scenario: publishes/s (default: 20)")
    parser.add_argument("--browser-duration", type=float, default=5.0,
                        help="browser scenario: seconds of publishing (default: 5)")
    parser.add_argument("--browser-variants",
                        default="websocket-json,default-json,websocket-msgpack,default-msgpack",
                        help="browser scenario: <websocket|default>-<json|msgpack>, "
                             "comma-separated (default: all four)")
    parser.add_argument("--churn-concurrency", type=_positive_int, default=50,
                        help="connect/disconnect loops per load generator worker (default: 50)")
    parser.add_argument("--soak-duration", type=_positive_float, default=600.0,
                        help="soak scenario: seconds of churn (default: 600)")
    parser.add_argument("--soak-clients", type=_positive_int, default=100,
                        help="soak scenario: concurrent connect/subscribe/disconnect loops "
                             "(default: 100)")
    parser.add_argument("--soak-rate", type=_positive_float, default=20.0,
                        help="soak scenario: publishes/s on the shared channel (default: 20)")
    parser.add_argument("--soak-notify-rate", type=_positive_float, default=100.0,
                        help="soak scenario: notifications/s to the user channels through the "
                             "HTTP API (default: 100)")
    parser.add_argument("--soak-hold", type=_positive_float, default=2.0,
                        help="soak scenario: a client stays subscribed a random 0..this many "
                             "seconds (default: 2)")
    parser.add_argument("--soak-warmup", type=_positive_float, default=200.0,
                        help="soak scenario: seconds left out of the RSS slope (at most a third "
                             "of the run; default: 200)")
    parser.add_argument("--soak-sample", type=_positive_float, default=2.0,
                        help="soak scenario: seconds between RSS/descriptor samples (default: 2)")
    parser.add_argument("--soak-max-slope", type=_positive_float, default=1.0,
                        help="soak scenario: MB/min of RSS growth per node after the warm-up "
                             "below which memory counts as flat (default: 1)")
    parser.add_argument("--stalled", type=int, default=4,
                        help="clients that stop reading during the overload step (default: 4)")
    parser.add_argument("--no-overload", action="store_true",
                        help="skip the overload step at 2x the saturating rate")
    parser.add_argument("--memory-bound-mb", type=float, default=256.0,
                        help="node RSS growth allowed during the overload step (default: 256)")
    parser.add_argument("--floor-sockets", type=_positive_int, default=2000,
                        help="loopback sockets of the floor's send loop (default: 2000)")
    parser.add_argument("--workers", type=_positive_int, default=2,
                        help="load generator client processes (more are added for >15,000 "
                             "connections; default: 2)")
    parser.add_argument("--nap-ms", type=float, default=1.0,
                        help="load generator loop nap between iterations: lower client CPU per "
                             "message (default: 1)")
    parser.add_argument("--no-install", action="store_true",
                        help="do not pip/npm install missing bench dependencies")
    parser.add_argument("--render", type=Path, metavar="DIR",
                        help="run nothing: rebuild DIR/results.md and the plots from "
                             "DIR/results.json (medians and targets recomputed)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


# -- dependencies, logging, progress ----------------------------------------------------------


def ensure_python_requirements(allowed: bool) -> None:
    """pip install bench/requirements.txt into this interpreter when something is missing."""
    missing = [name for name in ("tqdm", "matplotlib")
               if importlib.util.find_spec(name) is None]
    if not missing:
        return
    if not allowed:
        logger.warning("not installed: %s (bench/requirements.txt); carrying on without",
                       ", ".join(missing))
        return
    logger.warning("installing the bench's requirements (missing %s)", ", ".join(missing))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "-r", str(BENCH_DIR / "requirements.txt")],
        check=False, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        logger.warning("pip install failed; carrying on without %s:\n%s", ", ".join(missing),
                       result.stderr.strip()[-2000:])
    importlib.invalidate_caches()


class _NoBar:
    """Stands in for a tqdm bar when tqdm is not installed."""

    def update(self, n: float = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def bar_factory() -> Callable[..., Any]:
    try:
        from tqdm import tqdm
    except ImportError:
        return lambda **_: _NoBar()
    return lambda **kwargs: tqdm(file=sys.stderr, dynamic_ncols=True, **kwargs)


class _TqdmHandler(logging.StreamHandler):
    """Logs through tqdm.write so that lines do not tear the progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except ImportError:
            super().emit(record)


def configure_logging(verbose: bool) -> None:
    handler = _TqdmHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        logging.getLogger("realtime").setLevel(logging.WARNING)


# -- the run ----------------------------------------------------------------------------------


def machine_description() -> str:
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory = 0
    node = ""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        node = subprocess.run(["node", "--version"], capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip()
    return (f"{os.cpu_count()} cores, {memory:.0f} GiB, Linux {platform.release()}, "
            f"Python {platform.python_version()}" + (f", node {node}" if node else ""))


def git_revision() -> str:
    """The repository's commit (with ``+dirty`` when the work tree has changes), or ''."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR,
                                capture_output=True, text=True, timeout=10,
                                check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=BENCH_DIR, capture_output=True, text=True, timeout=10,
                               check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return commit + ("+dirty" if commit and dirty else "")


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(raw)
    configure_logging(args.verbose)
    if args.render:
        return render(args.render)
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        build_parser().error(f"unknown scenario(s) {', '.join(unknown)}: choose from "
                             f"{', '.join(SCENARIOS)}")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    from bench.targets import TARGET_NAMES

    bad = [t for t in targets if t not in TARGET_NAMES]
    if bad:
        build_parser().error(f"unknown target(s) {', '.join(bad)}: choose from "
                             f"{', '.join(TARGET_NAMES)}")
    try:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        build_parser().error(f"--rates must be numbers separated by commas: {args.rates!r}")
    ensure_python_requirements(not (args.no_install or args.quick))

    from bench.scenarios import Settings

    scenarios = [s for s in SCENARIOS if s in (args.scenarios or DEFAULT_SCENARIOS)]
    stamp = datetime.datetime.now(datetime.UTC)
    out = args.out or BENCH_DIR / "results" / stamp.strftime("%Y%m%dT%H%M%SZ")
    settings = Settings(
        scenarios=scenarios, targets=targets, out=out, quick=args.quick,
        subscribers=args.subscribers, nodes=args.nodes, cluster_nodes=args.cluster_nodes,
        rates=rates, duration=args.duration, runs=args.runs, workers=args.workers,
        nap_ms=args.nap_ms, floor_sockets=args.floor_sockets,
        idle_connections=args.idle_connections, capacity_one_node=args.capacity_one_node,
        capacity_cluster=args.capacity_cluster, capacity_nodes=args.capacity_nodes,
        notify_users=args.notify_users, notify_rate=args.notify_rate,
        notify_connections=args.notify_connections,
        churn_concurrency=args.churn_concurrency, stalled=args.stalled,
        browser_clients=args.browser_clients, browser_concurrency=args.browser_concurrency,
        browser_rate=args.browser_rate, browser_duration=args.browser_duration,
        browser_variants=[v.strip() for v in args.browser_variants.split(",") if v.strip()],
        overload=not args.no_overload, memory_bound_mb=args.memory_bound_mb,
        soak_duration=args.soak_duration, soak_clients=args.soak_clients,
        soak_rate=args.soak_rate, soak_notify_rate=args.soak_notify_rate,
        soak_hold=args.soak_hold, soak_warmup=args.soak_warmup, soak_sample=args.soak_sample,
        soak_max_slope=args.soak_max_slope)
    if args.quick:
        _make_quick(settings, raw)
    command = "python bench/run.py " + " ".join(shlex.quote(a) for a in raw)
    return run(settings, command, stamp, install=not (args.no_install or args.quick))


def _make_quick(settings: Any, argv: list[str]) -> None:
    """Shrink everything the user did not set explicitly to a few clients and seconds."""
    given = {arg.split("=", 1)[0] for arg in argv}

    def unless(flag: str, name: str, value: Any) -> None:
        if flag not in given:
            setattr(settings, name, value)

    unless("--subscribers", "subscribers", 20)
    unless("--rates", "rates", [20.0])
    unless("--duration", "duration", 1.5)
    unless("--idle-connections", "idle_connections", 50)
    unless("--notify-users", "notify_users", 20)
    unless("--notify-rate", "notify_rate", 50.0)
    unless("--floor-sockets", "floor_sockets", 100)
    unless("--capacity-one-node", "capacity_one_node", 100)
    unless("--capacity-cluster", "capacity_cluster", 200)
    unless("--workers", "workers", 1)
    unless("--browser-clients", "browser_clients", 20)
    unless("--browser-concurrency", "browser_concurrency", 10)
    unless("--browser-duration", "browser_duration", 1.0)
    unless("--soak-duration", "soak_duration", 4.0)
    unless("--soak-clients", "soak_clients", 10)
    unless("--soak-notify-rate", "soak_notify_rate", 20.0)
    unless("--soak-hold", "soak_hold", 0.5)
    unless("--soak-warmup", "soak_warmup", 1.0)
    unless("--soak-sample", "soak_sample", 0.25)
    settings.floor_duration = 0.5
    settings.idle_hold = 0.5
    unless("--notify-connections", "notify_connections", 2)
    settings.drain_idle = 1.0
    settings.overload = False


def run(settings: Any, command: str, stamp: datetime.datetime, *, install: bool) -> int:
    from bench import report, scenarios, targets
    from bench.floor import floor_us, run_floor

    settings.out.mkdir(parents=True, exist_ok=True)
    logs = settings.out / "logs"
    results: dict[str, Any] = {
        "meta": {"date": stamp.strftime("%Y-%m-%d %H:%M UTC"), "command": command,
                 "machine": machine_description(), "commit": git_revision()},
        "settings": {k: (str(v) if isinstance(v, Path) else v)
                     for k, v in vars(settings).items()},
        "skipped": {},
        "scenarios": {},
    }
    if "node" in settings.targets:
        reason = targets.ensure_node_peer() if install else targets.node_available() or (
            None if (targets.NODE_PEER_DIR / "node_modules").is_dir()
            else "its npm packages are not installed (--no-install/--quick): npm install "
                 "--prefix bench/peers/node")
        if reason:
            print(f"Node socket.io peer skipped: {reason}", file=sys.stderr)
            results["skipped"]["node"] = reason
            settings.targets = [t for t in settings.targets if t != "node"]
    results["settings"]["targets"] = settings.targets
    bench = scenarios.Bench(settings, bar_factory())
    failures = 0
    started = time.monotonic()
    try:
        if "floor" in settings.scenarios:
            logger.info("floor: %d sockets, %g rounds/s", settings.floor_sockets,
                        settings.floor_rate)
            results["floor"] = run_floor(settings.floor_sockets, settings.floor_rate,
                                         settings.floor_duration,
                                         repeat=1 if settings.quick else 3)
            logger.info("floor: %s µs per send (1 frame), %s µs per frame (4 per send)",
                        floor_us(results["floor"], 1), floor_us(results["floor"], 4))
        floor = floor_us(results.get("floor"))
        for name in settings.scenarios:
            if name == "floor":
                continue
            by_target = results["scenarios"].setdefault(name, {})
            for run_index, target in scenarios.each_run(settings):
                if name in REALTIME_ONLY and target != "realtime":
                    continue
                record = by_target.setdefault(target, {"runs": []})
                workdir = logs / f"{name}-{target}-{run_index + 1}"
                try:
                    record["runs"].append(_run_scenario(
                        bench, name, target, workdir, floor))
                except Exception as exc:
                    failures += 1
                    logger.error("%s %s run %d failed: %s", name, target, run_index + 1, exc)
                    logger.debug("%s", traceback.format_exc())
                    record["runs"].append({"error": f"{type(exc).__name__}: {exc}"[:2000],
                                           "logs": str(workdir)})
            for record in by_target.values():
                record["summary"] = report.summarize(name, record["runs"])
            _write(results, settings.out, report)
    except KeyboardInterrupt:
        logger.error("interrupted: writing what was measured so far")
        failures += 1
    finally:
        bench.close()
    results["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
    md_path = _write(results, settings.out, report)
    plots = report.write_plots(results, settings.out)
    print(md_path.read_text())
    print(f"results: {settings.out / 'results.json'}, {md_path}"
          + "".join(f", {p.name}" for p in plots))
    return 1 if failures else 0


def render(out: Path) -> int:
    """Rebuild results.md and the plots of an earlier run from its results.json."""
    from bench import report

    results = json.loads((out / "results.json").read_text())
    for name, by_target in results.get("scenarios", {}).items():
        for record in by_target.values():
            record["summary"] = report.summarize(name, record["runs"])
    md_path = _write(results, out, report)
    plots = report.write_plots(results, out)
    print(md_path.read_text())
    print(f"results: {out / 'results.json'}, {md_path}" + "".join(f", {p.name}" for p in plots))
    return 0


def _run_scenario(bench: Any, name: str, target: str, workdir: Path,
                  floor: float | None) -> dict[str, Any]:
    from bench import scenarios, targets, webhooks

    settings = bench.settings
    logger.info("%s: %s", name, target)
    if name == "capacity":
        result = {}
        for part, nodes, connections in (
                ("one_node", 1, settings.capacity_one_node),
                ("cluster", settings.capacity_nodes, settings.capacity_cluster)):
            with targets.deployed(target, workdir / part, nodes) as deployment:
                result[part] = scenarios.idle(bench, deployment, connections,
                                              name=f"capacity {part}")
        return result
    if name == "browser":
        from bench import browser

        missing = browser.driver_missing()
        if missing:
            raise RuntimeError(f"the browser driver cannot run: {missing}")
        result = {}
        for way, parser in browser.VARIANTS:
            variant = browser.variant_name(way, parser)
            if variant not in settings.browser_variants:
                continue
            with targets.deployed(target, workdir / variant, 1) as deployment:
                result[variant] = browser.browser_variant(bench, deployment, way, parser,
                                                          workdir)
        return result
    nodes = {"idle": 1, "cluster": settings.cluster_nodes}.get(name, settings.nodes)
    # notify on realtime carries webhook load too (bench/webhooks.py)
    hooked = name == "notify" and target == "realtime" and webhooks.enabled()
    node_args = webhooks.node_args(workdir) if hooked else None
    with targets.deployed(target, workdir, nodes, nginx=name == "cluster",
                          node_args=node_args) as deployment:
        if name == "idle":
            result = scenarios.idle(bench, deployment, settings.idle_connections)
        elif name == "fanout":
            result = scenarios.fanout(bench, deployment, floor)
        elif name == "cluster":
            result = scenarios.fanout(bench, deployment, floor, via_nginx=True, name="cluster")
        elif name == "notify":
            result = scenarios.notify(bench, deployment, floor)
            if hooked:
                result["webhooks"] = webhooks.webhook_load(bench, deployment)
        elif name == "churn":
            result = scenarios.churn(bench, deployment)
        elif name == "soak":
            result = scenarios.soak(bench, deployment)
        else:
            raise ValueError(f"unknown scenario {name!r}")
        crashed = deployment.crashed()
        if crashed:
            raise RuntimeError(f"node process(es) {crashed} died during {name}; logs in "
                               f"{workdir}")
    return result


def _write(results: dict[str, Any], out: Path, report: Any) -> Path:
    results["targets"] = report.evaluate_targets(results)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    md_path = out / "results.md"
    md_path.write_text(report.render_markdown(results))
    return md_path


if __name__ == "__main__":
    sys.exit(main())
