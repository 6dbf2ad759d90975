"""Brokers, chosen by URL (see :func:`realtime.backends.create_broker`)."""

from .base import (
    NO_STREAM,
    Broker,
    BrokerEventHandler,
    HistoryOptions,
    HistoryResult,
    Publication,
    PublishRequest,
    StreamPosition,
)
from .memory import MemoryBroker

__all__ = [
    "NO_STREAM",
    "Broker",
    "BrokerEventHandler",
    "HistoryOptions",
    "HistoryResult",
    "MemoryBroker",
    "Publication",
    "PublishRequest",
    "StreamPosition",
]
