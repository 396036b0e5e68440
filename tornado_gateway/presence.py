"""The cluster registry: which devices of a user are connected, on which instance.

`Presence` is the interface the gateway talks to; `MemoryPresence` is the
embedded single-instance version (`REDIS_URL=memory://`), and
`presence_redis.RedisPresence` the real one.

Which connection of a device wins is decided by when each connection was
opened (its `stamp`, microseconds of the accepting instance's clock), never by
which registration reaches Redis last: an instance whose Redis link is slow
must not let an old connection's late registration push out the device's
newer one on another instance.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from typing import Protocol, TypedDict

from .connection import Connection
from .messages import USER_TYPES, UserType


class DeviceLimitReached(Exception):
    """The user already has MAX_DEVICES_PER_USER devices connected across the cluster."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"this user already has {limit} devices connected (MAX_DEVICES_PER_USER)")


class PresenceEntry(TypedDict):
    """The value of field `deviceId` in `gateway:presence:{userId}`."""

    serverId: str
    connectionId: str
    userType: str
    platform: str
    connectedAt: int
    stamp: int  # addition to the contract: microseconds at the upgrade; the newest connection wins


@dataclasses.dataclass(frozen=True, slots=True)
class Registration:
    """What writing a connection's entry found: the older entry it displaced, or the newer one that
    keeps the device (then nothing was written and the connection must close as replaced)."""

    displaced: PresenceEntry | None = None
    superseded: bool = False
    superseded_by: PresenceEntry | None = None  # when readable
    over_limit: bool = False  # only from resync: a device never admitted would exceed MAX_DEVICES_PER_USER


class ServerStats(TypedDict):
    """The `/stats` body, and one element of `/stats/cluster`'s `servers`."""

    serverId: str
    totalConnections: int
    uniqueUsers: int
    byUserType: dict[UserType, int]
    uptime: int


class ClusterStats(TypedDict):
    totalConnections: int
    uniqueUsers: int
    byUserType: dict[UserType, int]
    uptime: int
    servers: list[ServerStats]


def presence_entry(conn: Connection, server_id: str) -> PresenceEntry:
    ident = conn.identity
    return {"serverId": server_id, "connectionId": conn.connection_id, "userType": ident.user_type,
            "platform": ident.platform, "connectedAt": int(conn.opened_at * 1000), "stamp": stamp_of(conn)}


def stamp_of(conn: Connection) -> int:
    return int(conn.opened_at * 1_000_000)


def is_newer(entry: PresenceEntry, stamp: int, connection_id: str) -> bool:
    """Whether `entry` belongs to a connection opened after (stamp, connection_id). Entries written
    by a release without stamps count as oldest; equal stamps are ordered by connection id."""
    theirs = entry.get("stamp", 0)
    theirs = theirs if isinstance(theirs, int) else 0
    return theirs > stamp or (theirs == stamp and str(entry.get("connectionId", "")) > connection_id)


def sum_cluster(servers: list[ServerStats], unique_users: int) -> ClusterStats:
    """Sums per instance, except uniqueUsers: the cluster's distinct users (`Presence.unique_users`),
    since a user with devices on two instances is one user, not two."""
    by_type: dict[UserType, int] = dict.fromkeys(USER_TYPES, 0)
    for server in servers:
        for user_type in USER_TYPES:
            by_type[user_type] += server["byUserType"].get(user_type, 0)
    return {
        "totalConnections": sum(s["totalConnections"] for s in servers),
        "uniqueUsers": unique_users,
        "byUserType": by_type,
        "uptime": max((s["uptime"] for s in servers), default=0),
        "servers": servers,
    }


class Presence(Protocol):
    async def register(self, conn: Connection, *, max_devices: int = 0) -> Registration:
        """Record `conn` unless a newer connection of the same device is registered.

        Raises DeviceLimitReached when a new device would exceed `max_devices` (0: no cap)."""

    async def unregister(self, conn: Connection, *, last_local: bool) -> None:
        """Remove `conn`'s entry unless a newer connection already owns the device."""

    async def device_count(self, user_id: str) -> int: ...

    async def publish_server(self, stats: ServerStats) -> bool:
        """Write this instance's live key (with its expiry) and membership in the server set.

        Returns whether the key was still there: if not, Redis lost it (a restart, or peers reaped
        this instance after a stall) and with it, possibly, this instance's presence entries."""

    async def remove_server(self, connections: Iterable[Connection]) -> None:
        """Deregister this instance and every entry it owns (graceful shutdown)."""

    async def cluster(self) -> list[ServerStats]: ...

    async def unique_users(self) -> int:
        """Distinct users with at least one device registered anywhere in the cluster (O(1))."""

    async def sweep_users(self) -> None:
        """One bounded step of repairing the distinct-users count (called every housekeeping tick)."""

    async def reap_dead_servers(self) -> list[str]:
        """Remove the entries of instances whose live key expired; returns their ids."""

    async def resync(self, held: Iterable[Connection], rewrite: Iterable[tuple[Connection, int]],
                     started_us: int) -> list[tuple[Connection, Registration]]:
        """Make Redis match this instance: remove the entries it owns for connections not in `held`
        and opened before `started_us` (a disconnect whose removal failed, a previous run of the same
        serverId; never a connection that registered while the pass ran), then register every
        (connection, device cap) of `rewrite` again, as `register` would."""


class MemoryPresence:
    """Single-instance presence, for development without Redis."""

    def __init__(self, server_id: str) -> None:
        self._server_id = server_id
        self._entries: dict[str, dict[str, PresenceEntry]] = {}
        self._stats: ServerStats | None = None

    async def register(self, conn: Connection, *, max_devices: int = 0) -> Registration:
        devices = self._entries.setdefault(conn.identity.user_id, {})
        previous = devices.get(conn.identity.device_id)
        if previous is None and 0 < max_devices <= len(devices):
            raise DeviceLimitReached(max_devices)
        if previous is not None and previous["connectionId"] != conn.connection_id:
            if is_newer(previous, stamp_of(conn), conn.connection_id):
                return Registration(superseded=True, superseded_by=previous)
        else:
            previous = None
        devices[conn.identity.device_id] = presence_entry(conn, self._server_id)
        return Registration(displaced=previous)

    async def unregister(self, conn: Connection, *, last_local: bool) -> None:
        devices = self._entries.get(conn.identity.user_id, {})
        entry = devices.get(conn.identity.device_id)
        if entry is not None and entry["connectionId"] == conn.connection_id:
            del devices[conn.identity.device_id]
        if not devices:
            self._entries.pop(conn.identity.user_id, None)

    async def device_count(self, user_id: str) -> int:
        return len(self._entries.get(user_id, {}))

    async def publish_server(self, stats: ServerStats) -> bool:
        self._stats = stats
        return True

    async def remove_server(self, connections: Iterable[Connection]) -> None:
        self._entries.clear()
        self._stats = None

    async def cluster(self) -> list[ServerStats]:
        return [self._stats] if self._stats is not None else []

    async def unique_users(self) -> int:
        return len(self._entries)

    async def sweep_users(self) -> None:
        return None

    async def reap_dead_servers(self) -> list[str]:
        return []

    async def resync(self, held: Iterable[Connection], rewrite: Iterable[tuple[Connection, int]],
                     started_us: int) -> list[tuple[Connection, Registration]]:
        return []  # nothing outside this process can lose or keep stale entries


def uptime_s(started_at: float) -> int:
    return int(time.time() - started_at)
