"""Broker and presence store chosen by URL scheme: ``memory://`` or ``redis://host:port/db``."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from .broker.base import Broker
from .broker.memory import MemoryBroker
from .broker.redis import RedisBroker
from .config import Config, ConfigError
from .presence.base import PresenceStore
from .presence.memory import MemoryPresenceStore
from .presence.redis import RedisPresenceStore
from .webhooks.base import TransitionStore
from .webhooks.memory import MemoryTransitionStore
from .webhooks.redis import RedisTransitionStore

BrokerFactory = Callable[[str, Config], Broker]
PresenceFactory = Callable[[str, Config], PresenceStore]
TransitionFactory = Callable[[str, Config], TransitionStore]

_BROKERS: dict[str, BrokerFactory] = {
    "memory": lambda url, config: MemoryBroker(idempotency_ttl=config.idempotency_ttl),
    "redis": lambda url, config: RedisBroker(url, idempotency_ttl=config.idempotency_ttl),
}
_PRESENCE_STORES: dict[str, PresenceFactory] = {
    "memory": lambda url, config: MemoryPresenceStore(),
    "redis": lambda url, config: RedisPresenceStore(url, ttl=config.presence_ttl),
}

_TRANSITION_STORES: dict[str, TransitionFactory] = {
    "memory": lambda url, config: MemoryTransitionStore(grace=config.offline_grace),
    "redis": lambda url, config: RedisTransitionStore(url, ttl=config.presence_ttl,
                                                      grace=config.offline_grace),
}


def create_broker(config: Config) -> Broker:
    """The broker named by ``config.broker``."""
    return _pick(_BROKERS, config.broker, "broker")(config.broker, config)


def create_presence_store(config: Config) -> PresenceStore:
    """The presence store named by ``config.presence_url`` (the broker URL by default)."""
    url = config.presence_url
    return _pick(_PRESENCE_STORES, url, "presence store")(url, config)


def create_transition_store(config: Config) -> TransitionStore:
    """The webhook transition store, next to presence (``config.presence_url``)."""
    url = config.presence_url
    return _pick(_TRANSITION_STORES, url, "presence store")(url, config)


def _pick(factories: dict, url: str, what: str) -> Callable:
    scheme = urlsplit(url).scheme
    try:
        return factories[scheme]
    except KeyError:
        known = ", ".join(f"{name}://" for name in sorted(factories))
        raise ConfigError(f"unsupported {what} URL {url!r}; use one of: {known}") from None
