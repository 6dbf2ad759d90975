"""What the Redis broker, the Redis presence store and the emitter share: keys, Lua scripts,
errors, and the redis-py client of the emitter (nodes use :mod:`realtime.redis_wire`)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .errors import BadRequest, Unavailable

logger = logging.getLogger(__name__)

KEY_PREFIX = "rt"
CONTROL_CHANNEL = KEY_PREFIX + ":control"
DEFAULT_POOL_SIZE = 64
DEFAULT_TIMEOUT = 5.0


_NOT_UNICODE = "strings must be valid Unicode (no lone surrogates)"


def check_encodable(text: str) -> None:
    """Raise :class:`~realtime.errors.BadRequest` unless Redis can take ``text`` (UTF-8)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise BadRequest(_NOT_UNICODE) from None


def stream_keys(channel: str) -> tuple[str, str]:
    """Keys of a channel's history list and stream meta hash.

    Both share the ``{channel}`` hash tag so that one Lua script may touch them in Redis Cluster.
    """
    return f"{KEY_PREFIX}:{{{channel}}}:h", f"{KEY_PREFIX}:{{{channel}}}:m"


def idempotency_record_key(channel: str, idempotency_key: str) -> str:
    """Key of the record of a publication made on ``channel`` with ``idempotency_key`` (its
    position, until the idempotency TTL), in the channel's hash slot."""
    return f"{KEY_PREFIX}:{{{channel}}}:i:{idempotency_key}"


def presence_keys(channel: str) -> tuple[str, str, str, str]:
    """Keys of a channel's presence: entry expiries, entry users, connection counts per user,
    and each user's info (from its token)."""
    base = f"{KEY_PREFIX}:{{{channel}}}"
    return base + ":p", base + ":pu", base + ":pc", base + ":pi"


def redacted_url(url: str) -> str:
    """``url`` with its password masked, for logs (``redis://user:***@host:6379/0``)."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not sep or not at:
        return url
    user, colon, _ = credentials.partition(":")
    return f"{scheme}://{user}:***@{host}" if colon else f"{scheme}://***@{host}"


PRESENCE_DUE_KEY = KEY_PREFIX + ":presence:due"
"""Sorted set of the channels with presence entries, scored by their earliest expiry (ms)."""


WEBHOOK_KEY_PREFIX = KEY_PREFIX + ":{webhooks}"


def webhook_keys(prefix: str = WEBHOOK_KEY_PREFIX) -> tuple[str, ...]:
    """Keys of the webhook transition store: connection expiries (zset client -> ms), their
    users (hash client -> user), connection counts (hash user -> count), users in their
    offline grace (zset user -> due ms), subscription expiries (zset "channel client" -> ms),
    subscriber counts (hash channel -> count), the event queue (list of JSON), the event id
    sequence, and the sender's lease. One hash tag: one Lua script may touch them all."""
    return tuple(f"{prefix}:{name}" for name in (
        "clients", "client_user", "users", "offline", "subs", "channels", "queue", "seq",
        "lease"))


def pubsub_channel(channel: str) -> str:
    return f"{KEY_PREFIX}:c:{channel}"


PUBSUB_CHANNEL_PREFIX = pubsub_channel("").encode()


def create_client(url: str, *, pool_size: int = DEFAULT_POOL_SIZE,
                  timeout: float = DEFAULT_TIMEOUT) -> redis.Redis:
    """A redis-py client for ``url`` whose calls fail fast instead of retrying in the background.

    For processes without gevent (the emitter); nodes use :mod:`realtime.redis_wire`.

    The pool blocks (up to ``timeout``) when all ``pool_size`` connections are busy, rather
    than opening one connection per greenlet under load. redis-py picks the hiredis parser
    when it is installed. Retries are ours to decide: the callers turn failures into
    :class:`~realtime.errors.Unavailable` or reconnect with back-off.
    """
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=pool_size, timeout=timeout, socket_timeout=timeout,
        socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0), health_check_interval=0)
    return redis.Redis(connection_pool=pool)


@contextlib.contextmanager
def translate_redis_errors(what: str) -> Iterator[None]:
    """Turn redis-py failures into :class:`~realtime.errors.Unavailable` for the edges.

    A string that cannot be encoded for Redis (UTF-8: a lone surrogate, say in a user id) is
    the caller's input, not an outage: :class:`~realtime.errors.BadRequest`. Commands are
    encoded before anything is written, so such a failure never leaves half a command on a
    connection.
    """
    try:
        yield
    except UnicodeEncodeError as exc:
        raise BadRequest(_NOT_UNICODE) from exc
    # redis-py lets a few socket failures through untranslated, e.g. ValueError "Invalid file
    # object" for a connection closed under it.
    except (redis.RedisError, OSError, ValueError) as exc:
        # Debug only: during an outage every request fails this way, and the caller answers
        # 503; the broker's reader logs the outage itself, once when it starts and ends.
        logger.debug("redis %s failed: %s", what, exc)
        raise Unavailable(f"the message store is unavailable ({type(exc).__name__})") from exc


class LuaScript:
    """A Lua script run by its SHA1 (``EVALSHA``), loaded with ``EVAL`` when Redis lacks it."""

    __slots__ = ("source", "sha")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


class ScriptRunner(Protocol):
    """Something that runs :class:`LuaScript`s: a :class:`CommandPipe` or redis-py."""

    def run_script(self, script: LuaScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run ``script``; raises ``redis.RedisError`` (or ``OSError``) when it cannot."""
        ...

    def run_scripts(self, script: LuaScript,
                    calls: Sequence[tuple[Sequence[Any], Sequence[Any]]]) -> list[Any]:
        """Run ``script`` once per ``(keys, args)``, in order; an error reply comes back as a
        ``redis.ResponseError`` in its place, a lost connection raises."""
        ...


class RedisPyScriptRunner:
    """:class:`ScriptRunner` over a redis-py client, for processes without gevent (emitter)."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._scripts: dict[str, Any] = {}

    def run_script(self, script: LuaScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        registered = self._scripts.get(script.sha)
        if registered is None:
            registered = self._scripts[script.sha] = self._client.register_script(
                script.source)
        return registered(keys=keys, args=args)

    def run_scripts(self, script: LuaScript,
                    calls: Sequence[tuple[Sequence[Any], Sequence[Any]]]) -> list[Any]:
        results: list[Any] = []
        for keys, args in calls:
            try:
                results.append(self.run_script(script, keys, args))
            except redis.ResponseError as exc:
                results.append(exc)
        return results
