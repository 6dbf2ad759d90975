"""The scenarios: what runs against a deployed target, and what each one measures.

Each scenario function takes the :class:`Bench` (settings, load generator, progress bars) and a
running :class:`~bench.targets.Deployment`, and returns a JSON-ready dict for one run. The
orchestration (which targets, how many runs, interleaving) is in ``bench/run.py``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import procstat
from .loadgen import LoadGen, split
from .stats import latency_summary, merge_sparse
from .targets import Deployment

logger = logging.getLogger(__name__)

FANOUT_CHANNEL = "bench.fanout"
# Every fanout subscriber connects as the same user: realtime announces a user's first
# subscription to a channel to all its subscribers (presence join), which with N distinct users
# would cost N² deliveries while subscribing. The peers have no presence; it changes nothing there.
FANOUT_USER = "bench-sub"
PUBLISHER_USER = "bench-pub"
SATURATION_ACHIEVED = 0.9  # saturated below this share of the offered deliveries/s...
SATURATION_P99_MS = 1000.0  # ...or above this p99
DRAIN_POLL = 0.25
# The overload step's slow consumers: a small receive buffer, and a channel of big messages.
STALLED_RCVBUF = 4096
BULK_CHANNEL = "bench.bulk"
BULK_SIZE = 32 * 1024
BULK_RATE = 40.0
# A saturated step that delivers less than this times the best so far ends the ladder.
PLATEAU = 1.1
# The fanout rates (publishes/s) the targets are stated at: always measured when listed.
TARGET_RATES = (30, 60)


@dataclasses.dataclass
class Settings:
    """Everything the command line decides (see ``bench/run.py --help``)."""

    scenarios: list[str]
    targets: list[str]
    out: Path
    quick: bool = False
    subscribers: int = 2000
    nodes: int = 2
    cluster_nodes: int = 2
    rates: list[float] = dataclasses.field(
        default_factory=lambda: [10, 30, 60, 120, 240, 480, 960])
    duration: float = 5.0
    runs: int = 1
    workers: int = 2
    nap_ms: float = 1.0
    payload_size: int = 100
    floor_sockets: int = 2000
    floor_rate: float = 60.0
    floor_duration: float = 3.0
    idle_connections: int = 8000
    idle_hold: float = 5.0
    capacity_one_node: int = 20000
    capacity_cluster: int = 60000
    capacity_nodes: int = 4
    notify_users: int = 10000
    notify_rate: float = 1000.0
    notify_connections: int = 64
    churn_concurrency: int = 50
    browser_clients: int = 1000
    browser_concurrency: int = 50
    browser_rate: float = 20.0
    browser_duration: float = 5.0
    browser_variants: list[str] = dataclasses.field(default_factory=lambda: [
        "websocket-json", "default-json", "websocket-msgpack", "default-msgpack"])
    stalled: int = 4
    overload: bool = True
    memory_bound_mb: float = 256.0
    drain_idle: float = 3.0
    soak_duration: float = 600.0
    soak_clients: int = 100
    soak_rate: float = 20.0
    soak_notify_rate: float = 100.0
    soak_hold: float = 2.0
    soak_warmup: float = 200.0
    soak_sample: float = 2.0
    soak_max_slope: float = 1.0


class Bench:
    """What the scenarios share: settings, a fresh publisher id per step, progress bars."""

    def __init__(self, settings: Settings, bar_factory: Callable[..., Any]) -> None:
        self.settings = settings
        self._bar_factory = bar_factory
        self._pub_ids = itertools.count(1)
        self.loadgen: LoadGen | None = None

    def next_pub_id(self) -> int:
        return next(self._pub_ids)

    def bar(self, total: float | None, desc: str, unit: str) -> Any:
        """A progress bar on stderr (a no-op object when tqdm is missing)."""
        return self._bar_factory(total=total, desc=desc, unit=unit, leave=False)

    def with_loadgen(self, connections: int) -> LoadGen:
        """The load generator, with enough workers for ``connections`` clients."""
        workers = max(self.settings.workers, math.ceil(connections / 15000))
        if self.loadgen is not None and len(self.loadgen.subscriber_workers) != workers:
            self.loadgen.close()
            self.loadgen = None
        if self.loadgen is None:
            self.loadgen = LoadGen(workers, nap_ms=self.settings.nap_ms)
        return self.loadgen

    def close(self) -> None:
        if self.loadgen is not None:
            self.loadgen.close()
            self.loadgen = None


# -- measuring processes ----------------------------------------------------------------------


@dataclasses.dataclass
class CpuSnapshot:
    """CPU seconds of the deployment's processes (and the load generator's) at one moment."""

    nodes: float
    redis: float
    nginx: float
    loadgen: float
    at: float

    @classmethod
    def take(cls, deployment: Deployment, loadgen: LoadGen) -> CpuSnapshot:
        return cls(procstat.total_cpu(deployment.node_pids),
                   procstat.total_cpu(deployment.redis_pids),
                   procstat.total_cpu(procstat.with_children(deployment.nginx_pids)),
                   procstat.total_cpu(loadgen.pids), time.monotonic())

    def minus(self, before: CpuSnapshot) -> dict[str, float]:
        return {"nodes": self.nodes - before.nodes, "redis": self.redis - before.redis,
                "nginx": self.nginx - before.nginx, "loadgen": self.loadgen - before.loadgen,
                "wall": self.at - before.at}


def node_rss_mb(deployment: Deployment) -> float:
    return round(procstat.total_rss(deployment.node_pids) / 2**20, 1)


# -- connecting ---------------------------------------------------------------------------------


def connect_clients(bench: Bench, group: str, urls: list[list[Any]], count: int, *,
                    user: str | None, channel: str | None, desc: str,
                    workers: list[int] | None = None, record: bool = True,
                    concurrency: int = 100, tick: Callable[[int], None] | None = None,
                    ) -> dict[str, Any]:
    """Connect ``count`` clients spread over the subscriber workers; totals and rate."""
    loadgen = bench.loadgen
    assert loadgen is not None
    workers = loadgen.subscriber_workers if workers is None else workers
    slices = split(count, len(workers))
    bar = bench.bar(count, desc, "conn")
    done = [0]

    def progress(n: int) -> None:
        done[0] += n
        bar.update(n)

    try:
        handles = [loadgen.submit(worker, "connect", group=group, urls=urls, start=start,
                                  count=n, user=user, channel=channel, record=record,
                                  concurrency=concurrency)
                   for worker, (start, n) in zip(workers, slices, strict=True)]
        results = loadgen.wait(handles, progress=progress,
                               tick=(lambda: tick(done[0])) if tick else None)
    finally:
        bar.close()
    errors: dict[str, int] = {}
    for result in results:
        for reason, n in result["errors"].items():
            errors[reason] = errors.get(reason, 0) + n
    connected = sum(r["connected"] for r in results)
    began = min(r["began"] for r in results)
    finished = max(r["handshakes_done"] for r in results)
    return {
        "connected": connected,
        "subscribed": sum(r["subscribed"] for r in results),
        "subscribe_refusals": sum(r.get("subscribe_refusals", 0) for r in results),
        "refused_clients": sorted(n for r in results for n in r.get("refused_clients", [])),
        "failed": sum(r["failed"] for r in results),
        "errors": dict(sorted(errors.items(), key=lambda item: -item[1])[:5]),
        "handshakes_per_s": round(connected / max(finished - began, 1e-6), 1),
        "elapsed_s": round(max(r["elapsed_s"] for r in results), 3),
    }


def close_group(bench: Bench, group: str, workers: list[int] | None = None) -> None:
    loadgen = bench.loadgen
    assert loadgen is not None
    workers = loadgen.subscriber_workers if workers is None else workers
    loadgen.call_each(workers, "close", lambda _: {"group": group}, timeout=120)


def group_status(bench: Bench, group: str, workers: list[int] | None = None) -> dict[str, Any]:
    loadgen = bench.loadgen
    assert loadgen is not None
    workers = loadgen.subscriber_workers if workers is None else workers
    results = loadgen.call_each(workers, "status", lambda _: {"group": group}, timeout=60)
    reasons: dict[str, int] = {}
    for result in results:
        for reason, n in result["close_reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    return {
        "clients": sum(r["clients"] for r in results),
        "closed": sum(r["closed"] for r in results),
        "close_reasons": reasons,
        "paused": sum(r["paused"] for r in results),
        "paused_closed_by_server": sum(r["paused_closed_by_server"] for r in results),
    }


# -- one measured step: publish at a rate, drain, count -----------------------------------------


def collect(bench: Bench, pub_id: int) -> dict[str, Any]:
    """The subscriber workers' counts for publisher ``pub_id``, summed."""
    loadgen = bench.loadgen
    assert loadgen is not None
    reports = loadgen.call_each(loadgen.subscriber_workers, "stats",
                                lambda _: {"publishers": [pub_id]}, timeout=60)
    parts = [r[pub_id] for r in reports if pub_id in r]
    deliveries = sum(p["deliveries"] for p in parts)
    duplicated = sum(p["duplicated"] for p in parts)
    return {
        "deliveries": deliveries,
        "distinct": deliveries - duplicated,
        "duplicated": duplicated,
        "reordered": sum(p["reordered"] for p in parts),
        "histogram": merge_sparse(p["histogram"] for p in parts),
        "max_us": max((p["max_us"] for p in parts), default=None),
        "first_ns": min((p["first_ns"] for p in parts if p["first_ns"]), default=0),
        "last_ns": max((p["last_ns"] for p in parts), default=0),
    }


