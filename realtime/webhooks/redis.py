"""The transition store in Redis, shared by every node: each call is one atomic Lua script."""

from __future__ import annotations

import json
from collections.abc import Sequence

from ..redis_support import WEBHOOK_KEY_PREFIX, LuaScript, translate_redis_errors, webhook_keys
from ..redis_wire import CommandPipe
from .base import QUEUE_LIMIT, Event, Result, TransitionStore

# Expired entries, and users due offline, one sweep handles at most (the rest wait for the
# next heartbeat): a few milliseconds of Redis per script.
SWEEP_BATCH = 1000

# KEYS: see realtime.redis_support.webhook_keys. ARGV[1] is always the queue's limit. push()
# queues an event with its id (the Redis clock's seconds and a sequence number: unique, and
# the same on every retry because it is stored with the event) unless the queue is full.
_PRELUDE = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local queued, dropped = {}, 0
local function push(event)
  if redis.call('LLEN', KEYS[7]) >= tonumber(ARGV[1]) then
    dropped = dropped + 1
    return
  end
  event.id = now[1] .. '-' .. redis.call('INCR', KEYS[8])
  local encoded = cjson.encode(event)
  redis.call('RPUSH', KEYS[7], encoded)
  table.insert(queued, encoded)
end
"""

# ARGV: limit, client, user, ttl_ms.
CONNECT_SCRIPT = LuaScript(_PRELUDE + """
local known = redis.call('ZSCORE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[4]), ARGV[2])
if known then return {queued, dropped} end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
if redis.call('HINCRBY', KEYS[3], ARGV[3], 1) == 1 and redis.call('ZREM', KEYS[4], ARGV[3]) == 0
then
  push({name = 'user_online', user = ARGV[3]})
end
return {queued, dropped}
""")

# ARGV: limit, client, grace_ms.
DISCONNECT_SCRIPT = LuaScript(_PRELUDE + """
local user = redis.call('HGET', KEYS[2], ARGV[2])
if not user then return {queued, dropped} end
redis.call('ZREM', KEYS[1], ARGV[2])
redis.call('HDEL', KEYS[2], ARGV[2])
if redis.call('HINCRBY', KEYS[3], user, -1) <= 0 then
  redis.call('HDEL', KEYS[3], user)
  redis.call('ZADD', KEYS[4], now_ms + tonumber(ARGV[3]), user)
end
return {queued, dropped}
""")

# ARGV: limit, channel, client, ttl_ms.
OCCUPY_SCRIPT = LuaScript(_PRELUDE + """
local member = ARGV[2] .. ' ' .. ARGV[3]
local known = redis.call('ZSCORE', KEYS[5], member)
redis.call('ZADD', KEYS[5], now_ms + tonumber(ARGV[4]), member)
if not known and redis.call('HINCRBY', KEYS[6], ARGV[2], 1) == 1 then
  push({name = 'channel_occupied', channel = ARGV[2]})
end
return {queued, dropped}
""")

# ARGV: limit, channel, client.
VACATE_SCRIPT = LuaScript(_PRELUDE + """
if redis.call('ZREM', KEYS[5], ARGV[2] .. ' ' .. ARGV[3]) == 1
   and redis.call('HINCRBY', KEYS[6], ARGV[2], -1) <= 0 then
  redis.call('HDEL', KEYS[6], ARGV[2])
  push({name = 'channel_vacated', channel = ARGV[2]})
end
return {queued, dropped}
""")

# ARGV: limit, then one JSON event per argument.
ENQUEUE_SCRIPT = LuaScript(_PRELUDE + """
for i = 2, #ARGV do push(cjson.decode(ARGV[i])) end
return {queued, dropped}
""")

# ARGV: limit, ttl_ms, number of clients n, n clients, then "channel client" members. XX: a
# refresh racing a disconnect never brings the entry back.
REFRESH_SCRIPT = LuaScript("""
local now = redis.call('TIME')
local expiry = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tonumber(ARGV[2])
local n = tonumber(ARGV[3])
for i = 4, #ARGV do
  redis.call('ZADD', i < 4 + n and KEYS[1] or KEYS[5], 'XX', expiry, ARGV[i])
end
return 1
""")

# ARGV: limit, batch. The connections and subscriptions that expired (their node died) are
# dropped as a disconnect and a vacate would have; a user left without connection that way
# is due at once (the expiry took longer than the grace). Then the users whose grace ended
# without a connection are offline.
SWEEP_SCRIPT = LuaScript(_PRELUDE + """
local batch = tonumber(ARGV[2])
for _, client in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, batch)) do
  local user = redis.call('HGET', KEYS[2], client)
  redis.call('ZREM', KEYS[1], client)
  redis.call('HDEL', KEYS[2], client)
  if user and redis.call('HINCRBY', KEYS[3], user, -1) <= 0 then
    redis.call('HDEL', KEYS[3], user)
    redis.call('ZADD', KEYS[4], now_ms, user)
  end
