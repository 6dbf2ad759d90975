"""``run.py cluster`` as a real process (routing, supervision of parts that die, Redis
persistence), and :class:`LocalCluster` failing cleanly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import socketio

from realtime_dev.cluster import ClusterError, LocalCluster
from realtime_dev.processes import (
    ManagedProcess,
    find_executable,
    free_port,
    redis_pings,
    wait_port_closed,
)
from tests.helpers import REPO, wait_until
from tests.integration.clients import connect_client

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

    def started_pids(self, name: str) -> list[int]:
        """Every pid that part ``name`` ('node n1', 'redis', 'nginx') had, first to last."""
        return [int(pid) for pid in re.findall(
            rf"INFO realtime_dev\.processes: started {re.escape(name)} \(pid (\d+)\)",
            self.stderr.read_text())]

    def wait_restarted(self, name: str, old_pid: int) -> int:
        """Wait until part ``name`` runs under a pid after ``old_pid``; that pid."""
        def restarted() -> int | None:
            if self.process.poll() is not None:
                raise AssertionError(f"run.py cluster exited with {self.process.returncode}\n"
                                     + self.logs())
            pids = self.started_pids(name)
            later = pids[pids.index(old_pid) + 1:] if old_pid in pids else []
            return later[-1] if later else None

        return wait_until(restarted, START_TIMEOUT, interval=0.05,
                          message=f"{name} to be started again")

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


def processes() -> list[tuple[str, int, int]]:
    """(command name, parent pid, process group) of every process."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Format: pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses.
        comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:]
        fields = rest.split()
        found.append((comm, int(fields[1]), int(fields[2])))
    return found


def child_commands(pid: int) -> list[str]:
    """The command names of the processes whose parent is ``pid``."""
    return [comm for comm, parent, _ in processes() if parent == pid]


def group_members(pgid: int) -> list[str]:
    """The command names of the processes in process group ``pgid``."""
    return [comm for comm, _, group in processes() if group == pgid]


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


def readyz(url: str) -> int:
    try:
        return requests.get(url + "/readyz", timeout=5).status_code
    except requests.ConnectionError:
        return 0


