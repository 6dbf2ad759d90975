"""What only shows across transports, against real node processes.

- An upgrade from long-polling to WebSocket in the middle of a fan-out loses, duplicates and
  reorders nothing (the official client, default options, both parsers).
- A client that stops reading is cut at ``--max-outbound-buffer`` on every transport
  (WebSocket first, upgraded, long-polling only), and the node's memory stays bounded however
  much is published to it.
"""

from __future__ import annotations

import json
import socket
import subprocess

import pytest
import requests
import websocket

from realtime_dev.processes import NodeProcess
from tests.helpers import wait_until
from tests.integration.clients import JS_DIR

SUBSCRIBERS = 12


@pytest.mark.parametrize("parser", ["json", "msgpack"])
def test_an_upgrade_in_the_middle_of_a_fanout_loses_duplicates_and_reorders_nothing(
        single_node, channel, parser):
    done = subprocess.run(
        ["node", str(JS_DIR / "upgrade_during_fanout.js"), single_node.url, channel,
         str(SUBSCRIBERS), parser], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(summary["subscribers"]) == SUBSCRIBERS
    for subscriber in summary["subscribers"]:
        ack, received = subscriber["ack"], subscriber["received"]
        assert ack["ok"] and subscriber["transportAtSubscribe"] == "polling"
        offsets = [offset for offset, _ in received]
        # every publication after the subscribe ack, once, in order, across the switch
        assert offsets == list(range(ack["offset"] + 1, ack["offset"] + 1 + len(offsets)))
        assert offsets[-1] >= summary["last"]
        transports = [transport for _, transport in received]
        switch = transports.index("websocket")
        assert switch > 0, "the upgrade did not happen during the stream"
        assert set(transports[:switch]) == {"polling"} and set(transports[switch:]) == {
            "websocket"}


# -- slow clients ------------------------------------------------------------------------------

MESSAGE = "x" * 60_000
PUBLISHED_MB = 60
OUTBOUND_LIMIT = 1024 * 1024


def event(ack_id: int, name: str, payload: dict) -> str:
    """A Socket.IO EVENT packet with an ack id, as an Engine.IO message."""
    return f"42{ack_id}" + json.dumps([name, payload])


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def polling_session(url: str, user: str, channel: str) -> tuple[requests.Session, str]:
    """A long-polling session that connected and subscribed; (http session, its query)."""
    http = requests.Session()
    opened = http.get(f"{url}/socket.io/?EIO=4&transport=polling", timeout=10).text
    query = f"EIO=4&transport=polling&sid={json.loads(opened[1:])['sid']}"
    http.post(f"{url}/socket.io/?{query}", data="40" + json.dumps({"user": user}), timeout=10)
    assert http.get(f"{url}/socket.io/?{query}", timeout=10).text.startswith("40{")
    http.post(f"{url}/socket.io/?{query}", data=event(1, "subscribe", {"channel": channel}),
              timeout=10)
    wait_until(lambda: "431[" in http.get(f"{url}/socket.io/?{query}", timeout=10).text,
               message="the subscribe ack")
    return http, query


def stalled_websocket(url: str, query: str) -> websocket.WebSocket:
    """A WebSocket with a small receive buffer, to stop reading from."""
    return websocket.create_connection(
        url.replace("http", "ws") + f"/socket.io/?{query}", timeout=10,
        sockopt=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])


def slow_websocket_first(url: str, user: str, channel: str) -> object:
    ws = stalled_websocket(url, "EIO=4&transport=websocket")
    assert ws.recv().startswith("0{")
    ws.send("40" + json.dumps({"user": user}))
    assert ws.recv().startswith("40{")
    ws.send(event(1, "subscribe", {"channel": channel}))
    assert ws.recv().startswith("431[")
    return ws


def slow_upgraded(url: str, user: str, channel: str) -> object:
    http, query = polling_session(url, user, channel)
    ws = stalled_websocket(url, query.replace("polling", "websocket"))
    ws.send("2probe")
    assert ws.recv() == "3probe"
    ws.send("5")
    ws.send(event(2, "history", {"channel": channel, "limit": 0}))
    while not ws.recv().startswith("432["):
        pass
    return ws, http


def slow_polling(url: str, user: str, channel: str) -> object:
    return polling_session(url, user, channel)  # and never polls again


@pytest.fixture(scope="module")
def roomy_node(tmp_path_factory):
    """A node of its own: its memory is measured."""
    node = NodeProcess(tmp_path_factory.mktemp("slow"), "slow",
                       "--max-outbound-buffer", str(OUTBOUND_LIMIT)).wait_ready()
    yield node
    node.stop()


@pytest.mark.parametrize("way,connect", [
    ("websocket", slow_websocket_first),
    ("upgrade", slow_upgraded),
    ("polling", slow_polling),
])
def test_a_client_that_stops_reading_is_cut_at_the_limit_and_memory_stays_bounded(
        roomy_node, channel, way, connect):
    user = f"stalled-{way}"
    reader = connect(roomy_node.url, user, channel)
    publisher = requests.Session()
    before = rss_mb(roomy_node.pid)
    for _ in range(PUBLISHED_MB * 1024 * 1024 // len(MESSAGE)):
        response = publisher.post(f"{roomy_node.url}/api/publish",
                                  json={"channel": channel, "data": MESSAGE}, timeout=10)
        assert response.status_code == 200
    grown = rss_mb(roomy_node.pid) - before
    wait_until(lambda: f"user='{user}'" in roomy_node.log()
               and f"user='{user}' {way if way != 'upgrade' else 'websocket'}>: slow"
               in roomy_node.log(), message="the slow client to be cut")
    # Holding all of it would take PUBLISHED_MB; the limit, kernel buffers and the
    # allocator's slack take a few.
    assert grown < PUBLISHED_MB / 4, f"node RSS grew by {grown:.1f} MB"
    assert requests.get(f"{roomy_node.url}/api/presence/{channel}", timeout=5).json() == {
        "members": []}
    del reader
