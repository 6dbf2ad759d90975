"""Channel history streams in Redis, and publishing into them: shared by broker and emitter.

History is a Redis list per channel, newest first, trimmed to the history size, next to a
small hash holding the stream's epoch and top offset. Lists rather than Streams: the history
is short (100 by default), so recovery reads the whole list at once; a list trimmed with LTRIM
costs O(1) per publish and uses less memory than a Stream for small entries, and the Stream's
strength, ranges by ID, buys nothing at this size.

One Lua script appends, assigns the offset and PUBLISHes, so offsets are gap-free and in the
same order in history and on the wire, whichever node or emitter publishes. The same script
checks and records a publication's idempotency key (a string key next to the stream's, holding
the position it got, expiring after the idempotency TTL), so a retry is answered with the first
position in the same atomic step. Only publishing
writes: reading a channel's history never creates a key nor extends one's life, and every key
of a stream expires by itself (the list ``ttl`` after the last publication, the hash
``meta_ttl`` after it).
"""

from __future__ import annotations

import base64
import logging
import random
from collections.abc import Sequence
from typing import Any

import msgpack

from ..errors import BadRequest, RealtimeError, Unavailable
from ..redis_support import (
    LuaScript,
    ScriptRunner,
    check_encodable,
    idempotency_record_key,
    pubsub_channel,
    stream_keys,
    translate_redis_errors,
)
from .base import (
    DEFAULT_IDEMPOTENCY_TTL,
    HistoryOptions,
    HistoryResult,
    Publication,
    PublishRequest,
    StreamPosition,
)

logger = logging.getLogger(__name__)

WIRE_VERSION = 1

# Entries and messages are a msgpack header followed by the msgpack body [data, user], which
# the publisher packs once: the script never decodes it.
#   history entry:        [offset, expires_at_ms] body
#   publication message:  [WIRE_VERSION, "p", offset, epoch] body
# KEYS: history list, meta hash, and (only with an idempotency key) the key's record.
# ARGV: body, size, ttl_ms, meta_ttl_s, candidate epoch, pub/sub channel, wire version, and
# (with an idempotency key) its TTL in ms. Returns {epoch, offset}.
PUBLISH_SCRIPT = LuaScript("""
if KEYS[3] then
  local seen = redis.call('GET', KEYS[3])
  if seen then
    local space = string.find(seen, ' ', 1, true)
    return {string.sub(seen, 1, space - 1), tonumber(string.sub(seen, space + 1))}
  end
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local offset = redis.call('HINCRBY', KEYS[2], 'o', 1)
local epoch = false
if offset ~= 1 then
  epoch = redis.call('HGET', KEYS[2], 'e')
end
if not epoch then
  -- a new stream: whatever history outlived the old meta belongs to a forgotten stream
  epoch = ARGV[5]
  redis.call('HSET', KEYS[2], 'e', epoch)
  redis.call('DEL', KEYS[1])
end
redis.call('EXPIRE', KEYS[2], ARGV[4])
local ttl_ms = tonumber(ARGV[3])
local size = tonumber(ARGV[2])
if redis.call('LPUSH', KEYS[1], cmsgpack.pack({offset, now_ms + ttl_ms}) .. ARGV[1]) > size then
  redis.call('LTRIM', KEYS[1], 0, size - 1)
end
redis.call('PEXPIRE', KEYS[1], ttl_ms)
redis.call('PUBLISH', ARGV[6], cmsgpack.pack({tonumber(ARGV[7]), 'p', offset, epoch}) .. ARGV[1])
if KEYS[3] then
  redis.call('SET', KEYS[3], epoch .. ' ' .. offset, 'PX', ARGV[8])
end
return {epoch, offset}
""")

# Returns {epoch, offset, now_ms, entries (newest first)}, or epoch "" and no entries when the
# stream does not exist (never published, or its meta expired). Read-only: a read never creates
# a key, nor extends one's life. A list without its meta belongs to a forgotten stream (the next
# publish deletes it) and is not read.
HISTORY_SCRIPT = LuaScript("""
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local meta = redis.call('HMGET', KEYS[2], 'e', 'o')
if not meta[1] then
  return {'', 0, now_ms, {}}
end
local count = tonumber(ARGV[1])
local entries = {}
if count < 0 then
  entries = redis.call('LRANGE', KEYS[1], 0, -1)
elseif count > 0 then
  entries = redis.call('LRANGE', KEYS[1], 0, count - 1)
end
return {meta[1], tonumber(meta[2]), now_ms, entries}
""")


