"""Contract section 5 (Redis and /stats): presence entries, instance keys, dead-instance cleanup, counts."""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import redis

from tests.helpers import GatewayProcess, eventually, unique


async def test_presence_entry_is_written_on_connect_with_the_contract_fields(gateway: GatewayProcess,
                                                                            redis_client: redis.Redis,
                                                                            prefix: str) -> None:
    before = int(time.time() * 1000)
    client = await gateway.connect(user_type="rider", device_id="pixel-8", platform="android")
    entry = json.loads(redis_client.hget(f"{prefix}:presence:{client.user_id}", "pixel-8"))
    assert entry == {"serverId": gateway.server_id, "connectionId": client.connection_id, "userType": "rider",
                     "platform": "android", "connectedAt": entry["connectedAt"], "stamp": entry["stamp"]}
    assert before - 1000 <= entry["connectedAt"] <= int(time.time() * 1000)
    assert entry["stamp"] // 1000 == entry["connectedAt"]  # the ordering stamp: microseconds of the same instant
    client.close()


async def test_presence_entry_is_removed_on_disconnect(gateway: GatewayProcess, redis_client: redis.Redis,
                                                      prefix: str) -> None:
    client = await gateway.connect(device_id="gone")
    key = f"{prefix}:presence:{client.user_id}"
    client.close()
    await eventually(lambda: not redis_client.exists(key))


async def test_instance_registers_its_live_key_and_membership(gateway: GatewayProcess, redis_client: redis.Redis,
                                                             prefix: str) -> None:
    assert redis_client.sismember(f"{prefix}:servers", gateway.server_id)
    key = f"{prefix}:server:{gateway.server_id}"
    assert redis_client.hget(key, "serverId") == gateway.server_id.encode()
    ttl_ms = redis_client.pttl(key)
    assert 0 < ttl_ms <= 15000


