"""/ready follows Redis, and the instance recovers by itself when Redis comes back (a Redis we own)."""

from __future__ import annotations

import json

import redis

from tests.helpers import GatewayProcess, RedisServer, eventually, unique


async def ready_status(gateway: GatewayProcess) -> int:
    return (await gateway.http("GET", "/ready"))[0]


async def test_ready_is_503_while_redis_is_down_and_200_after_it_returns(make_gateway,  # type: ignore[no-untyped-def]
                                                                        own_redis: RedisServer) -> None:
    gateway = make_gateway(url=own_redis.url)
    assert await ready_status(gateway) == 200
    own_redis.stop()
    await eventually(lambda: _is(ready_status(gateway), 503), timeout=5)
    status, _body = await gateway.http("GET", "/health")
    assert status == 200
    own_redis.start()
    await eventually(lambda: _is(ready_status(gateway), 200), timeout=10)


async def test_connected_clients_stay_connected_through_a_redis_restart(make_gateway,  # type: ignore[no-untyped-def]
                                                                       own_redis: RedisServer) -> None:
    gateway = make_gateway({"HEARTBEAT_INTERVAL": "0.3", "HEARTBEAT_TIMEOUT": "5"}, url=own_redis.url)
    client = await gateway.connect()
    own_redis.stop()
    await eventually(lambda: _is(ready_status(gateway), 503))
    beat = await client.recv("heartbeat", timeout=2)  # local heartbeats go on during the outage
    client.send({"type": "heartbeat_ack", "payload": {"timestamp": beat["payload"]["timestamp"]}})
    own_redis.start()
    await eventually(lambda: _is(ready_status(gateway), 200), timeout=10)
    assert client.ws.close_code is None
    client.close()


async def test_delivery_and_presence_resume_after_redis_restarts(make_gateway,  # type: ignore[no-untyped-def]
                                                                own_redis: RedisServer) -> None:
    gateway = make_gateway(url=own_redis.url)
    user = unique()
    client = await gateway.connect(user, device_id="phone")
    own_redis.stop()
    await eventually(lambda: _is(ready_status(gateway), 503))
    own_redis.start()  # a fresh Redis: every key and subscription is gone
    await eventually(lambda: _is(ready_status(gateway), 200), timeout=10)
    r: redis.Redis = own_redis.client()
    await eventually(lambda: r.hexists(f"{gateway.prefix}:presence:{user}", "phone"), timeout=5)
    await eventually(lambda: r.sismember(f"{gateway.prefix}:servers", gateway.server_id), timeout=5)
    r.publish(f"{gateway.prefix}:user:{user}", json.dumps({"type": "notification",
                                                           "payload": {"title": "back", "body": "!"}}))
    assert (await client.recv("notification"))["payload"]["title"] == "back"
    client.close()


async def test_dispatch_response_during_an_outage_gets_a_retryable_error_and_no_ack(
        make_gateway, own_redis: RedisServer) -> None:  # type: ignore[no-untyped-def]
    gateway = make_gateway(url=own_redis.url)
    client = await gateway.connect()
    own_redis.stop()
    await eventually(lambda: _is(ready_status(gateway), 503))
    reply = await client.request({"type": "dispatch_response", "id": "dr-x",
                                  "payload": {"requestId": "r1", "action": "accept"}}, timeout=10)
    assert reply["type"] == "error"
    assert reply["payload"] == {"code": "UNAVAILABLE", "message": reply["payload"]["message"], "ref": "dr-x"}
    client.close()


async def _is(status: object, expected: int) -> bool:
    return await status == expected  # type: ignore[misc]
