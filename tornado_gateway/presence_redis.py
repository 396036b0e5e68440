"""Presence in Redis: `gateway:presence:{userId}` hashes plus the per-instance live keys.

Register and unregister are Lua scripts so that "who owned this device before"
and "only delete the entry if it is still mine" are decided atomically: without
that, a replaced connection closing on instance A would delete the entry the
new connection on instance B just wrote.

The same scripts keep `gateway:users`, the set of users that have a presence hash:
a user joins it with the hash's first entry and leaves it when the hash's last
entry goes, in the same atomic step, whoever removes the entry (the instance
itself, its resync, or a survivor reaping a dead instance). So SCARD is the
number of distinct users in the cluster, in O(1), and it is exactly as true as
presence itself: a killed instance's users stay counted until its entries are
reaped (INSTANCE_TTL). A slow sweep (`sweep_users`, a page per housekeeping
tick) removes members whose hash is gone some other way (a release before this
set existed removing entries during a rolling upgrade, a key deleted by hand).
Why a set: a HyperLogLog cannot forget a user who left, and a counter kept with
INCR/DECR, once wrong, has nothing to be checked against; a set costs one member
per online user (as the presence hashes do) and can be repaired member by member.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import cast

import ujson
from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

from .bus import BusUnavailable
from .connection import Connection
from .messages import USER_TYPES, dumps
from .presence import DeviceLimitReached, PresenceEntry, Registration, ServerStats, presence_entry, stamp_of
from .redis_keys import Keys
from .resp import Commands, RedisReplyError, RedisUnavailable

log = logging.getLogger(__name__)

# KEYS: presence hash, server users set, users set.
# ARGV: deviceId, entry JSON, userId, max devices (0: no cap), stamp, connectionId.
# Returns {'limit'}, {'newer', entry} (a newer connection owns the device: nothing written) or {'ok', displaced|nil}.
REGISTER_BODY = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local ok, entry = pcall(cjson.decode, old)
  if ok and type(entry) == 'table' and entry['connectionId'] ~= ARGV[6] then
    local theirs = tonumber(entry['stamp']) or 0
    local mine = tonumber(ARGV[5])
    if theirs > mine or (theirs == mine and tostring(entry['connectionId']) > ARGV[6]) then
      return {'newer', old}
    end
  else
    old = false
  end
elseif tonumber(ARGV[4]) > 0 and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then
  return {'limit'}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
"""
REGISTER = REGISTER_BODY + """
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[3])
return {'ok', old}
"""

# KEYS[1]: presence hash. ARGV: deviceId, connectionId. Removes the device's entry if it is still this connection's.
UNREGISTER_BODY = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local ok, entry = pcall(cjson.decode, cur)
  if ok and entry['connectionId'] == ARGV[2] then redis.call('HDEL', KEYS[1], ARGV[1]) end
end
"""

# KEYS: presence hash, server users set, users set. ARGV: deviceId, connectionId, userId, last_local (1/0).
UNREGISTER = UNREGISTER_BODY + """
if ARGV[4] == '1' then redis.call('SREM', KEYS[2], ARGV[3]) end
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SREM', KEYS[3], ARGV[3]) end
return 1
"""

# KEYS: presence hash, server users set, users set.
# ARGV: serverId, userId, pass start stamp, connectionIds this instance holds for the user.
# Removes the instance's entries for connections it no longer holds and that were opened before the pass
# started (a registration that lands during the pass is never pruned); forgets the user when nothing is left.
PRUNE_BODY = """
local keep = {}
for i = 4, #ARGV do keep[ARGV[i]] = true end
local started = tonumber(ARGV[3])
local fields = redis.call('HGETALL', KEYS[1])
local mine = 0
for i = 1, #fields, 2 do
  local ok, entry = pcall(cjson.decode, fields[i + 1])
  if ok and type(entry) == 'table' and entry['serverId'] == ARGV[1] then
    if keep[entry['connectionId']] or (tonumber(entry['stamp']) or 0) >= started then
      mine = mine + 1
    else
      redis.call('HDEL', KEYS[1], fields[i])
    end
  end
end
"""
PRUNE = PRUNE_BODY + """
if mine == 0 and #ARGV == 3 then redis.call('SREM', KEYS[2], ARGV[2]) end
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SREM', KEYS[3], ARGV[2]) end
return mine
"""

# KEYS[1]: presence hash. ARGV[1]: serverId. Removes every device entry owned by that instance.
PURGE_SERVER_BODY = """
local fields = redis.call('HGETALL', KEYS[1])
local removed = 0
for i = 1, #fields, 2 do
  local ok, entry = pcall(cjson.decode, fields[i + 1])
  if ok and entry['serverId'] == ARGV[1] then
    redis.call('HDEL', KEYS[1], fields[i]); removed = removed + 1
  end
