"""The HTTP API: JSON in, JSON out, for backends that publish and inspect.

Errors answer ``{error: {code, message}}`` with the status of the error's class.

``POST /api/batch`` runs many publish/broadcast/disconnect commands in one request
(:func:`batch_command`). The hot routes (publish, broadcast, batch) are also served as plain
WSGI before Flask's dispatch (:class:`FastRoutes`), on the same code as the Flask routes.

``GET /metrics`` (Prometheus, see :mod:`realtime.metrics`) answers under the same rule.

Who may call it: with API keys configured (``--api-key``), whoever sends one of them as
``Authorization: apikey <KEY>``, from anywhere; without any, loopback clients only. "Loopback"
is the real client: behind a trusted proxy (``--trusted-proxies``, loopback by default, which
is where the shipped nginx runs) the client address comes from ``X-Forwarded-For`` (see
:mod:`realtime.client_address`), so that nginx does not make every client look local.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
from collections.abc import Callable, Iterable
from typing import Any

from flask import Blueprint, Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.http import HTTP_STATUS_CODES

from .broker.base import PublishRequest, StreamPosition
from .channels import validate_channel
from .client_address import client_address, is_loopback
from .config import Config
from .engineio import host_allowed
from .errors import (
    BadRequest,
    Forbidden,
    InternalError,
    NotFound,
    RealtimeError,
    TooLarge,
    Unauthorized,
)
from .jsontext import dumps, loads
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

# POST /api/batch: at most this many commands (413 above), in a body of at most this many
# bytes (413 above). 1,000 commands of a typical notification (a few hundred bytes) fit; a
# bigger batch would hold the node's one thread for tens of milliseconds of parsing and
# checking, and a client gains nothing from it that two batches would not give.
MAX_BATCH_COMMANDS = 1000
BATCH_BODY_LIMIT = 1024 * 1024

NOT_A_JSON_OBJECT = "the body must be a JSON object (Content-Type: application/json)"
# What werkzeug answers a body over MAX_CONTENT_LENGTH with: the fast routes say the same.
BODY_TOO_LARGE = RequestEntityTooLarge.description

StartResponse = Callable[..., object]


def api_body_limit(config: Config) -> int:
    """The largest body the API's routes take (but /api/batch's, :data:`BATCH_BODY_LIMIT`):
    room for data of the largest message with its JSON escaping."""
    return 2 * config.max_message_size + config.frame_overhead


class ApiAccess:
    """Who may call the API (the module docstring's rule): one check for every route."""

    def __init__(self, config: Config) -> None:
        self._key_digests = tuple(_digest(key.encode()) for key in config.api_keys)
        self._trusted_proxies = config.trusted_proxy_networks
        # Parsing the addresses (ipaddress) was 7% of a publish's CPU (cProfile): a backend
        # calls from the same few addresses, so the verdicts are remembered, a bounded number.
        self._loopback_verdicts = functools.lru_cache(maxsize=1024)(self._from_loopback)

    def check(self, authorization: str | None, remote_addr: str | None,
              forwarded_for: str | None) -> None:
        """Raise :class:`Unauthorized` (no or a wrong key, when keys are configured) or
        :class:`Forbidden` (no keys, and the real client is not on loopback)."""
        if self._key_digests:
            _check_api_key(authorization, self._key_digests)
            return
        if not self._loopback_verdicts(remote_addr, forwarded_for):
            raise Forbidden("without API keys configured, the API answers loopback clients "
                            "only")

    def _from_loopback(self, remote_addr: str | None, forwarded_for: str | None) -> bool:
        return is_loopback(client_address(remote_addr, forwarded_for, self._trusted_proxies))


def create_api_blueprint(node: Node, config: Config) -> Blueprint:
    """The ``/api/*`` routes of ``node``, guarded by ``config``'s API keys and trusted proxies."""
    api = Blueprint("api", __name__)
    access = ApiAccess(config)

    # App-wide and by path rather than on the blueprint's routes: a path under /api/ that no
    # route matches (or a method none accepts) is refused like the others, so that nobody
    # learns which routes exist without a key.
    @api.before_app_request
    def authorise() -> None:
        if not _guarded(request.path):
            return
        access.check(request.headers.get("Authorization"), request.remote_addr,
                     request.headers.get("X-Forwarded-For"))

    @api.after_app_request
    def challenge(response: Response) -> Response:
        # RFC 9110: a 401 names the scheme that would be accepted.
        if response.status_code == 401 and _guarded(request.path):
            response.headers["WWW-Authenticate"] = AUTH_SCHEME
        return response

    # The hot routes: the node's WSGI entry serves them before Flask's dispatch (FastRoutes);
    # these are what Flask answers when called directly (its test client, say). Both run the
    # same parsing, checks and commands (_json_object, *_command).
    @api.post("/api/publish")
    def publish() -> Any:
        return publish_command(node, _json_body())

    @api.post("/api/broadcast")
    def broadcast() -> Any:
        return broadcast_command(node, _json_body())

    @api.post("/api/batch")
    def batch() -> Any:
        return batch_command(node, _json_body(BATCH_BODY_LIMIT), node.counters.error)

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
        return disconnect_command(node, _json_body())

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


# -- the commands: what /api/publish, /api/broadcast, /api/disconnect and /api/batch do --------

def _position(position: StreamPosition) -> dict[str, Any]:
    return {"offset": position.offset, "epoch": position.epoch}


def _publish_request(params: dict) -> PublishRequest:
    """The publication ``params`` of ``POST /api/publish`` ask for (checked but for the data's
    size, which is the channel's namespace's business: :meth:`Node.publish_many`)."""
    channel = validate_channel(params.get("channel"))
    data = _data(params)
    return PublishRequest(channel, data, None, check_idempotency_key(params.get("idempotency_key")))


def _broadcast_requests(node: Node, params: dict) -> list[PublishRequest]:
    """The publications ``params`` of ``POST /api/broadcast`` ask for, every one checked
    (the data's size too): a broadcast is refused whole or made whole."""
    channels = params.get("channels")
    if not isinstance(channels, list) or not channels:
        raise BadRequest("channels must be a non-empty list of channel names")
    channels = [validate_channel(channel) for channel in channels]
    data = _data(params)
    key = check_idempotency_key(params.get("idempotency_key"))
    for channel in channels:
        node.check_data_size(channel, data)
    return [PublishRequest(channel, data, None, key) for channel in channels]


def _broadcast_result(requests: list[PublishRequest],
                      results: list[StreamPosition | RealtimeError]) -> dict[str, Any]:
    for result in results:
        if isinstance(result, RealtimeError):
            raise result
    return {"results": [{"channel": request.channel, **_position(result)}  # type: ignore[arg-type]
                        for request, result in zip(requests, results, strict=True)]}


def publish_command(node: Node, params: dict) -> dict[str, Any]:
    """``POST /api/publish``: ``{channel, data, idempotency_key?}`` → ``{offset, epoch}``."""
    (result,) = node.publish_many([_publish_request(params)])
    if isinstance(result, RealtimeError):
        raise result
    return _position(result)


def broadcast_command(node: Node, params: dict) -> dict[str, Any]:
    """``POST /api/broadcast``: ``{channels, data, idempotency_key?}`` → ``{results:
    [{channel, offset, epoch}, ...]}``; the first refusal raises (see :meth:`Node.broadcast`)."""
    requests = _broadcast_requests(node, params)
    return _broadcast_result(requests, node.publish_many(requests))


def disconnect_command(node: Node, params: dict) -> dict[str, Any]:
    """``POST /api/disconnect``: ``{user}`` → ``{disconnected: <sessions closed>}``."""
    user = params.get("user")
    if not isinstance(user, str) or not user:
        raise BadRequest("user must be a non-empty string")
    return {"disconnected": node.disconnect_user(user)}


BATCH_METHODS = ("publish", "broadcast", "disconnect")


def batch_command(node: Node, body: dict,
                  count: Callable[[str], object] = lambda code: None) -> dict[str, Any]:
    """``POST /api/batch``: ``{commands: [{method, params}, ...]}`` → ``{replies: [{result} |
    {error: {code, message}}, ...]}``, a reply per command, in order.

    ``params`` are those of the command's own route, and a reply's ``result`` that route's
    answer. A bad or refused command gets its error in its slot (counted with ``count``) and
    the others still run. Commands run in order; the publications of consecutive publish and
    broadcast commands go to the broker together (one round trip for a batch without
    disconnects), so a disconnect sees every publication before it made.
    """
    commands = body.get("commands")
    if not isinstance(commands, list) or not commands:
        raise BadRequest("commands must be a non-empty list of {method, params} objects")
    if len(commands) > MAX_BATCH_COMMANDS:
        raise TooLarge(f"a batch has at most {MAX_BATCH_COMMANDS} commands; this one has "
                       f"{len(commands)}")
    replies: list[dict[str, Any] | None] = [None] * len(commands)
    # Publications waiting for the broker: for each command, its slot and its requests' span.
    queued: list[PublishRequest] = []
    waiting: list[tuple[int, str, int, int]] = []

    def refuse(slot: int, exc: RealtimeError) -> None:
        count(exc.code)
        replies[slot] = {"error": exc.to_dict()}

    def flush() -> None:
        if not queued:
            return
        results = node.publish_many(queued)
        for slot, method, start, end in waiting:
            try:
                if method == "publish":
                    result = results[start]
                    if isinstance(result, RealtimeError):
                        raise result
                    replies[slot] = {"result": _position(result)}
                else:
                    replies[slot] = {"result": _broadcast_result(queued[start:end],
                                                                 results[start:end])}
            except RealtimeError as exc:
                refuse(slot, exc)
        queued.clear()
        waiting.clear()

    for slot, command in enumerate(commands):
        try:
            method, params = _batch_command(command)
            if method == "disconnect":
                flush()
                replies[slot] = {"result": disconnect_command(node, params)}
                continue
            requests = ([_publish_request(params)] if method == "publish"
                        else _broadcast_requests(node, params))
            waiting.append((slot, method, len(queued), len(queued) + len(requests)))
            queued.extend(requests)
        except RealtimeError as exc:
            refuse(slot, exc)
    flush()
    return {"replies": replies}


def _batch_command(command: object) -> tuple[str, dict]:
    """A batch command's method and params; BadRequest unless it is ``{method, params}``."""
    if not isinstance(command, dict):
        raise BadRequest("a command must be an object {method, params}")
    method = command.get("method")
    if method not in BATCH_METHODS:
        raise BadRequest("method must be one of " + ", ".join(BATCH_METHODS))
    params = command.get("params")
    if not isinstance(params, dict):
        raise BadRequest("params must be an object")
    return method, params


# -- the hot routes, before Flask ---------------------------------------------------------------

class FastRoutes:
    """``POST /api/publish``, ``/api/broadcast`` and ``/api/batch``, before Flask.

    A publish through Flask spent most of its time in werkzeug's request and response objects
    and Flask's dispatch (bench/RESULTS.md, issue 12): these three routes are answered here
    instead, from two entries: the node's WSGI application (:meth:`__call__`, for requests
    that reach WSGI) and the HTTP server's API lane (:meth:`answer`, which
    :class:`realtime.server.RealtimeHandler` calls for the requests it reads itself, without
    pywsgi's per-request work). Everything that decides an answer is shared with the Flask
    routes: the access rule (:class:`ApiAccess`), the body's limits and parsing
    (:func:`_json_object`), the commands, and the JSON answers and error bodies, byte for byte.
    """

    def __init__(self, node: Node, config: Config) -> None:
        self._access = ApiAccess(config)
        self._count = node.counters.error
        self._allowed_hosts = config.allowed_host_names
        body_limit = api_body_limit(config)
        self._routes: dict[str, tuple[Callable[[dict], dict[str, Any]], int]] = {
            "/api/publish": (lambda body: publish_command(node, body), body_limit),
            "/api/broadcast": (lambda body: broadcast_command(node, body), body_limit),
            "/api/batch": (lambda body: batch_command(node, body, self._count),
                           BATCH_BODY_LIMIT),
        }

    def serves(self, environ: dict) -> bool:
        """Whether ``environ`` is a request for one of the fast routes."""
        return environ["REQUEST_METHOD"] == "POST" and environ.get("PATH_INFO") in self._routes

    def body_limit(self, path: str) -> int | None:
        """The largest body a POST to ``path`` takes; None when ``path`` is not a fast route."""
        route = self._routes.get(path)
        return None if route is None else route[1]

    def host_allowed(self, host: str) -> bool:
        """Whether a request with this ``Host`` is served (``--allowed-hosts``)."""
        return host_allowed({"HTTP_HOST": host}, self._allowed_hosts)

    def answer(self, path: str, *, authorization: str | None, remote_addr: str | None,
               forwarded_for: str | None, content_type: str | None,
               read_body: Callable[[int], bytes]) -> tuple[str, list[tuple[str, str]], bytes]:
        """The answer to a POST to fast route ``path``: status line, headers, body.

        ``read_body(limit)`` gives the request's body, or raises :class:`TooLarge` when it is
        over ``limit`` bytes; it is not called when the request is refused before its body
        matters (no access, not JSON). Never raises: an unexpected failure is logged and
        answered 500.
        """
        command, limit = self._routes[path]
        headers: list[tuple[str, str]] = [("Content-Type", "application/json")]
        try:
            self._access.check(authorization, remote_addr, forwarded_for)
            if not _is_json(content_type):
                raise BadRequest(NOT_A_JSON_OBJECT)
            status, answer = 200, command(_json_object(read_body(limit)))
        except RealtimeError as exc:
            note_error(exc, "POST", path, self._count)
            status, answer = exc.http_status, {"error": exc.to_dict()}
            if status == 401:
                headers.append(("WWW-Authenticate", AUTH_SCHEME))
        except Exception:
            logger.exception("POST %s failed", path)
            self._count(InternalError.code)
            status, answer = 500, {"error": InternalError().to_dict()}
        # Flask's JSON answers, byte for byte: compact, ASCII, a final newline.
        body = (dumps(answer) + "\n").encode()
        headers.append(("Content-Length", str(len(body))))
        return _STATUS_LINES[status], headers, body

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        status, headers, body = self.answer(
            environ["PATH_INFO"], authorization=environ.get("HTTP_AUTHORIZATION"),
            remote_addr=environ.get("REMOTE_ADDR"),
            forwarded_for=environ.get("HTTP_X_FORWARDED_FOR"),
            content_type=environ.get("CONTENT_TYPE"),
            read_body=lambda limit: _read_body(environ, limit))
        start_response(status, headers)
        return [body]


# The status lines Flask sends (werkzeug's phrases, upper case), for every status.
_STATUS_LINES = {status: f"{status} {phrase.upper()}"
                 for status, phrase in HTTP_STATUS_CODES.items()}


def _read_body(environ: dict, limit: int) -> bytes:
    """The request's body; TooLarge (werkzeug's words) when it is over ``limit`` bytes."""
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH")
    if length:
        size = int(length)  # the server checked it is a number
        if size > limit:
            raise TooLarge(BODY_TOO_LARGE)
        return stream.read(size)
    raw = stream.read(limit + 1)  # chunked: read no more than the limit allows
    if len(raw) > limit:
        raise TooLarge(BODY_TOO_LARGE)
    return raw


def register_error_handlers(app: Flask, counters: Counters | None = None) -> None:
    """Answer every error with the protocol's ``{error: {code, message}}`` JSON body,
    counted by code in ``counters`` (the node's, for ``realtime_errors_total``) when given."""
    count = counters.error if counters is not None else lambda code: None

    @app.errorhandler(RealtimeError)
    def realtime_error(exc: RealtimeError) -> tuple[Response, int]:
        note_error(exc, request.method, request.path, count)
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


def note_error(exc: RealtimeError, method: str, path: str,
               count: Callable[[str], object]) -> None:
    """Count ``exc`` by its code and log it if it is worth a line (server errors but outages)."""
    count(exc.code)
    # Unavailable (an outage) is the broker's to log, once; a line per request would bury it.
    # Other server errors are worth a line each.
    if exc.http_status >= 500 and not exc.temporary:
        logger.warning("%s %s: %s", method, path, exc.message)


def _json_body(limit: int | None = None) -> dict:
    """The Flask request's body as a JSON object (see :func:`_json_object`)."""
    if not _is_json(request.content_type):
        raise BadRequest(NOT_A_JSON_OBJECT)
    if limit is not None:
        request.max_content_length = limit
    return _json_object(request.get_data(cache=True))


def _is_json(content_type: str | None) -> bool:
    """Whether ``content_type`` is JSON, as werkzeug's ``Request.is_json`` says."""
    mimetype = (content_type or "").partition(";")[0].strip().lower()
    return mimetype == "application/json" or (
        mimetype.startswith("application/") and mimetype.endswith("+json"))


def _json_object(raw: bytes) -> dict:
    """``raw`` parsed as a JSON object; BadRequest for anything else."""
    try:
        body = loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        body = None
    if not isinstance(body, dict):
        raise BadRequest(NOT_A_JSON_OBJECT)
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
