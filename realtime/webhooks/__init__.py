"""Webhooks: the node tells a backend, by signed HTTP POSTs, who came and went.

:mod:`.events` (the body and its signature), :mod:`.base` (the transition store that decides,
once cluster-wide, that a channel was occupied or a user went offline, and queues the events),
:mod:`.memory` and :mod:`.redis` (its two backends), :mod:`.sender` (the greenlet that POSTs
the queued events), :mod:`.service` (what the node calls).
"""

from .base import TransitionStore
from .events import SIGNATURE_HEADER, encode_body, sign, verify

__all__ = ["SIGNATURE_HEADER", "TransitionStore", "encode_body", "sign", "verify"]
