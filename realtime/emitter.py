"""Publish to realtime from any Python process: Celery workers, Django or Flask apps, scripts.

>>> from realtime.emitter import Emitter, PublishRequest
>>> emitter = Emitter("redis://127.0.0.1:6379/0")
>>> emitter.publish("user:alice", {"title": "Your order shipped"})
>>> emitter.publish_many([PublishRequest("user:bob", {"title": "Hi"}),
...                       PublishRequest("user:carol", {"title": "Hi"})])

The emitter writes to the same Redis as the nodes with the same Lua script as ``POST
/api/publish``: same offsets, same history, no HTTP hop. It needs neither gevent nor a running
node in the caller's process, and is safe to share between threads.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

from .broker.base import HistoryOptions, PublishRequest, StreamPosition, publish_by_history
from .broker.redis_streams import RedisStreams
from .channels import ChannelPolicy, validate_channel
from .config import Config
from .control import encode_control
from .errors import BadRequest, RealtimeError
from .payloads import check_idempotency_key, check_publication_data
from .redis_support import (
    CONTROL_CHANNEL,
    RedisPyScriptRunner,
    create_client,
    translate_redis_errors,
)

# PublishRequest is re-exported: it is what publish_many takes.
__all__ = ["Emitter", "PublishRequest"]


class Emitter:
    """Publishes, broadcasts and disconnects through Redis, like the HTTP API.

    What a channel keeps (history size and TTL) and the largest data it takes must be what the
    nodes use: pass their ``config`` (``Config.load(config_file=...)``, which carries the
    namespaces' settings too), or, without namespaces of your own, ``history_size``,
    ``history_ttl`` and ``max_message_size`` (their defaults are the nodes' defaults). Like the
    HTTP API, the emitter is not subject to the client rules (who may publish where). Errors
    are :class:`~realtime.errors.RealtimeError`: ``BadRequest`` and ``TooLarge`` for bad
    input, ``Unavailable`` when Redis cannot be reached within ``timeout`` seconds.
    """

    def __init__(self, url: str, *, config: Config | None = None, history_size: int = 100,
                 history_ttl: float = 300.0, max_message_size: int = 64 * 1024,
                 timeout: float = 5.0, pool_size: int = 8) -> None:
        self._client = create_client(url, pool_size=pool_size, timeout=timeout)
        self._config = config or Config(history_size=history_size, history_ttl=history_ttl,
                                        max_message_size=max_message_size)
        # The nodes' idempotency TTL: a key the emitter used is remembered as long as theirs.
        self._streams = RedisStreams(RedisPyScriptRunner(self._client),
                                     idempotency_ttl=self._config.idempotency_ttl)
        self._channels = ChannelPolicy(self._config)
        self._sender = "emitter-" + secrets.token_hex(4)

    def _checked(self, channel: str, data: Any) -> HistoryOptions:
        """Validate ``channel`` and ``data`` as the nodes do; the channel's history options."""
        validate_channel(channel)
        rules = self._channels.rules(channel)
        config = self._config
        check_publication_data(data, rules.max_message_size or config.max_message_size)
        return HistoryOptions(size=rules.history_size or config.history_size,
                              ttl=rules.history_ttl or config.history_ttl)

    def publish(self, channel: str, data: Any, *,
                idempotency_key: str | None = None) -> StreamPosition:
        """Publish ``data`` (a JSON value) on ``channel``; return its stream position.

        With ``idempotency_key`` (1 to 64 characters), a retry within the idempotency TTL
        (the config's, 300 s by default) publishes nothing and returns the first position:
        retry with the same key when an answer was lost.
        """
        history = self._checked(channel, data)
        return self._streams.publish(channel, data, None, history,
                                     check_idempotency_key(idempotency_key))

    def publish_many(self, requests: Sequence[PublishRequest],
                     ) -> list[StreamPosition | RealtimeError]:
        """Make ``requests`` (``PublishRequest(channel, data, idempotency_key=...)``) in order,
        pipelined: one round trip to Redis (one per history setting when the channels'
        namespaces keep different histories).

        Each request gets its position or the error that refused it, in order, and one's
        failure does not stop the others: ``BadRequest``/``TooLarge`` for bad input,
        ``Unavailable`` when Redis failed. Idempotency keys work as in :meth:`publish`. A
        request's ``user`` is the publication's ``user`` (None, as :meth:`publish` sends, for
        a backend).
        """
        def checked(request: PublishRequest) -> HistoryOptions:
            history = self._checked(request.channel, request.data)
            check_idempotency_key(request.idempotency_key)
            return history

        return publish_by_history(requests, checked, self._streams.publish_many)

    def broadcast(self, channels: list[str], data: Any, *,
                  idempotency_key: str | None = None) -> list[tuple[str, StreamPosition]]:
        """Publish the same ``data`` on each channel, in order; stops at the first failure.

        ``idempotency_key`` applies per channel: retrying a broadcast that failed half-way
        with the same key publishes only on the channels it had not reached.
        """
        if not isinstance(channels, list | tuple) or not channels:
            raise BadRequest("channels must be a non-empty list of channel names")
        histories = [self._checked(channel, data) for channel in channels]
        key = check_idempotency_key(idempotency_key)
        return [(channel, self._streams.publish(channel, data, None, history, key))
                for channel, history in zip(channels, histories, strict=True)]

    def disconnect(self, user: str) -> None:
        """Disconnect every connection of ``user`` on every node.

        Fire and forget, like Socket.IO's Redis emitter: nodes act on it as they receive it,
        and nobody counts (``POST /api/disconnect`` answers with a count).
        """
        if not isinstance(user, str) or not user:
            raise BadRequest("user must be a non-empty string")
        with translate_redis_errors("publish"):
            self._client.publish(CONTROL_CHANNEL,
                                 encode_control(self._sender, "disconnect", user=user, req=None))

    def close(self) -> None:
        self._client.close()
        self._client.connection_pool.disconnect()

    def __enter__(self) -> Emitter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
