"""A node drained with SIGTERM: out of rotation at once, clients moved on gradually by a
transport close (so they reconnect by themselves), presence left with ``leave`` events, the
requests in flight answered, exit status 0."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import requests

from realtime_dev.processes import NodeProcess, RedisProcess
from tests.helpers import wait_until
from tests.integration.clients import connect_client
from tests.integration.rawclients import OP_CLOSE, websocket_session

CLIENTS = 12


@pytest.fixture
def two_nodes(tmp_path):
    server = RedisProcess(tmp_path).wait_ready()
    started = []

    def start(node_id: str, *extra: str) -> NodeProcess:
        node = NodeProcess(tmp_path, node_id, "--broker", server.url, *extra).wait_ready()
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()
    server.stop()


def test_a_drained_node_moves_its_clients_on_gradually_and_says_who_left(two_nodes, clients):
    leaving = two_nodes("leaving", "--drain-timeout", "3")
    staying = two_nodes("staying")
    room = "chat:drain"  # chat: has join and leave events
    watcher = connect_client(staying.url, "websocket", "watcher")
    clients.append(watcher)
    assert watcher.call("subscribe", {"channel": room}, timeout=5)["ok"]
    raw = [websocket_session(leaving.port, auth={"user": f"raw{i}"}) for i in range(CLIENTS)]
    for ws in raw:
        ws.send_text(f'420["subscribe",{{"channel":"{room}"}}]')
        ws.wait_for_text(lambda text: text.startswith("430"))
    polling = connect_client(leaving.url, "polling", "poller")
    clients.append(polling)
    assert polling.call("subscribe", {"channel": room}, timeout=5)["ok"]
    leavers = sorted([f"raw{i}" for i in range(CLIENTS)] + ["poller"])
    members = requests.get(f"{staying.url}/api/presence/{room}", timeout=5).json()["members"]
    assert sorted(m["user"] for m in members) == sorted([*leavers, "watcher"])
    kept_alive = requests.Session()
    assert kept_alive.get(f"{leaving.url}/readyz", timeout=5).status_code == 200

    signalled = time.monotonic()
    leaving.signal(signal.SIGTERM)
    # Out of rotation at once: the open connection hears 503 (and is closed after it), new
    # connections are refused.
    answers = []  # (a Response is falsy when its status is an error: keep it in a list)
    wait_until(lambda: answers.append(kept_alive.get(f"{leaving.url}/readyz", timeout=5))
               or answers[-1].status_code == 503, timeout=2, message="readyz 503")
    assert answers[-1].headers["Connection"] == "close"
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{leaving.url}/readyz", timeout=2)

    closed_at = []
    for ws in raw:
        assert ws.read_until_closed(timeout=10), "a client was not closed by the drain"
        closed_at.append(time.monotonic() - signalled)
        # A transport close (1001, going away), never a Socket.IO DISCONNECT ("41"), after
        # which the official client would not reconnect by itself.
        assert ws.close_code == 1001
        assert "41" not in [frame.text for frame in ws.frames if frame.opcode != OP_CLOSE]
    # spread over the drain (80% of 3 s to close in), not all at once
    assert max(closed_at) - min(closed_at) > 1.0, closed_at
    assert leaving.process.wait(10) == 0
    assert "drained 13 sessions" in leaving.log()
    wait_until(lambda: not polling.connected, message="the polling client to be closed")
    # every user of the drained node left the room, each with a leave event, before it exited
    assert sorted(event["user"] for event in watcher.events("leave")) == leavers
    assert [m["user"] for m in requests.get(
        f"{staying.url}/api/presence/{room}", timeout=5).json()["members"]] == ["watcher"]


def test_a_long_poll_waiting_when_the_drain_starts_is_answered_with_the_close(two_nodes):
    leaving = two_nodes("leaving", "--drain-timeout", "3")
    base = f"{leaving.url}/socket.io/?EIO=4&transport=polling"
    session = requests.Session()
    sid = session.get(base, timeout=5).text.split('"sid":"')[1].split('"')[0]
    session.post(f"{base}&sid={sid}", data="40", timeout=5)
    assert session.get(f"{base}&sid={sid}", timeout=5).text.startswith("40")
    outcome: dict = {}

    def long_poll():
        try:
            outcome["poll"] = session.get(f"{base}&sid={sid}", timeout=30)
        except requests.RequestException as exc:
            outcome["poll"] = exc

    thread = threading.Thread(target=long_poll)
    thread.start()
    # The GET waits in the node (nothing to send for 25 s) or arrives during the drain:
    # either way it is answered, with the Engine.IO close packet, not cut.
    leaving.signal(signal.SIGTERM)
    thread.join(15)
    answer = outcome["poll"]
    assert isinstance(answer, requests.Response), answer
    assert answer.status_code == 200 and "1" in answer.text.split("\x1e"), answer.text
    assert leaving.process.wait(10) == 0


def test_a_new_session_on_a_connection_opened_before_the_drain_is_refused_with_503(
        two_nodes, clients):
    leaving = two_nodes("leaving", "--drain-timeout", "5")
    holder = connect_client(leaving.url, "websocket", "holder")  # keeps the drain going
    clients.append(holder)
    probe, idle = requests.Session(), requests.Session()
    for session in (probe, idle):
        assert session.get(f"{leaving.url}/healthz", timeout=5).status_code == 200
    leaving.signal(signal.SIGTERM)
    wait_until(lambda: probe.get(f"{leaving.url}/readyz", timeout=5).status_code == 503,
               timeout=2, message="readyz 503")
    refused = idle.get(f"{leaving.url}/socket.io/?EIO=4&transport=polling", timeout=5)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "unavailable"
    assert refused.headers["Connection"] == "close"
    assert leaving.process.wait(15) == 0


def test_a_second_sigterm_ends_the_drain_at_once(two_nodes):
    leaving = two_nodes("leaving", "--drain-timeout", "60")
    raw = [websocket_session(leaving.port) for _ in range(CLIENTS)]
    leaving.signal(signal.SIGTERM)
    wait_until(lambda: "draining" in leaving.log(), message="the drain to start")
    leaving.signal(signal.SIGTERM)
    started = time.monotonic()
    assert leaving.process.wait(10) == 0
    assert time.monotonic() - started < 5
    for ws in raw:
        assert ws.read_until_closed(timeout=5)
