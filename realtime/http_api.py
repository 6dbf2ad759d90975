"""The HTTP API: JSON in, JSON out, for backends that publish and inspect.

Errors answer ``{error: {code, message}}`` with the status of the error's class. Until API keys
arrive with the security work, only loopback peers may call it.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from flask import Blueprint, Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from .channels import validate_channel
from .errors import BadRequest, Forbidden, InternalError, NotFound, RealtimeError, TooLarge
from .node import Node
from .protocol import parse_limit

logger = logging.getLogger(__name__)

_HTTP_CODES = {400: BadRequest, 403: Forbidden, 404: NotFound, 413: TooLarge}


def create_api_blueprint(node: Node) -> Blueprint:
    api = Blueprint("api", __name__)

    @api.before_request
    def only_loopback() -> None:
        if not _is_loopback(request.remote_addr):
            raise Forbidden("the API answers loopback clients only")

    @api.post("/api/publish")
    def publish() -> Any:
        body = _json_body()
        channel = validate_channel(body.get("channel"))
        position = node.publish(channel, _data(body))
        return {"offset": position.offset, "epoch": position.epoch}

    @api.post("/api/broadcast")
    def broadcast() -> Any:
        body = _json_body()
        channels = body.get("channels")
        if not isinstance(channels, list) or not channels:
            raise BadRequest("channels must be a non-empty list of channel names")
        channels = [validate_channel(channel) for channel in channels]
        results = node.broadcast(channels, _data(body))
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

    return api


def register_error_handlers(app: Flask) -> None:
    """Answer every error with the protocol's ``{error: {code, message}}`` JSON body."""

    @app.errorhandler(RealtimeError)
    def realtime_error(exc: RealtimeError) -> tuple[Response, int]:
        if exc.http_status >= 500:
            logger.warning("%s %s: %s", request.method, request.path, exc.message)
        return jsonify(error=exc.to_dict()), exc.http_status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        status = exc.code or 500
        error_class = _HTTP_CODES.get(status, InternalError if status >= 500 else BadRequest)
        return jsonify(error={"code": error_class.code, "message": exc.description}), status

    @app.errorhandler(Exception)
    def unexpected_error(exc: Exception) -> tuple[Response, int]:
        logger.exception("%s %s failed", request.method, request.path)
        return jsonify(error=InternalError().to_dict()), 500


def _json_body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object (Content-Type: application/json)")
    return body


def _data(body: dict) -> Any:
    if "data" not in body:
        raise BadRequest("data is required")
    return body["data"]


def _is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
