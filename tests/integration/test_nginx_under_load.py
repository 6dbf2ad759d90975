"""The shipped nginx config in front of three real nodes, under load and when nodes die.

Issue 10's test (5) and the first "What to build" point: ordinary long-polling handshakes from
10 concurrent loops get no 502 (nginx once reused connections that the nodes had closed, and
three such failures took every node out of rotation); a node that dies loses only its own
sessions and gets traffic again once it is back; a rolling restart, or every node dying at once,
never leaves nginx without a node once one runs; a node that drains costs no handshake; and an
API request goes to another node only when the first never received it.

Each loop comes from a loopback address of its own (127.0.0.10, .11, ...), as separate
browsers would: from one address, the handshakes of all loops together would pass nginx's
per-address handshake rate (see nginx/README.md) and measure that limit instead.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gevent
import pytest
import requests

from realtime_dev.cluster import LocalCluster
from tests.helpers import wait_until

NODES = 3
LOOPS = 10
LOAD_SECONDS = 15.0
# A node (re)started under load may take a while on a small machine.
NODE_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(workdir=tmp_path_factory.mktemp("under-load"), nodes=NODES,
                           node_args=["--history-size", "1000"]).start()
    yield cluster
    cluster.stop()


@pytest.fixture(autouse=True)
def every_node_running(cluster) -> Iterator[None]:
    """A test that killed or stopped a node leaves it running again for the next one."""
    yield
    for node_id in cluster.node_ids:
        child = cluster.node(node_id)
        if child.alive() and _stopped(child.pid):
            child.kill()
        if not child.alive():
            cluster.start_node(node_id)


def _stopped(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] == "T"


@dataclass
class Step:
    """One request of a loop: what it was, its HTTP status (0: no answer), when it started."""

    name: str  # handshake, connect, poll, close
    status: int
    at: float
    done: float = 0.0  # when it was answered or failed
    error: str = ""  # why there is no answer (status 0)

    def in_flight_during(self, start: float, end: float) -> bool:
        return self.at <= end and self.done >= start


@dataclass
class Session:
    """One run of the official client's start, on node ``node`` ("" if the handshake failed)."""

    node: str
    steps: list[Step] = field(default_factory=list)

    @property
    def started(self) -> float:
        return self.steps[0].at

    @property
    def ok(self) -> bool:
        return all(step.status == 200 for step in self.steps) and len(self.steps) == 4


class HandshakeLoops:
    """``LOOPS`` greenlets repeating the official client's default start through nginx.

    Each loop, on a keep-alive connection of its own as a browser has: the handshake
    ``GET /socket.io/?EIO=4&transport=polling``, ``POST 40`` (the Socket.IO CONNECT), the
    ``GET`` that brings its answer, then ``POST 1`` (the Engine.IO close) so that sessions do
    not pile up until their ping timeout. A loop whose session fails starts a new one.
    """

    def __init__(self, url: str, loops: int = LOOPS) -> None:
        self.host, port = url.removeprefix("http://").rsplit(":", 1)
        self.port = int(port)
        self.sessions: list[Session] = []
        self._running = True
        self._greenlets = [gevent.spawn(self._loop, f"127.0.0.{10 + i}") for i in range(loops)]

    def stop(self) -> list[Session]:
        self._running = False
        gevent.joinall(self._greenlets, raise_error=True)
        return self.sessions

    def run_for(self, seconds: float) -> list[Session]:
        gevent.sleep(seconds)  # the load itself lasts this long: not a wait for a condition
        return self.stop()

    def sessions_on(self, node: str, since: float = 0.0) -> list[Session]:
        """The finished sessions that went well on ``node``, started after ``since``."""
        return [s for s in list(self.sessions) if s.node == node and s.started > since and s.ok]

    def handshakes_since(self, since: float) -> int:
        return sum(1 for s in list(self.sessions) if s.started > since)

    def _loop(self, source: str) -> None:
        connection = None
        while self._running:
            if connection is None:
                connection = http.client.HTTPConnection(self.host, self.port, timeout=30,
                                                        source_address=(source, 0))
            session = Session("")
            self.sessions.append(session)
            try:
                status, body = self._request(connection, session, "handshake", "GET", "")
                if status != 200:
                    # The official client's reconnection delay (a second, by default), shorter:
                    # no busy loop against nginx while every node is down.
                    gevent.sleep(0.1)
                    continue
                sid = re.search(r'"sid":"([^"]+)"', body).group(1)
                session.node = sid.split(".", 1)[0]
                for name, method, payload in (("connect", "POST", "40"), ("poll", "GET", None),
                                              ("close", "POST", "1")):
                    status, body = self._request(connection, session, name, method,
                                                 f"&sid={sid}", payload)
                    if status != 200:
                        break
                    if name == "poll" and not body.startswith("40"):
                        session.steps[-1].status = -1  # answered, but not the CONNECT ack
                        break
            except (OSError, http.client.HTTPException) as exc:
                session.steps[-1].error = repr(exc)  # its status stays 0
                session.steps[-1].done = time.monotonic()
                connection.close()
                connection = None

    def _request(self, connection: http.client.HTTPConnection, session: Session, name: str,
                 method: str, query: str, body: str | None = None) -> tuple[int, str]:
        step = Step(name, 0, time.monotonic())
        session.steps.append(step)
        connection.request(method, f"/socket.io/?EIO=4&transport=polling{query}", body=body)
        response = connection.getresponse()
        text = response.read().decode(errors="replace")
        step.status, step.done = response.status, time.monotonic()
        if response.will_close:
            connection.close()  # http.client opens a new one for the next request
        return step.status, text


