"""Authentication and channel rules on a real node that requires tokens.

The node gets its secret from the environment (as run.py cluster hands it over) and its
namespaces from a TOML file; clients are python-socketio's and the official JS client.
"""

from __future__ import annotations

import json
import subprocess
import time

import jwt
import pytest
import requests
import socketio

from realtime_dev.processes import NodeProcess
from tests.helpers import wait_until
from tests.integration.clients import JS_DIR, RecordingClient

SECRET = "integration-secret-" + "x" * 20
CONFIG = """
[auth]
jwt_audience = "realtime-tests"

[limits]
events_per_second = 20
events_burst = 20

[namespaces.news]
subscribe = "authenticated"
publish = "server"
"""


def token(sub: str = "alice", ttl: float = 60, **claims) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + ttl), "aud": "realtime-tests",
                       **claims}, SECRET)


@pytest.fixture(scope="module")
def secure_node(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("auth")
    config = workdir / "realtime.toml"
    config.write_text(CONFIG)
    node = NodeProcess(workdir, "secure", "--config", str(config),
                       env={"REALTIME_JWT_SECRET": SECRET}).wait_ready()
    yield node
    node.stop()


def connect(node, auth, transport="websocket") -> RecordingClient:
    client = RecordingClient()
    client.connect(node.url, auth=auth, transports=[transport], wait_timeout=10)
    return client


# Minted when the module is collected, maybe minutes before the test runs: valid for a day, so
# that each is refused for its one flaw and never as expired.
A_DAY = 24 * 3600


@pytest.mark.parametrize("auth,reason", [
    (None, "token required"),
    ({"user": "alice"}, "token required"),
    ({"token": "garbage"}, "malformed token"),
    ({"token": jwt.encode({"sub": "a", "exp": int(time.time()) + A_DAY, "aud": "realtime-tests"},
                          "another-secret-" + "y" * 20)}, "bad token signature"),
    ({"token": jwt.encode({"sub": "a", "exp": int(time.time()) + A_DAY, "aud": "elsewhere"},
                          SECRET)}, "token for another audience"),
])
@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_connections_without_a_valid_token_are_refused_with_the_reason(secure_node, auth,
                                                                       reason, transport):
    client = RecordingClient()
    errors = []
    client.on("connect_error", lambda data: errors.append(data))
    with pytest.raises(socketio.exceptions.ConnectionError):
        client.connect(secure_node.url, auth=auth, transports=[transport], wait_timeout=10)
    assert errors == [{"message": "unauthorized", "data": {"reason": reason}}]


def test_the_user_is_the_tokens_sub_and_presence_shows_its_info(secure_node, channel):
    alice = connect(secure_node, {"token": token("alice", info={"name": "Alice A."})})
    try:
        assert alice.call("subscribe", {"channel": f"chat:{channel}"}, timeout=10)["ok"]
        members = alice.call("presence", {"channel": f"chat:{channel}"}, timeout=10)["members"]
        assert members == [{"user": "alice", "connections": 1, "info": {"name": "Alice A."}}]
    finally:
        alice.disconnect()


def test_private_channels_and_namespaces_follow_the_token_and_the_config(secure_node, channel):
    granted = connect(secure_node, {"token": token("bob", channels=[f"private:{channel}*"])})
    other = connect(secure_node, {"token": token("carol")})
    try:
        assert granted.call("subscribe", {"channel": f"private:{channel}-a"}, timeout=10)["ok"]
        refused = other.call("subscribe", {"channel": f"private:{channel}-a"}, timeout=10)
        assert refused["error"]["code"] == "forbidden"
        # [namespaces.news]: any token holder reads, only the server publishes
        assert other.call("subscribe", {"channel": f"news:{channel}"}, timeout=10)["ok"]
        published = other.call("publish", {"channel": f"news:{channel}", "data": 1}, timeout=10)
        assert published["error"]["code"] == "forbidden"
        response = requests.post(f"{secure_node.url}/api/publish", timeout=5,
                                 json={"channel": f"news:{channel}", "data": "from the server"})
        assert response.status_code == 200
        other.wait_messages(f"news:{channel}", 1)
    finally:
        granted.disconnect()
        other.disconnect()


def test_a_flood_of_events_is_rate_limited_then_cut(secure_node):
    client = connect(secure_node, {"token": token("flooder")})
    answers = []
    for _ in range(25):
        client.emit("history", {"channel": "x"}, callback=lambda answer: answers.append(answer))
    wait_until(lambda: len(answers) == 25, message="25 answers")
    codes = [a["ok"] or a["error"]["code"] for a in answers]
    assert codes[:20] == [True] * 20 and "rate_limited" in codes[20:]
    for _ in range(40):  # another whole burst regardless: the node ends the session
        client.emit("history", {"channel": "x"})
    wait_until(lambda: not client.connected, message="the node to cut the flooder")


@pytest.mark.parametrize("way", ["websocket", "default"])
def test_an_expired_token_makes_the_official_client_reconnect_with_a_fresh_one(secure_node,
                                                                              channel, way):
    tokens = [token("dana", ttl=2), token("dana", ttl=60), token("dana", ttl=3600)]
    done = subprocess.run(["node", str(JS_DIR / "token_client.js"), secure_node.url,
                           f"chat:{channel}", json.dumps(tokens), way],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["first"]["ok"] and summary["second"]["ok"]
    assert len(summary["connects"]) == 2 and summary["asked"] == 2
    # closed by the transport, not a Socket.IO DISCONNECT: the client reconnected by itself
    assert summary["disconnects"][0] == "transport close"
    assert summary["refreshed"]["ok"] is True
    assert summary["refreshed"]["expires_at"] == jwt.decode(
        tokens[2], options={"verify_signature": False})["exp"]
    assert summary["published"]["ok"]
