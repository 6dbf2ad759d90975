"""The Flask-SocketIO peer: a plain Flask-SocketIO app, set up as its documentation recommends.

gevent with gevent-websocket, ``monkey.patch_all()`` first, ``message_queue`` on Redis so that
several processes behave as one server, ``socketio.run``. The same events as realtime as far as
the bench uses them:

- ``subscribe {channel}`` -> ``join_room(channel)``, ack ``{"ok": true, "channel": ...}``
- ``publish {channel, data}`` -> ``emit("message", {channel, data, user}, to=channel)``,
  ack ``{"ok": true}``
- ``POST /api/publish {channel, data}`` -> the same emit from outside a handler
- ``GET /readyz``

Usage: ``python bench/peers/flask_socketio_peer.py --port 5001 --redis redis://127.0.0.1:6390/0``
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
from typing import Any  # noqa: E402

from flask import Flask, Response, jsonify, request, session  # noqa: E402
from flask_socketio import SocketIO, emit, join_room  # noqa: E402

logger = logging.getLogger(__name__)


def create_app(redis_url: str) -> tuple[Flask, SocketIO]:
    """The app and its SocketIO, sharing ``redis_url`` with the other processes."""
    app = Flask(__name__)
    app.secret_key = os.urandom(16)
    socketio = SocketIO(app, message_queue=redis_url, async_mode="gevent",
                        cors_allowed_origins="*")

    @socketio.on("connect")
    def on_connect(auth: Any = None) -> None:
        user = auth.get("user") if isinstance(auth, dict) else None
        session["user"] = user if isinstance(user, str) else None

    @socketio.on("subscribe")
    def on_subscribe(payload: dict) -> dict:
        join_room(payload["channel"])
        return {"ok": True, "channel": payload["channel"]}

    @socketio.on("publish")
    def on_publish(payload: dict) -> dict:
        emit("message", {"channel": payload["channel"], "data": payload["data"],
                         "user": session.get("user")}, to=payload["channel"])
        return {"ok": True}

    @app.post("/api/publish")
    def api_publish() -> Response:
        body = request.get_json()
        socketio.emit("message", {"channel": body["channel"], "data": body["data"],
                                  "user": None}, to=body["channel"])
        return jsonify({"ok": True})

    @app.get("/readyz")
    def readyz() -> Response:
        return jsonify({"status": "ready"})

    return app, socketio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True, help="redis://host:port/db")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    app, socketio = create_app(args.redis)
    socketio.run(app, host=args.host, port=args.port, log_output=False)


if __name__ == "__main__":
    main()
