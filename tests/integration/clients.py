"""Socket.IO clients for integration tests that keep the order in which events arrived."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import engineio
import socketio

from tests.helpers import wait_until


class _InOrderEngineIOClient(engineio.Client):
    # python-engineio's client runs each message handler in a new thread, which loses the
    # order in which messages arrived; tests that check ordering need it kept.
    def _trigger_event(self, event, *args, **kwargs):
        kwargs["run_async"] = False
        return super()._trigger_event(event, *args, **kwargs)


class RecordingClient(socketio.Client):
    """A python-socketio client recording every event, acks included, in arrival order.

    Its handlers run on the reading thread: call ``call``/``emit`` from the test thread only.
    """

    def __init__(self, serializer: str = "default") -> None:
        super().__init__(reconnection=False, serializer=serializer)
        self.received: list[tuple[str, Any]] = []
        self._lock = threading.Lock()
        for name in ("message", "join", "leave", "reset"):
            self.on(name, self._recorder(name))

    def _engineio_client_class(self):
        return _InOrderEngineIOClient

    def _recorder(self, name: str):
        def record(payload: Any) -> None:
            with self._lock:
                self.received.append((name, payload))
        return record

    def emit_recorded(self, event: str, payload: Any) -> None:
        """Emit with an ack that is recorded as ``("ack:<event>", answer)`` in arrival order."""
        self.emit(event, payload, callback=self._recorder("ack:" + event))

    def events(self, name: str) -> list[Any]:
        with self._lock:
            return [payload for event, payload in self.received if event == name]

    def messages(self, channel: str) -> list[dict]:
        return [m for m in self.events("message") if m["channel"] == channel]

    def wait_messages(self, channel: str, count: int, timeout: float = 10.0) -> list[dict]:
        return wait_until(lambda: len(self.messages(channel)) >= count and self.messages(channel),
                          timeout, message=f"{count} messages on {channel}")


# The ways a client can come in: (transports, serializer). "upgrade" is the official client's
# default start: long-polling, then a WebSocket upgrade.
WAYS = {
    "websocket": (["websocket"], "default"),
    "polling": (["polling"], "default"),
    "upgrade": (["polling", "websocket"], "default"),
    "msgpack-websocket": (["websocket"], "msgpack"),
    "msgpack-polling": (["polling"], "msgpack"),
}


def connect_client(url: str, way: str, user: str | None = None,
                   path: str = "socket.io") -> RecordingClient:
    """A connected python-socketio client that came in ``way`` (a key of :data:`WAYS`)."""
    transports, serializer = WAYS[way]
    client = RecordingClient(serializer)
    client.connect(url, transports=transports, auth={"user": user} if user else None,
                   socketio_path=path, wait_timeout=10)
    if way == "upgrade":
        wait_until(lambda: client.transport() == "websocket", message="the upgrade")
    return client


JS_DIR = Path(__file__).parent / "js"
STATIC_MODULES = Path(__file__).parents[2] / "static" / "node_modules"
OFFICIAL_CLIENT_SCRIPT = JS_DIR / "official_client.js"
OFFICIAL_CLIENT = STATIC_MODULES / "socket.io-client"


def run_official_client(url: str, mode: str, channel: str, publishes: int) -> dict:
    """Run official_client.js (the official socket.io-client); its JSON summary."""
    # scripts/setup installs both; a machine without them must fail here, not skip quietly
    assert shutil.which("node") and OFFICIAL_CLIENT.is_dir(), "node or socket.io-client is missing"
    done = subprocess.run(["node", str(OFFICIAL_CLIENT_SCRIPT), url, mode, channel, str(publishes)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])
