"""Webhook events, the body they travel in, and its signature.

A body is ``{"time_ms": <sender's clock>, "events": [{"id", "name", "channel"?, "user"?}, ...]}``
(Pusher's shape); its header :data:`SIGNATURE_HEADER` is the hex HMAC-SHA256 of the raw body
with the webhook secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

SIGNATURE_HEADER = "X-Realtime-Signature"

CHANNEL_OCCUPIED = "channel_occupied"
CHANNEL_VACATED = "channel_vacated"
MEMBER_ADDED = "member_added"
MEMBER_REMOVED = "member_removed"
USER_ONLINE = "user_online"
USER_OFFLINE = "user_offline"
EVENT_NAMES = (CHANNEL_OCCUPIED, CHANNEL_VACATED, MEMBER_ADDED, MEMBER_REMOVED, USER_ONLINE,
               USER_OFFLINE)

# Only these keys of a queued event reach the receiver (the queue may carry more one day).
_PUBLIC_KEYS = ("id", "name", "channel", "user")


def sign(body: bytes, secret: str) -> str:
    """The hex HMAC-SHA256 of ``body`` with ``secret``: the :data:`SIGNATURE_HEADER` value."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, signature: str, secret: str) -> bool:
    """True when ``signature`` is ``body``'s, made with ``secret`` (compared in constant time)."""
    return hmac.compare_digest(sign(body, secret), signature)


def encode_body(events: Sequence[Mapping[str, Any]], time_ms: int | None = None) -> bytes:
    """The JSON body carrying ``events`` (each with an ``id`` and ``name``), compact UTF-8."""
    if time_ms is None:
        time_ms = int(time.time() * 1000)
    public = [{key: event[key] for key in _PUBLIC_KEYS if key in event} for event in events]
    return json.dumps({"time_ms": time_ms, "events": public}, separators=(",", ":"),
                      ensure_ascii=False).encode()
