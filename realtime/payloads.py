"""Checks on publication data shared by every way of publishing (clients, HTTP API, emitter)."""

from __future__ import annotations

from typing import Any

import msgpack

from .errors import BadRequest, TooLarge
from .jsontext import dumps_utf8

# The longest idempotency key a publish may carry (Centrifugo's limit too).
MAX_IDEMPOTENCY_KEY = 64

# Arrays and objects nested deeper than this are refused: far beyond real data, and safely
# within what every encoder and decoder on the way takes (Python's json stops near 1,000,
# msgpack near 500, browsers' parsers further).
MAX_NESTING = 100


def check_publication_data(data: Any, max_size: int) -> None:
    """Raise unless ``data`` is a JSON value whose compact encoding fits in ``max_size`` bytes.

    Whatever passes can be written to every kind of client: as JSON text, and as msgpack for
    ``socket.io-msgpack-parser`` clients, so strings are valid Unicode (no lone surrogates),
    integers fit in 64 bits and arrays and objects nest at most :data:`MAX_NESTING` deep.
    """
    try:
        encoded = dumps_utf8(data)
    except RecursionError:
        raise BadRequest("data is nested too deeply") from None
    except UnicodeEncodeError:
        raise BadRequest("data has a string that is not valid Unicode") from None
    except (TypeError, ValueError) as exc:
        raise BadRequest("data must be a JSON value") from exc
    size = len(encoded)
    if size > max_size:
        raise TooLarge(f"data is {size} bytes; the limit is {max_size}")
    # Counting brackets is C-fast and bounds the depth; only data with more of them than the
    # limit (say, a long list of objects) is walked to find its real depth.
    if encoded.count(b"[") + encoded.count(b"{") > MAX_NESTING and _nesting(data) > MAX_NESTING:
        raise BadRequest(f"data is nested too deeply (more than {MAX_NESTING} levels)")
    try:
        msgpack.packb(data)
    except OverflowError:
        raise BadRequest("data has an integer that does not fit in 64 bits") from None
    except ValueError:
        raise BadRequest("data is nested too deeply") from None
    except TypeError:  # a value JSON writes and msgpack does not (orjson writes a UUID)
        raise BadRequest("data must be a JSON value") from None


def check_idempotency_key(key: object) -> str | None:
    """A publish's optional ``idempotency_key``: None, or a string of 1 to 64 characters
    (valid Unicode). Raises BadRequest for anything else."""
    if key is None:
        return None
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY:
        raise BadRequest(f"idempotency_key must be a string of 1 to {MAX_IDEMPOTENCY_KEY} "
                         f"characters")
    try:
        key.encode()
    except UnicodeEncodeError:
        raise BadRequest("idempotency_key must be valid Unicode") from None
    return key


def _nesting(data: Any) -> int:
    """How deep arrays and objects nest in ``data`` (0 for a scalar), without recursion."""
    deepest = 0
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, dict | list))
    return deepest
