"""Presence on a Redis Cluster: the same decisions as presence_redis.py, in one slot per script.

A script may only touch keys of one slot, and a user's presence hash (`gateway:presence:{u1}`),
its instance's user set (`gateway:server:{i1}:users`) and the cluster's user set (`gateway:users`)
live in three. So the atomic part, who owns a device and whether the hash is now empty, stays a
script on the presence hash alone, and the two sets are written right after it by the instance:

- `gateway:server:{i1}:users` is written by that instance only, in order on one connection, so
  it is exactly as in single mode;
- `gateway:users` can be left wrong for a moment by two instances racing on one user's first
  and last device (a SADD overtaken by another instance's SREM). It is repaired both ways: members
  whose hash is gone are removed by the sweep (as in single mode), and every instance adds back a
  page of the users it holds on each housekeeping tick. `uniqueUsers` of `/stats/cluster` is
  therefore exact in single mode and eventually exact (within a few ticks) in a cluster.

The cold paths (instance keys, reaping) use the pipelined cluster client instead of redis-py
transactions, which a cluster refuses across slots.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from redis.asyncio import Redis

from .bus import BusUnavailable
from .connection import Connection
from .messages import dumps
from .presence import DeviceLimitReached, Registration, ServerStats, presence_entry, stamp_of
from .presence_redis import (
    PRUNE_BODY,
    PURGE_SERVER_BODY,
    REGISTER_BODY,
    SWEEP_PAGE,
    UNREGISTER_BODY,
    RedisPresence,
    decode_entry,
    stats_from_hash,
)
from .redis_keys import Keys
from .resp import Commands, RedisReplyError, RedisUnavailable

# KEYS: presence hash. ARGV as presence_redis.REGISTER. Same replies.
REGISTER = REGISTER_BODY + "return {'ok', old}\n"

# KEYS: presence hash. ARGV: deviceId, connectionId. Returns 1 when the hash is gone.
UNREGISTER = UNREGISTER_BODY + "return 1 - redis.call('EXISTS', KEYS[1])\n"

# KEYS: presence hash. ARGV as presence_redis.PRUNE. Returns {entries of the instance kept, hash gone 1/0}.
PRUNE = PRUNE_BODY + "return {mine, 1 - redis.call('EXISTS', KEYS[1])}\n"

# KEYS: presence hash. ARGV: serverId. Returns 1 when the hash is gone.
PURGE_SERVER = PURGE_SERVER_BODY + "return 1 - redis.call('EXISTS', KEYS[1])\n"


class ClusterPresence(RedisPresence):
    def __init__(self, redis: Redis, commands: Commands, keys: Keys, server_id: str, instance_ttl_s: float) -> None:
        super().__init__(redis, commands, keys, server_id, instance_ttl_s)
        self._register_sha = commands.script(REGISTER)
        self._unregister_sha = commands.script(UNREGISTER)
        self._prune_sha = commands.script(PRUNE)
        self._purge_sha = commands.script(PURGE_SERVER)
        self._readd_cursor = 0

    async def register(self, conn: Connection, *, max_devices: int = 0) -> Registration:
        ident = conn.identity
        try:
            reply = await self._commands.evalsha(
                self._register_sha, [self._keys.presence(ident.user_id)],
                [ident.device_id, dumps(presence_entry(conn, self._server_id)), ident.user_id, max_devices,
                 stamp_of(conn), conn.connection_id])
            if reply[0] == b"ok":
                await self._add_user(ident.user_id)
        except (RedisUnavailable, RedisReplyError) as exc:
            raise BusUnavailable(str(exc)) from None
        if reply[0] == b"limit":
            raise DeviceLimitReached(max_devices)
        if reply[0] == b"newer":
            return Registration(superseded=True, superseded_by=decode_entry(reply[1]))
        return Registration(displaced=decode_entry(reply[1] if len(reply) > 1 else None))

    async def _add_user(self, user_id: str) -> None:
        await asyncio.gather(self._commands.call("SADD", self._keys.server_users(self._server_id), user_id),
                             self._commands.call("SADD", self._keys.users(), user_id))

    async def unregister(self, conn: Connection, *, last_local: bool) -> None:
        ident = conn.identity
        try:
            gone = await self._commands.evalsha(self._unregister_sha, [self._keys.presence(ident.user_id)],
                                                [ident.device_id, conn.connection_id])
            await self._forget(ident.user_id, mine=not last_local, gone=bool(gone))
        except (RedisUnavailable, RedisReplyError) as exc:
            raise BusUnavailable(str(exc)) from None

    async def _forget(self, user_id: str, *, mine: bool, gone: bool) -> None:
        """The sets' side of an entry removed: the instance's set unless it still holds the user, the
        cluster's set when the hash is gone."""
        calls = []
        if not mine:
            calls.append(self._commands.call("SREM", self._keys.server_users(self._server_id), user_id))
        if gone:
            calls.append(self._commands.call("SREM", self._keys.users(), user_id))
        await asyncio.gather(*calls)

    async def publish_server(self, stats: ServerStats) -> bool:
        key = self._keys.server(self._server_id)
        fields: list[str | int] = []
        for name, value in self._server_fields(stats).items():
            fields += [name, value]
        existed, *_ = await asyncio.gather(
            self._commands.call("EXISTS", key),
            self._commands.call("HSET", key, *fields),
            self._commands.call("PEXPIRE", key, self._ttl_ms),
            self._commands.call("SADD", self._keys.servers, self._server_id))
        return bool(existed)

    async def _purge_instance(self, server_id: str) -> None:
        users_key = self._keys.server_users(server_id)
        cursor = 0
        while True:
            cursor, users = await self._redis.sscan(users_key, cursor, count=500)
            await asyncio.gather(*(self._purge_user(server_id, _text(user)) for user in users))
            if cursor == 0:
                break
        await asyncio.gather(self._commands.call("DEL", users_key, self._keys.server(server_id)),
                             self._commands.call("SREM", self._keys.servers, server_id))

    async def _purge_user(self, server_id: str, user_id: str) -> None:
        if await self._commands.evalsha(self._purge_sha, [self._keys.presence(user_id)], [server_id]):
            await self._commands.call("SREM", self._keys.users(), user_id)

    async def cluster(self) -> list[ServerStats]:
        ids = await self._server_ids()
        rows = await asyncio.gather(*(self._commands.call("HGETALL", self._keys.server(i)) for i in ids))
        now = int(time.time())
        return [stats_from_hash(server_id, dict(zip(row[::2], row[1::2], strict=True)), now)
                for server_id, row in zip(ids, rows, strict=True) if row]

    async def _server_keys_exist(self, ids: list[str]) -> list[int]:
        return list(await asyncio.gather(*(self._commands.call("EXISTS", self._keys.server(i)) for i in ids)))

    async def sweep_users(self) -> None:
        """A page of the users set checked against the presence hashes (in their own slots), and a page
        of this instance's users added back (see the module docstring)."""
        cursor, members = await self._redis.sscan(self._keys.users(), int(self._sweep_cursor), count=SWEEP_PAGE)
        self._sweep_cursor = str(cursor).encode()
        users = [_text(member) for member in members]
        exists = await asyncio.gather(*(self._commands.call("EXISTS", self._keys.presence(u)) for u in users))
        gone = [user for user, there in zip(users, exists, strict=True) if not there]
        if gone:
            await self._commands.call("SREM", self._keys.users(), *gone)
        await self._readd_held()

    async def _readd_held(self) -> None:
        """This instance's own set is exact (only it writes it, in order): its members are online."""
        cursor, members = await self._redis.sscan(self._keys.server_users(self._server_id), self._readd_cursor,
                                                  count=SWEEP_PAGE)
        self._readd_cursor = int(cursor)
        if members:
            await self._commands.call("SADD", self._keys.users(), *members)

    async def _prune(self, user_id: str, started_us: int, connection_ids: list[str]) -> None:
        mine, gone = await self._commands.evalsha(
            self._prune_sha, [self._keys.presence(user_id)],
            [self._server_id, user_id, started_us, *connection_ids])
        await self._forget(user_id, mine=bool(mine) or bool(connection_ids), gone=bool(gone))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

