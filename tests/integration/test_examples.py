"""The worked examples of examples/, each run as a user would run it, against a real node.

One node on a throw-away Redis serves the whole module, configured as the examples' READMEs
say: an API key for the Flask app's publishes, the Flask app as its connect proxy (the
browser's Cookie forwarded), and the webhook receiver as its webhook URL. The Flask app, the
Celery worker and the webhook receiver are real processes started from their own folders.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import socketio
from celery import Celery

from realtime_dev.processes import (
    ManagedProcess,
    NodeProcess,
    RedisProcess,
    free_port,
    http_ok,
    node_environment,
    wait_for,
)
from tests.helpers import REPO, wait_until
from tests.integration.clients import RecordingClient

EXAMPLES = REPO / "examples"
API_KEY = "examples-" + uuid.uuid4().hex
APP_SECRET = "app-" + uuid.uuid4().hex
WEBHOOK_SECRET = "hooks-" + uuid.uuid4().hex
# The Flask app's accounts: every test logs in as a user of its own.
USERS = {name: "pw-" + name
         for name in ("alice", "bob", "carol", "dave", "erin", "frank", "henry")}
# The node's --offline-grace: short, so that the test of user_offline does not wait long.
OFFLINE_GRACE = 0.5


@dataclass
class Examples:
    node: NodeProcess
    app_url: str
    receiver_url: str
    celery: Celery


def _example_process(log_dir: Path, name: str, folder: str, argv: list[str],
                     env: dict[str, str]) -> ManagedProcess:
    """``argv`` run from ``examples/<folder>`` with ``env``, able to import this realtime."""
    environ = node_environment()
    environ.update(env)
    return ManagedProcess(name, argv, log_dir / f"{name}.log", env=environ,
                          cwd=EXAMPLES / folder)


def _wait_http(process: ManagedProcess, url: str) -> None:
    def ready() -> bool:
        assert process.alive(), process.log()
        return http_ok(url)

    wait_for(ready, 20, f"{process.name} to answer {url}")


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> Iterator[Examples]:
    logs = tmp_path_factory.mktemp("examples")
    redis = RedisProcess(logs).wait_ready()
    started: list[ManagedProcess] = [redis]
    try:
        node_port = free_port()
        node_url = f"http://127.0.0.1:{node_port}"
        app_port, receiver_port = free_port(), free_port()
        app_url = f"http://127.0.0.1:{app_port}"
        receiver_url = f"http://127.0.0.1:{receiver_port}"
        celery_broker = f"redis://127.0.0.1:{redis.port}/1"

        app = _example_process(
            logs, "flask-app", "flask_app",
            [sys.executable, "-m", "flask", "--app", "app", "run", "--port", str(app_port)],
            {"REALTIME_URL": node_url, "REALTIME_API_KEY": API_KEY,
             "APP_SECRET_KEY": APP_SECRET,
             "APP_USERS": ",".join(f"{user}:{password}" for user, password in USERS.items())})
        started.append(app)
        receiver = _example_process(
            logs, "webhook-receiver", "webhook_receiver",
            [sys.executable, "-m", "flask", "--app", "receiver", "run", "--port",
             str(receiver_port)],
            {"WEBHOOK_SECRET": WEBHOOK_SECRET, "WEBHOOK_DB": str(logs / "webhooks.sqlite3")})
        started.append(receiver)
        worker = _example_process(
            logs, "celery-worker", "celery_worker",
            [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool", "solo",
             "--loglevel", "info", "--without-gossip", "--without-mingle",
             "--without-heartbeat"],
            {"CELERY_BROKER_URL": celery_broker, "CELERY_RESULT_BACKEND": celery_broker,
             "REALTIME_REDIS_URL": redis.url})
        started.append(worker)
        node = NodeProcess(logs, "examples", "--broker", redis.url, "--api-key", API_KEY,
                           "--proxy-connect-url", app_url + "/realtime/connect",
                           "--proxy-headers", "Cookie",
                           "--webhook-url", receiver_url + "/realtime/webhooks",
                           "--offline-grace", str(OFFLINE_GRACE), port=node_port,
                           env={"REALTIME_WEBHOOK_SECRET": WEBHOOK_SECRET})
        started.append(node)

        node.wait_ready()
        _wait_http(app, app_url + "/me")
        _wait_http(receiver, receiver_url + "/events")
        wait_for(lambda: (worker.alive() or pytest.fail(worker.log()))
                 and " ready." in worker.log(), 30, "the Celery worker to be ready")
        celery = Celery(broker=celery_broker, backend=celery_broker)
        yield Examples(node, app_url, receiver_url, celery)
        celery.close()
    finally:
        for process in reversed(started):
            process.stop()


def _login(examples: Examples, user: str) -> requests.Session:
    """A browser of the Flask app, logged in as ``user`` (its session cookie in the jar)."""
    browser = requests.Session()
    browser.trust_env = False
    answer = browser.post(examples.app_url + "/login",
                          json={"user": user, "password": USERS[user]}, timeout=10)
    assert answer.status_code == 200, answer.text
    return browser


def _connect(examples: Examples, browser: requests.Session) -> RecordingClient:
    """A Socket.IO client sending the browser's cookies to the node, as a browser does.

    It says nothing of who it is (no ``auth``): the node asks the Flask app.
    """
    client = RecordingClient()
    cookie = "; ".join(f"{name}={value}" for name, value in browser.cookies.items())
    client.connect(examples.node.url, transports=["websocket"], headers={"Cookie": cookie},
                   wait_timeout=10)
    return client


def _subscribe(client: RecordingClient, channel: str) -> dict:
    return client.call("subscribe", {"channel": channel}, timeout=10)


@pytest.fixture
def connected(examples):
    """Connects users (logged in to the Flask app first) and disconnects them afterwards."""
    made: list[RecordingClient] = []

    def connect(user: str) -> tuple[requests.Session, RecordingClient]:
        browser = _login(examples, user)
        client = _connect(examples, browser)
        made.append(client)
        return browser, client

    yield connect
    for client in made:
        client.disconnect()


def test_flask_app_publishes_a_notification_through_the_http_api_with_its_api_key(
        examples, connected):
    alice, _ = connected("alice")
    _, bob = connected("bob")
    assert _subscribe(bob, "user:bob")["ok"]

    answer = alice.post(examples.app_url + "/notify", json={"to": "bob", "text": "hi"},
                        timeout=10)

    assert answer.status_code == 200, answer.text
    (message,) = bob.wait_messages("user:bob", 1)
    assert message["data"] == {"from": "alice", "text": "hi"}
    assert message["user"] is None  # published by the server, not by a client
    assert message["offset"] == answer.json()["offset"]


def test_flask_app_without_the_api_key_is_refused_by_the_node(examples):
    # What the example's API key buys: the node refuses the same publish without it.
    answer = requests.post(examples.node.url + "/api/publish",
                           json={"channel": "user:bob", "data": {}}, timeout=10)
    assert answer.status_code == 401


def test_flask_app_session_cookie_decides_who_connects_through_the_connect_proxy(
        examples, connected):
    _, frank = connected("frank")

    # The node took the user from the app's answer: frank's personal channel is his, and
    # another user's is not (namespace `user` is `owner`: only user <id> subscribes).
    assert _subscribe(frank, "user:frank")["ok"]
    refused = _subscribe(frank, "user:alice")
    assert refused["ok"] is False and refused["error"]["code"] == "forbidden"


@pytest.mark.parametrize("cookie", [None, "session=forged.cookie.value"])
def test_flask_app_refuses_connections_without_a_valid_session_cookie(examples, cookie):
    client = RecordingClient()
    errors = []
    client.on("connect_error", lambda data: errors.append(data))
    with pytest.raises(socketio.exceptions.ConnectionError):
        client.connect(examples.node.url, transports=["websocket"], wait_timeout=10,
                       headers={"Cookie": cookie} if cookie else {},
                       auth={"user": "alice"})  # claims are worth nothing: the app decides
    assert [error["message"] for error in errors] == ["unauthorized"]


def test_celery_task_notifies_a_user_through_the_emitter(examples, connected):
    _, carol = connected("carol")
    assert _subscribe(carol, "user:carol")["ok"]

    result = examples.celery.send_task("tasks.notify_user", ["carol", {"title": "shipped"}])

    position = result.get(timeout=20)
    (message,) = carol.wait_messages("user:carol", 1, timeout=20)
    assert message["data"] == {"title": "shipped"}
    assert position["offset"] == message["offset"]


def test_celery_batch_task_notifies_every_user_of_the_batch(examples, connected):
    _, dave = connected("dave")
    _, erin = connected("erin")
    for client, user in ((dave, "dave"), (erin, "erin")):
        assert _subscribe(client, f"user:{user}")["ok"]

    result = examples.celery.send_task("tasks.notify_users", [[
        {"user": "dave", "data": {"title": "maintenance"}},
        {"user": "not a user id", "data": {"title": "lost"}},  # refused alone
        {"user": "erin", "data": {"title": "invoice", "amount": 12}},
    ]])

    replies = result.get(timeout=20)
    assert [reply["channel"] for reply in replies] == ["user:dave", "user:not a user id",
                                                       "user:erin"]
    assert replies[1]["error"]["code"] == "bad_request"
    (to_dave,) = dave.wait_messages("user:dave", 1, timeout=20)
    (to_erin,) = erin.wait_messages("user:erin", 1, timeout=20)
    assert (to_dave["data"], to_erin["data"]) == ({"title": "maintenance"},
                                                  {"title": "invoice", "amount": 12})
    assert (to_dave["offset"], to_erin["offset"]) == (replies[0]["offset"], replies[2]["offset"])


def _signed_post(examples: Examples, batch: dict,
                 secret: str = WEBHOOK_SECRET) -> requests.Response:
    body = json.dumps(batch).encode()
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return requests.post(examples.receiver_url + "/realtime/webhooks", data=body, timeout=10,
                         headers={"Content-Type": "application/json",
                                  "X-Realtime-Signature": digest})


def test_webhook_receiver_refuses_a_batch_signed_with_another_secret(examples):
    user = "mallory-" + uuid.uuid4().hex[:8]
    batch = {"time_ms": int(time.time() * 1000),
             "events": [{"id": uuid.uuid4().hex, "name": "user_offline", "user": user}]}

    assert _signed_post(examples, batch, secret="not-the-secret").status_code == 401
    unsigned = requests.post(examples.receiver_url + "/realtime/webhooks", json=batch, timeout=10)
    assert unsigned.status_code == 401
    assert requests.get(f"{examples.receiver_url}/users/{user}", timeout=10).status_code == 404


def test_webhook_receiver_acts_once_on_an_event_delivered_twice(examples):
    user = "gina-" + uuid.uuid4().hex[:8]
    batch = {"time_ms": int(time.time() * 1000),
             "events": [{"id": uuid.uuid4().hex, "name": "user_offline", "user": user}]}

    first, again = _signed_post(examples, batch), _signed_post(examples, batch)

    assert (first.json()["new"], again.json()["new"]) == (1, 0)
    events = requests.get(examples.receiver_url + "/events", params={"user": user},
                          timeout=10).json()["events"]
    assert [(event["name"], event["deliveries"]) for event in events] == [("user_offline", 2)]
    status = requests.get(f"{examples.receiver_url}/users/{user}", timeout=10).json()
    assert status["online"] is False and status["last_offline_ms"] == batch["time_ms"]


def _user_status(examples: Examples, user: str) -> dict:
    return requests.get(f"{examples.receiver_url}/users/{user}", timeout=10).json()


def test_webhook_receiver_records_user_offline_once_the_users_last_connection_closes(examples):
    browser = _login(examples, "henry")
    tabs = [_connect(examples, browser), _connect(examples, browser)]
    try:
        wait_until(lambda: _user_status(examples, "henry")["online"], timeout=15,
                   message="user_online of henry at the receiver")
        for tab in tabs:
            tab.disconnect()

        status = wait_until(lambda: (found := _user_status(examples, "henry"))["online"] is False
                            and found, timeout=15 + OFFLINE_GRACE,
                            message="user_offline of henry at the receiver")
    finally:
        for tab in tabs:
            tab.disconnect()

    assert status["last_offline_ms"] is not None
    events = requests.get(examples.receiver_url + "/events", params={"user": "henry"},
                          timeout=10).json()["events"]
    # Two tabs, one user: one online and one offline, whatever the order the tabs closed in.
    assert [event["name"] for event in events] == ["user_online", "user_offline"]
