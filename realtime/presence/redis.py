"""Presence in Redis, shared by every node, with entries that expire unless refreshed."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import redis

from ..redis_support import LuaScript, presence_keys, translate_redis_errors
from ..redis_wire import CommandPipe
from .base import PresenceMember, PresenceStore

# KEYS: entry expiries (zset client -> expires_at_ms), entry users (hash client -> user),
# connection counts (hash user -> count), users' info (hash user -> JSON). Every script first
# drops expired entries, so counts only ever include live entries, and join/leave answers
# stay exact.
_EXPIRE_STALE = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms)
for _, client in ipairs(stale) do
  local user = redis.call('HGET', KEYS[2], client)
  redis.call('ZREM', KEYS[1], client)
  redis.call('HDEL', KEYS[2], client)
  if user and redis.call('HINCRBY', KEYS[3], user, -1) <= 0 then
    redis.call('HDEL', KEYS[3], user)
    redis.call('HDEL', KEYS[4], user)
  end
end
"""

# ARGV: client, user, ttl_ms, info (JSON, or "" for none). Returns 1 when this is the user's
# first connection.
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
for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ttl_ms) end
return first
""")

# ARGV: client. Returns 1 when the user has no connection left.
REMOVE_SCRIPT = LuaScript(_EXPIRE_STALE + """
local user = redis.call('HGET', KEYS[2], ARGV[1])
if not user then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if redis.call('HINCRBY', KEYS[3], user, -1) <= 0 then
  redis.call('HDEL', KEYS[3], user)
  redis.call('HDEL', KEYS[4], user)
  return 1
end
return 0
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
for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ttl_ms) end
return 0
""")

MEMBERS_SCRIPT = LuaScript(_EXPIRE_STALE + """
return {redis.call('HGETALL', KEYS[3]), redis.call('HGETALL', KEYS[4])}
""")


class RedisPresenceStore(PresenceStore):
    """:class:`PresenceStore` in Redis; each call is one atomic Lua script.

    Entries live ``ttl`` seconds past their last add or refresh, measured on the Redis clock,
    so a node killed without cleaning up drops out of presence within ``ttl``. Calls of all
    greenlets share one pipelined connection (:class:`~realtime.redis_wire.CommandPipe`).
    Redis down: :class:`~realtime.errors.Unavailable` within ``timeout`` seconds.
    """

    def __init__(self, url: str, *, ttl: float, timeout: float = 5.0) -> None:
        self._ttl_ms = max(1, int(ttl * 1000))
        self._pipe = CommandPipe(url, timeout=timeout)

    def add(self, channel: str, client_id: str, user: str,
            info: Mapping[str, Any] | None = None) -> bool:
        encoded = json.dumps(info, separators=(",", ":")) if info is not None else ""
        with translate_redis_errors("presence add"):
            return self._pipe.run_script(ADD_SCRIPT, presence_keys(channel),
                                         [client_id, user, self._ttl_ms, encoded]) == 1

    def remove(self, channel: str, client_id: str, user: str) -> bool:
        with translate_redis_errors("presence remove"):
            return self._pipe.run_script(REMOVE_SCRIPT, presence_keys(channel),
                                         [client_id]) == 1

    def members(self, channel: str) -> list[PresenceMember]:
        with translate_redis_errors("presence"):
            flat, flat_info = self._pipe.run_script(MEMBERS_SCRIPT, presence_keys(channel), [])
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
            for result in results:
                if isinstance(result, redis.ResponseError):
                    raise result

    def close(self) -> None:
        self._pipe.close()
