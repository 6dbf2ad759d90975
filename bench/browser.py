"""The ``browser`` scenario: the official socket.io-client, as browsers run it, on one node.

Browsers connect with the official client's default options: long-polling first, then the
upgrade to a WebSocket. This scenario puts that start beside WebSocket-first clients, and the
official ``socket.io-msgpack-parser`` beside the default parser, in the same run: for each
variant, a fresh one-node deployment, ``browser_clients`` official clients in one Node process
(``bench/browser/driver.js``), ``browser_concurrency`` connecting at a time, all subscribed to
one channel; then the load generator's publisher publishes ~100-byte messages at
``browser_rate``/s for ``browser_duration`` s.

Per variant: the time to connect every client (a default-start client counts once upgraded),
node RSS per connection once they are all in (before they subscribe: every client logs in as
one user, so subscribing sends a few joins, not N²), server CPU per delivery, deliveries lost,
duplicated or reordered, and end-to-end latency (from the publisher's clock to the Node
client's, so including the client's event loop: informative only).
"""

from __future__ import annotations

import json
import logging
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from . import procstat
from .scenarios import PUBLISHER_USER, Bench, CpuSnapshot, close_group, node_rss_mb
from .targets import Deployment

logger = logging.getLogger(__name__)

DRIVER = Path(__file__).resolve().parent / "browser" / "driver.js"
STATIC_MODULES = Path(__file__).resolve().parents[1] / "static" / "node_modules"
CHANNEL = "bench.browser"
# (way, parser) in the order each run measures them
VARIANTS = (("websocket", "json"), ("default", "json"),
            ("websocket", "msgpack"), ("default", "msgpack"))
SETTLE_S = 1.0


def variant_name(way: str, parser: str) -> str:
    return f"{way}-{parser}"


def driver_missing() -> str | None:
    """Why the driver cannot run here (None when it can)."""
    if not shutil.which("node"):
        return "node is not installed"
    for package in ("socket.io-client", "socket.io-msgpack-parser"):
        if not (STATIC_MODULES / package).is_dir():
            return f"static/node_modules/{package} is missing: run scripts/setup test"
    return None


class Driver:
    """The Node process holding the official clients; JSON lines on its stdin and stdout."""

    def __init__(self, url: str, clients: int, concurrency: int, way: str, parser: str,
                 log_path: Path) -> None:
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            ["node", str(DRIVER), url, str(clients), str(concurrency), way, parser, CHANNEL],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
            bufsize=1)

    @property
    def pid(self) -> int:
        return self.process.pid

    def read(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"the browser driver said nothing within {timeout:g} s "
                               f"(exit status {self.process.poll()})")
        answer = json.loads(line)
        if answer.get("event") == "error":
            raise RuntimeError(f"the browser driver failed: {answer['error'][:2000]}")
        return answer

    def command(self, op: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.process.stdin.flush()
        return self.read(timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.command("close", timeout=30)
                self.process.wait(30)
            except (RuntimeError, OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(10)
        self._log.close()


def browser_variant(bench: Bench, deployment: Deployment, way: str, parser: str,
                    log_dir: Path) -> dict[str, Any]:
    """One variant on a fresh deployment: connect, hold, publish, count (see the module)."""
    settings = bench.settings
    loadgen = bench.with_loadgen(0)
    label = f"browser {variant_name(way, parser)}"
    clients = settings.browser_clients
    time.sleep(0.5)
    rss_before = procstat.total_rss(deployment.node_pids)
    driver = Driver(deployment.node_urls[0], clients, settings.browser_concurrency, way, parser,
                    log_dir / f"driver-{variant_name(way, parser)}.log")
    try:
        ready = driver.read(timeout=300)
        if ready["connected"] < clients:
            raise RuntimeError(f"{label}: {ready['connected']} of {clients} clients connected: "
                               f"{ready['errors']}")
        time.sleep(SETTLE_S)  # the long-polling requests of the upgrades are over
        rss_after = procstat.total_rss(deployment.node_pids)
        subscribed = driver.command("subscribe", timeout=300)
        if subscribed["subscribed"] < clients:
            raise RuntimeError(f"{label}: {subscribed['subscribed']} of {clients} clients "
                               f"subscribed: {subscribed['errors']}")
        loadgen.call(loadgen.publisher, "connect", group="publisher",
                     urls=[deployment.node_addresses[0]], start=0, count=1, user=PUBLISHER_USER,
                     timeout=60)
        pub_id = bench.next_pub_id()
        before = CpuSnapshot.take(deployment, loadgen)
        driver_cpu_before = procstat.total_cpu([driver.pid])
        publication = loadgen.call(loadgen.publisher, "publish_ws", group="publisher",
                                   channel=CHANNEL, rate=settings.browser_rate,
                                   duration=settings.browser_duration, pub_id=pub_id,
                                   size=settings.payload_size,
                                   timeout=settings.browser_duration * 3 + 60)
        expected = (publication["sent"] - publication["ack_errors"]) * clients
        last_count, last_change = -1, time.monotonic()
        at_last_change = CpuSnapshot.take(deployment, loadgen)
        deadline = time.monotonic() + 60
        while True:
            stats = driver.command("stats", pub=pub_id)
            now = time.monotonic()
            distinct = stats["deliveries"] - stats["duplicated"]
            if distinct != last_count:
                last_count, last_change = distinct, now
                at_last_change = CpuSnapshot.take(deployment, loadgen)
            if distinct >= expected or now - last_change > settings.drain_idle or now > deadline:
                break
            time.sleep(0.1)
        used = at_last_change.minus(before)
        driver_cpu = procstat.total_cpu([driver.pid]) - driver_cpu_before
        close_group(bench, "publisher", [loadgen.publisher])
    finally:
        driver.close()
    result = {
        "way": way,
        "parser": parser,
        "clients": clients,
        "connected": ready["connected"],
        "transports": ready["transports"],
        "connect_s": round(ready["connect_s"], 3),
        "connects_per_s": round(ready["connected"] / ready["connect_s"], 1),
        "subscribe_s": round(subscribed["subscribe_s"], 3),
        "rss_before_mb": round(rss_before / 2**20, 1),
        "rss_after_mb": round(rss_after / 2**20, 1),
        "kb_per_connection": round((rss_after - rss_before) / 1024 / ready["connected"], 2),
        "published": publication["sent"],
        "expected": expected,
        "delivered": distinct,
        "lost": max(0, expected - distinct),
        "duplicated": stats["duplicated"],
        "reordered": stats["reordered"],
        "server_cpu_s": round(used["nodes"], 3),
        "cpu_us_per_delivery": round(used["nodes"] / distinct * 1e6, 2) if distinct else None,
        "driver_cpu_us_per_delivery": round(driver_cpu / distinct * 1e6, 2)
        if distinct else None,
        "p50_ms": stats["p50_ms"],
        "p99_ms": stats["p99_ms"],
        "node_rss_end_mb": node_rss_mb(deployment),
    }
    logger.info("%s: %d clients in %.2f s, %.2f KB/connection, %s µs CPU/delivery, lost %d "
                "dup %d reordered %d", label, result["connected"], result["connect_s"],
                result["kb_per_connection"], result["cpu_us_per_delivery"], result["lost"],
                result["duplicated"], result["reordered"])
    return result
