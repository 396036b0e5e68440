"""Contract section 3: heartbeats, liveness, and closing stale connections with 4408."""

from __future__ import annotations

import asyncio
import time

import redis

from tests.helpers import GatewayProcess, eventually, module_gateway

FAST = {"HEARTBEAT_INTERVAL": "0.2", "HEARTBEAT_TIMEOUT": "0.6"}


fast = module_gateway(FAST)


async def test_connected_announces_the_heartbeat_interval_in_ms(fast: GatewayProcess) -> None:
    client = await fast.connect(expect_connected=False)
    assert (await client.recv("connected"))["payload"]["heartbeatInterval"] == 200
    client.close()


async def test_server_sends_heartbeats_every_interval(fast: GatewayProcess) -> None:
    client = await fast.connect()
    first = await client.recv("heartbeat", timeout=1)
    second = await client.recv("heartbeat", timeout=1)
    assert isinstance(first["payload"]["timestamp"], int)
    gap_ms = second["payload"]["timestamp"] - first["payload"]["timestamp"]
    assert 100 <= gap_ms <= 400
    client.close()


async def test_answering_heartbeats_keeps_the_connection_open(fast: GatewayProcess) -> None:
    client = await fast.connect()
    deadline = time.monotonic() + 1.5  # 2.5 timeouts
    while time.monotonic() < deadline:
        beat = await client.recv("heartbeat", timeout=1)
        client.send({"type": "heartbeat_ack", "payload": {"timestamp": beat["payload"]["timestamp"]}})
    assert client.ws.close_code is None
    client.close()


async def test_any_frame_counts_as_a_sign_of_life(fast: GatewayProcess) -> None:
    client = await fast.connect()
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        client.send({"type": "location_update", "payload": {"latitude": 1, "longitude": 1, "timestamp": 1}})
        await asyncio.sleep(0.1)
    assert client.ws.close_code is None
    client.close()


async def test_silent_connection_gets_heartbeat_timeout_then_4408(fast: GatewayProcess) -> None:
    client = await fast.connect()
    code, frames = await client.closed(timeout=3)
    assert code == 4408
    errors = [f for f in frames if f["type"] == "error"]
    assert [e["payload"]["code"] for e in errors] == ["HEARTBEAT_TIMEOUT"]


async def test_stale_connection_is_removed_locally_and_from_redis(fast: GatewayProcess, redis_client: redis.Redis,
                                                                 prefix: str) -> None:
    client = await fast.connect(device_id="sleepy")
    key = f"{prefix}:presence:{client.user_id}"
    assert redis_client.hexists(key, "sleepy")
    await client.closed(timeout=3)
    await eventually(lambda: not redis_client.hexists(key, "sleepy"))
    channel = f"{prefix}:user:{client.user_id}"
    await eventually(lambda: dict(redis_client.pubsub_numsub(channel))[channel.encode()] == 0)
