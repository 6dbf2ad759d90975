"""A Flask app that keeps its own session login and uses realtime for live notifications.

Two integrations, both plain HTTP:

* **Publishing**: ``POST /notify`` (logged in) publishes on ``user:<to>`` through realtime's
  HTTP API, ``POST /api/publish`` with ``Authorization: apikey <KEY>``, over one keep-alive
  connection pool (a ``requests.Session``) shared by the app's requests.
* **Authorising connections** (realtime's connect proxy): the node POSTs each new Socket.IO
  connection's context to ``POST /realtime/connect``, with the browser's ``Cookie`` header
  among the forwarded headers; the app reads its own session cookie from it and answers
  ``{user, info}``, or ``{error: {code, message}}`` to refuse. No JWT anywhere.

Run it against a node (from this folder; the cookie reaches the node because browsers send a
host's cookies to every port of it, and behind one nginx it is the same origin anyway)::

    # the node: API key, connect proxy, and the Cookie header forwarded to the app
    python run.py serve --port 5000 --api-key dev-key \\
        --proxy-connect-url http://127.0.0.1:8000/realtime/connect --proxy-headers Cookie \\
        --allowed-origins http://127.0.0.1:8000
    # the app
    REALTIME_URL=http://127.0.0.1:5000 REALTIME_API_KEY=dev-key APP_SECRET_KEY=change-me \\
        flask --app app run --port 8000

Then open http://127.0.0.1:8000/ in two browsers, log in as ``alice`` and ``bob`` (the
passwords are in ``USERS``), and send each other notifications.

Configuration comes from the environment: ``REALTIME_URL`` (the node, or nginx in front of a
cluster), ``REALTIME_API_KEY``, ``APP_SECRET_KEY`` (signs the session cookie; keep it secret),
``REALTIME_PUBLIC_URL`` (where browsers reach the node, when not at ``REALTIME_URL``) and
``APP_USERS`` (optional, ``name:password,...``, replaces the demo users).
"""

from __future__ import annotations

import hmac
import os
from http.cookies import CookieError, SimpleCookie
from typing import Any

import requests
from flask import Flask, jsonify, request, session
from itsdangerous import BadData

# Demo accounts. A real app checks password hashes in its database.
USERS = {"alice": "wonderland", "bob": "builder"}
# How long the app waits for the node before answering 503 itself.
REALTIME_TIMEOUT = 5.0


class RealtimeClient:
    """Publishes through a realtime node's HTTP API with an API key, over keep-alive."""

    def __init__(self, base_url: str, api_key: str, timeout: float = REALTIME_TIMEOUT) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._http = requests.Session()
        self._http.headers["Authorization"] = f"apikey {api_key}"
        # The node is reached directly: never through a proxy taken from the environment.
        self._http.trust_env = False

    def publish(self, channel: str, data: Any, idempotency_key: str | None = None) -> dict:
        """Publish ``data`` on ``channel``; return ``{offset, epoch}``.

        Raises ``requests.HTTPError`` (the node's ``{error: {code, message}}`` is in
        ``response.json()``) or ``requests.ConnectionError``/``Timeout``. With an
        ``idempotency_key`` a retry after a lost answer publishes nothing twice.
        """
        body: dict[str, Any] = {"channel": channel, "data": data}
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        response = self._http.post(f"{self.base_url}/api/publish", json=body,
                                   timeout=self.timeout)
        response.raise_for_status()
        return response.json()


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """The app, configured from the environment, then from ``config`` (tests, WSGI servers)."""
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=os.environ.get("APP_SECRET_KEY", "dev-only-secret-change-me"),
        REALTIME_URL=os.environ.get("REALTIME_URL", "http://127.0.0.1:5000"),
        REALTIME_API_KEY=os.environ.get("REALTIME_API_KEY", ""),
        # Where browsers reach the node, when it is not where the app does (nginx, TLS).
        REALTIME_PUBLIC_URL=os.environ.get("REALTIME_PUBLIC_URL"),
        USERS=_users_from_env(os.environ.get("APP_USERS")) or dict(USERS),
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
    )
    app.config.update(config or {})
    realtime = RealtimeClient(app.config["REALTIME_URL"], app.config["REALTIME_API_KEY"])

    @app.get("/")
    def index():
        return app.send_static_file("index.html")

    @app.get("/config")
    def browser_config():
        return jsonify(realtime_url=app.config["REALTIME_PUBLIC_URL"] or app.config["REALTIME_URL"])

    @app.post("/login")
    def login():
        form = request.get_json(silent=True) or request.form
        user, password = str(form.get("user", "")), str(form.get("password", ""))
        expected = app.config["USERS"].get(user)
        # Compare in constant time, and compare something even for an unknown user.
        if not hmac.compare_digest(password.encode(), (expected or "\0").encode()) or not expected:
            return jsonify(error={"code": "unauthorized", "message": "wrong user or password"}), 401
        session.clear()
        session["user"] = user
        return jsonify(user=user)

    @app.post("/logout")
    def logout():
        session.clear()
        return jsonify(ok=True)

    @app.get("/me")
    def me():
        return jsonify(user=session.get("user"))

    @app.post("/notify")
    def notify():
        sender = session.get("user")
        if not sender:
            return jsonify(error={"code": "unauthorized", "message": "log in first"}), 401
        body = request.get_json(silent=True) or {}
        to, text = body.get("to"), body.get("text")
        if not isinstance(to, str) or not isinstance(text, str) or not text:
            return jsonify(error={"code": "bad_request", "message": "give `to` and `text`"}), 400
        try:
            position = realtime.publish(f"user:{to}", {"from": sender, "text": text},
                                        idempotency_key=body.get("id"))
        except requests.HTTPError as error:
            # The node's own {error: {code, message}}, e.g. bad_request for a bad user name.
            return jsonify(error.response.json()), error.response.status_code
        except requests.RequestException as error:
            return jsonify(error={"code": "unavailable", "message": str(error)}), 503
        return jsonify(position)

    @app.post("/realtime/connect")
    def realtime_connect():
        # Called by the realtime node, not by browsers: the browser's headers are in the body.
        # Bind the app where only the nodes reach this route, or check their source address.
        context = request.get_json(silent=True) or {}
        headers = {str(name).lower(): value
                   for name, value in (context.get("headers") or {}).items()}
        user = _session_user(app, headers.get("cookie"))
        if user is None:
            return jsonify(error={"code": "unauthorized", "message": "log in to the app first"})
        return jsonify(user=user, info={"name": user.title()})

    return app


def _session_user(app: Flask, cookie_header: Any) -> str | None:
    """The user of the Flask session cookie in a forwarded ``Cookie`` header, if it is valid."""
    if not isinstance(cookie_header, str):
        return None
    try:
        cookies = SimpleCookie(cookie_header)
    except CookieError:
        return None
    morsel = cookies.get(app.config.get("SESSION_COOKIE_NAME", "session"))
    serializer = app.session_interface.get_signing_serializer(app)
    if morsel is None or serializer is None:
        return None
    lifetime = int(app.permanent_session_lifetime.total_seconds())
    try:
        data = serializer.loads(morsel.value, max_age=lifetime)
    except BadData:  # a forged, expired or garbled cookie is no session
        return None
    user = data.get("user") if isinstance(data, dict) else None
    return user if isinstance(user, str) and user else None


def _users_from_env(value: str | None) -> dict[str, str]:
    """``name:password,...`` as a dict (empty when unset)."""
    pairs = (item.split(":", 1) for item in (value or "").split(",") if ":" in item)
    return {name.strip(): password for name, password in pairs}
