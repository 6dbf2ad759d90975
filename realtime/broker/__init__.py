"""Brokers, chosen by URL (see :func:`realtime.backends.create_broker`)."""

from .base import (
    Broker,
    BrokerEventHandler,
    HistoryOptions,
    HistoryResult,
    Publication,
    StreamPosition,
)
from .memory import MemoryBroker

__all__ = [
    "Broker",
    "BrokerEventHandler",
    "HistoryOptions",
    "HistoryResult",
    "MemoryBroker",
    "Publication",
    "StreamPosition",
]
