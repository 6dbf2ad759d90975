"""A node's instructions per publication, counted by callgrind: a figure that noise cannot move.

    .venv/bin/python bench/instructions.py [--count 2000] [--batch 0] [--subscribers 100]
        [--connections 1]

Wall-clock CPU per publication (``bench/profile_http.py``, ``bench/run.py notify``) moves by
±15% between runs on a shared machine, more than most single changes to a hot path gain.
This runs the same load as ``bench/profile_http.py`` against one node under ``valgrind
--tool=callgrind`` with instrumentation off (it starts at near native speed), subscribes
``--subscribers`` WebSocket clients, warms up with ``--count / 10`` publications, counts the
node's instructions over ``--count`` publications (``--batch N``: in ``POST /api/batch``
bodies of N), waits for their deliveries, and prints instructions per publication (publish
and delivery). One run of a checkout gives the same figure again within about 1%.

What it does not count: the kernel (system calls run natively under valgrind: about a fifth of
a publication's CPU, see ``profile_http.py``'s kernel share) and waiting. Under valgrind the
node runs some 50 times slower, so with several ``--connections`` more requests queue up per
event-loop turn than in real runs; the default of one connection keeps every publication on
its own, the worst case for per-request costs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.profile_http import _load, _subscribe
from bench.wsclient import Recorder
from realtime_dev.processes import NodeProcess, RedisProcess, find_executable


def _instrument(pid: int, on: bool, url: str) -> None:
    """``callgrind_control -i on|off <pid>``; valgrind reads the command only while the node
    runs, so the node is kept busy with health checks until it has."""
    option = "on" if on else "off"
    control = subprocess.Popen([find_executable("callgrind_control"), "-i", option, str(pid)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    give_up = time.monotonic() + 120
    while control.poll() is None:
        if time.monotonic() > give_up:
            control.kill()
            raise RuntimeError(f"callgrind_control -i {option} did not finish")
        with contextlib.suppress(OSError):
            urllib.request.urlopen(url + "/healthz", timeout=10).read()
    if control.returncode != 0:
        raise RuntimeError(f"callgrind_control -i {option} failed: {control.returncode}")


def _total_instructions(path: Path) -> int:
    """The ``totals:`` line of a callgrind output (its ``summary:`` says 0 when
    instrumentation started off)."""
    for line in path.read_text().splitlines():
        match = re.match(r"totals:\s+(\d+)", line)
        if match:
            return int(match.group(1))
    raise RuntimeError(f"no instruction total in {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="publications counted")
    parser.add_argument("--batch", type=int, default=0)
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--out", help="keep callgrind's output here (for callgrind_annotate)")
    args = parser.parse_args()
    per_request = args.batch or 1
    path = "/api/batch" if args.batch else "/api/publish"
    with tempfile.TemporaryDirectory() as scratch:
        logs = Path(scratch)
        out = logs / "callgrind.out"
        redis = RedisProcess(logs).wait_ready()
        node = NodeProcess(
            logs, "i1", "--broker", redis.url, "--log-level", "warning",
            "--events-per-second", "1000000", "--events-burst", "1000000",
            wrapper=[find_executable("valgrind"), "--tool=callgrind", "--instr-atstart=no",
                     f"--callgrind-out-file={out}"])
        try:
            node.wait_ready(timeout=600)
            recorder = Recorder()
            loop = asyncio.new_event_loop()
            subscribers = loop.run_until_complete(
                _subscribe(node.port, args.subscribers, recorder))
            users = max(args.subscribers, 1)

            def publish(count: int) -> int:
                requests = max(1, count // per_request)
                done, errors = loop.run_until_complete(_load(
                    node.port, path, args.connections, 3600.0, args.batch, users,
                    requests=requests))
                if errors:
                    raise RuntimeError(f"{errors} publish requests failed")
                return done

            def wait_delivered(total: int) -> None:
                give_up = time.monotonic() + 600
                while args.subscribers and recorder.other_events < total:
                    if time.monotonic() > give_up:
                        raise RuntimeError(f"{recorder.other_events} of {total} delivered")
                    loop.run_until_complete(asyncio.sleep(0.1))

            warmed = publish(max(args.count // 10, per_request))
            wait_delivered(warmed)
            _instrument(node.pid, True, node.url)
            counted = publish(args.count)
            wait_delivered(warmed + counted)
            _instrument(node.pid, False, node.url)
            for client in subscribers:
                client.close()
            loop.close()
        finally:
            node.stop(timeout=120)
            redis.stop()
        # the health checks that woke valgrind for the two commands are in the count: a few
        # requests against thousands of publications
        total = _total_instructions(out)
        if args.out:
            shutil.copyfile(out, args.out)
        print(f"{path}: {total / counted:,.0f} instructions per publication and delivery "
              f"({counted:,} publications, {args.subscribers} subscribers, "
              f"{args.connections} connection(s))")


if __name__ == "__main__":
    main()
