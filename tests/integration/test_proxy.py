"""The backend proxy on a real node, with a real backend: a small HTTP server in the test.

The backend decides by what it is sent: the connect's ``auth.mode`` or the session cookie,
the word in a channel's name (``slow``, ``garbage``, ``500``, ``deny``, ``rewrite``). A
backend that is down is a namespace whose URLs name a closed port (and, for connect, a second
node whose connect URL does).
"""

from __future__ import annotations

import http.server
import json
import threading
import time
import uuid

import pytest
import socketio

from realtime_dev.processes import NodeProcess, free_port
from tests.helpers import wait_until
from tests.integration.clients import RecordingClient

TIMEOUT = 1.0  # the node's --proxy-timeout: each slow case costs this much


class Backend:
    """The app behind realtime: answers connect, subscribe and publish, records each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.release = threading.Event()  # set at teardown: slow answers end
        backend = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                backend.calls.append((self.path, body))
                status, answer = backend.decide(self.path, body)
                raw = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except OSError:
                    pass  # the node gave up on a slow answer and closed the connection

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def decide(self, path: str, body: dict) -> tuple[int, object]:
        if path == "/connect":
            auth = body["auth"] or {}
            cookie = body["headers"].get("cookie", "")
            word = auth.get("mode", "ok")
        else:
            word = next((w for w in ("slow", "garbage", "500", "deny", "rewrite")
                         if w in body["channel"]), "ok")
        if word == "slow":
            self.release.wait(3 * TIMEOUT)
            return 200, {"allow": True, "user": "late"}
        if word == "garbage":
            return 200, b"<html>please log in</html>"
        if word == "500":
            return 500, b"Internal Server Error"
        if word == "deny":
            code = "unauthorized" if path == "/connect" else "forbidden"
            return 200, {"error": {"code": code, "message": f"no {path[1:]} for you"}}
        if path == "/connect":
            user = cookie.removeprefix("session=") if cookie.startswith("session=") else "guest"
            return 200, {"user": user, "info": {"via": "backend"}}
        if word == "rewrite" and path == "/publish":
            return 200, {"data": {"text": body["data"]["text"].upper(), "by": body["user"]}}
        return 200, {"allow": True}

    def bodies(self, path: str) -> list[dict]:
        return [body for where, body in list(self.calls) if where == path]

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def backend():
    server = Backend()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def closed_url():
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


@pytest.fixture(scope="module")
def proxied_node(tmp_path_factory, backend, closed_url):
    workdir = tmp_path_factory.mktemp("proxy")
    config = workdir / "realtime.toml"
    config.write_text(f'[namespaces.down]\nproxy_subscribe_url = "{closed_url}/subscribe"\n'
                      f'proxy_publish_url = "{closed_url}/publish"\n')
    node = NodeProcess(workdir, "proxied", "--config", str(config),
                       "--proxy-connect-url", backend.url + "/connect",
                       "--proxy-subscribe-url", backend.url + "/subscribe",
                       "--proxy-publish-url", backend.url + "/publish",
                       "--proxy-headers", "Cookie", "--proxy-timeout", str(TIMEOUT)).wait_ready()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def node_with_its_backend_down(tmp_path_factory, closed_url):
    workdir = tmp_path_factory.mktemp("proxy-down")
    node = NodeProcess(workdir, "proxy-down", "--proxy-connect-url", closed_url + "/connect",
                       "--proxy-timeout", str(TIMEOUT)).wait_ready()
    yield node
    node.stop()


@pytest.fixture
def made():
    clients: list[RecordingClient] = []
    yield clients
    for client in clients:
        client.disconnect()


def connect(node, made, auth=None, cookie=None, transport="websocket") -> RecordingClient:
    client = RecordingClient()
    client.connect(node.url, auth=auth, transports=[transport], wait_timeout=10,
                   headers={"Cookie": cookie} if cookie else {})
    made.append(client)
    return client


def refused_connect(node, auth) -> dict:
    """The connect_error of a connect that must be refused."""
    client = RecordingClient()
    errors: list[dict] = []
    client.on("connect_error", errors.append)
    with pytest.raises(socketio.exceptions.ConnectionError):
        client.connect(node.url, auth=auth, transports=["websocket"], wait_timeout=10)
    return errors[0]


def unique(word: str = "") -> str:
    return f"room-{word}-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_the_session_cookie_decides_who_connects_and_is_forwarded_on_subscribe(
        proxied_node, backend, made, transport):
    client = connect(proxied_node, made, auth={"app": "web"}, cookie="session=alice",
                     transport=transport)
    channel = "chat:" + unique()
    assert client.call("subscribe", {"channel": channel}, timeout=10)["ok"]
    members = client.call("presence", {"channel": channel}, timeout=10)["members"]
    assert members == [{"user": "alice", "connections": 1, "info": {"via": "backend"}}]
    (subscribe,) = [b for b in backend.bodies("/subscribe") if b["channel"] == channel]
    assert subscribe["user"] == "alice" and subscribe["headers"] == {"cookie": "session=alice"}
    assert subscribe["peer"] == "127.0.0.1"
    connects = [b for b in backend.bodies("/connect") if b["client"] == subscribe["client"]]
    assert connects[0]["transport"] == transport and connects[0]["auth"] == {"app": "web"}


def test_a_refusing_connect_backend_gives_connect_error_with_its_code(proxied_node):
    assert refused_connect(proxied_node, {"mode": "deny"}) == {
        "message": "unauthorized", "data": {"reason": "no connect for you"}}


@pytest.mark.parametrize("mode", ["slow", "garbage", "500"])
def test_a_failing_connect_backend_gives_connect_error_unavailable(proxied_node, mode):
    started = time.monotonic()
    assert refused_connect(proxied_node, {"mode": mode})["message"] == "unavailable"
    assert time.monotonic() - started < TIMEOUT + 2  # the timeout, not the backend's 3 s


def test_a_connect_backend_that_is_down_gives_connect_error_unavailable(
        node_with_its_backend_down):
    error = refused_connect(node_with_its_backend_down, {"user": "alice"})
    assert error == {"message": "unavailable",
                     "data": {"reason": "the connect backend is unavailable"}}
    assert "Traceback" not in node_with_its_backend_down.log()


@pytest.mark.parametrize("word", ["slow", "garbage", "500", "down"])
def test_a_failing_backend_answers_subscribe_and_publish_unavailable(proxied_node, made, word):
    client = connect(proxied_node, made, cookie="session=bob")
    channel = f"down:{unique()}" if word == "down" else unique(word)
    for event, payload in (("subscribe", {"channel": channel}),
                           ("publish", {"channel": channel, "data": {"text": "hi"}})):
        ack = client.call(event, payload, timeout=10)
        assert ack["ok"] is False and ack["error"]["code"] == "unavailable", (event, ack)
    # the session lives on: a channel whose backend answers still works
    assert client.call("subscribe", {"channel": unique()}, timeout=10)["ok"]
    assert "Traceback" not in proxied_node.log()


def test_a_refusing_backend_answers_subscribe_and_publish_with_its_code(proxied_node, made):
    client = connect(proxied_node, made, cookie="session=bob")
    channel = unique("deny")
    assert client.call("subscribe", {"channel": channel}, timeout=10) == {
        "ok": False, "error": {"code": "forbidden", "message": "no subscribe for you"}}
    assert client.call("publish", {"channel": channel, "data": 1}, timeout=10) == {
        "ok": False, "error": {"code": "forbidden", "message": "no publish for you"}}


def test_the_publish_backend_rewrites_what_subscribers_receive(proxied_node, backend, made):
    alice = connect(proxied_node, made, cookie="session=alice")
    bob = connect(proxied_node, made, cookie="session=bob")
    channel = unique("rewrite")
    assert alice.call("subscribe", {"channel": channel}, timeout=10)["ok"]
    assert bob.call("publish", {"channel": channel, "data": {"text": "hi"}}, timeout=10)["ok"]
    (message,) = alice.wait_messages(channel, 1)
    assert message["data"] == {"text": "HI", "by": "bob"} and message["user"] == "bob"
    (publish,) = [b for b in backend.bodies("/publish") if b["channel"] == channel]
    assert publish["data"] == {"text": "hi"} and publish["headers"] == {
        "cookie": "session=bob"}


def test_while_one_clients_backend_call_hangs_another_client_is_served_at_once(
        proxied_node, backend, made):
    waiting = connect(proxied_node, made, cookie="session=carol")
    other = connect(proxied_node, made, cookie="session=dave")
    quiet = unique()
    assert other.call("subscribe", {"channel": quiet}, timeout=10)["ok"]
    slow = unique("slow")
    waiting.emit_recorded("subscribe", {"channel": slow})
    wait_until(lambda: any(b["channel"] == slow for b in backend.bodies("/subscribe")),
               message="the hanging subscribe at the backend")
    started = time.monotonic()
    assert other.call("publish", {"channel": quiet, "data": "now"}, timeout=10)["ok"]
    other.wait_messages(quiet, 1)
    assert time.monotonic() - started < TIMEOUT / 2
    assert waiting.events("ack:subscribe") == []  # still waiting on its backend
    (ack,) = wait_until(lambda: waiting.events("ack:subscribe"), timeout=TIMEOUT + 5)
    assert ack["error"]["code"] == "unavailable"