def cut_by_a_kill(session: Session, kills: list[tuple[float, float]]) -> bool:
    """Whether the session's handshake got no complete answer because its node was killed.

    A node killed while it writes an answer leaves nginx with the status line and headers,
    already passed on to the client: too late to try another node. The session is lost with
    its node, like those the node held; a client starts a new one.
    """
    first = session.steps[0]
    return first.status == 0 and any(first.in_flight_during(*kill) for kill in kills)


def failures(sessions: list[Session]) -> list[str]:
    return [f"{s.node or '?'}: " + ", ".join(f"{st.name} {st.status}{st.error}" for st in s.steps)
            for s in sessions if not s.ok]


def error_log_since(cluster: LocalCluster, offset: int) -> str:
    with open(cluster.nginx_error_log, "rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


def error_log_size(cluster: LocalCluster) -> int:
    return cluster.nginx_error_log.stat().st_size


def node_port(cluster: LocalCluster, node_id: str) -> int:
    return int(cluster.node_urls[node_id].rsplit(":", 1)[1])


def test_ten_polling_handshake_loops_through_nginx_get_no_502_for_15_s(cluster):
    log_start = error_log_size(cluster)
    sessions = HandshakeLoops(cluster.url).run_for(LOAD_SECONDS)
    assert not failures(sessions), failures(sessions)[:20]
    # real load, spread over every node
    assert len(sessions) >= 20 * LOOPS, len(sessions)
    assert {s.node for s in sessions} == set(cluster.node_ids)
    log = error_log_since(cluster, log_start)
    assert "upstream prematurely closed connection" not in log, log[-3000:]
    assert "no live upstreams" not in log, log[-3000:]


def test_a_node_killed_under_load_loses_only_its_sessions_and_gets_traffic_once_back(cluster):
    log_start = error_log_size(cluster)
    loops = HandshakeLoops(cluster.url)
    try:
        wait_until(lambda: all(loops.sessions_on(n) for n in cluster.node_ids), 20,
                   message="sessions on every node")
        killed_at = time.monotonic()
        cluster.kill_node("n2")
        kills = [(killed_at, time.monotonic())]
        # load goes on while it is down
        wait_until(lambda: loops.handshakes_since(killed_at) >= 100, 20,
                   message="handshakes while n2 is down")
        cluster.start_node("n2")
        back_at = time.monotonic()
        wait_until(lambda: len(loops.sessions_on("n2", since=back_at)) >= 10, 20,
                   message="new sessions on n2 once it is back")
    finally:
        sessions = loops.stop()
    # Only sessions that n2 held when it died (or that it forgot, restarted) fail: never a
    # handshake (but one n2 was answering as it died), never a session on another node, never
    # one n2 took after it came back.
    unexpected = [s for s in sessions if not s.ok and not (s.node == "n2" and s.started < back_at)
                  and not cut_by_a_kill(s, kills)]
    assert not unexpected, failures(unexpected)[:20]
    assert all(s.steps[0].status == 200 or cut_by_a_kill(s, kills) for s in sessions)
    after_kill = [s for s in sessions if s.started > killed_at]
    assert {s.node for s in after_kill if s.started < back_at and s.node} <= {"n1", "n3"}
    assert "no live upstreams" not in error_log_since(cluster, log_start)


def test_a_rolling_restart_under_load_never_leaves_nginx_without_a_node(cluster):
    """Each node in turn is killed, taken out of rotation by nginx and started again.

    Every node fails a few times within seconds: with nginx's default accounting (one failure
    takes a node out for 10 s) the last kill left every node out, and requests were answered
    502 "no live upstreams" although two nodes were running.
    """
    log_start = error_log_size(cluster)
    loops = HandshakeLoops(cluster.url)
    try:
        wait_until(lambda: all(loops.sessions_on(n) for n in cluster.node_ids), 20,
                   message="sessions on every node")
        kills = []
        for node_id in cluster.node_ids:
            port = node_port(cluster, node_id)
            killed_at = time.monotonic()
            cluster.kill_node(node_id)
            kills.append((killed_at, time.monotonic()))
            taken_out = re.compile(rf"upstream server temporarily disabled .*"
                                   rf"upstream: \"http://127\.0\.0\.1:{port}/")
            wait_until(lambda p=taken_out: p.search(error_log_since(cluster, log_start)), 20,
                       message=f"nginx to take {node_id} out of rotation")
            cluster.start_node(node_id)
        done_at = time.monotonic()
        wait_until(lambda: loops.handshakes_since(done_at) >= 100, 20,
                   message="handshakes after the restart")
    finally:
        sessions = loops.stop()
    failed = [s for s in sessions if s.steps[0].status != 200 and not cut_by_a_kill(s, kills)]
    assert not failed, failures(failed)[:20]
    assert "no live upstreams" not in error_log_since(cluster, log_start)


def test_once_every_node_died_nginx_sends_requests_to_the_first_one_back(cluster):
    """Every node dies at once and nginx takes each out of rotation; they start again.

    As soon as one answers, handshakes reach it, rather than get 502 "no live upstreams" until
    nginx's fail_timeout is over: the same nodes, listed again as backups that are never taken
    out, are tried when every node is out.
    """
    log_start = error_log_size(cluster)
    loops = HandshakeLoops(cluster.url)
    try:
        wait_until(lambda: all(loops.sessions_on(n) for n in cluster.node_ids), 20,
                   message="sessions on every node")
        for node_id in cluster.node_ids:
            cluster.kill_node(node_id)
        ports = [node_port(cluster, node_id) for node_id in cluster.node_ids]

        def every_node_taken_out() -> bool:
            log = error_log_since(cluster, log_start)
            return all(re.search(rf"upstream server temporarily disabled .*upstream: "
                                 rf"\"http://127\.0\.0\.1:{port}/", log) for port in ports)

        wait_until(every_node_taken_out, 20, message="nginx to take every node out")
        children = [cluster.restart(cluster.node(node_id)) for node_id in cluster.node_ids]
        first_back = wait_until(lambda: any(cluster.is_ready(c) for c in children) and
                                time.monotonic(), NODE_TIMEOUT, interval=0.02,
                                message="a node to be back")
        wait_until(lambda: loops.handshakes_since(first_back) >= 100, 20,
                   message="handshakes once a node is back")
        wait_until(lambda: all(cluster.is_ready(c) for c in children), NODE_TIMEOUT,
                   message="every node to be back")
    finally:
        sessions = loops.stop()
    failed = [s for s in sessions if s.started > first_back and s.steps[0].status != 200]
    assert not failed, failures(failed)[:20]


def publish(cluster: LocalCluster, channel: str, data: object) -> requests.Response:
    return requests.post(cluster.url + "/api/publish", json={"channel": channel, "data": data},
                         timeout=60)


def history(cluster: LocalCluster, channel: str) -> list[tuple[int, object]]:
    response = requests.get(f"{cluster.url}/api/history/{channel}", timeout=10)
    assert response.status_code == 200, response.text
    return [(p["offset"], p["data"]) for p in response.json()["publications"]]


def test_publishes_right_after_a_node_dies_go_to_another_node_exactly_once(cluster, channel):
    log_start = error_log_size(cluster)
    cluster.kill_node("n2")
    # nginx tries the dead node (least_conn: it has no connections at all; or, if an earlier
    # failure took it out of rotation, once that is over) and goes on to the next one, as
    # the publish never reached it: the error log says so
    refused = re.compile(rf"connect\(\) failed \(111: Connection refused\) while connecting to "
                         rf"upstream, .*request: \"POST /api/publish .*127\.0\.0\.1:"
                         rf"{node_port(cluster, 'n2')}/")
    answers: list[requests.Response] = []

    def the_dead_node_was_tried() -> bool:
        answers.append(publish(cluster, channel, len(answers)))
        return bool(refused.search(error_log_since(cluster, log_start)))

    wait_until(the_dead_node_was_tried, 20, interval=0.02, message="a publish to try n2")
    for _ in range(10):
        answers.append(publish(cluster, channel, len(answers)))
    count = len(answers)
    assert [a.status_code for a in answers] == [200] * count, [a.text for a in answers]
    assert [a.json()["offset"] for a in answers] == list(range(1, count + 1))
    assert history(cluster, channel) == [(i + 1, i) for i in range(count)]


def unread_bytes_on(port: int) -> bool:
    """Whether a connection to ``port`` on this machine holds bytes its server has not read."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            state, queues = fields[3], fields[4]
            # 01: ESTABLISHED (accepted or still in the accept queue); rx_queue in hex
            if local_port == port and state == "01" and int(queues.split(":")[1], 16):
                return True
    return False


def test_a_publish_that_reached_a_node_is_not_sent_to_another_when_that_node_dies(cluster,
                                                                                  channel):
    """nginx cannot know whether a node that got a POST and failed had published it already:
    it must answer 502 rather than publish it a second time on another node.

    The node here is stopped (SIGSTOP) so that the request sits in its socket, received and
    not answered, then killed: the retry that must not happen would succeed on another node.
    """
    victim = cluster.node("n3")
    port = node_port(cluster, "n3")
    os.kill(victim.pid, signal.SIGSTOP)
    answered: list[int] = []
    stuck: list[tuple[int, gevent.Greenlet]] = []

    def a_publish_sticks_on_n3() -> bool:
        # least_conn spreads publishes over the nodes in turn (once an earlier failure that
        # took n3 out of rotation is over): soon one is sent to n3, and gets no answer
        data = len(answered)
        request = gevent.spawn(publish, cluster, channel, data)
        wait_until(lambda: request.ready() or unread_bytes_on(port), 20,
                   message="the publish to be answered or to reach n3")
        if not request.ready():
            stuck.append((data, request))
            return True
        assert request.get().status_code == 200, request.get().text
        answered.append(data)
        return False

    try:
        wait_until(a_publish_sticks_on_n3, 20, interval=0.02, message="a publish to reach n3")
    finally:
        victim.kill()  # SIGKILL: its unread connections are reset
    ((data, request),) = stuck
    response: requests.Response = request.get(timeout=60)
    assert response.status_code == 502, response.text
    # the publishes answered 200 are there once each, the one n3 got is nowhere
    assert history(cluster, channel) == [(n + 1, i) for n, i in enumerate(answered)]
    assert data not in [d for _, d in history(cluster, channel)]


def test_a_node_drained_under_load_costs_no_handshake(cluster):
    """SIGTERM: the node drains. New sessions that nginx still sends it, on the connections it
    keeps open to it, are refused with 503 and go on to another node: no client sees them."""
    loops = HandshakeLoops(cluster.url)
    try:
        wait_until(lambda: all(loops.sessions_on(n) for n in cluster.node_ids), 20,
                   message="sessions on every node")
        assert cluster.stop_node("n2", timeout=20) == 0
        stopped_at = time.monotonic()
        wait_until(lambda: loops.handshakes_since(stopped_at) >= 100, 20,
                   message="handshakes after the drain")
    finally:
        sessions = loops.stop()
    failed = [s for s in sessions if s.steps[0].status != 200]
    assert not failed, failures(failed)[:20]
