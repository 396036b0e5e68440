"""Connection churn: thousands of connects and disconnects leave nothing behind.

A gateway process of its own (heartbeats at the normal 30 s) takes rounds of 200 concurrent clients:
mixed user types, some users with several devices, some devices connecting twice so the first
connection is replaced (4409), drivers and delivery partners sending an acked `location_update`,
then every client leaving, a third with a clean close, a third dropping the TCP connection without a
close frame (FIN) and a third resetting it (RST). Before and after, we measure what a leak would grow:
the process's RSS and open file descriptors, the Redis keys under the test prefix, the user channels
with a subscriber, and `/stats`.

What "nothing left" means, from presence_redis.py and redis_keys.py: the instance's own keys only,
`{prefix}:servers` (set of instance ids) and `{prefix}:server:{serverId}` (its stats hash). Its users set
`{prefix}:server:{serverId}:users` loses a user with the user's last local device, so Redis deletes it
when empty; presence hashes `{prefix}:presence:{userId}` lose each device entry on close, likewise. History
keys `{prefix}:history:{userId}...` stay until their HISTORY_TTL expiry (by design), so only ones without it count.

Baselines are taken after a warm-up (WARMUP_CONNECTIONS), so the first connections' one-off growth (allocator
arenas, Redis connection pool filled to the burst's concurrency, caches that fill once) does not count.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import psutil
import pytest
import redis

from tests.helpers import Client, GatewayProcess, unique

USER_TYPES = ("driver", "rider", "restaurant", "delivery_partner")
MOVING = ("driver", "delivery_partner")
BATCH = 200
PLATFORMS = ("ios", "android", "web")

# The gateway under churn: its own process, the default heartbeats, and no per-IP connect limit (every
# client comes from 127.0.0.1; 0 disables it, which is also the default today).
SOAK_ENV = {"HEARTBEAT_INTERVAL": "30", "HEARTBEAT_TIMEOUT": "75", "CONNECT_RATE_PER_IP": "0", "LOG_LEVEL": "WARNING"}

# Bounds, from measurements on this machine (2 cores, Python 3.11, rounds of 200 clients): RSS climbs about
# 4.5 MiB over the first ~900 connections (allocator arenas, buffers and caches that fill once), then moves
# in steps of up to 1.4 MiB until ~3,500 connections, then stays flat (60.0 MiB from 3,500 to 6,600
# connections; a 3.5-minute soak of 11,660 connections stayed at 59.9 MiB from its first minute on).
# - So the baseline is taken after WARMUP_CONNECTIONS, and the growth allowed is 3 MiB (twice the largest step
#   seen), plus 256 B per connection in the soak. A leak of 1 KiB per connection (one small dict, one unread
#   frame) shows as 6 MiB over the short test's 6,000 connections, and as 15 MiB against a 6.7 MiB bound after
#   a 5-minute soak at 3,000 a minute.
# - fds: every client socket must be gone; what stays is the listening socket, the Redis connections and the
#   process's own files. A few more idle Redis connections after a burst would be bounded by the burst's
#   concurrency, not by the number of connections churned: FD_SLACK.
WARMUP_CONNECTIONS = 3000
SHORT_RUN_CONNECTIONS = 6000
RSS_SLACK_BYTES = 3 * 1024 * 1024
RSS_PER_CONNECTION_BYTES = 256
FD_SLACK = 16


@dataclasses.dataclass
class Snapshot:
    rss: int
    fds: int
    client_sockets: int
    keys: set[str]
    user_channels: list[str]
    total_connections: int

    def line(self) -> str:
        return (f"rss={self.rss / 2**20:.1f} MiB fds={self.fds} client_sockets={self.client_sockets} "
                f"keys={len(self.keys)} user_channels={len(self.user_channels)} "
                f"totalConnections={self.total_connections}")


@dataclasses.dataclass
class Tally:
    connected: int = 0
    replaced: int = 0
    acked: int = 0
    clean: int = 0
    fin: int = 0
    rst: int = 0

    def add(self, other: Tally) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


class Churn:
    """Rounds of clients against one gateway, and the measurements around them."""

    def __init__(self, gateway: GatewayProcess, redis_client: redis.Redis, seed: int, batch: int) -> None:
        self.gateway = gateway
        self.batch = batch
        self.redis = redis_client
        self.random = random.Random(seed)
        assert gateway.proc is not None
        self.process = psutil.Process(gateway.proc.pid)
        self.tally = Tally()

    # --- measurements ---------------------------------------------------------------------------

    def own_keys(self) -> set[str]:
        prefix = self.gateway.prefix
        return {f"{prefix}:servers", f"{prefix}:server:{self.gateway.server_id}"}

    def keys(self) -> set[str]:
        """Keys under the prefix, less the users' history keys (PROTOCOL.md 7.1: a user's epoch exists
        from the first connection on) as long as each carries its HISTORY_TTL expiry: one without
        would be a leak and is counted."""
        keys = [k.decode() for k in self.redis.scan_iter(f"{self.gateway.prefix}:*", count=1000)]
        history = [k for k in keys if ":history:" in k]
        pipe = self.redis.pipeline(transaction=False)
        for key in history:
            pipe.pttl(key)
        expiring = {key for key, ttl in zip(history, pipe.execute(), strict=True) if ttl > 0}
        return set(keys) - expiring

    def user_channels(self) -> list[str]:
        return sorted(c.decode() for c in self.redis.pubsub_channels(f"{self.gateway.prefix}:user:*"))

    def client_sockets(self) -> int:
        """TCP connections accepted on the gateway's port (the listening socket excluded)."""
        return sum(1 for c in self.process.net_connections(kind="tcp")
                   if c.laddr and c.laddr.port == self.gateway.port and c.status != psutil.CONN_LISTEN)

    async def stats(self) -> dict[str, Any]:
        status, body = await self.gateway.http("GET", "/stats")
        assert status == 200, body
        return dict(body)

    async def snapshot(self) -> Snapshot:
        stats = await self.stats()
        return Snapshot(self.process.memory_info().rss, self.process.num_fds(), self.client_sockets(), self.keys(),
                        self.user_channels(), int(stats["totalConnections"]))

    async def settle(self, timeout: float = 20) -> Snapshot:
        """Wait until the gateway has noticed every close, then measure; fails with what is left."""
        deadline = time.monotonic() + timeout
        while True:
            snap = await self.snapshot()
            if (snap.total_connections == 0 and snap.client_sockets == 0 and not snap.user_channels
                    and snap.keys <= self.own_keys()):
                return snap
            if time.monotonic() > deadline:
                failures = redis_failures(self.gateway)
                raise AssertionError(f"not settled after {timeout} s: {snap.line()}; left: channels "
                                     f"{snap.user_channels[:3]}, keys {sorted(snap.keys - self.own_keys())[:3]}; "
                                     f"{len(failures)} presence Redis failures logged, e.g. {failures[:1]}")
            await asyncio.sleep(0.2)

    # --- one round ------------------------------------------------------------------------------

    def identities(self, count: int) -> list[tuple[str, str, str]]:
        """(userId, userType, deviceId): about a third of the users have two or three devices."""
        result: list[tuple[str, str, str]] = []
        while len(result) < count:
            user, user_type = unique("soak"), self.random.choice(USER_TYPES)
            devices = self.random.choices((1, 2, 3), weights=(6, 2, 1))[0]
            result.extend((user, user_type, f"dev-{n}") for n in range(devices))
        return result[:count]

    async def connect(self, user: str, user_type: str, device: str) -> Client:
        return await self.gateway.connect(user, user_type, device_id=device, platform=self.random.choice(PLATFORMS))

    async def warm_up(self) -> Snapshot:
        """Churn WARMUP_CONNECTIONS, settle, and return the baseline; the tally starts from zero afterwards."""
        while self.tally.connected < WARMUP_CONNECTIONS:
            await self.round()
        self.tally = Tally()
        return await self.settle()

    async def round(self) -> Tally:
        tally = Tally()
        size = self.batch
        identities = self.identities(size)
        replace = set(self.random.sample(range(size), size // 10))  # these devices connect a second time
        first = await asyncio.gather(*(self.connect(*ident) for ident in identities))
        second = await asyncio.gather(*(self.connect(*identities[i]) for i in replace))
        tally.connected = len(first) + len(second)
        for index in replace:
            code, frames = await first[index].closed(timeout=10)
            assert code == 4409, f"a replaced connection must close with 4409, got {code}"
            assert [f["payload"]["code"] for f in frames if f["type"] == "error"] == ["REPLACED"], frames
            tally.replaced += 1
        live = [c for i, c in enumerate(first) if i not in replace] + list(second)
        stats = await self.stats()
        assert stats["totalConnections"] == len(live), stats

        senders = [c for i, (c, (_, user_type, _)) in enumerate(zip(first, identities, strict=True))
                   if i not in replace and user_type in MOVING and self.random.random() < 0.5]
        replies = await asyncio.gather(*(c.request({"type": "location_update", "payload": {
            "latitude": self.random.uniform(-90, 90), "longitude": self.random.uniform(-180, 180),
            "timestamp": int(time.time() * 1000)}}) for c in senders))
        assert all(r["type"] == "ack" for r in replies), [r for r in replies if r["type"] != "ack"][:3]
        tally.acked = len(replies)

        for n, client in enumerate(live):
            how = n % 3
            if how == 0:
                client.close()
                tally.clean += 1
            else:
                drop(client, reset=how == 2)
                if how == 1:
                    tally.fin += 1
                else:
                    tally.rst += 1
        await asyncio.gather(*(wait_closed(c) for c in live[::3]))
        self.tally.add(tally)
        return tally


def drop(client: Client, *, reset: bool) -> None:
    """Leave without a close frame: close the TCP socket (FIN), or reset it (SO_LINGER 0: RST)."""
    stream = client.ws.protocol.stream  # type: ignore[union-attr]
    if reset:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.close()


async def wait_closed(client: Client) -> None:
    """A clean close completes when the gateway echoes the close frame."""
    while await asyncio.wait_for(client.ws.read_message(), 10) is not None:
        pass


@pytest.fixture
def churn(make_gateway: Callable[..., GatewayProcess], redis_client: redis.Redis,
          request: pytest.FixtureRequest) -> Churn:
    batch = int(request.config.getoption("--soak-batch", default=BATCH))
    return Churn(make_gateway(SOAK_ENV), redis_client, seed=random.randrange(2**32), batch=batch)


def redis_failures(gateway: GatewayProcess) -> list[str]:
    """The gateway's log lines saying a presence write or removal did not reach Redis."""
    return [line for line in gateway.log().splitlines()
            if "presence unavailable" in line or "could not remove presence" in line]


def assert_nothing_left(churn: Churn, before: Snapshot, after: Snapshot, rss_bound: int) -> None:
    failures = redis_failures(churn.gateway)
    assert failures == [], f"{len(failures)} presence writes/removals failed during the churn, e.g. {failures[:2]}"
    assert after.total_connections == 0
    assert after.client_sockets == 0
    assert after.user_channels == [], after.user_channels[:5]
    assert after.keys == churn.own_keys(), sorted(after.keys - churn.own_keys())[:5]
    assert after.fds <= before.fds + FD_SLACK, f"fds {before.fds} -> {after.fds}"
    assert after.rss - before.rss <= rss_bound, f"RSS {before.rss} -> {after.rss} (+{after.rss - before.rss} B)"
    assert churn.gateway.proc is not None and churn.gateway.proc.poll() is None, "the gateway process died"


async def test_connection_churn_leaves_no_connections_sockets_keys_subscriptions_or_memory_behind(
        churn: Churn) -> None:
    before = await churn.warm_up()
    started = time.monotonic()
    while churn.tally.connected < SHORT_RUN_CONNECTIONS:
        await churn.round()
    after = await churn.settle()
    elapsed = time.monotonic() - started
    print(f"\nchurned {churn.tally} in {elapsed:.1f} s\nbefore: {before.line()}\nafter:  {after.line()}")
    assert_nothing_left(churn, before, after, RSS_SLACK_BYTES)


@pytest.mark.soak
async def test_minutes_of_churn_leave_no_connections_sockets_keys_subscriptions_or_memory_behind(
        churn: Churn, request: pytest.FixtureRequest) -> None:
    if not request.config.getoption("--run-soak", default=False):
        pytest.skip("soak test: run with --run-soak (and -p tests.soak_plugin until conftest registers it)")
    minutes = float(request.config.getoption("--soak-minutes"))
    per_minute = int(request.config.getoption("--soak-rate"))
    before = await churn.warm_up()
    started = time.monotonic()
    deadline = started + minutes * 60
    samples: list[str] = []
    next_sample = started + 60
    while time.monotonic() < deadline:
        round_started = time.monotonic()
        await churn.round()
        # Pace the rounds to `per_minute` connections a minute (a round: `batch` connections plus replacements).
        await asyncio.sleep(max(0.0, round_started + 60 * churn.batch / per_minute - time.monotonic()))
        if time.monotonic() >= next_sample:
            next_sample += 60
            rss = churn.process.memory_info().rss
            samples.append(f"  {(time.monotonic() - started) / 60:.1f} min: {churn.tally.connected} connections, "
                           f"rss={rss / 2**20:.1f} MiB fds={churn.process.num_fds()}")
    after = await churn.settle()
    elapsed = time.monotonic() - started
    print(f"\nsoak: churned {churn.tally} in {elapsed / 60:.1f} min "
          f"({churn.tally.connected / elapsed * 60:.0f} connections/min)\n" + "\n".join(samples) +
          f"\nbefore: {before.line()}\nafter:  {after.line()}")
    assert churn.tally.connected >= 0.8 * per_minute * minutes, "the churn fell short of its rate"
    assert_nothing_left(churn, before, after, RSS_SLACK_BYTES + RSS_PER_CONNECTION_BYTES * churn.tally.connected)