def publish_through(url: str, channel: str, data: object) -> dict:
    response = requests.post(url + "/api/publish", json={"channel": channel, "data": data},
                             timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def history_through(url: str, channel: str) -> dict | None:
    """The channel's history through nginx, or None while the broker cannot answer."""
    response = requests.get(f"{url}/api/history/{channel}", timeout=10)
    return response.json() if response.status_code == 200 else None


def test_a_killed_node_and_a_killed_nginx_come_back_on_their_ports_while_clients_carry_on(
        run_cluster, tmp_path, channel):
    workdir = tmp_path / "work"
    cluster = run_cluster("--nodes", "2", "--port", "0", "--workdir", str(workdir)).wait_ready()
    parts = cluster.parts
    url = parts["chat page"][0].rstrip("/")
    client = connect_client(url, "upgrade", "stays")  # the official client's default start
    try:
        assert client.call("subscribe", {"channel": channel}, timeout=10)["ok"]
        # kill the node the client is not on: the client must not notice
        victim = "n2" if client.eio.sid.startswith("n1.") else "n1"
        victim_url, victim_pid = parts[f"node {victim}"]
        os.kill(victim_pid, signal.SIGKILL)
        # new sessions and the API through nginx carry on meanwhile, on the other node
        for i in range(3):
            polling_session_through(url)
            publish_through(url, channel, i)
        new_pid = cluster.wait_restarted(f"node {victim}", victim_pid)
        assert new_pid != victim_pid and exited(victim_pid)
        wait_until(lambda: readyz(victim_url) == 200, START_TIMEOUT,
                   message=f"{victim} to answer /readyz on its port again")
        errors = cluster.stderr.read_text()
        assert re.search(rf"WARNING realtime_dev\.cluster: node {victim} \(pid {victim_pid}\) "
                         r"exited on its own with signal SIGKILL after [\d.]+ s; "
                         r"starting it again\n--- last lines of ", errors), errors
        # the restarted node gets new sessions through nginx again
        wait_until(lambda: polling_session_through(url).startswith(victim + "."), 20,
                   interval=0.1, message=f"a new session on the restarted {victim}")
        # its log kept the first run: appended to, not replaced
        assert (workdir / f"{victim}.log").read_text().count(f"node {victim} serving on") == 2
        publish_through(url, channel, "after")
        data = [m["data"] for m in client.wait_messages(channel, 4)]
        assert data == [0, 1, 2, "after"] and client.connected
    finally:
        client.disconnect()

    # nginx too (its clients lose their connections, and come back)
    nginx_pid = parts["chat page"][1]
    os.kill(nginx_pid, signal.SIGKILL)
    new_nginx = cluster.wait_restarted("nginx", nginx_pid)
    wait_until(lambda: readyz(url) == 200, START_TIMEOUT, message="nginx to answer again")
    # its workers, orphaned, went with it: they held its port
    wait_until(lambda: not group_members(nginx_pid), message="the old nginx workers to go")
    assert child_commands(cluster.process.pid).count("nginx") == 1
    polling_session_through(url)
    upgrade_through(url)

    cluster.process.send_signal(signal.SIGINT)
    assert cluster.wait_exit() == 0, cluster.logs()
    for pid in (*cluster.started_pids(f"node {victim}"), *cluster.started_pids("nginx"),
                *(pid for _, pid in parts.values()), new_pid, new_nginx):
        assert exited(pid), f"pid {pid} is still running"
    wait_port_closed(port_of(victim_url))
    wait_port_closed(port_of(url))
    assert "Traceback" not in cluster.stderr.read_text()


def test_a_node_that_keeps_dying_is_started_again_later_and_later(run_cluster):
    cluster = run_cluster("--nodes", "1", "--port", "0").wait_ready()
    pid = cluster.parts["node n1"][1]
    waited = []
    for _ in range(3):
        wait_until(lambda: readyz(cluster.parts["node n1"][0]) == 200, START_TIMEOUT,
                   message="n1 to be ready")
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        pid = cluster.wait_restarted("node n1", pid)
        waited.append(time.monotonic() - killed)
    errors = cluster.stderr.read_text()
    # the first death is taken for an accident: at once; then 1 s, then 2 s
    assert "exited on its own with signal SIGKILL after" in errors
    assert "it keeps dying (2 times in a row within 10 s of its start): " \
           "starting it again in 1 s" in errors, errors
    assert "it keeps dying (3 times in a row within 10 s of its start): " \
           "starting it again in 2 s" in errors, errors
    assert waited[1] >= 1.0 and waited[2] >= 2.0, waited
    assert len(cluster.started_pids("node n1")) == 4  # no start but these

    cluster.process.send_signal(signal.SIGTERM)
    assert cluster.wait_exit() == 0, cluster.logs()
    assert all(exited(p) for p in cluster.started_pids("node n1"))


@pytest.mark.parametrize("appendonly", [True, False], ids=["appendonly", "in-memory"])
def test_a_killed_redis_comes_back_on_its_port_with_its_data_only_with_appendonly(
        run_cluster, tmp_path, channel, appendonly):
    workdir = tmp_path / "work"
    flags = ["--redis-appendonly"] if appendonly else []
    cluster = run_cluster("--nodes", "1", "--port", "0", "--workdir", str(workdir),
                          *flags).wait_ready()
    parts = cluster.parts
    url = parts["chat page"][0].rstrip("/")
    redis_port = port_of(parts["redis"][0])
    before = publish_through(url, channel, "before the crash")

    os.kill(parts["redis"][1], signal.SIGKILL)
    new_redis = cluster.wait_restarted("redis", parts["redis"][1])
    wait_until(lambda: redis_pings("127.0.0.1", redis_port), START_TIMEOUT,
               message="redis to answer on its port again")
    history = wait_until(lambda: history_through(url, channel), START_TIMEOUT, interval=0.1,
                         message="history through nginx once the node is back on redis")
    if appendonly:
        assert history["epoch"] == before["epoch"] and history["offset"] == 1
        assert [p["data"] for p in history["publications"]] == ["before the crash"]
        # the stream carries on where it was
        assert publish_through(url, channel, "after") == {"epoch": before["epoch"],
                                                          "offset": 2}
        assert (workdir / "appendonlydir").is_dir()
    else:
        assert history["publications"] == [] and history["offset"] == 0
        after = publish_through(url, channel, "after")
        assert after["offset"] == 1 and after["epoch"] != before["epoch"]
        assert not (workdir / "appendonlydir").exists()
    # one log for both runs
    redis_log = (workdir / "redis.log").read_text()
    assert f"pid={parts['redis'][1]}," in redis_log and f"pid={new_redis}," in redis_log

    cluster.process.send_signal(signal.SIGINT)
    assert cluster.wait_exit() == 0, cluster.logs()
    assert exited(new_redis)
    wait_port_closed(redis_port)


def test_appendonly_is_refused_for_an_external_redis():
    result = subprocess.run([sys.executable, "run.py", "cluster", "--redis",
                             "redis://127.0.0.1:1/0", "--redis-appendonly"], cwd=REPO,
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2, result
    assert "--redis-appendonly is for the cluster's own redis-server" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_part_that_fails_to_start_is_reported_and_nothing_is_left(tmp_path):
    cluster = LocalCluster(workdir=tmp_path, nodes=1, node_args=["--no-such-flag"])
    with pytest.raises(ClusterError, match="node n1 exited") as failure:
        cluster.start()
    assert "--no-such-flag" in str(failure.value)  # the node's own complaint, from its log
    assert cluster.children and all(exited(child.pid) for child in cluster.children)
    cluster.stop()  # idempotent


