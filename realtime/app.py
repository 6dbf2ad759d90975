"""The application factory: a node's core, its Engine.IO server, and the Flask app around them.

The WSGI application it builds sends ``/socket.io/`` to the Engine.IO server
(:mod:`realtime.engineio`) and everything else (pages, HTTP API, health) to Flask.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from flask import Flask, abort, send_from_directory

from .backends import create_broker, create_presence_store, create_transition_store
from .config import Config
from .engineio import PATH as ENGINEIO_PATH
from .engineio import EngineServer, host_allowed
from .http_api import FastRoutes, api_body_limit, create_api_blueprint, register_error_handlers
from .node import Node
from .protocol import ClientProtocol
from .resources import CLIENT_BUNDLE, pages_dir
from .webhooks.service import Webhooks

logger = logging.getLogger(__name__)

StartResponse = Callable[..., object]


@dataclasses.dataclass
class Realtime:
    """What :func:`create_app` builds: call :meth:`start` before serving :meth:`wsgi`."""

    app: Flask
    engine: EngineServer
    node: Node
    config: Config
    fast_routes: FastRoutes

    def start(self) -> None:
        if not self.config.jwt_configured and not self.config.proxy_connect_url:
            logger.warning("no JWT key is configured: connections are anonymous and each is "
                           "who its auth.user says, unverified (development mode; see the "
                           "README's Authentication section)")
        self.node.start()
        self.engine.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Close what sessions are left, wait up to ``timeout`` for their clean-up, stop."""
        self.engine.stop(timeout)
        self.node.stop()

    def wsgi(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        """The node's WSGI application: Engine.IO under /socket.io/, the HTTP API's hot
        routes (:class:`~realtime.http_api.FastRoutes`), Flask for the rest.

        WebSocket upgrades need the raw socket, which WSGI does not give:
        :class:`realtime.server.RealtimeHandler` hands them to ``engine`` before this runs.
        """
        if not host_allowed(environ, self.config.allowed_host_names):
            body = json.dumps({"error": {"code": "bad_request",
                                         "message": "this Host is not served here"}}).encode()
            start_response("400 Bad Request", [("Content-Type", "application/json"),
                                               ("Content-Length", str(len(body)))])
            return [body]
        if environ.get("PATH_INFO", "").rstrip("/") == ENGINEIO_PATH:
            return self.engine.handle_http(environ, start_response)
        if self.fast_routes.serves(environ):
            return self.fast_routes(environ, start_response)
        return self.app(environ, start_response)


def create_app(config: Config | None = None) -> Realtime:
    """Build a node's core, Engine.IO server and Flask app from ``config``.

    Nothing is started: call ``start()`` before serving and ``stop()`` after.
    """
    config = config or Config.load()
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = api_body_limit(config)
    app.json.sort_keys = False
    webhooks = Webhooks(config, create_transition_store(config)) if config.webhook_urls else None
    node = Node(config, create_broker(config), create_presence_store(config), webhooks)
    engine = EngineServer(config, ClientProtocol(node))
    app.register_blueprint(create_api_blueprint(node, config))
    register_error_handlers(app, node.counters)
    _register_pages(app, node, Path(config.static_dir) if config.static_dir else pages_dir())
    return Realtime(app, engine, node, config, FastRoutes(node, config))


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
