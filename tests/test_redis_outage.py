"""/ready follows Redis, and the instance recovers by itself when Redis comes back (a Redis we own)."""

from __future__ import annotations

import asyncio
import json
import signal
import time

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


async def test_a_twelve_second_outage_is_survived_and_cross_instance_delivery_resumes(
        make_gateway, own_redis: RedisServer) -> None:  # type: ignore[no-untyped-def]
    """The figures of the README's failure-modes section come from this test (printed with -s)."""
    env = {"HEARTBEAT_INTERVAL": "1", "HEARTBEAT_TIMEOUT": "4"}
    first, second = make_gateway(env, url=own_redis.url), make_gateway(env, url=own_redis.url)
    here, there = unique(), unique()
    local = await first.connect(here, "rider", "phone")
    remote = await second.connect(there, "rider", "phone")
    keepers = [asyncio.create_task(_answer_heartbeats(c)) for c in (local, remote)]
    own_redis.stop()
    down_at = time.monotonic()
    await eventually(lambda: _is(ready_status(first), 503))
    # During the outage: a client frame that needs Redis is refused (retryable), never acked...
    local_ws = local.ws
    reply = await _request_while_keeping(local, {"type": "heartbeat_ack", "id": "alive", "payload": {}})
    assert reply["type"] == "ack"
    # ...and a broadcast still reaches the devices on the instance that received it.
    status, body = await first.http("POST", f"/broadcast/user/{here}", NOTE)
    assert (status, body.get("degraded"), body["devices"]) == (202, True, 1)
    status, body = await first.http("POST", f"/broadcast/user/{there}", NOTE)
    assert status == 503
    await asyncio.sleep(max(0.0, 12 - (time.monotonic() - down_at)))
    own_redis.start()
    up_at = time.monotonic()
    await eventually(lambda: _is(ready_status(first), 200), timeout=15)
    await eventually(lambda: _is(ready_status(second), 200), timeout=15)
    ready_after = time.monotonic() - up_at
    r = own_redis.client()
    published = lost = 0
    while True:  # publish until the remote user's instance has resubscribed
        published += 1
        if r.publish(f"{second.prefix}:user:{there}", json.dumps(NOTE)) == 1:
            break
        lost += 1
        await asyncio.sleep(0.02)
    resumed_after = time.monotonic() - up_at
    print(f"\noutage {up_at - down_at:.1f} s survived; ready {ready_after:.2f} s after Redis returned; "
          f"cross-instance delivery resumed after {resumed_after:.2f} s; {lost} of {published} publishes in "
          f"that window reached no subscriber (PUBLISH returned 0 to the publisher)")
    assert local.ws is local_ws and local.ws.close_code is None and remote.ws.close_code is None
    for task in keepers:
        task.cancel()
    assert resumed_after < 10
    local.close()
    remote.close()


NOTE = {"type": "notification", "payload": {"title": "t", "body": "b"}}


async def _answer_heartbeats(client) -> None:  # type: ignore[no-untyped-def]
    while True:
        frame = await client.recv("heartbeat", timeout=30)
        client.send({"type": "heartbeat_ack", "payload": frame["payload"]})


async def _request_while_keeping(client, frame: dict) -> dict:  # type: ignore[no-untyped-def]
    client.send(frame)
    await asyncio.sleep(0.3)
    return next(f for f in client.frames if f["type"] == "ack" and f["payload"]["id"] == frame["id"])


async def test_new_connections_register_after_redis_restarted_empty(make_gateway,  # type: ignore[no-untyped-def]
                                                                   own_redis: RedisServer) -> None:
    gateway = make_gateway(url=own_redis.url)
    first = await gateway.connect()
    own_redis.stop()
    await eventually(lambda: _is(ready_status(gateway), 503))
    own_redis.start()  # its script cache is empty: the gateway must load its scripts again
    await eventually(lambda: _is(ready_status(gateway), 200), timeout=10)
    user = unique()
    client = await gateway.connect(user, device_id="fresh")
    await eventually(lambda: own_redis.client().hexists(f"{gateway.prefix}:presence:{user}", "fresh"))
    first.close()
    client.close()


async def test_a_redis_that_stops_answering_fails_client_commands_with_unavailable_not_a_hang(
        make_gateway, own_redis: RedisServer) -> None:  # type: ignore[no-untyped-def]
    gateway = make_gateway(url=own_redis.url)
    client = await gateway.connect()
    assert own_redis.proc is not None
    own_redis.proc.send_signal(signal.SIGSTOP)  # the socket stays open; nothing answers
    try:
        started = time.monotonic()
        client.send({"type": "location_update", "id": "loc-hung", "payload": HUNG_LOCATION})
        reply = await client.recv("error", timeout=10)
        waited = time.monotonic() - started
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)
    assert reply["payload"]["code"] == "UNAVAILABLE"
    assert reply["payload"]["ref"] == "loc-hung"
    assert waited < 8.0, f"answered after {waited:.1f} s: commands time out after 5 s, checked every second"
    client.close()


HUNG_LOCATION = {"latitude": 12.97, "longitude": 77.59, "heading": 90, "speed": 8.5, "accuracy": 4,
                 "timestamp": 1767000000000}
