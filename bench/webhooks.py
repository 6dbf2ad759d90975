"""Webhook load for the ``notify`` scenario: users connecting and leaving, and a receiver in
the bench process counting the events the nodes POST and when they arrive.

The notify deployment of realtime runs with ``--webhook-url`` pointing at :data:`RECEIVER`
(started once per bench process) and ``--offline-grace`` :data:`GRACE`; after the publishing
steps :func:`webhook_load` connects ``min(notify_users, 2000)`` more users (each subscribed
to its ``user:`` channel), waits for their ``user_online``, ``member_added`` and
``channel_occupied``, disconnects them all, and waits for their ``channel_vacated``,
``member_removed`` and (after the grace) ``user_offline``. ``BENCH_WEBHOOKS=0`` leaves webhooks
off (:func:`enabled`).
"""

from __future__ import annotations

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from realtime.webhooks import SIGNATURE_HEADER, verify

SECRET = "bench-webhook-secret"
GRACE = 1.0
MAX_USERS = 2000
WAIT_S = 30.0


class CountingReceiver:
    """Counts the distinct events per name (and the duplicates, and bad signatures), with
    the arrival time of each distinct event."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.arrivals: dict[str, list[float]] = {}  # name -> arrival times
            self.subjects: dict[str, set[str]] = {}  # name -> the users/channels it was about
            self.ids: set[str] = set()
            self.duplicates = 0
            self.bad_signatures = 0
            self.posts = 0

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def start(self) -> CountingReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.record(body, self.headers.get(SIGNATURE_HEADER, ""))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def record(self, body: bytes, signature: str) -> None:
        now = time.monotonic()
        with self._lock:
            self.posts += 1
            if not verify(body, signature, SECRET):
                self.bad_signatures += 1
                return
            for event in json.loads(body)["events"]:
                if event["id"] in self.ids:
                    self.duplicates += 1
                    continue
                self.ids.add(event["id"])
                subject = str(event.get("user") or event.get("channel", "")).removeprefix(
                    "user:")
                if subject.startswith("wh"):
                    self.arrivals.setdefault(event["name"], []).append(now)
                    self.subjects.setdefault(event["name"], set()).add(subject)

    def count(self, name: str) -> int:
        with self._lock:
            return len(self.arrivals.get(name, []))

    def last(self, name: str) -> float:
        with self._lock:
            return max(self.arrivals.get(name, [0.0]))


RECEIVER: CountingReceiver | None = None


def enabled() -> bool:
    """False with ``BENCH_WEBHOOKS=0`` in the environment: notify without webhooks, to
    measure what they cost."""
    return os.environ.get("BENCH_WEBHOOKS", "1") != "0"


def node_args(workdir: Path) -> list[str]:
    """The flags of every node of the notify deployment (starts the receiver once)."""
    global RECEIVER
    if RECEIVER is None:
        RECEIVER = CountingReceiver().start()
    secret_file = workdir / "webhook-secret"
    workdir.mkdir(parents=True, exist_ok=True)
    secret_file.write_text(SECRET)
    return ["--webhook-url", RECEIVER.url, "--webhook-secret-file", str(secret_file),
            "--offline-grace", str(GRACE)]


def _wait(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def webhook_load(bench: Any, deployment: Any) -> dict[str, Any]:
    """Connect users and disconnect them; what the receiver got, and how late."""
    from bench.scenarios import close_group, connect_clients

    receiver = RECEIVER
    assert receiver is not None
    users = min(bench.settings.notify_users, MAX_USERS)
    urls = deployment.node_addresses
    receiver.reset()
    began = time.monotonic()
    connect = connect_clients(bench, "webhooks", urls, users, user="wh{i}",
                              channel="user:wh{i}", desc="notify webhooks: connecting")
    connected = time.monotonic()
    # what the clients that connected (and subscribed) should cause, each once
    expected = {"user_online": connect["connected"], "member_added": connect["subscribed"],
                "channel_occupied": connect["subscribed"], "user_offline": connect["connected"],
                "member_removed": connect["subscribed"], "channel_vacated": connect["subscribed"]}
    arrived = {name: _wait(lambda name=name: receiver.count(name) >= expected[name], WAIT_S)
               for name in ("user_online", "member_added", "channel_occupied")}
    online_done = max(receiver.last(name) for name in arrived)
    close_group(bench, "webhooks")
    closed = time.monotonic()
    arrived |= {name: _wait(lambda name=name: receiver.count(name) >= expected[name],
                            WAIT_S + GRACE)
                for name in ("channel_vacated", "member_removed", "user_offline")}
    offline_done = receiver.last("user_offline")
    everyone = set().union(*receiver.subjects.values()) if receiver.subjects else set()
    missing = {name: sorted(everyone - receiver.subjects.get(name, set()))[:10]
               for name in expected if len(receiver.subjects.get(name, ())) < expected[name]}
    events = sum(receiver.count(name) for name in arrived)
    return {
        "users": users, "nodes": len(urls), "grace_s": GRACE,
        "connected": connect["connected"], "subscribed": connect["subscribed"],
        "connect_errors": connect["errors"],
        "events": {name: receiver.count(name) for name in arrived},
        "all_arrived": all(arrived.values()), "missing": missing,
        "duplicates": receiver.duplicates, "bad_signatures": receiver.bad_signatures,
        "posts": receiver.posts,
        "events_per_post": round(events / max(receiver.posts, 1), 1),
        "connect_s": round(connected - began, 2),
        # how long after the last connect the last of their events arrived
        "online_lag_s": round(max(0.0, online_done - connected), 2),
        # how long after the last disconnect, beyond the grace, the last user_offline arrived
        "offline_lag_beyond_grace_s": round(offline_done - closed - GRACE, 2),
        # the connect half: three events per user, from the first connect to the last arrival
        "online_events_per_s": round(
            sum(expected[name] for name in ("user_online", "member_added", "channel_occupied"))
            / max(online_done - began, 1e-6), 1),
    }
