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