end
"""

# KEYS: presence hash, users set. ARGV: serverId, userId.
PURGE_SERVER = PURGE_SERVER_BODY + """
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SREM', KEYS[2], ARGV[2]) end
return removed
"""

# KEYS: users set. ARGV: SSCAN cursor, page size, presence key prefix (`gateway:presence:`).
# One page of the users set: members whose presence hash is gone are removed. Returns the next cursor.
SWEEP_USERS = """
local page = redis.call('SSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
for _, user in ipairs(page[2]) do
  if redis.call('EXISTS', ARGV[3] .. user) == 0 then redis.call('SREM', KEYS[1], user) end
end
return page[1]
"""

RESYNC_BATCH = 1000  # commands in flight at once: bounded memory with 100,000 connections to rewrite
SWEEP_PAGE = 500  # users set members checked per housekeeping tick
_STAT_FIELDS = ("totalConnections", "uniqueUsers", *USER_TYPES)


def decode_entry(raw: bytes | None) -> PresenceEntry | None:
    if raw is None:
        return None
    try:
        entry = ujson.loads(raw)
    except ValueError:
        return None
    return cast(PresenceEntry, entry) if isinstance(entry, dict) else None


class RedisPresence:
    def __init__(self, redis: Redis, commands: Commands, keys: Keys, server_id: str,
                 instance_ttl_s: float) -> None:
        self._redis = redis
        self._commands = commands
        self._register_sha = commands.script(REGISTER)
        self._unregister_sha = commands.script(UNREGISTER)
        self._prune_sha = commands.script(PRUNE)
        self._keys = keys
        self._server_id = server_id
        self._ttl_ms = int(instance_ttl_s * 1000)
        self._purge = redis.register_script(PURGE_SERVER)
        self._sweep = redis.register_script(SWEEP_USERS)
        self._sweep_cursor = b"0"

    async def register(self, conn: Connection, *, max_devices: int = 0) -> Registration:
        ident = conn.identity
        try:
            reply = await self._commands.evalsha(
                self._register_sha, [self._keys.presence(ident.user_id), self._keys.server_users(self._server_id),
                                     self._keys.users()],
                [ident.device_id, dumps(presence_entry(conn, self._server_id)), ident.user_id, max_devices,
                 stamp_of(conn), conn.connection_id])
        except (RedisUnavailable, RedisReplyError) as exc:
            raise BusUnavailable(str(exc)) from None
        outcome = reply[0]
        if outcome == b"limit":
            raise DeviceLimitReached(max_devices)
        if outcome == b"newer":
            return Registration(superseded=True, superseded_by=decode_entry(reply[1]))
        return Registration(displaced=decode_entry(reply[1] if len(reply) > 1 else None))

    async def unregister(self, conn: Connection, *, last_local: bool) -> None:
        ident = conn.identity
        try:
            await self._commands.evalsha(
                self._unregister_sha, [self._keys.presence(ident.user_id), self._keys.server_users(self._server_id),
                                       self._keys.users()],
                [ident.device_id, conn.connection_id, ident.user_id, "1" if last_local else "0"])
        except (RedisUnavailable, RedisReplyError) as exc:
            raise BusUnavailable(str(exc)) from None

    async def device_count(self, user_id: str) -> int:
        try:
            return int(await self._commands.call("HLEN", self._keys.presence(user_id)))
        except (RedisUnavailable, RedisReplyError) as exc:
            raise BusUnavailable(str(exc)) from None

    async def publish_server(self, stats: ServerStats) -> bool:
        key = self._keys.server(self._server_id)
        mapping: dict[FieldT, EncodableT] = {name: value for name, value in self._server_fields(stats).items()}
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.exists(key)
            pipe.hset(key, mapping=mapping)
            pipe.pexpire(key, self._ttl_ms)
            pipe.sadd(self._keys.servers, self._server_id)
            existed, *_ = await pipe.execute()
        return bool(existed)

    @staticmethod
    def _server_fields(stats: ServerStats) -> dict[str, str | int]:
        return {
            "serverId": stats["serverId"],
            "totalConnections": stats["totalConnections"],
            "uniqueUsers": stats["uniqueUsers"],
            "startedAt": int(time.time()) - stats["uptime"],
            "updatedAt": int(time.time() * 1000),
            **{user_type: stats["byUserType"][user_type] for user_type in USER_TYPES},
        }

    async def remove_server(self, connections: Iterable[Connection]) -> None:
        await self._purge_instance(self._server_id)

    async def _purge_instance(self, server_id: str) -> None:
        users_key = self._keys.server_users(server_id)
        cursor = 0
        while True:
            cursor, users = await self._redis.sscan(users_key, cursor, count=500)
            async with self._redis.pipeline(transaction=False) as pipe:
                for user in users:
                    user_id = user.decode() if isinstance(user, bytes) else str(user)
                    await self._purge(keys=[self._keys.presence(user_id), self._keys.users()],
                                      args=[server_id, user_id], client=pipe)
                await pipe.execute()
            if cursor == 0:
                break
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(users_key, self._keys.server(server_id))
            pipe.srem(self._keys.servers, server_id)
            await pipe.execute()

    async def _server_ids(self) -> list[str]:
        members = await self._redis.smembers(self._keys.servers)
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)

    async def cluster(self) -> list[ServerStats]:
        ids = await self._server_ids()
        async with self._redis.pipeline(transaction=False) as pipe:
            for server_id in ids:
                pipe.hgetall(self._keys.server(server_id))
            rows = await pipe.execute()
        now = int(time.time())
        servers: list[ServerStats] = []
        for server_id, row in zip(ids, rows, strict=True):
            if row:
                servers.append(stats_from_hash(server_id, row, now))
        return servers

    async def unique_users(self) -> int:
        return int(await self._redis.scard(self._keys.users()))

    async def sweep_users(self) -> None:
        cursor = await self._sweep(keys=[self._keys.users()],
                                   args=[self._sweep_cursor, SWEEP_PAGE, self._keys.presence("")])
        self._sweep_cursor = cursor if isinstance(cursor, bytes) else str(cursor).encode()

    async def reap_dead_servers(self) -> list[str]:
        ids = await self._server_ids()
        alive = await self._server_keys_exist(ids)
        dead = [server_id for server_id, exists in zip(ids, alive, strict=True)
                if not exists and server_id != self._server_id]
        for server_id in dead:
            log.warning("instance %s stopped refreshing its key; removing its presence entries", server_id)
            await self._purge_instance(server_id)
        return dead

    async def _server_keys_exist(self, ids: list[str]) -> list[int]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for server_id in ids:
                pipe.exists(self._keys.server(server_id))
            return list(await pipe.execute())

    async def resync(self, held: Iterable[Connection], rewrite: Iterable[tuple[Connection, int]],
                     started_us: int) -> list[tuple[Connection, Registration]]:
        by_user: dict[str, list[str]] = {}
        for conn in held:
            by_user.setdefault(conn.identity.user_id, []).append(conn.connection_id)
        users = list((await self._listed_users()) | by_user.keys())
        to_write = list(rewrite)
        settled: list[tuple[Connection, Registration]] = []
        try:
            for start in range(0, len(users), RESYNC_BATCH):
                await asyncio.gather(*(self._prune(user, started_us, by_user.get(user, []))
                                       for user in users[start:start + RESYNC_BATCH]))
            for start in range(0, len(to_write), RESYNC_BATCH):
                batch = to_write[start:start + RESYNC_BATCH]
                outcomes = await asyncio.gather(*(self._register_known(conn, cap) for conn, cap in batch))
                settled.extend(zip((conn for conn, _cap in batch), outcomes, strict=True))
        except (RedisUnavailable, RedisReplyError) as exc:
            raise BusUnavailable(str(exc)) from None
        return settled

    async def _register_known(self, conn: Connection, cap: int) -> Registration:
        try:
            return await self.register(conn, max_devices=cap)
        except DeviceLimitReached:
            return Registration(over_limit=True)

    async def _listed_users(self) -> set[str]:
        """The users this serverId's set lists: those it held when Redis last heard from it."""
        users: set[str] = set()
        async for member in self._redis.sscan_iter(self._keys.server_users(self._server_id), count=1000):
            users.add(member.decode() if isinstance(member, bytes) else str(member))
        return users

    async def _prune(self, user_id: str, started_us: int, connection_ids: list[str]) -> None:
        await self._commands.evalsha(
            self._prune_sha, [self._keys.presence(user_id), self._keys.server_users(self._server_id),
                              self._keys.users()],
            [self._server_id, user_id, started_us, *connection_ids])


def stats_from_hash(server_id: str, row: dict[bytes, bytes], now: int) -> ServerStats:
    values = {k.decode(): v.decode() for k, v in row.items()}

    def count(name: str) -> int:
        try:
            return int(values.get(name, 0))
        except ValueError:
            return 0

    return {
        "serverId": server_id,
        "totalConnections": count("totalConnections"),
        "uniqueUsers": count("uniqueUsers"),
        "byUserType": {user_type: count(user_type) for user_type in USER_TYPES},
        "uptime": max(0, now - count("startedAt")),
    }
