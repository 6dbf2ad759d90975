"""A node run by gunicorn (``gunicorn -c python:realtime.gunicorn_config
'realtime.gunicorn_worker:create_node()'``) serves like ``run.py serve``: realtime's own server
and WebSocket hand-off, behind the shipped nginx config, and the same drain on SIGTERM to the
gunicorn master, which then exits 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from realtime_dev.nginx import nginx_command, render_nginx_config
from realtime_dev.processes import ManagedProcess, find_executable, free_port
from tests.helpers import wait_until
from tests.integration.clients import connect_client
from tests.integration.rawclients import OP_CLOSE, RawWebSocket, websocket_session

GUNICORN_ARGV = [sys.executable, "-m", "gunicorn", "-c", "python:realtime.gunicorn_config",
                 "realtime.gunicorn_worker:create_node()"]


class GunicornNode(ManagedProcess):
    """A gunicorn master with realtime's worker, configured by REALTIME_* variables only."""

    def __init__(self, log_dir: Path, node_id: str, **settings: str) -> None:
        self.node_id = node_id
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "REALTIME_PORT": str(self.port), "REALTIME_NODE_ID": node_id,
               "REALTIME_DRAIN_TIMEOUT": "2",
               **{f"REALTIME_{name.upper()}": value for name, value in settings.items()}}
        super().__init__(f"gunicorn {node_id}", GUNICORN_ARGV, log_dir / f"{node_id}.log", env)

    def wait_ready(self, timeout: float = 20.0) -> GunicornNode:
        def ready() -> bool:
            assert self.alive(), f"gunicorn exited:\n{self.log()}"
            try:
                return requests.get(self.url + "/readyz", timeout=1).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(ready, timeout, interval=0.05, message="the gunicorn node to be ready")
        return self


def start_nginx(tmp_path: Path, node: GunicornNode) -> tuple[ManagedProcess, int]:
    """nginx with the shipped config rendered for ``node``: (process, its port)."""
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(render_nginx_config({node.node_id: f"127.0.0.1:{node.port}"},
                                        f"127.0.0.1:{port}", tmp_path))
    process = ManagedProcess("nginx", nginx_command(find_executable("nginx"), tmp_path, conf),
                             tmp_path / "nginx.log")

    def ready() -> bool:
        assert process.alive(), process.log()
        try:
            return requests.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    wait_until(ready, 10, interval=0.05, message="nginx to be ready")
    return process, port


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[GunicornNode, int]]:
    """A gunicorn node ``g1`` and nginx in front of it: (node, nginx's port)."""
    tmp_path = tmp_path_factory.mktemp("gunicorn")
    node = GunicornNode(tmp_path, "g1").wait_ready()
    nginx, port = start_nginx(tmp_path, node)
    yield node, port
    nginx.stop()
    assert node.stop() == 0, node.log()


def subscribe_raw(ws: RawWebSocket, channel: str) -> None:
    ws.send_text(f'420["subscribe",{{"channel":"{channel}"}}]')
    answer = ws.wait_for_text(lambda text: text.startswith("430"))
    assert json.loads(answer[3:])[0]["ok"], answer


def raw_message(ws: RawWebSocket, channel: str) -> dict:
    text = ws.wait_for_text(lambda text: text.startswith('42["message"'), timeout=10)
    _, message = json.loads(text[2:])
    assert message["channel"] == channel, message
    return message


def test_gunicorn_node_delivers_to_raw_and_socketio_clients_directly_and_through_nginx(
        served, clients, channel):
    node, nginx_port = served
    nginx_url = f"http://127.0.0.1:{nginx_port}"
    raw = {"raw direct": websocket_session(node.port, auth={"user": "raw1"}),
           "raw through nginx": websocket_session(nginx_port, auth={"user": "raw2"})}
    for ws in raw.values():
        subscribe_raw(ws, channel)
    socketio = {"socketio direct": connect_client(node.url, "websocket", "sio1"),
                # the official client's start: long-polling, then the upgrade, both via nginx
                "socketio through nginx": connect_client(nginx_url, "upgrade", "sio2")}
    clients.extend(socketio.values())
    for client in socketio.values():
        assert client.call("subscribe", {"channel": channel}, timeout=5)["ok"]
        # the session is the gunicorn node's: its id starts with the node id
        assert client.get_sid("/") and client.eio.sid.startswith("g1."), client.eio.sid

    published = requests.post(f"{nginx_url}/api/publish", timeout=5,
                              json={"channel": channel, "data": {"text": "hello"}})
    assert published.status_code == 200, published.text

    for name, ws in raw.items():
        assert raw_message(ws, channel)["data"] == {"text": "hello"}, name
        ws.close()
    for name, client in socketio.items():
        assert client.wait_messages(channel, 1)[0]["data"] == {"text": "hello"}, name