def measured_step(bench: Bench, deployment: Deployment, *, label: str, publish_op: str,
                  publish_args: dict[str, Any], rate: float, duration: float,
                  receivers: int, fanout: int, floor: float | None,
                  watch_rss: bool = False, short_group: tuple[str, int] | None = None,
                  ) -> dict[str, Any]:
    """Publish at ``rate`` for ``duration`` s, wait for the deliveries, measure.

    ``fanout`` is how many deliveries each publication should make (the subscribers of the
    channel; 1 for per-user channels). ``rate`` 0 publishes as fast as the publisher goes.
    """
    settings = bench.settings
    loadgen = bench.loadgen
    assert loadgen is not None
    pub_id = bench.next_pub_id()
    rss_peak = [node_rss_mb(deployment)]

    def sample_rss() -> None:
        if watch_rss:
            rss_peak[0] = max(rss_peak[0], node_rss_mb(deployment))

    before = CpuSnapshot.take(deployment, loadgen)
    bar = bench.bar(int(rate * duration) if rate else None, label, "pub")
    try:
        handle = loadgen.submit(loadgen.publisher, publish_op, rate=rate, duration=duration,
                                pub_id=pub_id, size=settings.payload_size, **publish_args)
        publication = loadgen.wait([handle], progress=bar.update, tick=sample_rss,
                                   timeout=duration * 3 + 120)[0]
        bar.set_postfix_str("draining")
        expected = (publication["sent"] - publication["ack_errors"]) * fanout
        # Wait until every expected delivery arrived, or until nothing more arrives.
        last_count, last_change = -1, time.monotonic()
        cpu_at_last_change = CpuSnapshot.take(deployment, loadgen)
        deadline = time.monotonic() + max(60.0, 6 * duration)
        while True:
            counts = collect(bench, pub_id)
            sample_rss()
            now = time.monotonic()
            if counts["distinct"] != last_count:
                last_count, last_change = counts["distinct"], now
                cpu_at_last_change = CpuSnapshot.take(deployment, loadgen)
            if counts["distinct"] >= expected or now - last_change > settings.drain_idle \
                    or now > deadline:
                break
            time.sleep(DRAIN_POLL)
    finally:
        bar.close()
    used = cpu_at_last_change.minus(before)
    delivered = counts["distinct"]
    span = (counts["last_ns"] / 1e9 - publication["started_wall"]) if counts["last_ns"] else 0.0
    achieved = delivered / span if span > 0 else 0.0
    offered = rate * receivers if rate else None
    latency = latency_summary(counts["histogram"], counts["max_us"])
    per_delivery = used["nodes"] / delivered * 1e6 if delivered else None
    step: dict[str, Any] = {
        "rate": rate,
        "offered_dps": offered,
        "achieved_dps": round(achieved, 1),
        "published": publication["sent"],
        "publishes_per_s": round(publication["sent"] / max(
            publication["ended"] - publication["started"], 1e-6), 1),
        "publish_errors": publication["ack_errors"],
        "publish_unacked": publication["unacked"],
        "publish_error_samples": publication["error_samples"],
        "publisher_lag_ms": publication["worst_lateness_ms"],
        "expected": expected,
        "delivered": delivered,
        "lost": max(0, expected - delivered),
        "duplicated": counts["duplicated"],
        "reordered": counts["reordered"],
        **latency,
        "server_cpu_s": round(used["nodes"], 3),
        "cpu_us_per_delivery": round(per_delivery, 2) if per_delivery else None,
        "vs_floor": round(per_delivery / floor, 2) if per_delivery and floor else None,
        "redis_cpu_s": round(used["redis"], 3),
        "nginx_cpu_s": round(used["nginx"], 3),
        "loadgen_cpu_us_per_delivery": round(used["loadgen"] / delivered * 1e6, 2)
        if delivered else None,
        "node_rss_mb": node_rss_mb(deployment),
        "node_rss_peak_mb": rss_peak[0],
        "crashed_nodes": len(deployment.crashed()),
    }
    if "request_p99_ms" in publication:
        step["request_p50_ms"] = publication["request_p50_ms"]
        step["request_p99_ms"] = publication["request_p99_ms"]
    if short_group is not None and step["lost"]:
        # Per-user channels: name the users a publication never reached (for a bug report).
        users, sent = short_group[1], publication["sent"]
        step["lost_clients"] = sorted(n for found in loadgen.call_each(
            loadgen.subscriber_workers, "short",
            lambda _: {"group": short_group[0], "publisher": pub_id, "sent": sent,
                       "users": users})
            for n in found)[:100]
    step["saturated"] = bool(
        (offered is not None and achieved < SATURATION_ACHIEVED * offered)
        or (step["p99_ms"] is not None and step["p99_ms"] > SATURATION_P99_MS)
        or step["crashed_nodes"])
    loadgen.call_each(loadgen.subscriber_workers, "forget", lambda _: {"publishers": [pub_id]})
    logger.info("%s: %s/s -> %.0f deliveries/s (offered %s), p50 %s ms, p99 %s ms, "
                "%s µs CPU/delivery (%sx floor), lost %d dup %d reordered %d",
                label, rate or "max", achieved, offered, step["p50_ms"], step["p99_ms"],
                step["cpu_us_per_delivery"], step["vs_floor"], step["lost"],
                step["duplicated"], step["reordered"])
    return step


