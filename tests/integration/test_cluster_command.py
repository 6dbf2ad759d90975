"""``run.py cluster`` as a real process, and :class:`LocalCluster` failing cleanly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import socketio

from realtime.cluster import ClusterError, LocalCluster, find_executable, redis_pings
from tests.helpers import free_port, wait_until
from tests.integration.processes import REPO, ManagedProcess, wait_port_closed

START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
URL_PID_RE = re.compile(r"^  (?P<name>.+?) +(?P<url>\S+://\S+) +(?:nginx )?pid (?P<pid>\d+)$",
                        re.M)


@dataclass
class ClusterCommand:
    """A running ``run.py cluster`` and what it printed."""

    process: subprocess.Popen
    stdout: Path
    stderr: Path

    def output(self) -> str:
        return self.stdout.read_text()

    def logs(self) -> str:
        return f"stdout:\n{self.output()}\nstderr:\n{self.stderr.read_text()}"

    def wait_ready(self) -> ClusterCommand:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"run.py cluster exited with {self.process.returncode}\n"
                                     + self.logs())
            return "is ready" in self.output()

        wait_until(ready, START_TIMEOUT, interval=0.05, message="run.py cluster to be ready")
        return self

    @property
    def parts(self) -> dict[str, tuple[str, int]]:
        """Printed name -> (URL, pid): 'chat page' (nginx), 'node n1'..., 'redis' if started."""
        return {m["name"]: (m["url"], int(m["pid"])) for m in URL_PID_RE.finditer(self.output())}

    def wait_exit(self) -> int:
        wait_until(lambda: self.process.poll() is not None, STOP_TIMEOUT,
                   message="run.py cluster to exit")
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


@pytest.fixture
def run_cluster(tmp_path):
    """``run_cluster(*flags)``: start ``run.py cluster`` with ``flags``; killed after the test."""
    started: list[ClusterCommand] = []

    def start(*flags: str) -> ClusterCommand:
        stdout, stderr = tmp_path / f"cluster{len(started)}.out", tmp_path / "cluster.err"
        with open(stdout, "wb") as out, open(stderr, "ab") as err:
            process = subprocess.Popen([sys.executable, "run.py", "cluster", *flags], cwd=REPO,
                                       stdout=out, stderr=err, start_new_session=True)
        command = ClusterCommand(process, stdout, stderr)
        started.append(command)
        return command

    yield start
    for command in started:
        # Only if a test failed half-way; every test stops its cluster itself.
        command.kill()


def exited(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def port_of(url: str) -> int:
    return int(re.search(r":(\d+)(?:/|$)", url).group(1))


def child_commands(pid: int) -> list[str]:
    """The command names of the processes whose parent is ``pid``."""
    names = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Format: pid (comm) state ppid ...; comm may hold spaces and parentheses.
        comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:]
        if int(rest.split()[1]) == pid:
            names.append(comm)
    return names


def polling_session_through(url: str) -> str:
    """Open an Engine.IO long-polling session through nginx and use it; return its sid."""
    handshake = requests.get(f"{url}/socket.io/", params={"EIO": 4, "transport": "polling"},
                             timeout=10)
    assert handshake.status_code == 200, handshake.text
    sid = re.search(r'"sid":"([^"]+)"', handshake.text).group(1)
    params = {"EIO": 4, "transport": "polling", "sid": sid}
    # A Socket.IO CONNECT, so that the GET below has an answer (the CONNECT ack) waiting and
    # returns at once. A node that does not hold the session answers both with 400.
    posted = requests.post(f"{url}/socket.io/", params=params, data="40", timeout=10)
    assert posted.status_code == 200, posted.text
    polled = requests.get(f"{url}/socket.io/", params=params, timeout=10)
    assert polled.status_code == 200, polled.text
    assert polled.text.startswith("40") or polled.text.startswith("44"), polled.text
    return sid


def upgrade_through(url: str) -> None:
    """A Socket.IO client starting on long-polling upgrades to WebSocket through nginx."""
    client = socketio.Client(reconnection=False)
    client.connect(url, transports=["polling", "websocket"], auth={"user": "u"},
                   wait_timeout=10)
    try:
        wait_until(lambda: client.transport() == "websocket", 10,
                   message="the upgrade to WebSocket")
        assert client.call("subscribe", {"channel": "cluster-command"}, timeout=10)["ok"]
    finally:
        client.disconnect()


def test_cluster_routes_sessions_to_their_node_and_stops_everything(run_cluster):
    port = free_port()
    cluster = run_cluster("--nodes", "2", "--port", str(port)).wait_ready()
    parts = cluster.parts
    assert set(parts) == {"chat page", "node n1", "node n2", "redis"}, cluster.output()
    url = f"http://127.0.0.1:{port}"
    assert parts["chat page"][0] == url + "/"

    assert requests.get(url + "/readyz", timeout=10).status_code == 200
    page = requests.get(url + "/", timeout=10)
    assert page.status_code == 200 and "<html" in page.text.lower()
    # least_conn takes turns between idle nodes: four sessions land on both of them.
    sids = [polling_session_through(url) for _ in range(4)]
    assert all(re.match(r"n[12]\.", sid) for sid in sids), sids
    assert {sid[:3] for sid in sids} == {"n1.", "n2."}, sids
    upgrade_through(url)

    cluster.process.send_signal(signal.SIGTERM)
    assert cluster.wait_exit() == 0, cluster.logs()
    for name, (part_url, pid) in parts.items():
        assert exited(pid), f"{name} (pid {pid}) is still running"
        wait_port_closed(port_of(part_url))
    assert "Traceback" not in cluster.stderr.read_text()


def test_an_external_redis_is_used_and_left_running(run_cluster, tmp_path):
    redis_port = free_port()
    redis = ManagedProcess("redis", [find_executable("redis-server"), "--port", str(redis_port),
                                     "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                     "--dir", str(tmp_path)], tmp_path / "redis.log")
    try:
        wait_until(lambda: redis_pings("127.0.0.1", redis_port), 10, message="the test's redis")
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        cluster = run_cluster("--nodes", "1", "--port", "0", "--redis", redis_url).wait_ready()
        assert "redis" not in cluster.parts
        assert f"{redis_url}  external, not started here" in cluster.output()
        children = child_commands(cluster.process.pid)
        assert "redis-server" not in children and "nginx" in children, children

        cluster.process.send_signal(signal.SIGINT)
        assert cluster.wait_exit() == 0, cluster.logs()
        assert redis.alive() and redis_pings("127.0.0.1", redis_port)
    finally:
        redis.stop()


def test_a_part_that_dies_stops_the_cluster_with_its_log(run_cluster):
    cluster = run_cluster("--nodes", "1", "--port", "0").wait_ready()
    parts = cluster.parts
    os.kill(parts["node n1"][1], signal.SIGKILL)
    assert cluster.wait_exit() == 1
    errors = cluster.stderr.read_text()
    assert "node n1" in errors and "exited unexpectedly" in errors, errors
    assert all(exited(pid) for _, pid in parts.values())


def test_a_part_that_fails_to_start_is_reported_and_nothing_is_left(tmp_path):
    cluster = LocalCluster(workdir=tmp_path, nodes=1, node_args=["--no-such-flag"])
    with pytest.raises(ClusterError, match="node n1 exited") as failure:
        cluster.start()
    assert "--no-such-flag" in str(failure.value)  # the node's own complaint, from its log
    assert cluster.children and all(exited(child.pid) for child in cluster.children)
    cluster.stop()  # idempotent


