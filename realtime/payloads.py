"""Checks on publication data shared by every way of publishing (clients, HTTP API, emitter)."""

from __future__ import annotations

import json
from typing import Any

from .errors import BadRequest, TooLarge


def check_publication_data(data: Any, max_size: int) -> None:
    """Raise unless ``data`` is a JSON value whose compact encoding fits in ``max_size`` bytes."""
    try:
        encoded = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BadRequest("data must be a JSON value") from exc
    size = len(encoded.encode())
    if size > max_size:
        raise TooLarge(f"data is {size} bytes; the limit is {max_size}")