# -- scenarios ----------------------------------------------------------------------------------


def fanout(bench: Bench, deployment: Deployment, floor: float | None, *,
           via_nginx: bool = False, name: str = "fanout") -> dict[str, Any]:
    """One channel, N subscribers spread over the nodes, a rate ladder up to saturation.

    Then, unless disabled, an overload step at twice the saturating rate with a few clients
    that stop reading.
    """
    settings = bench.settings
    loadgen = bench.with_loadgen(settings.subscribers)
    urls = [deployment.nginx_address] if via_nginx else deployment.node_addresses
    label = f"{name} {deployment.target}"
    result: dict[str, Any] = {"subscribers": settings.subscribers, "nodes": len(urls)
                              if not via_nginx else len(deployment.node_urls),
                              "via_nginx": via_nginx}
    result["connect"] = connect_clients(
        bench, "fanout", urls, settings.subscribers, user=FANOUT_USER, channel=FANOUT_CHANNEL,
        desc=f"{label}: subscribing")
    if result["connect"]["subscribed"] < settings.subscribers:
        raise RuntimeError(f"{label}: only {result['connect']['subscribed']} of "
                           f"{settings.subscribers} subscribers subscribed: "
                           f"{result['connect']['errors']}")
    loadgen.call(loadgen.publisher, "connect", group="publisher", urls=[urls[0]], start=0,
                 count=1, user=PUBLISHER_USER, timeout=60)
    receivers = result["connect"]["subscribed"]
    try:
        if not settings.quick:
            # CPU the deployment spends with the subscribers connected and nothing published.
            before = CpuSnapshot.take(deployment, loadgen)
            time.sleep(1.0)
            idle = CpuSnapshot.take(deployment, loadgen).minus(before)
            result["idle_cpu_percent"] = round(idle["nodes"] / idle["wall"] * 100, 2)
        steps: list[dict[str, Any]] = []
        best = 0.0
        must_reach = max((r for r in TARGET_RATES if r in settings.rates), default=0)
        for rate in settings.rates:
            step = measured_step(
                bench, deployment, label=f"{label} {rate:g}/s", publish_op="publish_ws",
                publish_args={"group": "publisher", "channel": FANOUT_CHANNEL}, rate=rate,
                duration=settings.duration, receivers=receivers, fanout=receivers, floor=floor)
            steps.append(step)
            plateau = step["achieved_dps"] <= best * PLATEAU
            best = max(best, step["achieved_dps"])
            saturated = sum(1 for s in steps if s["saturated"])
            # Past saturation the ladder goes on while throughput still grows (a server may
            # fall behind the offered rate yet deliver more), for at most two saturated steps,
            # and never stops before the rates the targets name.
            if step["saturated"] and rate >= must_reach and (plateau or saturated >= 2):
                break
        result["steps"] = steps
        result["saturation_dps"] = max(s["achieved_dps"] for s in steps)
        result["saturated_at_rate"] = next((s["rate"] for s in steps if s["saturated"]), None)
        status = group_status(bench, "fanout")
        result["subscribers_disconnected"] = status["closed"]
        if settings.overload and not settings.quick and not via_nginx and steps[-1]["saturated"]:
            result["overload"] = overload(bench, deployment, floor, urls, receivers,
                                         result["saturation_dps"], label)
    finally:
        close_group(bench, "fanout")
        close_group(bench, "publisher", [loadgen.publisher])
        close_group(bench, "stalled", [loadgen.publisher])
        close_group(bench, "bulk", [loadgen.publisher])
    return result


