"""Contract section 1: the same userId+deviceId connecting again replaces the old connection (4409)."""

from __future__ import annotations

import json

import redis

from tests.helpers import GatewayProcess, eventually, unique


async def test_reconnect_on_the_same_instance_replaces_the_old_connection(gateway: GatewayProcess) -> None:
    user = unique()
    old = await gateway.connect(user, device_id="phone")
    new = await gateway.connect(user, device_id="phone")
    code, frames = await old.closed()
    assert code == 4409
    assert [f["payload"]["code"] for f in frames if f["type"] == "error"] == ["REPLACED"]
    assert (await new.request({"type": "heartbeat_ack", "payload": {}}))["type"] == "ack"
    new.close()


async def test_reconnect_on_another_instance_replaces_the_old_connection(make_gateway,  # type: ignore[no-untyped-def]
                                                                          redis_client: redis.Redis,
                                                                          prefix: str) -> None:
    first, second = make_gateway(), make_gateway()
    user = unique()
    old = await first.connect(user, device_id="phone")
    new = await second.connect(user, device_id="phone")
    code, frames = await old.closed()
    assert code == 4409
    assert frames[-1]["payload"]["code"] == "REPLACED"
    entry = json.loads(redis_client.hget(f"{prefix}:presence:{user}", "phone"))
    assert entry["serverId"] == second.server_id
    assert entry["connectionId"] == new.connection_id

    async def first_is_empty() -> bool:
        _status, stats = await first.http("GET", "/stats")
        return bool(stats["totalConnections"] == 0)

    await eventually(first_is_empty)
    new.close()


async def test_replaced_connection_leaves_the_new_presence_entry_alone(gateway: GatewayProcess,
                                                                       redis_client: redis.Redis,
                                                                       prefix: str) -> None:
    user = unique()
    old = await gateway.connect(user, device_id="phone")
    new = await gateway.connect(user, device_id="phone")
    await old.closed()
    await eventually(lambda: redis_client.hget(f"{prefix}:presence:{user}", "phone") is not None)
    entry = json.loads(redis_client.hget(f"{prefix}:presence:{user}", "phone"))
    assert entry["connectionId"] == new.connection_id
    new.close()


async def test_other_devices_of_the_user_are_not_replaced(gateway: GatewayProcess) -> None:
    user = unique()
    phone = await gateway.connect(user, device_id="phone")
    await gateway.connect(user, device_id="watch")
    assert await phone.no_frame("error", within=0.3)
    assert (await phone.request({"type": "heartbeat_ack", "payload": {}}))["type"] == "ack"
    phone.close()