async def test_stats_counts_connections_users_and_user_types(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gateway = make_gateway()
    rider = unique()
    clients = [await gateway.connect(rider, "rider", "a"), await gateway.connect(rider, "rider", "b"),
               await gateway.connect(user_type="driver"), await gateway.connect(user_type="restaurant")]
    status, stats = await gateway.http("GET", "/stats")
    assert status == 200
    assert set(stats) == {"serverId", "totalConnections", "uniqueUsers", "byUserType", "uptime"}
    assert stats["serverId"] == gateway.server_id
    assert stats["totalConnections"] == 4
    assert stats["uniqueUsers"] == 3
    assert stats["byUserType"] == {"driver": 1, "rider": 2, "restaurant": 1, "delivery_partner": 0}
    assert isinstance(stats["uptime"], int)
    for client in clients:
        client.close()

    async def empty() -> bool:
        return (await gateway.http("GET", "/stats"))[1]["totalConnections"] == 0

    await eventually(empty)


async def test_cluster_stats_sum_every_live_instance(make_gateway) -> None:  # type: ignore[no-untyped-def]
    first, second = make_gateway(), make_gateway()
    a = await first.connect(user_type="driver")
    b = await second.connect(user_type="rider")
    c = await second.connect(user_type="rider")
    status, cluster = await first.http("GET", "/stats/cluster")
    assert status == 200
    mine = {s["serverId"]: s for s in cluster["servers"]}
    assert {first.server_id, second.server_id} <= set(mine)
    # Instances refresh their key every INSTANCE_TTL/3: wait until the second's figures are in.
    async def second_counted() -> bool:
        servers = {s["serverId"]: s for s in (await first.http("GET", "/stats/cluster"))[1]["servers"]}
        return bool(servers[second.server_id]["totalConnections"] == 2)

    await eventually(second_counted, timeout=8)
    _status, cluster = await first.http("GET", "/stats/cluster")
    servers = cluster["servers"]
    assert cluster["totalConnections"] == sum(s["totalConnections"] for s in servers)
    assert cluster["byUserType"]["rider"] == sum(s["byUserType"]["rider"] for s in servers)
    assert set(cluster) == {"totalConnections", "uniqueUsers", "byUserType", "uptime", "servers"}
    for client in (a, b, c):
        client.close()


async def test_dead_instance_entries_are_removed_by_survivors(make_gateway, redis_client: redis.Redis,  # type: ignore[no-untyped-def]
                                                             prefix: str) -> None:
    survivor = make_gateway({"INSTANCE_TTL": "1"})
    doomed = make_gateway({"INSTANCE_TTL": "1"})
    client = await doomed.connect(device_id="orphan")
    key = f"{prefix}:presence:{client.user_id}"
    assert redis_client.hexists(key, "orphan")
    doomed.signal(signal.SIGKILL)
    doomed.wait()
    started = time.monotonic()
    await eventually(lambda: not redis_client.hexists(key, "orphan"), timeout=8)
    assert time.monotonic() - started < 8
    await eventually(lambda: not redis_client.sismember(f"{prefix}:servers", doomed.server_id))

    async def not_counted() -> bool:
        servers = (await survivor.http("GET", "/stats/cluster"))[1]["servers"]
        return doomed.server_id not in {s["serverId"] for s in servers}

    await eventually(not_counted)


async def test_cluster_unique_users_counts_a_user_on_two_instances_once(make_gateway,  # type: ignore[no-untyped-def]
                                                                       redis_client: redis.Redis,
                                                                       prefix: str) -> None:
    first, second = make_gateway({"INSTANCE_TTL": "1"}), make_gateway({"INSTANCE_TTL": "1"})
    both, only_second = unique(), unique()
    clients = [await first.connect(both, "rider", "phone"), await second.connect(both, "rider", "tablet"),
               await first.connect(user_type="driver"), await second.connect(only_second, "restaurant", "till")]

    async def cluster() -> dict[str, Any]:
        body: dict[str, Any] = (await first.http("GET", "/stats/cluster"))[1]
        return body

    async def settled() -> bool:  # both instances' figures are in (each refreshes every INSTANCE_TTL/3)
        servers = {s["serverId"]: s for s in (await cluster())["servers"]}
        return servers.get(second.server_id, {}).get("totalConnections") == 2

    await eventually(settled, timeout=8)
    stats = await cluster()
    assert stats["uniqueUsers"] == 3  # `both` once, not once per instance
    assert sum(s["uniqueUsers"] for s in stats["servers"]) == 4  # what the old sum said
    assert stats["totalConnections"] == 4
    assert stats["byUserType"] == {"driver": 1, "rider": 2, "restaurant": 1, "delivery_partner": 0}  # connections
    assert redis_client.scard(f"{prefix}:users") == 3

    clients[0].close()  # `both` keeps the tablet: still one user

    async def phone_gone() -> bool:
        return (await cluster())["totalConnections"] == 3 and not redis_client.hexists(f"{prefix}:presence:{both}",
                                                                                        "phone")

    await eventually(phone_gone)
    assert (await cluster())["uniqueUsers"] == 3

    second.signal(signal.SIGKILL)  # the tablet's and the till's instance dies: its entries are reaped
    second.wait()

    async def reaped() -> bool:
        return bool((await cluster())["uniqueUsers"] == 1)  # only the driver on `first` is left

    await eventually(reaped, timeout=10)
    assert not redis_client.sismember(f"{prefix}:users", both)
    assert not redis_client.sismember(f"{prefix}:users", only_second)
    for client in clients:
        client.close()


async def test_the_users_set_heals_members_whose_presence_is_gone(gateway: GatewayProcess, redis_client: redis.Redis,
                                                                 prefix: str) -> None:
    """An entry removed by something that does not know the set (a release before it, a key deleted
    by hand) leaves a member behind; the housekeeping sweep removes it."""
    ghost = unique()
    redis_client.sadd(f"{prefix}:users", ghost)
    await eventually(lambda: not redis_client.sismember(f"{prefix}:users", ghost), timeout=12)
