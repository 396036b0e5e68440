"""Regressions for defects found in review: each test names the behaviour the contract expects."""

from __future__ import annotations

import json

import jwt
import redis

from tests.helpers import SECRET, Client, GatewayProcess, eventually


async def test_presence_uses_the_database_named_in_redis_url(make_gateway, redis_url: str,  # type: ignore[no-untyped-def]
                                                            prefix: str) -> None:
    gateway: GatewayProcess = make_gateway(url=f"{redis_url}/3")
    client = await gateway.connect(device_id="db3")
    db3 = redis.Redis.from_url(f"{redis_url}/3")
    try:
        assert db3.hexists(f"{prefix}:presence:{client.user_id}", "db3")
        assert db3.exists(f"{prefix}:server:{gateway.server_id}")
    finally:
        client.close()
        await eventually(lambda: not db3.exists(f"{prefix}:presence:{client.user_id}"))
        db3.close()


async def test_published_message_with_nan_is_not_forwarded_even_with_id_and_timestamp(
        gateway: GatewayProcess, redis_client: redis.Redis, prefix: str) -> None:
    client = await gateway.connect()
    channel = f"{prefix}:user:{client.user_id}"
    redis_client.publish(channel, '{"type":"notification","id":"n1","timestamp":1,"payload":{"title":NaN,"body":"x"}}')
    redis_client.publish(channel, json.dumps({"type": "notification", "id": "n2", "timestamp": 2,
                                              "payload": {"title": "ok", "body": "x"}}))
    frame = await client.recv()
    assert (frame["type"], frame["id"]) == ("notification", "n2")
    client.close()


async def test_token_with_an_absurd_exp_is_refused_with_4401_and_not_logged(gateway: GatewayProcess) -> None:
    token = jwt.encode({"sub": "u", "userType": "driver", "exp": 10**400}, SECRET, algorithm="HS256")
    client = await Client.open(gateway.ws_url(token=token, userType="driver", deviceId="d", platform="ios"))
    code, frames = await client.closed()
    assert code == 4401
    assert frames[0]["payload"]["code"] == "AUTH_FAILED"
    assert token not in gateway.log()


async def test_presence_lost_from_redis_is_written_again(make_gateway, redis_client: redis.Redis,  # type: ignore[no-untyped-def]
                                                        prefix: str) -> None:
    gateway: GatewayProcess = make_gateway({"INSTANCE_TTL": "1.5", "SHUTDOWN_DRAIN_SECONDS": "0"})
    client = await gateway.connect(device_id="kept")
    key = f"{prefix}:presence:{client.user_id}"
    # What a peer does when it wrongly takes this instance for dead after a long stall:
    redis_client.delete(key, f"{prefix}:server:{gateway.server_id}", f"{prefix}:server:{gateway.server_id}:users")
    await eventually(lambda: redis_client.hexists(key, "kept"), timeout=5)
    client.close()


async def test_an_instance_draining_longer_than_its_ttl_is_not_reaped(make_gateway,  # type: ignore[no-untyped-def]
                                                                        redis_client: redis.Redis,
                                                                        prefix: str) -> None:
    import asyncio
    import signal

    peer = make_gateway({"INSTANCE_TTL": "1"})
    leaving: GatewayProcess = make_gateway({"INSTANCE_TTL": "1", "SHUTDOWN_DRAIN_SECONDS": "3"})
    clients = [await leaving.connect(device_id="slowdrain") for _ in range(40)]
    leaving.signal(signal.SIGTERM)
    await asyncio.sleep(2)  # twice the TTL into the drain: the key must still be refreshed
    assert redis_client.exists(f"{prefix}:server:{leaving.server_id}")
    assert peer.proc is not None and peer.proc.poll() is None
    assert leaving.wait(15) == 0
    for client in clients:
        client.close()


