"""The official socket.io-client 4.x (Node build of what the pages bundle) against a real node.

Over a direct WebSocket (the fast path, :mod:`realtime.websocket`) and over the default start,
long-polling upgraded to WebSocket (python-engineio), the client must not notice which one it
got: same acks, same events, in order.
"""

from __future__ import annotations

import pytest

from tests.integration.clients import run_official_client

PUBLISHES = 40


@pytest.mark.parametrize("mode", ["websocket", "default"])
def test_the_official_client_speaks_the_protocol(single_node, channel, mode):
    summary = run_official_client(single_node.url, mode, channel, PUBLISHES)
    assert summary["transport"] == "websocket"
    assert summary["subscribed"]["ok"] is True and summary["subscribed"]["channel"] == channel
    assert summary["joins"] == [{"channel": channel, "user": "official"}]
    assert [ack["offset"] for ack in summary["acks"]] == list(range(1, PUBLISHES + 1))
    assert all(ack["ok"] and ack["epoch"] for ack in summary["acks"])
    assert [(m["offset"], m["data"]["i"], m["user"]) for m in summary["messages"]] == [
        (i + 1, i, "official") for i in range(PUBLISHES)]
    assert [p["offset"] for p in summary["history"]["publications"]] == [
        PUBLISHES - 2, PUBLISHES - 1, PUBLISHES]
    assert summary["presence"]["members"] == [{"user": "official", "connections": 1}]
    assert summary["unknown"]["ok"] is False
    assert summary["unknown"]["error"]["code"] == "bad_request"
    assert summary["reason"] == "io client disconnect"