class WireFormatError(ValueError):
    """Bytes from Redis that are not a publication of a known version."""


def pack_body(data: Any, user: str | None) -> bytes:
    """The msgpack body ``[data, user]`` of a history entry and of its message."""
    try:
        return msgpack.packb([data, user])
    except UnicodeEncodeError as exc:
        raise BadRequest("data and user must be valid Unicode (no lone surrogates)") from exc
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadRequest("data cannot be stored (integers must fit in 64 bits)") from exc


def _unpack_two(blob: bytes) -> tuple[Any, Any]:
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(blob)
    try:
        header, body = next(unpacker), next(unpacker)
    except (StopIteration, ValueError, msgpack.UnpackException) as exc:
        raise WireFormatError(f"undecodable message: {exc}") from exc
    if not isinstance(header, list) or not isinstance(body, list) or len(body) != 2:
        raise WireFormatError("message has the wrong shape")
    return header, body


def encode_presence_message(kind: str, user: str) -> bytes:
    """A join (``"j"``) or leave (``"l"``) message on a channel's pub/sub channel."""
    try:
        return msgpack.packb([WIRE_VERSION, kind, user])
    except UnicodeEncodeError as exc:
        raise BadRequest("user must be valid Unicode (no lone surrogates)") from exc


class MessageDecoder:
    """Decodes what arrives on channels' pub/sub channels: ``("p", Publication)`` or
    ``("j" | "l", user)``; :class:`WireFormatError` for anything else.

    One decoder per reader (it is not for sharing between threads): it keeps one msgpack
    Unpacker for every message, because building one zeroes its 32 KB parsing stack, which
    was 8% of the instructions of a publish and its delivery (bench/instructions.py). Bytes
    after a message's last object are dropped, as a fresh Unpacker per message dropped them.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        self._fed = 0  # bytes fed to this unpacker: where the next message starts

    def decode(self, channel: str, blob: bytes) -> tuple[str, Any]:
        unpacker = self._unpacker
        unpacker.feed(blob)
        self._fed += len(blob)
        try:
            message = _decode(channel, unpacker)
        except BaseException:
            self._reset()
            raise
        if unpacker.tell() != self._fed:  # bytes left over: dropped with the unpacker
            self._reset()
        return message


def decode_message(channel: str, blob: bytes) -> tuple[str, Any]:
    """Decode one message as :meth:`MessageDecoder.decode` does (a decoder of its own)."""
    return MessageDecoder().decode(channel, blob)


def _decode(channel: str, unpacker: msgpack.Unpacker) -> tuple[str, Any]:
    # One unpacker for the header and the body: every publication a node delivers comes
    # through here, and a second unpacker for the body cost a tenth of a delivery (cProfile).
    header = _next_object(unpacker)
    if isinstance(header, list) and len(header) in (3, 4) and header[0] == WIRE_VERSION:
        kind = header[1]
        if kind == "p":
            # [version, "p", offset, epoch]; a node of an earlier release sends no epoch
            body = _next_object(unpacker)
            epoch = header[3] if len(header) == 4 else ""
            if not isinstance(body, list) or len(body) != 2 or not isinstance(epoch, str):
                raise WireFormatError("message has the wrong shape")
            return "p", Publication(channel, header[2], body[0], body[1], epoch)
        if kind in ("j", "l") and isinstance(header[2], str):
            return kind, header[2]
    raise WireFormatError(f"unknown message header {header!r}")


def _next_object(unpacker: msgpack.Unpacker) -> Any:
    try:
        return next(unpacker)
    except (StopIteration, ValueError, msgpack.UnpackException) as exc:
        raise WireFormatError(f"undecodable message: {exc}") from exc


class RedisStreams:
    """Publishing into and reading channel streams, through any :class:`ScriptRunner`."""

    def __init__(self, scripts: ScriptRunner, *,
                 idempotency_ttl: float = DEFAULT_IDEMPOTENCY_TTL) -> None:
        self._scripts = scripts
        self._idempotency_ttl_ms = max(1, int(idempotency_ttl * 1000))

    def publish(self, channel: str, data: Any, user: str | None, options: HistoryOptions,
                idempotency_key: str | None = None) -> StreamPosition:
        keys, args = self._publish_call(channel, pack_body(data, user), options,
                                        idempotency_key)
        with translate_redis_errors("publish"):
            epoch, offset = self._scripts.run_script(PUBLISH_SCRIPT, keys, args)
        return StreamPosition(_text(epoch), int(offset))

    def publish_many(self, requests: Sequence[PublishRequest],
                     options: HistoryOptions) -> list[StreamPosition | RealtimeError]:
        """Make every request with one pipelined round trip; see ``Broker.publish_many``."""
        # A slot waiting for its reply holds None: an exception per slot as a placeholder was
        # a tenth of a batch's CPU (py-spy, bench/profile_http.py --batch 100).
        results: list[StreamPosition | RealtimeError | None] = []
        calls, slots = [], []
        for request in requests:
            try:
                calls.append(self._publish_call(
                    request.channel, pack_body(request.data, request.user), options,
                    request.idempotency_key))
            except RealtimeError as exc:
                results.append(exc)
                continue
            slots.append(len(results))
            results.append(None)
        if calls:
            try:
                with translate_redis_errors("publish"):
                    replies = self._scripts.run_scripts(PUBLISH_SCRIPT, calls)
            except Unavailable as exc:
                for slot in slots:
                    results[slot] = exc
                return results  # type: ignore[return-value]  # every slot is filled
            for slot, reply in zip(slots, replies, strict=True):
                if isinstance(reply, Exception):
                    logger.warning("redis publish failed: %s", reply)
                    results[slot] = Unavailable(
                        f"the message store is unavailable ({type(reply).__name__})")
                else:
                    results[slot] = StreamPosition(_text(reply[0]), int(reply[1]))
        return results  # type: ignore[return-value]  # every slot is filled

    def _publish_call(self, channel: str, body: bytes, options: HistoryOptions,
                      idempotency_key: str | None) -> tuple[tuple[str, ...], list[Any]]:
        """Keys and arguments of :data:`PUBLISH_SCRIPT` for one publication."""
        # Checked here, item by item: in a pipelined publish_many, a string that fails to
        # encode would otherwise refuse the whole batch.
        check_encodable(channel)
        keys: tuple[str, ...] = stream_keys(channel)
        args = [body, options.size, max(1, int(options.ttl * 1000)),
                max(1, int(options.meta_ttl)), _new_epoch(), pubsub_channel(channel),
                WIRE_VERSION]
        if idempotency_key is not None:
            check_encodable(idempotency_key)
            keys = (*keys, idempotency_record_key(channel, idempotency_key))
            args.append(self._idempotency_ttl_ms)
        return keys, args

    def history(self, channel: str, *, since_offset: int | None, limit: int | None,
                options: HistoryOptions) -> HistoryResult:
        count = -1 if since_offset is not None or limit is None else limit
        with translate_redis_errors("history"):
            epoch, offset, now_ms, entries = self._scripts.run_script(
                HISTORY_SCRIPT, stream_keys(channel), [count])
        # Every entry carries its own expiry: the list's PEXPIRE, refreshed by each publish,
        # lets older entries outlive their TTL while the channel stays busy, so they are
        # filtered here and never returned.
        publications = []
        for entry in reversed(entries):
            (entry_offset, expires_at), (data, user) = _unpack_two(entry)
            if expires_at > now_ms and (since_offset is None or entry_offset > since_offset):
                publications.append(Publication(channel, entry_offset, data, user,
                                                epoch.decode()))
        return HistoryResult(publications, StreamPosition(epoch.decode(), int(offset)))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _new_epoch() -> str:
    """A candidate epoch; the script keeps it only when the stream is new.

    48 random bits, as ``secrets.token_urlsafe(6)`` gave, but from ``random`` (seeded from
    the OS, seeded again in a forked child): an epoch tells stream incarnations apart and is
    no secret, and ``os.urandom``'s system call on every publish was 9% of a node's time on
    POST /api/publish (py-spy ``--native``).
    """
    return base64.urlsafe_b64encode(random.randbytes(6)).decode()
