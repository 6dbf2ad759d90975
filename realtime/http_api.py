"""The HTTP API: JSON in, JSON out, for backends that publish and inspect.

Errors answer ``{error: {code, message}}`` with the status of the error's class.

``GET /metrics`` (Prometheus, see :mod:`realtime.metrics`) answers under the same rule.

Who may call it: with API keys configured (``--api-key``), whoever sends one of them as
``Authorization: apikey <KEY>``, from anywhere; without any, loopback clients only. "Loopback"
is the real client: behind a trusted proxy (``--trusted-proxies``, loopback by default, which
is where the shipped nginx runs) the client address comes from ``X-Forwarded-For`` (see
:mod:`realtime.client_address`), so that nginx does not make every client look local.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Any

from flask import Blueprint, Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from .channels import validate_channel
from .client_address import client_address, is_loopback
from .config import Config
from .errors import (
    BadRequest,
    Forbidden,
    InternalError,
    NotFound,
    RealtimeError,
    TooLarge,
    Unauthorized,
)
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Counters
from .node import Node
from .payloads import check_idempotency_key
from .protocol import parse_limit

logger = logging.getLogger(__name__)

_HTTP_CODES = {400: BadRequest, 403: Forbidden, 404: NotFound, 413: TooLarge}
API_PREFIX = "/api/"
METRICS_PATH = "/metrics"
AUTH_SCHEME = "apikey"


def create_api_blueprint(node: Node, config: Config) -> Blueprint:
    """The ``/api/*`` routes of ``node``, guarded by ``config``'s API keys and trusted proxies."""
    api = Blueprint("api", __name__)
    key_digests = tuple(_digest(key.encode()) for key in config.api_keys)
    trusted_proxies = config.trusted_proxy_networks

    # App-wide and by path rather than on the blueprint's routes: a path under /api/ that no
    # route matches (or a method none accepts) is refused like the others, so that nobody
    # learns which routes exist without a key.
    @api.before_app_request
    def authorise() -> None:
        if not _guarded(request.path):
            return
        if key_digests:
            _check_api_key(request.headers.get("Authorization"), key_digests)
            return
        client = client_address(request.remote_addr, request.headers.get("X-Forwarded-For"),
                                trusted_proxies)
        if not is_loopback(client):
            raise Forbidden("without API keys configured, the API answers loopback clients "
                            "only")

    @api.after_app_request
    def challenge(response: Response) -> Response:
        # RFC 9110: a 401 names the scheme that would be accepted.
        if response.status_code == 401 and _guarded(request.path):
            response.headers["WWW-Authenticate"] = AUTH_SCHEME
        return response

    @api.post("/api/publish")
    def publish() -> Any:
        body = _json_body()
        channel = validate_channel(body.get("channel"))
        position = node.publish(channel, _data(body), idempotency_key=check_idempotency_key(
            body.get("idempotency_key")))
        return {"offset": position.offset, "epoch": position.epoch}

    @api.post("/api/broadcast")
    def broadcast() -> Any:
        body = _json_body()
        channels = body.get("channels")
        if not isinstance(channels, list) or not channels:
            raise BadRequest("channels must be a non-empty list of channel names")
        channels = [validate_channel(channel) for channel in channels]
        results = node.broadcast(channels, _data(body), idempotency_key=check_idempotency_key(
            body.get("idempotency_key")))
        return {"results": [{"channel": channel, "offset": position.offset,
                             "epoch": position.epoch} for channel, position in results]}

    @api.get("/api/presence/<channel>")
    def presence(channel: str) -> Any:
        members = node.presence(validate_channel(channel))
        return {"members": [member.to_dict() for member in members]}

    @api.get("/api/history/<channel>")
    def history(channel: str) -> Any:
        channel = validate_channel(channel)
        raw_limit = request.args.get("limit")
        limit = None
        if raw_limit is not None:
            try:
                limit = parse_limit(int(raw_limit))
            except ValueError:
                raise BadRequest("limit must be a non-negative integer") from None
        result = node.history(channel, limit)
        return {"epoch": result.position.epoch, "offset": result.position.offset,
                "publications": [p.to_event() for p in result.publications]}

    @api.post("/api/disconnect")
    def disconnect() -> Any:
        user = _json_body().get("user")
        if not isinstance(user, str) or not user:
            raise BadRequest("user must be a non-empty string")
        return {"disconnected": node.disconnect_user(user)}

    @api.get("/api/info")
    def info() -> Any:
        return {"nodes": [info.to_dict() for info in node.info()]}

    @api.get(METRICS_PATH)
    def metrics() -> Response:
        return Response(node.metrics.exposition(), mimetype=None,
                        content_type=METRICS_CONTENT_TYPE)

    @api.get("/api/stats")
    def stats() -> Any:
        # The admin page polls this every 2 s: figures of every live node, busiest channels.
        return node.stats()

    return api


def register_error_handlers(app: Flask, counters: Counters | None = None) -> None:
    """Answer every error with the protocol's ``{error: {code, message}}`` JSON body,
    counted by code in ``counters`` (the node's, for ``realtime_errors_total``) when given."""
    count = counters.error if counters is not None else lambda code: None

    @app.errorhandler(RealtimeError)
    def realtime_error(exc: RealtimeError) -> tuple[Response, int]:
        count(exc.code)
        # Unavailable (an outage) is the broker's to log, once; a line per request would
        # bury it. Other server errors are worth a line each.
        if exc.http_status >= 500 and not exc.temporary:
            logger.warning("%s %s: %s", request.method, request.path, exc.message)
        return jsonify(error=exc.to_dict()), exc.http_status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        status = exc.code or 500
        error_class = _HTTP_CODES.get(status, InternalError if status >= 500 else BadRequest)
        count(error_class.code)
        return jsonify(error={"code": error_class.code, "message": exc.description}), status

    @app.errorhandler(Exception)
    def unexpected_error(exc: Exception) -> tuple[Response, int]:
        logger.exception("%s %s failed", request.method, request.path)
        count(InternalError.code)
        return jsonify(error=InternalError().to_dict()), 500


def _guarded(path: str) -> bool:
    """Whether ``path`` answers only callers with an API key (or loopback ones)."""
    return path.startswith(API_PREFIX) or path == METRICS_PATH


def _json_body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object (Content-Type: application/json)")
    return body


def _data(body: dict) -> Any:
    if "data" not in body:
        raise BadRequest("data is required")
    return body["data"]


def _digest(key: bytes) -> bytes:
    # Keys are compared as SHA-256 digests: equal lengths, so that compare_digest's time says
    # nothing about a key's length either.
    return hashlib.sha256(key).digest()


def _check_api_key(authorization: str | None, key_digests: tuple[bytes, ...]) -> None:
    """Raise :class:`Unauthorized` unless ``authorization`` is ``apikey <one of the keys>``."""
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != AUTH_SCHEME or not credentials:
        raise Unauthorized("this API needs an API key: Authorization: apikey <KEY>")
    # WSGI hands headers over as latin-1 text: this gives back the bytes the client sent.
    presented = _digest(credentials.encode("latin-1", errors="replace"))
    # Every key is compared, also after a match, so that the time taken does not say which.
    matched = False
    for digest in key_digests:
        matched |= hmac.compare_digest(presented, digest)
    if not matched:
        raise Unauthorized("the API key is not valid")
