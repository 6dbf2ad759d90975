"""The official socket.io-client 4.x (Node build of what the pages bundle) against a real node.

Every way a browser can come in: a WebSocket straight away, long-polling only, and the default
start (long-polling, then the upgrade), each with the default parser and with the official
``socket.io-msgpack-parser``. The client must not notice which one it got: same acks, same
events, in order; and nothing the server sends may make its parser throw (that would end the
session with reason ``parse error``), including null data, error acks, a refused namespace and
a deliberate disconnect by the server.
"""

from __future__ import annotations

import pytest

from tests.integration.clients import run_official_client

PUBLISHES = 40
WAYS = ["websocket", "polling", "default",
        "msgpack-websocket", "msgpack-polling", "msgpack-default"]


@pytest.mark.parametrize("way", WAYS)
def test_the_official_client_speaks_the_protocol(single_node, channel, way):
    channel = "chat:" + channel  # a namespace with join and leave events
    summary = run_official_client(single_node.url, way, channel, PUBLISHES)
    user = summary["user"]
    assert summary["transport"] == ("polling" if way.endswith("polling") else "websocket")
    assert summary["subscribed"]["ok"] is True and summary["subscribed"]["channel"] == channel
    assert summary["joins"] == [{"channel": channel, "user": user}]
    assert [ack["offset"] for ack in summary["acks"]] == list(range(1, PUBLISHES + 1))
    assert all(ack["ok"] and ack["epoch"] for ack in summary["acks"])
    assert summary["nullAck"]["ok"] is True
    assert [(m["offset"], m["data"], m["user"]) for m in summary["messages"]] == [
        (i + 1, {"i": i}, user) for i in range(PUBLISHES)] + [(PUBLISHES + 1, None, user)]
    assert [p["offset"] for p in summary["history"]["publications"]] == [
        PUBLISHES - 1, PUBLISHES, PUBLISHES + 1]
    assert summary["presence"]["members"] == [{"user": user, "connections": 1}]
    assert summary["unknown"]["ok"] is False
    assert summary["unknown"]["error"]["code"] == "bad_request"
    assert summary["forbidden"]["error"]["code"] == "forbidden"
    assert summary["namespace"] == "Invalid namespace"
    assert summary["disconnected"] == {"disconnected": 1}
    assert summary["reason"] == "io server disconnect"
