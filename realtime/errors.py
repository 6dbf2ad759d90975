"""The one error hierarchy of realtime.

Every failure that can reach a client is a :class:`RealtimeError` carrying a stable ``code`` from
the public protocol, a human ``message`` and a ``temporary`` flag (retrying later may succeed).
The edges (Socket.IO handlers, HTTP API) translate it: an ack ``{ok: false, error: {code,
message}}`` or an HTTP status with ``{error: {code, message}}``. Anything else that escapes the core
is a bug: the edges log it with its traceback and answer ``internal``.
"""

from __future__ import annotations


class RealtimeError(Exception):
    """Base of all errors that are reported to clients."""

    code = "internal"
    http_status = 500
    temporary = False

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.default_message)
        self.message = message or self.default_message

    default_message = "internal error"

    def to_dict(self) -> dict:
        """The ``{code, message}`` object that the protocol puts under ``error``."""
        return {"code": self.code, "message": self.message}


class BadRequest(RealtimeError):
    code = "bad_request"
    http_status = 400
    default_message = "bad request"


class Unauthorized(RealtimeError):
    code = "unauthorized"
    http_status = 401
    default_message = "unauthorized"


class Forbidden(RealtimeError):
    code = "forbidden"
    http_status = 403
    default_message = "forbidden"


class NotFound(RealtimeError):
    code = "not_found"
    http_status = 404
    default_message = "not found"


class TooLarge(RealtimeError):
    code = "too_large"
    http_status = 413
    default_message = "payload too large"


class RateLimited(RealtimeError):
    code = "rate_limited"
    http_status = 429
    temporary = True
    default_message = "rate limited"


class Unavailable(RealtimeError):
    """A dependency (the broker, the presence store) cannot serve the request right now."""

    code = "unavailable"
    http_status = 503
    temporary = True
    default_message = "service unavailable"


class InternalError(RealtimeError):
    code = "internal"
    http_status = 500
    default_message = "internal error"