end
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now_ms, 'LIMIT', 0, batch)) do
  redis.call('ZREM', KEYS[5], member)
  local channel = string.match(member, '^(%S+) ')
  if redis.call('HINCRBY', KEYS[6], channel, -1) <= 0 then
    redis.call('HDEL', KEYS[6], channel)
    push({name = 'channel_vacated', channel = channel})
  end
end
for _, user in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now_ms, 'LIMIT', 0, batch)) do
  redis.call('ZREM', KEYS[4], user)
  if redis.call('HEXISTS', KEYS[3], user) == 0 then
    push({name = 'user_offline', user = user})
  end
end
return {queued, dropped}
""")

# ARGV: limit, owner, lease_ms, count. nil while another owner holds the lease.
CLAIM_SCRIPT = LuaScript("""
local holder = redis.call('GET', KEYS[9])
if holder and holder ~= ARGV[2] then return false end
redis.call('SET', KEYS[9], ARGV[2], 'PX', ARGV[3])
return redis.call('LRANGE', KEYS[7], 0, tonumber(ARGV[4]) - 1)
""")

# ARGV: limit, owner, count.
ACK_SCRIPT = LuaScript("""
if redis.call('GET', KEYS[9]) ~= ARGV[2] then return 0 end
redis.call('LTRIM', KEYS[7], tonumber(ARGV[3]), -1)
return 1
""")


class RedisTransitionStore(TransitionStore):
    """:class:`TransitionStore` in Redis. Entries live ``ttl`` seconds (the presence TTL) past
    their last write or refresh, on the Redis clock, and so does the offline grace; the queue
    is a Redis list, which outlives any node. ``prefix`` keeps the keys of separate
    deployments (or tests) on one Redis apart."""

    def __init__(self, url: str, *, ttl: float, grace: float, queue_limit: int = QUEUE_LIMIT,
                 prefix: str = WEBHOOK_KEY_PREFIX, timeout: float = 5.0) -> None:
        self._ttl_ms = max(1, int(ttl * 1000))
        self._grace_ms = max(0, int(grace * 1000))
        self._limit = queue_limit
        self._keys = webhook_keys(prefix)
        self._pipe = CommandPipe(url, timeout=timeout)

    def connect(self, client_id: str, user: str) -> Result:
        return self._run(CONNECT_SCRIPT, "connect", client_id, user, self._ttl_ms)

    def disconnect(self, client_id: str) -> Result:
        return self._run(DISCONNECT_SCRIPT, "disconnect", client_id, self._grace_ms)

    def occupy(self, channel: str, client_id: str) -> Result:
        return self._run(OCCUPY_SCRIPT, "occupy", channel, client_id, self._ttl_ms)

    def vacate(self, channel: str, client_id: str) -> Result:
        return self._run(VACATE_SCRIPT, "vacate", channel, client_id)

    def enqueue(self, events: Sequence[Event]) -> Result:
        if not events:
            return [], 0
        return self._run(ENQUEUE_SCRIPT, "enqueue",
                         *(json.dumps(event, separators=(",", ":")) for event in events))

    def refresh(self, client_ids: Sequence[str], subscriptions: Sequence[tuple[str, str]],
                ) -> None:
        if not client_ids and not subscriptions:
            return
        with translate_redis_errors("webhooks refresh"):
            self._pipe.run_script(REFRESH_SCRIPT, self._keys, [
                self._limit, self._ttl_ms, len(client_ids), *client_ids,
                *(f"{channel} {client_id}" for channel, client_id in subscriptions)])

    def sweep(self) -> Result:
        return self._run(SWEEP_SCRIPT, "sweep", SWEEP_BATCH)

    def claim(self, owner: str, lease: float, limit: int = 50) -> list[Event] | None:
        with translate_redis_errors("webhooks claim"):
            found = self._pipe.run_script(CLAIM_SCRIPT, self._keys,
                                          [self._limit, owner, max(1, int(lease * 1000)),
                                           limit])
        return None if found is None else [json.loads(item) for item in found]

    def ack(self, owner: str, count: int) -> bool:
        with translate_redis_errors("webhooks ack"):
            return self._pipe.run_script(ACK_SCRIPT, self._keys,
                                         [self._limit, owner, count]) == 1

    def queue_length(self) -> int:
        with translate_redis_errors("webhooks queue length"):
            return int(self._pipe.call("LLEN", self._keys[6]))

    def close(self) -> None:
        self._pipe.close()

    def _run(self, script: LuaScript, what: str, *args: object) -> Result:
        with translate_redis_errors("webhooks " + what):
            queued, dropped = self._pipe.run_script(script, self._keys, [self._limit, *args])
        return [json.loads(item) for item in queued], int(dropped)