def test_gunicorn_node_is_served_by_realtimes_own_server(served):
    """Not gunicorn's or gevent's plain handler (an empty 400): an unreadable request gets
    realtime's JSON error."""
    node, _ = served
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        head, _, body = sock.recv(4096).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert json.loads(body)["error"]["code"] == "bad_request"


def test_sigterm_to_the_gunicorn_master_drains_the_node_and_exits_0(tmp_path, clients):
    node = GunicornNode(tmp_path, "g2", drain_timeout="3").wait_ready()
    try:
        raw = [websocket_session(node.port, auth={"user": f"raw{i}"}) for i in range(4)]
        polling = connect_client(node.url, "polling", "poller")
        clients.append(polling)
        kept_alive = requests.Session()
        assert kept_alive.get(f"{node.url}/readyz", timeout=5).status_code == 200
        # a long poll waiting in the node when the drain starts
        base = f"{node.url}/socket.io/?EIO=4&transport=polling"
        poller = requests.Session()
        sid = poller.get(base, timeout=5).text.split('"sid":"')[1].split('"')[0]
        poller.post(f"{base}&sid={sid}", data="40", timeout=5)
        assert poller.get(f"{base}&sid={sid}", timeout=5).text.startswith("40")
        in_flight = ThreadPoolExecutor(1)
        long_poll = in_flight.submit(poller.get, f"{base}&sid={sid}", timeout=30)

        node.signal(signal.SIGTERM)  # to the master, as an orchestrator stops it
        answers = []
        wait_until(lambda: answers.append(kept_alive.get(f"{node.url}/readyz", timeout=5))
                   or answers[-1].status_code == 503, timeout=2, message="readyz 503")
        assert answers[-1].headers["Connection"] == "close"
        with pytest.raises(requests.ConnectionError):  # the listener is closed
            requests.get(f"{node.url}/readyz", timeout=2)
        started = time.monotonic()
        for ws in raw:
            assert ws.read_until_closed(timeout=10), "a client was not closed by the drain"
            # a transport close (going away), never a Socket.IO DISCONNECT: clients reconnect
            assert ws.close_code == 1001
            assert "41" not in [frame.text for frame in ws.frames if frame.opcode != OP_CLOSE]
        assert time.monotonic() - started < 5
        wait_until(lambda: not polling.connected, message="the polling client to be closed")
        # the request in flight is answered, with the Engine.IO close packet, not cut
        answer = long_poll.result(timeout=15)
        in_flight.shutdown()
        assert answer.status_code == 200 and "1" in answer.text.split("\x1e"), answer.text
        assert node.process.wait(15) == 0, node.log()
        log = node.log()
        assert "drained 6 sessions" in log, log
        assert "Shutting down: Master" in log
    finally:
        node.stop()


@pytest.mark.parametrize(("flags", "reason"), [
    (("--graceful-timeout", "2"),
     "graceful_timeout (2 s) must be longer than the node's drain_timeout (5 s)"),
    (("--workers", "2"), "workers must be 1, not 2"),
])
def test_gunicorn_refuses_to_boot_what_is_not_one_node_that_can_drain(tmp_path, flags, reason):
    argv = [*GUNICORN_ARGV[:-1], *flags, GUNICORN_ARGV[-1]]
    env = {**os.environ, "REALTIME_PORT": str(free_port()), "REALTIME_DRAIN_TIMEOUT": "5"}
    refused = ManagedProcess("gunicorn", argv, tmp_path / "refused.log", env)
    try:
        # A failed boot stops the master, rather than a worker restarted forever: with exit
        # status 3, or 1 when two workers fail at once (gunicorn's halt meets the second
        # failure while it stops, and ends on that exception).
        assert refused.process.wait(20) in (1, 3), refused.log()
        assert reason in refused.log()
    finally:
        refused.stop()
