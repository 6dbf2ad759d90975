"""Presence in Redis, shared by every node, with entries that expire unless refreshed."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import redis

from ..redis_support import (
    PRESENCE_DUE_KEY,
    LuaScript,
    presence_keys,
    translate_redis_errors,
)
from ..redis_wire import CommandPipe
from .base import PresenceMember, PresenceStore

# Channels one sweep looks at, at most (the rest wait for the next heartbeat).
SWEEP_BATCH = 200

# KEYS: entry expiries (zset client -> expires_at_ms), entry users (hash client -> user),
# connection counts (hash user -> count), users' info (hash user -> JSON). Every script first
# drops expired entries, so counts only ever include live entries, and join/leave answers
# stay exact; the users that this left without a connection (their node died) are returned in
# ``gone``, by the one script call that dropped them, so that their leave is published once.
# The keys themselves live twice the TTL past the last write: long enough for a sweep to find
# the expired entries of a node that died, and tell who left, before the keys vanish.
_EXPIRE_STALE = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms)
local gone = {}
for _, client in ipairs(stale) do
  local user = redis.call('HGET', KEYS[2], client)
  redis.call('ZREM', KEYS[1], client)
  redis.call('HDEL', KEYS[2], client)
  if user and redis.call('HINCRBY', KEYS[3], user, -1) <= 0 then
    redis.call('HDEL', KEYS[3], user)
    redis.call('HDEL', KEYS[4], user)
    table.insert(gone, user)
  end
end
"""

# ARGV: client, user, ttl_ms, info (JSON, or "" for none). Returns {1 when this is the user's
# first connection else 0, gone}.
ADD_SCRIPT = LuaScript(_EXPIRE_STALE + """
local ttl_ms = tonumber(ARGV[3])
local known = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now_ms + ttl_ms, ARGV[1])
local first = 0
if not known then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  if redis.call('HINCRBY', KEYS[3], ARGV[2], 1) == 1 then first = 1 end
end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[4], ARGV[2], ARGV[4]) end
for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ttl_ms * 2) end
return {first, gone}
""")

# ARGV: client. Returns {1 when the user has no connection left else 0, gone}.
REMOVE_SCRIPT = LuaScript(_EXPIRE_STALE + """
local user = redis.call('HGET', KEYS[2], ARGV[1])
if not user then return {0, gone} end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if redis.call('HINCRBY', KEYS[3], user, -1) <= 0 then
  redis.call('HDEL', KEYS[3], user)
  redis.call('HDEL', KEYS[4], user)
  return {1, gone}
end
return {0, gone}
""")

# ARGV: ttl_ms, then client, user pairs: ADD_SCRIPT for many entries of one channel.
REFRESH_SCRIPT = LuaScript(_EXPIRE_STALE + """
local ttl_ms = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  if not redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
    redis.call('HINCRBY', KEYS[3], ARGV[i + 1], 1)
  end
  redis.call('ZADD', KEYS[1], now_ms + ttl_ms, ARGV[i])
end
for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ttl_ms * 2) end
return gone
""")

MEMBERS_SCRIPT = LuaScript(_EXPIRE_STALE + """
return {redis.call('HGETALL', KEYS[3]), redis.call('HGETALL', KEYS[4]), gone}
""")

# Drops what expired; returns {gone, the earliest expiry left in ms (-1: no entry left)}.
SWEEP_SCRIPT = LuaScript(_EXPIRE_STALE + """
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if first[2] then return {gone, tonumber(first[2])} end
return {gone, -1}
""")