def overload(bench: Bench, deployment: Deployment, floor: float | None,
             urls: list[list[Any]], receivers: int, saturation_dps: float,
             label: str) -> dict[str, Any]:
    """Twice the saturating publish rate, with ``stalled`` subscribers that stop reading.

    The stalled clients (small receive buffers) are also subscribed to a bulk channel that
    carries :data:`BULK_SIZE`-byte messages at :data:`BULK_RATE`/s during the step: megabytes
    per client, well past any sane outbound buffer, so that a server that bounds it has to
    disconnect them. The readers must get everything, in order.
    """
    settings = bench.settings
    loadgen = bench.loadgen
    assert loadgen is not None
    rate = round(2 * saturation_dps / receivers, 1)
    stalled = settings.stalled
    bulk = None
    if stalled:
        loadgen.call(loadgen.publisher, "connect", group="stalled", urls=urls, start=0,
                     count=stalled, user=FANOUT_USER, channel=FANOUT_CHANNEL, record=False,
                     rcvbuf=STALLED_RCVBUF, timeout=60)
        loadgen.call(loadgen.publisher, "subscribe", group="stalled", channel=BULK_CHANNEL)
        loadgen.call(loadgen.publisher, "pause", group="stalled", count=stalled)
        loadgen.call(loadgen.publisher, "connect", group="bulk", urls=[urls[0]], start=0,
                     count=1, user=PUBLISHER_USER, timeout=60)
        bulk = loadgen.submit(loadgen.publisher, "publish_ws", group="bulk",
                              channel=BULK_CHANNEL, rate=BULK_RATE, duration=settings.duration,
                              pub_id=bench.next_pub_id(), size=BULK_SIZE)
    rss_before = node_rss_mb(deployment)
    step = measured_step(
        bench, deployment, label=f"{label} overload {rate:g}/s", publish_op="publish_ws",
        publish_args={"group": "publisher", "channel": FANOUT_CHANNEL}, rate=rate,
        duration=settings.duration, receivers=receivers, fanout=receivers, floor=floor,
        watch_rss=True)
    bulk_result = loadgen.wait([bulk], timeout=120)[0] if bulk else {}
    # A server that closed a stalled connection queued its FIN behind the data the client never
    # read: the client sees it once it reads again.
    reasons = loadgen.call(loadgen.publisher, "resume", group="stalled") if stalled else {}
    cut = sum(n for reason, n in reasons.items() if reason != "still open")
    readers = group_status(bench, "fanout")
    crashed = deployment.crashed()
    growth = step["node_rss_peak_mb"] - rss_before
    result = {
        "rate": rate,
        "step": step,
        "stalled_clients": stalled,
        "bulk_bytes_per_stalled_client": bulk_result.get("sent", 0) * BULK_SIZE,
        "stalled_disconnected": cut,
        "stalled_close_reasons": reasons,
        "readers_disconnected": readers["closed"],
        "rss_before_mb": rss_before,
        "rss_peak_mb": step["node_rss_peak_mb"],
        "rss_growth_mb": round(growth, 1),
        "crashed_nodes": len(crashed),
    }
    result["checks"] = {
        "no_crash": not crashed,
        "no_loss": step["lost"] == 0,
        "in_order": step["reordered"] == 0 and step["duplicated"] == 0,
        "readers_kept": readers["closed"] == 0,
        "slow_clients_disconnected": cut == stalled,
        "memory_bounded": growth <= settings.memory_bound_mb,
    }
    result["pass"] = all(result["checks"].values())
    logger.info("%s overload at %s/s: %s; slow clients: %s", label, rate, result["checks"],
                reasons)
    return result


