"""Control messages between nodes (and from emitters): msgpack maps with a version field.

Kept free of gevent so that :mod:`realtime.emitter` can send them from any Python process.
"""

from __future__ import annotations

from typing import Any

import msgpack

from .errors import BadRequest

CONTROL_VERSION = 1


class ControlMessageError(ValueError):
    """A control message that does not decode, or has another version."""


def encode_control(sender: str, kind: str, **fields: Any) -> bytes:
    """Pack a control message of ``kind`` from node (or emitter) ``sender``.

    Raises :class:`~realtime.errors.BadRequest` when a field cannot be sent: a string that is
    not valid Unicode (a user id with a lone surrogate, from the HTTP API or the emitter).
    """
    try:
        return msgpack.packb({"v": CONTROL_VERSION, "node": sender, "t": kind, **fields})
    except UnicodeEncodeError as exc:
        raise BadRequest("strings must be valid Unicode (no lone surrogates)") from exc


def decode_control(payload: bytes) -> dict[str, Any]:
    """Unpack a control message; raise :class:`ControlMessageError` when it is not one."""
    try:
        message = msgpack.unpackb(payload)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ControlMessageError(f"not msgpack: {exc}") from exc
    if not isinstance(message, dict) or message.get("v") != CONTROL_VERSION:
        raise ControlMessageError("unknown control message version")
    if not isinstance(message.get("t"), str) or not isinstance(message.get("node"), str):
        raise ControlMessageError("control message without type or sender")
    return message
