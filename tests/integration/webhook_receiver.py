"""A webhook receiver in the test process: a small HTTP server that checks signatures and
records every event, marking the duplicates (an id seen before)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from realtime.webhooks import SIGNATURE_HEADER, verify


class WebhookReceiver:
    """Records ``(event, duplicate)`` per event received; ``fail_next`` answers the next
    POSTs 500 after recording them (so the sender sends them again), ``unavailable`` answers
    503 without recording; :meth:`stop` and :meth:`start` take it down and bring it back on
    the same port."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.received: list[tuple[dict[str, Any], bool]] = []
        self.arrival: dict[str, float] = {}  # event id -> time.time() of its first arrival
        self.bad_signatures = 0
        self.fail_next = 0
        self.unavailable = False  # answer every POST 503 without reading its events
        self.refused = 0  # POSTs answered 503
        self.port = 0
        self._server: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = receiver.record(body, self.headers.get(SIGNATURE_HEADER, ""))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.allow_reuse_address = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def record(self, body: bytes, signature: str) -> int:
        if self.unavailable:
            self.refused += 1
            return 503
        if not verify(body, signature, self.secret):
            self.bad_signatures += 1
            return 401
        now = time.time()
        with self._lock:
            for event in json.loads(body)["events"]:
                duplicate = event["id"] in self.arrival
                self.arrival.setdefault(event["id"], now)
                self.received.append((event, duplicate))
            if self.fail_next:
                self.fail_next -= 1
                return 500
        return 200

    def events(self, name: str | None = None, *, duplicates: bool = False) -> list[dict]:
        """The events received (of ``name``), without the duplicates unless asked."""
        with self._lock:
            return [event for event, duplicate in self.received
                    if (name is None or event["name"] == name) and (duplicates or not duplicate)]

    def about(self, name: str, who: str) -> list[dict]:
        """The (distinct) events ``name`` about user or channel ``who``."""
        return [e for e in self.events(name) if who in (e.get("user"), e.get("channel"))]
