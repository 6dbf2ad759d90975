"""The application factory: one Flask app with its Socket.IO server, node and HTTP API."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from flask import Flask, abort, send_from_directory
from flask_socketio import SocketIO

from .backends import create_broker, create_presence_store
from .channels import ChannelPolicy
from .config import Config
from .http_api import create_api_blueprint, register_error_handlers
from .node import Node
from .protocol import ClientProtocol
from .socketio_edge import register_socketio_handlers
from .transport import cap_packets_per_poll, guard_malformed_packets, prefix_session_ids
from .websocket import WebSocketTransport

logger = logging.getLogger(__name__)

# The official client, installed from npm at set-up time into static/node_modules.
CLIENT_BUNDLE = Path("node_modules/socket.io-client/dist/socket.io.min.js")


@dataclasses.dataclass
class Realtime:
    """What :func:`create_app` builds: call :meth:`start` before serving ``app``."""

    app: Flask
    socketio: SocketIO
    node: Node
    websocket: WebSocketTransport
    config: Config

    def start(self) -> None:
        self.node.start()
        self.websocket.start()

    def stop(self) -> None:
        self.websocket.stop()
        self.node.stop()


def create_app(config: Config | None = None) -> Realtime:
    """Build a node's Flask app, Socket.IO server and core from ``config``.

    Nothing is started: call ``start()`` before serving and ``stop()`` after. Direct WebSocket
    connections reach ``websocket`` only through :func:`realtime.server.serve`'s handler.
    """
    config = config or Config.load()
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = 2 * config.max_message_size + config.frame_overhead
    app.json.sort_keys = False

    socketio = SocketIO(
        app,
        async_mode="gevent",
        # One greenlet per connection handles its events in order: a client's publishes keep
        # their order, and subscribe acks precede the live messages (EngineIOConnection).
        async_handlers=False,
        manage_session=False,
        cors_allowed_origins=config.cors_allowed_origins,
        ping_interval=config.ping_interval,
        ping_timeout=config.ping_timeout,
        max_http_buffer_size=config.max_message_size + config.frame_overhead,
        logger=False,
        engineio_logger=False,
    )
    guard_malformed_packets(socketio.server)
    cap_packets_per_poll(socketio.server)
    prefix_session_ids(socketio.server, config.node_id)
    node = Node(config, create_broker(config), create_presence_store(config))
    protocol = ClientProtocol(node, ChannelPolicy())
    register_socketio_handlers(socketio, protocol)
    app.register_blueprint(create_api_blueprint(node))
    register_error_handlers(app)
    _register_pages(app, node, Path(config.static_dir))
    return Realtime(app, socketio, node, WebSocketTransport(protocol, config), config)


def _register_pages(app: Flask, node: Node, static_dir: Path) -> None:
    @app.get("/healthz")
    def healthz() -> tuple[dict, int]:
        return {"status": "ok"}, 200

    @app.get("/readyz")
    def readyz() -> tuple[dict, int]:
        if node.is_ready():
            return {"status": "ready"}, 200
        return {"status": "not ready"}, 503

    @app.get("/")
    def index():
        return send_from_directory(static_dir, "index.html")

    @app.get("/vendor/socket.io.min.js")
    def socketio_client():
        if not (static_dir / CLIENT_BUNDLE).is_file():
            abort(404, "socket.io-client is not installed: run scripts/setup")
        return send_from_directory(static_dir, str(CLIENT_BUNDLE))

    @app.get("/<path:name>")
    def page(name: str):
        if name.startswith("node_modules/"):
            abort(404)
        return send_from_directory(static_dir, name)
