"""Profile one node's HTTP API under keep-alive load with py-spy (issue 12's "measure first").

    .venv/bin/python bench/profile_http.py --out /tmp/publish.svg [--path /api/publish]
        [--connections 16] [--duration 10] [--batch 0] [--subscribers 0]

Starts a throw-away redis-server and one node on it (``--broker redis://...``), POSTs ~100-byte
publications to ``--path`` from ``--connections`` keep-alive connections as fast as they go
for ``--duration`` s (``--batch N``: /api/batch bodies of N publish commands), records the node
with ``py-spy record`` meanwhile, and prints publications/s and the node's CPU per
publication. ``--subscribers N`` first connects N Socket.IO clients over WebSocket, client i
as user ``u<i>`` subscribed to ``user:u<i>``, and publishes to those channels, so that every
publication is also a delivery (the ``notify`` bench's shape on one node); the deliveries are
counted and printed. The flame graph (or ``--format raw`` text for a speedscope/flamegraph.pl) is in
``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loadgen import HttpClient
from bench.wsclient import Recorder, connect
from realtime_dev.processes import NodeProcess, RedisProcess


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """The user and system CPU seconds of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / 100.0, int(fields[12]) / 100.0  # utime, stime: clock ticks


async def _subscribe(port: int, count: int, recorder: Recorder) -> list:
    """``count`` WebSocket clients, client i as user ``u<i>`` subscribed to ``user:u<i>``."""
    loop = asyncio.get_running_loop()
    semaphore = asyncio.Semaphore(50)

    async def one(i: int):
        async with semaphore:
            client = await connect(loop, "127.0.0.1", port, source=None,
                                   auth={"user": f"u{i}"}, recorder=recorder)
            answer = await client.emit("subscribe", {"channel": f"user:u{i}"})
            if not (isinstance(answer, dict) and answer.get("ok")):
                raise RuntimeError(f"subscribe refused: {answer}")
            return client

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def _load(port: int, path: str, connections: int, duration: float,
                batch: int, users: int, requests: int | None = None) -> tuple[int, int]:
    """POST for ``duration`` s (or until ``requests`` requests were made); (published, errors)."""
    clients = [await HttpClient.open("127.0.0.1", port) for _ in range(connections)]
    done, errors = 0, 0
    deadline = time.monotonic() + duration
    left = [requests if requests is not None else -1]

    def body(i: int) -> bytes:
        publication = {"channel": f"user:u{i % users}", "data": {"n": i, "pad": "x" * 80}}
        if not batch:
            return json.dumps(publication).encode()
        return json.dumps({"commands": [{"method": "publish", "params": publication}
                                        for _ in range(batch)]}).encode()

    async def lane(client: HttpClient, lane_id: int) -> None:
        nonlocal done, errors
        i = lane_id
        while time.monotonic() < deadline and left[0] != 0:
            left[0] -= 1
            status, _ = await client.post(path, body(i))
            if status == 200:
                done += batch or 1
            else:
                errors += 1
            i += connections

    await asyncio.gather(*(lane(client, n) for n, client in enumerate(clients)))
    for client in clients:
        client.close()
    return done, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--format", default="flamegraph", choices=["flamegraph", "raw",
                                                                   "speedscope"])
    parser.add_argument("--path", default="/api/publish")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=0)
    parser.add_argument("--subscribers", type=int, default=0)
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()
    path = "/api/batch" if args.batch else args.path
    with tempfile.TemporaryDirectory() as scratch:
        logs = Path(scratch)
        redis = RedisProcess(logs).wait_ready()
        node = NodeProcess(logs, "p1", "--broker", redis.url, "--log-level", "warning",
                           "--events-per-second", "1000000", "--events-burst", "1000000")
        spy = None
        try:
            node.wait_ready()
            recorder = Recorder()
            loop = asyncio.new_event_loop()
            subscribers = loop.run_until_complete(
                _subscribe(node.port, args.subscribers, recorder))
            if not args.no_profile:
                spy = subprocess.Popen([shutil.which("py-spy") or str(
                    Path(sys.executable).parent / "py-spy"), "record", "--pid", str(node.pid),
                    "--rate", "200", "--format", args.format, "-o", args.out,
                    "--duration", str(int(args.duration)), "--nonblocking"])
            before, began = _cpu_seconds(node.pid), time.monotonic()
            done, errors = loop.run_until_complete(_load(
                node.port, path, args.connections, args.duration, args.batch,
                args.subscribers or 1000))
            after = _cpu_seconds(node.pid)
            if subscribers:
                # The last deliveries may still be on their way: wait for them (or 5 s).
                give_up = time.monotonic() + 5
                while recorder.other_events < done and time.monotonic() < give_up:
                    loop.run_until_complete(asyncio.sleep(0.05))
                print(f"{recorder.other_events:,} of {done:,} publications delivered")
                for client in subscribers:
                    client.close()
            loop.close()
            wall = time.monotonic() - began
            user, system = after[0] - before[0], after[1] - before[1]
            cpu = user + system
            print(f"{path}: {done / wall:,.0f} publications/s, {errors} errors, node CPU "
                  f"{cpu / wall * 100:.0f}%, {cpu / max(done, 1) * 1e6:.0f} µs CPU per "
                  f"publication ({system / max(cpu, 1e-9) * 100:.0f}% of it in the kernel)")
            if spy is not None:
                spy.wait(60)
        finally:
            node.stop()
            redis.stop()


if __name__ == "__main__":
    main()