class RedisPresenceStore(PresenceStore):
    """:class:`PresenceStore` in Redis; each call is one atomic Lua script.

    Entries live ``ttl`` seconds past their last add or refresh, measured on the Redis clock,
    so a node killed without cleaning up drops out of presence within ``ttl``. Every script
    drops the channel's expired entries first and reports the users that left no connection
    to ``on_expired``; :meth:`sweep` runs that on the channels whose earliest entry is due,
    found in one sorted set (:data:`~realtime.redis_support.PRESENCE_DUE_KEY`, channel ->
    earliest expiry in ms) that every add and refresh keeps up to date, so that the leave of
    a dead node's users comes within a heartbeat of their expiry even where nobody touches
    the channel. Calls of all greenlets share one pipelined connection
    (:class:`~realtime.redis_wire.CommandPipe`). Redis down: :class:`~realtime.errors.Unavailable`
    within ``timeout`` seconds.
    """

    def __init__(self, url: str, *, ttl: float, timeout: float = 5.0) -> None:
        super().__init__()
        self._ttl_ms = max(1, int(ttl * 1000))
        self._pipe = CommandPipe(url, timeout=timeout)

    def add(self, channel: str, client_id: str, user: str,
            info: Mapping[str, Any] | None = None) -> bool:
        encoded = json.dumps(info, separators=(",", ":")) if info is not None else ""
        with translate_redis_errors("presence add"):
            first, gone = self._pipe.run_script(ADD_SCRIPT, presence_keys(channel),
                                                [client_id, user, self._ttl_ms, encoded])
            # LT: the channel's due time is its earliest entry's expiry, never a later one.
            self._pipe.call("ZADD", PRESENCE_DUE_KEY, "LT", self._expiry_ms(), channel)
        self._report_gone(channel, gone)
        return first == 1

    def remove(self, channel: str, client_id: str, user: str) -> bool:
        with translate_redis_errors("presence remove"):
            last, gone = self._pipe.run_script(REMOVE_SCRIPT, presence_keys(channel),
                                               [client_id])
        self._report_gone(channel, gone)
        return last == 1

    def members(self, channel: str) -> list[PresenceMember]:
        with translate_redis_errors("presence"):
            flat, flat_info, gone = self._pipe.run_script(MEMBERS_SCRIPT,
                                                          presence_keys(channel), [])
        self._report_gone(channel, gone)
        counts = {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}
        infos = {flat_info[i].decode(): json.loads(flat_info[i + 1])
                 for i in range(0, len(flat_info), 2)}
        return [PresenceMember(user, counts[user], infos.get(user)) for user in sorted(counts)]

    def refresh(self, entries: list[tuple[str, str, str]]) -> None:
        if not entries:
            return
        by_channel: dict[str, list[str]] = {}
        for channel, client_id, user in entries:
            by_channel.setdefault(channel, []).extend((client_id, user))
        with translate_redis_errors("presence refresh"):
            results = self._pipe.run_scripts(
                REFRESH_SCRIPT, [(presence_keys(channel), [self._ttl_ms, *pairs])
                                 for channel, pairs in by_channel.items()])
            expiry = self._expiry_ms()
            # Puts back a channel the index lost (swept while a refresh was under way).
            self._pipe.call_many([("ZADD", PRESENCE_DUE_KEY, "LT", expiry, channel)
                                  for channel in by_channel])
            for result in results:
                if isinstance(result, redis.ResponseError):
                    raise result
        for channel, gone in zip(by_channel, results, strict=True):
            self._report_gone(channel, gone)

    def sweep(self) -> None:
        """Drop the expired entries of the channels that are due, reporting who left."""
        with translate_redis_errors("presence sweep"):
            due = self._pipe.call("ZRANGEBYSCORE", PRESENCE_DUE_KEY, "-inf",
                                  int(time.time() * 1000), "LIMIT", 0, SWEEP_BATCH)
            if not due:
                return
            channels = [channel.decode() for channel in due]
            results = self._pipe.run_scripts(SWEEP_SCRIPT, [(presence_keys(channel), [])
                                                            for channel in channels])
            updates: list[tuple[Any, ...]] = []
            for channel, result in zip(channels, results, strict=True):
                if isinstance(result, redis.ResponseError):
                    continue
                gone, earliest = result
                self._report_gone(channel, gone)
                updates.append(("ZREM", PRESENCE_DUE_KEY, channel) if earliest < 0 else
                               ("ZADD", PRESENCE_DUE_KEY, earliest, channel))
            self._pipe.call_many(updates)

    def close(self) -> None:
        self._pipe.close()

    def _expiry_ms(self) -> int:
        # This node's clock, not Redis's: the index only decides when to look (a skew of a
        # second delays a sweep by as much); the entries' own expiry is on the Redis clock.
        return int(time.time() * 1000) + self._ttl_ms

    def _report_gone(self, channel: str, gone: list[bytes]) -> None:
        if gone and self.on_expired is not None:
            self.on_expired(channel, [user.decode() for user in gone])
