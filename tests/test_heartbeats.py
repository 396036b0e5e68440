"""Contract section 3: heartbeats, liveness, and closing stale connections with 4408."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import redis

from tests.helpers import GatewayProcess, RawSocketClient, eventually, make_token, module_gateway, unique

PING, CLOSE = 0x9, 0x8

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


@pytest.mark.parametrize("compression", ["false", "true"])
async def test_websocket_pings_alone_keep_the_connection_alive(make_gateway, compression: str) -> None:  # type: ignore[no-untyped-def]
    """OkHttp's pingInterval and URLSessionWebSocketTask keep a socket alive with protocol pings."""
    gateway = make_gateway({**FAST, "COMPRESSION": compression})
    extensions = "permessage-deflate" if compression == "true" else ""
    client = RawSocketClient(gateway.port, make_token(unique(), "driver"), "driver", "pinger",
                             extensions=extensions)
    assert client.read_frame()[0] == 1  # connected (compressed on the Tornado path)
    client.sock.settimeout(0.1)
    deadline = time.monotonic() + 2.0  # more than three heartbeat timeouts
    while time.monotonic() < deadline:
        client.send_frame(PING, b"alive")
        await asyncio.sleep(0.15)
        with contextlib.suppress(TimeoutError):
            while True:
                opcode, _payload = client.read_frame()
                assert opcode != CLOSE, "closed although the client kept pinging"
    client.sock.settimeout(5)
    _status, stats = await gateway.http("GET", "/stats")
    assert stats["totalConnections"] == 1
    client.close()
