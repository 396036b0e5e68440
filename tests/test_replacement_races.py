"""Replacement across instances: the device's newest connection wins, whichever Redis write lands last.

Instance A reaches Redis through a proxy that delays every packet; instance B talks to the same Redis
directly. A device that starts connecting on A and then connects on B (a phone that gave up on a
slow instance and was sent elsewhere by the load balancer) must end up connected on B.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import pytest
import redis

from tests.helpers import Client, GatewayProcess, RedisServer, eventually, make_token, unique
from tests.tcp_proxy import DelayingProxy

ONE_WAY_DELAY_S = 0.5  # each Redis round trip of instance A takes a second


@pytest.fixture
async def slow_link(own_redis: RedisServer) -> AsyncIterator[DelayingProxy]:
    proxy = await DelayingProxy("127.0.0.1", own_redis.port).start()
    yield proxy
    await proxy.stop()


@pytest.fixture
async def instances(make_gateway: Callable[..., GatewayProcess], own_redis: RedisServer,
                    slow_link: DelayingProxy) -> tuple[GatewayProcess, GatewayProcess]:
    """(A, B): A reaches the Redis through the slow link (slowed once both are up), B directly."""
    slow = await make_gateway(url=slow_link.url, wait=False).until_ready()
    fast = make_gateway(url=own_redis.url)
    slow_link.delay = ONE_WAY_DELAY_S
    return slow, fast


async def open_without_waiting(gateway: GatewayProcess, user: str, device: str) -> Client:
    """The upgrade completes (101) before the instance has subscribed and registered the device."""
    token = make_token(user, "driver")
    client = await Client.open(gateway.ws_url(token=token, userType="driver", deviceId=device, platform="ios"))
    client.user_id = user
    return client


def entry(r: redis.Redis, prefix: str, user: str, device: str) -> dict[str, str] | None:
    raw = r.hget(f"{prefix}:presence:{user}", device)
    return json.loads(raw) if raw else None


async def stats_total(gateway: GatewayProcess) -> int:
    return int((await gateway.http("GET", "/stats"))[1]["totalConnections"])


async def test_a_connection_abandoned_during_a_slow_registration_never_replaces_the_newer_one(
        instances: tuple[GatewayProcess, GatewayProcess], own_redis: RedisServer) -> None:
    slow, fast = instances
    user = unique()
    abandoned = await open_without_waiting(slow, user, "phone")
    await asyncio.sleep(0.5)
    abandoned.close()  # the phone gives up on A ...
    newer = await fast.connect(user, device_id="phone")  # ... and the load balancer sends it to B

    assert await newer.no_frame("error", within=4.0), "the newer connection was told it was replaced"
    assert newer.ws.close_code is None
    current = entry(own_redis.client(), fast.prefix, user, "phone")
    assert current is not None and current["connectionId"] == newer.connection_id
    assert await stats_total(slow) == 0
    assert f"user={user}" not in "\n".join(line for line in slow.log().splitlines() if " opened " in line)
    newer.close()


async def test_an_older_connection_whose_registration_lands_last_is_the_one_replaced(
        instances: tuple[GatewayProcess, GatewayProcess], own_redis: RedisServer) -> None:
    slow, fast = instances
    user = unique()
    older = await open_without_waiting(slow, user, "phone")
    await asyncio.sleep(0.3)
    newer = await fast.connect(user, device_id="phone")

    code, frames = await older.closed(timeout=8)
    assert code == 4409
    assert [f["payload"]["code"] for f in frames if f["type"] == "error"] == ["REPLACED"]
    assert await newer.no_frame("error", within=1.0)
    current = entry(own_redis.client(), fast.prefix, user, "phone")
    assert current is not None and current["connectionId"] == newer.connection_id

    async def slow_instance_is_empty() -> bool:
        return await stats_total(slow) == 0

    await eventually(slow_instance_is_empty, timeout=5)
    newer.close()


async def test_a_control_message_for_another_user_closes_nothing(gateway: GatewayProcess,
                                                                 redis_client: redis.Redis) -> None:
    client = await gateway.connect(unique(), device_id="phone")
    control = {"op": "close", "userId": unique(), "deviceId": "phone", "connectionId": client.connection_id}
    redis_client.publish(f"{gateway.prefix}:control:{gateway.server_id}", json.dumps(control))
    assert await client.no_frame("error", within=0.5)
    assert (await client.request({"type": "heartbeat_ack", "payload": {}}))["type"] == "ack"
    client.close()