def idle(bench: Bench, deployment: Deployment, connections: int, *,
         name: str = "idle") -> dict[str, Any]:
    """Connect ``connections`` clients (Socket.IO connected, no subscription), hold, measure.

    Memory per connection from the nodes' RSS before and after; handshakes/s from the first
    connect to the last Socket.IO CONNECT ack; the hold shows the idle CPU (pings) and whether
    every connection stays up.
    """
    settings = bench.settings
    bench.with_loadgen(connections)
    urls = deployment.node_addresses
    label = f"{name} {deployment.target}"
    time.sleep(0.5)
    rss_before = procstat.total_rss(deployment.node_pids)
    curve: list[tuple[int, float]] = [(0, round(rss_before / 2**20, 1))]
    next_sample = [max(1, connections // 20)]

    def sample(done: int) -> None:
        if done >= next_sample[0]:
            curve.append((done, node_rss_mb(deployment)))
            next_sample[0] = done + max(1, connections // 20)

    connect = connect_clients(bench, name, urls, connections, user="idle-{i}", channel=None,
                              desc=f"{label}: connecting", tick=sample)
    time.sleep(1.0 if not settings.quick else 0.3)
    rss_after = procstat.total_rss(deployment.node_pids)
    curve.append((connect["connected"], round(rss_after / 2**20, 1)))
    loadgen = bench.loadgen
    assert loadgen is not None
    before = CpuSnapshot.take(deployment, loadgen)
    hold = settings.idle_hold if not settings.quick else 0.5
    bar = bench.bar(hold, f"{label}: holding {connect['connected']} connections", "s")
    end = time.monotonic() + hold
    while time.monotonic() < end:
        time.sleep(min(0.5, max(0.0, end - time.monotonic())))
        bar.update(0.5)
    bar.close()
    held = CpuSnapshot.take(deployment, loadgen).minus(before)
    status = group_status(bench, name)
    close_group(bench, name)
    nodes = len(deployment.node_pids)
    result = {
        "connections": connections,
        "nodes": nodes,
        **connect,
        "handshakes_per_s_per_node": round(connect["handshakes_per_s"] / nodes, 1),
        "rss_before_mb": round(rss_before / 2**20, 1),
        "rss_after_mb": round(rss_after / 2**20, 1),
        "kb_per_connection": round((rss_after - rss_before) / 1024 / connect["connected"], 2)
        if connect["connected"] else None,
        "idle_cpu_percent": round(held["nodes"] / held["wall"] * 100, 2),
        "dropped_while_idle": status["closed"],
        "memory_curve": curve,
        "crashed_nodes": len(deployment.crashed()),
    }
    logger.info("%s: %d/%d connected, %.0f handshakes/s, %s KB/connection, %d dropped",
                label, connect["connected"], connections, connect["handshakes_per_s"],
                result["kb_per_connection"], status["closed"])
    return result


NOTIFY_BATCH = 100


def notify(bench: Bench, deployment: Deployment, floor: float | None) -> dict[str, Any]:
    """Per-user channels: ``notify_users`` clients, each subscribed to ``user:<id>`` as ``<id>``.

    For each way to publish (the HTTP API on every target; the emitter and ``POST /api/batch``
    in batches of :data:`NOTIFY_BATCH` on realtime): a fixed rate for latency, then as fast as
    the publisher goes for publishes/s.
    """
    settings = bench.settings
    users = settings.notify_users
    bench.with_loadgen(users)
    urls = deployment.node_addresses
    label = f"notify {deployment.target}"
    result: dict[str, Any] = {"users": users, "nodes": len(urls)}
    result["connect"] = connect_clients(bench, "notify", urls, users, user="u{i}",
                                        channel="user:u{i}", desc=f"{label}: subscribing")
    if result["connect"]["subscribed"] < users:
        raise RuntimeError(f"{label}: only {result['connect']['subscribed']} of {users} "
                           f"users subscribed: {result['connect']['errors']}")
    methods = {"api": ("publish_http", {"urls": urls, "channel": "user:u{i}", "users": users,
                                        "connections": settings.notify_connections})}
    loadgen = bench.loadgen
    assert loadgen is not None
    before = CpuSnapshot.take(deployment, loadgen)
    time.sleep(1.0 if not settings.quick else 0.2)
    idle_cpu = CpuSnapshot.take(deployment, loadgen).minus(before)
    # With this many connections and subscriptions, a node's background work (heartbeats,
    # presence refreshes) is part of every step's CPU.
    result["idle_cpu_percent"] = round(idle_cpu["nodes"] / idle_cpu["wall"] * 100, 2)
    if deployment.target == "realtime":
        methods["emitter"] = ("publish_emitter", {"redis_url": deployment.redis_url,
                                                  "channel": "user:u{i}", "users": users})
        # POST /api/batch, NOTIFY_BATCH publish commands a request (the peers have no batch
        # route: Socket.IO servers leave that to the app)
        methods["batch"] = ("publish_http", {"urls": urls, "channel": "user:u{i}",
                                             "users": users, "path": "/api/batch",
                                             "batch": NOTIFY_BATCH,
                                             "connections": settings.notify_connections})
    try:
        for method, (op, args) in methods.items():
            fixed = measured_step(
                bench, deployment, label=f"{label} {method} {settings.notify_rate:g}/s",
                publish_op=op, publish_args=args, rate=settings.notify_rate,
                duration=settings.duration, receivers=1, fanout=1, floor=floor,
                short_group=("notify", users))
            flat_out = measured_step(
                bench, deployment, label=f"{label} {method} max", publish_op=op,
                publish_args=args, rate=0, duration=settings.duration, receivers=1, fanout=1,
                floor=floor, short_group=("notify", users))
            flat_out["publishes_per_s_per_node"] = round(
                flat_out["publishes_per_s"] / len(urls), 1)
            result[method] = {"fixed_rate": fixed, "max": flat_out}
        result["subscribers_disconnected"] = group_status(bench, "notify")["closed"]
    finally:
        close_group(bench, "notify")
    return result


def churn(bench: Bench, deployment: Deployment) -> dict[str, Any]:
    """Connect, subscribe to one's own ``user:<id>``, disconnect, as fast as it goes."""
    settings = bench.settings
    loadgen = bench.with_loadgen(0)
    urls = deployment.node_addresses
    label = f"churn {deployment.target}"
    rss_before = node_rss_mb(deployment)
    before = CpuSnapshot.take(deployment, loadgen)
    concurrency = settings.churn_concurrency if not settings.quick else 5
    bar = bench.bar(None, f"{label}: connect/subscribe/disconnect", "cycle")
    try:
        handles = [loadgen.submit(worker, "churn", urls=urls, duration=settings.duration,
                                  concurrency=concurrency, user="churn-{i}",
                                  channel="user:churn-{i}")
                   for worker in loadgen.subscriber_workers]
        results = loadgen.wait(handles, timeout=settings.duration * 3 + 120)
    finally:
        bar.close()
    used = CpuSnapshot.take(deployment, loadgen).minus(before)
    time.sleep(1.0 if not settings.quick else 0.2)
    cycles = sum(r["cycles"] for r in results)
    errors: dict[str, int] = {}
    for r in results:
        for reason, n in r["error_samples"].items():
            errors[reason] = errors.get(reason, 0) + n
    elapsed = max(r["elapsed_s"] for r in results)
    result = {
        "concurrency": concurrency * len(results),
        "cycles": cycles,
        "cycles_per_s": round(cycles / elapsed, 1) if elapsed else None,
        "errors": sum(errors.values()),
        "error_samples": dict(sorted(errors.items(), key=lambda item: -item[1])[:5]),
        "cycle_p50_ms": max((r["cycle_p50_ms"] or 0) for r in results),
        "cycle_p99_ms": max((r["cycle_p99_ms"] or 0) for r in results),
        "server_cpu_s": round(used["nodes"], 3),
        "cpu_ms_per_cycle": round(used["nodes"] / cycles * 1000, 3) if cycles else None,
        "redis_cpu_s": round(used["redis"], 3),
        "rss_before_mb": rss_before,
        "rss_after_mb": node_rss_mb(deployment),
        "crashed_nodes": len(deployment.crashed()),
    }
    logger.info("%s: %s cycles/s, %d errors, %s ms CPU/cycle", label, result["cycles_per_s"],
                result["errors"], result["cpu_ms_per_cycle"])
    return result


# -- soak -----------------------------------------------------------------------------------------

SOAK_CHANNEL = "bench.soak"
SOAK_USER = "soak-{i}"
SOAK_USER_CHANNEL = "user:soak-{i}"
SOAK_PUBLISHER_GROUP = "soak-publisher"
SOAK_PRIMING_GROUP = "soak-priming"
# Every this-many-th cycle ends with a TCP reset instead of a clean close: a node must clean up
# after clients that vanish as well as after those that say goodbye.
SOAK_ABORT_EVERY = 4
# How long a leaving client waits for the publications it is owed before counting them lost.
SOAK_LEAVE_TIMEOUT = 10.0
SOAK_NOTIFY_CONNECTIONS = 4
# How long the nodes get to close the last clients' descriptors once the churn stops.
SOAK_SETTLE = 15.0


def open_descriptors(pid: int) -> int | None:
    """How many file descriptors process ``pid`` holds (/proc/<pid>/fd); None once it is gone."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def least_squares(xs: list[float], ys: list[float]) -> tuple[float, float, float] | None:
    """(slope, intercept, RMS residual) of the least-squares line through the points."""
    n = len(xs)
    if n < 2:
        return None
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if not sxx:
        return None
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = mean_y - slope * mean_x
    rms = math.sqrt(sum((y - intercept - slope * x) ** 2
                        for x, y in zip(xs, ys, strict=True)) / n)
    return slope, intercept, rms


def soak(bench: Bench, deployment: Deployment) -> dict[str, Any]:
    """Connect/subscribe/receive/disconnect churn for ``soak_duration`` s; memory and fds.

    ``soak_clients`` loops over the load generator's workers, each a client at a time that
    connects as ``soak-<n>``, subscribes to the shared :data:`SOAK_CHANNEL` and to its own
    ``user:soak-<n>``, stays a random 0..``soak_hold`` s, makes sure it got everything it is
    owed and leaves (every :data:`SOAK_ABORT_EVERY`-th cycle with a TCP reset). Meanwhile one
    connection publishes on the shared channel at ``soak_rate``/s, and notifications go to the
    ``user:soak-<n>`` channels through the HTTP API at ``soak_notify_rate``/s (round robin
    over the users, connected or not). Every node's RSS and descriptor count are sampled every
    ``soak_sample`` s; the RSS slope is a least-squares fit over the samples after
    ``soak_warmup`` s. Memory is flat when every node's slope is under ``soak_max_slope``
    MB/min; descriptors are back when every node holds no more than before the soak once the
    clients are gone.
    """
    settings = bench.settings
    loadgen = bench.with_loadgen(0)
    urls = deployment.node_addresses
    pids = deployment.node_pids
    label = f"soak {deployment.target}"
    duration = settings.soak_duration
    warmup = min(settings.soak_warmup, duration / 3)
    clients = settings.soak_clients
    workers = loadgen.subscriber_workers
    slices = [(worker, start, count) for worker, (start, count)
              in zip(workers, split(clients, len(workers)), strict=True) if count]
    samples: list[dict[str, Any]] = []
    cycles_done = [0]
    began = time.monotonic()  # reset at the start sample: t counts from there

    def sample(phase: str) -> dict[str, Any]:
        taken = {"t": round(time.monotonic() - began, 2), "phase": phase,
                 "cycles": cycles_done[0],
                 "rss_mb": [round(procstat.rss_bytes(pid) / 2**20, 2) for pid in pids],
                 "fds": [open_descriptors(pid) for pid in pids],
                 "redis_rss_mb": round(procstat.total_rss(deployment.redis_pids) / 2**20, 2)}
        samples.append(taken)
        return taken

    # A node opens some connections on first use (its presence connection to Redis): one
    # client per node subscribes and leaves first, so that the baseline holds them.
    loadgen.call(loadgen.publisher, "connect", group=SOAK_PRIMING_GROUP, urls=urls, start=0,
                 count=len(urls), user=PUBLISHER_USER, channel=SOAK_CHANNEL, record=False,
                 timeout=60)
    close_group(bench, SOAK_PRIMING_GROUP, [loadgen.publisher])
    time.sleep(0.5)
    # Before the soak's clients and publisher connect: the descriptors to come back to.
    began = time.monotonic()
    start = sample("start")
    loadgen.call(loadgen.publisher, "connect", group=SOAK_PUBLISHER_GROUP, urls=[urls[0]],
                 start=0, count=1, user=PUBLISHER_USER, timeout=60)
    cpu_before = CpuSnapshot.take(deployment, loadgen)
    next_sample = [time.monotonic() + settings.soak_sample]

    def tick() -> None:
        now = time.monotonic()
        if now >= next_sample[0]:
            sample("load")
            next_sample[0] = max(next_sample[0] + settings.soak_sample, now)

    bar = bench.bar(None, f"{label}: {clients} clients churning for {duration:g} s", "cycle")

    def progress(n: int) -> None:
        cycles_done[0] += n
        bar.update(n)

    try:
        loops = [loadgen.submit(worker, "soak", urls=urls, duration=duration, start=first,
                                concurrency=count, user=SOAK_USER,
                                channels={"shared": SOAK_CHANNEL, "user": SOAK_USER_CHANNEL},
                                hold_max=settings.soak_hold, abort_every=SOAK_ABORT_EVERY,
                                leave_timeout=SOAK_LEAVE_TIMEOUT)
                 for worker, first, count in slices]
        publishers = [
            loadgen.submit(loadgen.publisher, "publish_ws", group=SOAK_PUBLISHER_GROUP,
                           channel=SOAK_CHANNEL, rate=settings.soak_rate, duration=duration,
                           pub_id=bench.next_pub_id(), size=settings.payload_size),
            loadgen.submit(loadgen.publisher, "publish_http", urls=urls,
                           channel=SOAK_USER_CHANNEL, users=clients,
                           rate=settings.soak_notify_rate, duration=duration,
                           pub_id=bench.next_pub_id(), size=settings.payload_size,
                           connections=SOAK_NOTIFY_CONNECTIONS)]
        results = loadgen.wait(loops, progress=progress, tick=tick,
                               timeout=duration + settings.soak_hold + SOAK_LEAVE_TIMEOUT + 120)
        shared, notified = loadgen.wait(publishers, tick=tick, timeout=120)
        end = sample("end")
    finally:
        bar.close()
        close_group(bench, SOAK_PUBLISHER_GROUP, [loadgen.publisher])
    cpu = CpuSnapshot.take(deployment, loadgen).minus(cpu_before)
    # The clients are gone: wait until every node has closed their descriptors (or give up).
    settle_deadline = time.monotonic() + SOAK_SETTLE
    while True:
        after = sample("after")
        back = all(now is not None and was is not None and now <= was
                   for now, was in zip(after["fds"], start["fds"], strict=True))
        if back or time.monotonic() > settle_deadline:
            break
        time.sleep(0.2)
    settle_s = round(after["t"] - end["t"], 2)
    # Only the last "after" sample is kept: the others are the settling loop's polls.
    samples[:] = [s for s in samples if s["phase"] != "after"] + [after]

    load = [s for s in samples if s["phase"] in ("start", "load", "end")]
    warm = next((s for s in load if s["t"] >= warmup), load[-1])
    fitted = [s for s in load if warmup <= s["t"] <= duration]
    per_node = []
    for index in range(len(pids)):
        fit = least_squares([s["t"] / 60 for s in fitted], [s["rss_mb"][index] for s in fitted])
        per_node.append({
            "node": index + 1,
            "rss_start_mb": start["rss_mb"][index], "rss_warm_mb": warm["rss_mb"][index],
            "rss_end_mb": end["rss_mb"][index], "rss_after_mb": after["rss_mb"][index],
            "rss_peak_mb": max(s["rss_mb"][index] for s in samples),
            "rss_slope_mb_per_min": round(fit[0], 3) if fit else None,
            "fit_intercept_mb": round(fit[1], 3) if fit else None,
            "fit_rms_mb": round(fit[2], 3) if fit else None,
            "fds_start": start["fds"][index], "fds_peak": max(
                (s["fds"][index] or 0) for s in samples),
            "fds_end": after["fds"][index]})
    total_fit = least_squares([s["t"] / 60 for s in fitted],
                              [sum(s["rss_mb"]) for s in fitted])
    slopes = [n["rss_slope_mb_per_min"] for n in per_node]
    cycles = sum(r["cycles"] for r in results)
    fit_minutes = (fitted[-1]["t"] - fitted[0]["t"]) / 60 if len(fitted) > 1 else 0.0
    fit_cycles = fitted[-1]["cycles"] - fitted[0]["cycles"] if len(fitted) > 1 else 0
    errors: dict[str, int] = {}
    for r in results:
        for reason, n in r["error_samples"].items():
            errors[reason] = errors.get(reason, 0) + n
    streams = {kind: _sum_streams([r["streams"][kind] for r in results])
               for kind in ("shared", "user")}
    elapsed = max(r["elapsed_s"] for r in results)
    crashed = deployment.crashed()
    result: dict[str, Any] = {
        "duration_s": duration, "warmup_s": warmup, "clients": clients, "nodes": len(pids),
        "publish_rate": settings.soak_rate, "notify_rate": settings.soak_notify_rate,
        "hold_max_s": settings.soak_hold, "abort_every": SOAK_ABORT_EVERY,
        "cycles": cycles,
        "cycles_per_s": round(cycles / elapsed, 1) if elapsed else None,
        "aborted_cycles": sum(r["aborted"] for r in results),
        "errors": sum(errors.values()),
        "error_samples": dict(sorted(errors.items(), key=lambda item: -item[1])[:5]),
        "setup_p50_ms": max((r["setup_p50_ms"] or 0) for r in results),
        "setup_p99_ms": max((r["setup_p99_ms"] or 0) for r in results),
        "published": shared["sent"], "publish_errors": shared["ack_errors"],
        "publish_unacked": shared["unacked"],
        "notifications": notified["sent"], "notify_errors": notified["ack_errors"],
        "notify_unacked": notified["unacked"],
        "publish_error_samples": {**shared["error_samples"], **notified["error_samples"]},
        **{f"{kind}_{key}": stream[key] for kind, stream in streams.items()
           for key in ("expected", "received", "lost", "deliveries")},
        "lost": sum(s["lost"] for s in streams.values()),
        "duplicated": sum(s["duplicated"] for s in streams.values()),
        "reordered": sum(s["reordered"] for s in streams.values()),
        "before_window": sum(s["before_window"] for s in streams.values()),
        "epoch_changes": sum(s["epoch_changes"] for s in streams.values()),
        "resets": sum(r["resets"] for r in results),
        "other_events": sum(r["other_events"] for r in results),
        "lost_samples": [s for r in results for s in r["lost_samples"]][:20],
        "shared_p50_ms": streams["shared"]["p50_ms"], "shared_p99_ms": streams["shared"]["p99_ms"],
        "shared_max_ms": streams["shared"]["max_ms"],
        "user_p50_ms": streams["user"]["p50_ms"], "user_p99_ms": streams["user"]["p99_ms"],
        "rss_start_mb": round(sum(start["rss_mb"]), 1),
        "rss_warm_mb": round(sum(warm["rss_mb"]), 1),
        "rss_end_mb": round(sum(end["rss_mb"]), 1),
        "rss_after_mb": round(sum(after["rss_mb"]), 1),
        "rss_growth_after_warmup_mb": round(sum(end["rss_mb"]) - sum(warm["rss_mb"]), 1),
        "rss_slope_mb_per_min": round(total_fit[0], 3) if total_fit else None,
        "rss_slope_max_node_mb_per_min": max((s for s in slopes if s is not None),
                                             default=None),
        # What the total slope would be per cycle if it all came from the churn.
        "bytes_per_cycle": round(total_fit[0] * 2**20 * fit_minutes / fit_cycles)
        if total_fit and fit_cycles else None,
        "fit_samples": len(fitted),
        "max_slope_mb_per_min": settings.soak_max_slope,
        "fds_start": sum(start["fds"]), "fds_peak": sum(n["fds_peak"] for n in per_node),
        "fds_end": sum(after["fds"]) if None not in after["fds"] else None,
        "fds_settle_s": settle_s,
        "redis_rss_start_mb": start["redis_rss_mb"], "redis_rss_end_mb": end["redis_rss_mb"],
        "server_cpu_s": round(cpu["nodes"], 2),
        "cpu_ms_per_cycle": round(cpu["nodes"] / cycles * 1000, 3) if cycles else None,
        "redis_cpu_s": round(cpu["redis"], 2),
        "crashed_nodes": len(crashed),
        "per_node": per_node,
        "samples": samples,
    }
    result["checks"] = {
        "memory_flat": bool(slopes) and all(s is not None and s < settings.soak_max_slope
                                            for s in slopes),
        "descriptors_back": back,
        "no_loss": result["lost"] == 0 and result["duplicated"] == 0
        and result["reordered"] == 0,
        "no_errors": result["errors"] == 0 and result["publish_errors"] == 0
        and result["notify_errors"] == 0,
        "no_crash": not crashed,
    }
    result["pass"] = all(result["checks"].values())
    logger.info("%s: %d cycles (%s/s), %d errors, lost %d, RSS %s → %s → %s MB (slope %s MB/min"
                " after %gs), fds %s → %s: %s", label, cycles, result["cycles_per_s"],
                result["errors"], result["lost"], result["rss_start_mb"],
                result["rss_warm_mb"], result["rss_end_mb"], result["rss_slope_mb_per_min"],
                warmup, result["fds_start"], result["fds_end"], result["checks"])
    return result


def _sum_streams(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The workers' soak tallies of one kind of channel, added up, with latency percentiles."""
    total: dict[str, Any] = {key: sum(p[key] for p in parts) for key in (
        "windows", "expected", "received", "lost", "duplicated", "reordered", "before_window",
        "deliveries", "epoch_changes")}
    total.update(latency_summary(merge_sparse(p["histogram"] for p in parts),
                                 max((p["max_us"] for p in parts), default=None)))
    return total


def each_run(settings: Settings) -> Iterator[tuple[int, str]]:
    """(run, target) in the interleaved order A B A B."""
    for run in range(settings.runs):
        for target in settings.targets:
            yield run, target
