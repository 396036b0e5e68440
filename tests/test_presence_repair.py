"""Presence heals itself: ghosts left by a restarted Redis or a crashed process go, failed writes are retried.

Each test owns its Redis (a private redis-server), so that it may restart it, fill its memory or
kill a gateway process without touching anyone else's keys.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

from tests.helpers import GatewayProcess, RedisServer, eventually, unique
from tornado_gateway.bus import MemoryBus
from tornado_gateway.config import load_settings
from tornado_gateway.gateway import Gateway
from tornado_gateway.metrics import Metrics
from tornado_gateway.presence import MemoryPresence


def presence_key(gateway: GatewayProcess, user: str) -> str:
    return f"{gateway.prefix}:presence:{user}"


async def ready(gateway: GatewayProcess) -> bool:
    return (await gateway.http("GET", "/ready"))[0] == 200


async def not_ready(gateway: GatewayProcess) -> bool:
    return not await ready(gateway)


async def test_an_entry_whose_removal_failed_while_redis_restarted_is_removed_after_it_returns(
        make_gateway: Callable[..., GatewayProcess], persistent_redis: RedisServer) -> None:
    gateway = make_gateway({"MAX_DEVICES_PER_USER": "1"}, url=persistent_redis.url)
    user = unique()
    phone = await gateway.connect(user, device_id="phone")
    r = persistent_redis.client()
    assert r.hexists(presence_key(gateway, user), "phone")
    persistent_redis.stop()  # the entry is on disk
    await eventually(lambda: not_ready(gateway))
    phone.close()  # ... and its removal cannot reach Redis
    await asyncio.sleep(0.3)
    persistent_redis.start()  # back with the entry of a device that is gone
    await eventually(lambda: ready(gateway), timeout=10)

    await eventually(lambda: not r.hexists(presence_key(gateway, user), "phone"), timeout=5)
    status, body = await gateway.http("POST", f"/broadcast/user/{user}",
                                      {"type": "notification", "payload": {"title": "t", "body": "b"}})
    assert (status, body["devices"]) == (202, 0)
    tablet = await gateway.connect(user, device_id="tablet")  # MAX_DEVICES_PER_USER=1: the ghost took no slot
    assert tablet.ws.close_code is None
    tablet.close()


def child_pids(parent: int) -> list[int]:
    text = Path(f"/proc/{parent}/task/{parent}/children").read_text()
    return [int(pid) for pid in text.split()]


def server_id_of(pid: int) -> str:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next(item[len(b"SERVER_ID="):].decode() for item in environ if item.startswith(b"SERVER_ID="))


async def test_a_crashed_child_restarted_with_the_same_server_id_removes_the_entries_of_its_previous_run(
        make_gateway: Callable[..., GatewayProcess], own_redis: RedisServer) -> None:
    gateway = make_gateway({"PROCESSES": "2"}, url=own_redis.url)
    user = unique()
    phone = await gateway.connect(user, device_id="phone")
    connected = phone.frames[0]["payload"]
    r = own_redis.client()
    assert json.loads(r.hget(presence_key(gateway, user), "phone"))["serverId"] == connected["serverId"]
    assert gateway.proc is not None
    victim = next(pid for pid in child_pids(gateway.proc.pid) if server_id_of(pid) == connected["serverId"])
    os.kill(victim, signal.SIGKILL)

    async def restarted() -> bool:
        pids = child_pids(gateway.proc.pid)  # type: ignore[union-attr]
        return victim not in pids and any(server_id_of(pid) == connected["serverId"] for pid in pids)

    await eventually(restarted, timeout=10)
    await eventually(lambda: not r.hexists(presence_key(gateway, user), "phone"), timeout=10)
    assert not r.sismember(f"{gateway.prefix}:server:{connected['serverId']}:users", user)
    phone.close()


async def test_a_registration_refused_by_redis_is_written_once_redis_accepts_writes(
        make_gateway: Callable[..., GatewayProcess], own_redis: RedisServer) -> None:
    gateway = make_gateway(url=own_redis.url)
    r = own_redis.client()
    r.config_set("maxmemory", "1")  # every write is refused with OOM; SUBSCRIBE still works
    user = unique()
    phone = await gateway.connect(user, device_id="phone")
    await asyncio.sleep(0.5)
    assert not r.hexists(presence_key(gateway, user), "phone")
    r.config_set("maxmemory", "0")
    await eventually(lambda: r.hexists(presence_key(gateway, user), "phone"), timeout=5)
    assert json.loads(r.hget(presence_key(gateway, user), "phone"))["connectionId"] == phone.connection_id
    phone.close()


def test_two_runs_of_one_server_id_never_share_connection_or_message_ids() -> None:
    settings = load_settings({"SERVER_ID": "gw-7", "REDIS_URL": "memory://"}, dev=True)
    runs = [Gateway(settings, MemoryPresence("gw-7"), MemoryBus(), Metrics("", 8125, "t")) for _ in range(2)]
    first_ids = {runs[0].ids.next() for _ in range(3)}
    second_ids = {runs[1].ids.next() for _ in range(3)}
    assert not first_ids & second_ids
    assert all(i.startswith("gw-7.") for i in first_ids | second_ids)




class RecordingSocket:
    def __init__(self) -> None:
        self.frames: list[dict[str, object]] = []
        self.closed_with: int | None = None

    def write_frame(self, data: str | bytes) -> bool:
        self.frames.append(json.loads(data))
        return True

    def close_transport(self, code: int, reason: str) -> None:
        self.closed_with = code

    def buffered_bytes(self) -> int:
        return 0

    def on_drained(self, callback: Callable[[], None]) -> None:
        callback()

    def drop_queued(self) -> int:
        return 0


async def test_a_resync_that_finds_the_device_owned_by_a_newer_connection_elsewhere_closes_the_local_one(
        redis_url: str, prefix: str) -> None:
    """The control message that should have closed it was lost (this instance was not subscribed then):
    the next resync finds the newer entry, and the local duplicate goes with 4409, as replaced."""
    import time

    import redis.asyncio as aredis

    from tornado_gateway.auth import DeviceId, Identity, UserId
    from tornado_gateway.config import Settings
    from tornado_gateway.presence_redis import RedisPresence
    from tornado_gateway.redis_keys import Keys
    from tornado_gateway.resp import PipelinedClient

    client, commands, keys = aredis.Redis.from_url(redis_url), PipelinedClient(redis_url), Keys(prefix)
    server_id = unique("gw-a")
    gateway = Gateway(Settings(server_id=server_id, redis_prefix=prefix, history_size=0),
                      RedisPresence(client, commands, keys, server_id, 15), MemoryBus(), Metrics("", 8125, "t"))
    await gateway.start()
    try:
        user, sock = unique(), RecordingSocket()
        conn = gateway.admit(Identity(UserId(user), "driver", DeviceId("phone"), "ios", time.time() + 600), sock, "::1")
        await gateway.establish(conn)
        assert json.loads(await client.hget(keys.presence(user), "phone"))["connectionId"] == conn.connection_id
        newer = {"serverId": unique("gw-b"), "connectionId": "gw-b.x-1", "userType": "driver", "platform": "ios",
                 "connectedAt": int(time.time() * 1000) + 1000, "stamp": int(time.time() * 1e6) + 1_000_000}
        await client.hset(keys.presence(user), "phone", json.dumps(newer))

        gateway.request_resync()
        await eventually(lambda: conn.closed, timeout=5)
        assert (conn.close_code, sock.closed_with) == (4409, 4409)
        assert [f["payload"]["code"] for f in sock.frames if f["type"] == "error"] == ["REPLACED"]  # type: ignore[index]
        assert json.loads(await client.hget(keys.presence(user), "phone")) == newer, "the newer entry is left alone"
    finally:
        await gateway.drain()
        await commands.close()
        await client.aclose()
