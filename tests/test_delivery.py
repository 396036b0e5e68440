"""Contract section 5: services' messages reach every device of the user, on whatever instance."""

from __future__ import annotations

import json

import pytest
import redis

from tests.helpers import GatewayProcess, eventually, module_gateway, unique

second = module_gateway()


def publish(client: redis.Redis, prefix: str, user_id: str, message: dict) -> int:
    return int(client.publish(f"{prefix}:user:{user_id}", json.dumps(message)))


RIDE = {"type": "ride_request", "payload": {"requestId": "r-1", "pickup": {"lat": 1, "lng": 2}}}


async def test_redis_publish_reaches_the_user(gateway: GatewayProcess, redis_client: redis.Redis,
                                              prefix: str) -> None:
    client = await gateway.connect()
    publish(redis_client, prefix, client.user_id, RIDE)
    frame = await client.recv("ride_request")
    assert frame["payload"] == RIDE["payload"]
    assert frame["id"] and isinstance(frame["timestamp"], int)
    client.close()


async def test_producer_id_and_timestamp_are_kept(gateway: GatewayProcess, redis_client: redis.Redis,
                                                 prefix: str) -> None:
    client = await gateway.connect()
    publish(redis_client, prefix, client.user_id, {**RIDE, "id": "svc-1", "timestamp": 1767000000123})
    frame = await client.recv("ride_request")
    assert (frame["id"], frame["timestamp"]) == ("svc-1", 1767000000123)
    client.close()


async def test_every_device_of_a_user_receives_the_message(gateway: GatewayProcess, redis_client: redis.Redis,
                                                          prefix: str) -> None:
    user = unique()
    phone = await gateway.connect(user, user_type="rider", device_id="phone")
    browser = await gateway.connect(user, user_type="rider", device_id="browser", platform="web")
    publish(redis_client, prefix, user, {"type": "ride_status", "payload": {"rideId": "x", "status": "arrived"}})
    assert (await phone.recv("ride_status"))["payload"]["status"] == "arrived"
    assert (await browser.recv("ride_status"))["payload"]["status"] == "arrived"
    phone.close()
    browser.close()


async def test_devices_on_two_instances_both_receive(gateway: GatewayProcess, second: GatewayProcess,
                                                    redis_client: redis.Redis, prefix: str) -> None:
    user = unique()
    on_first = await gateway.connect(user, user_type="rider", device_id="phone")
    on_second = await second.connect(user, user_type="rider", device_id="tablet")
    eta = {"type": "eta_update", "payload": {"rideId": "r", "etaSeconds": 90}}
    assert publish(redis_client, prefix, user, eta) == 2
    assert (await on_first.recv("eta_update"))["payload"]["etaSeconds"] == 90
    assert (await on_second.recv("eta_update"))["payload"]["etaSeconds"] == 90
    on_first.close()
    on_second.close()


async def test_broadcast_on_one_instance_reaches_a_user_on_another(gateway: GatewayProcess,
                                                                  second: GatewayProcess) -> None:
    client = await second.connect()
    status, body = await gateway.http("POST", f"/broadcast/user/{client.user_id}",
                                      {"type": "notification", "payload": {"title": "Hi", "body": "there"}})
    assert status == 202
    assert body["devices"] == 1
    frame = await client.recv("notification")
    assert frame["id"] == body["messageId"]
    client.close()


async def test_only_instances_holding_the_user_are_subscribed(gateway: GatewayProcess, second: GatewayProcess,
                                                             redis_client: redis.Redis, prefix: str) -> None:
    client = await gateway.connect()
    channel = f"{prefix}:user:{client.user_id}"
    assert dict(redis_client.pubsub_numsub(channel))[channel.encode()] == 1
    client.close()
    await eventually(lambda: dict(redis_client.pubsub_numsub(channel))[channel.encode()] == 0)


@pytest.mark.parametrize("message", [
    {"type": "connected", "payload": {}}, {"type": "ride_request", "payload": {}}, {"payload": {"title": "x"}},
    "not json",
], ids=["gateway-type", "missing-field", "no-type", "not-json"])
async def test_undeliverable_redis_messages_are_dropped_and_later_ones_still_arrive(
        gateway: GatewayProcess, redis_client: redis.Redis, prefix: str, message: object) -> None:
    client = await gateway.connect()
    channel = f"{prefix}:user:{client.user_id}"
    redis_client.publish(channel, message if isinstance(message, str) else json.dumps(message))
    publish(redis_client, prefix, client.user_id, {"type": "notification", "payload": {"title": "t", "body": "b"}})
    frame = await client.recv()
    assert frame["type"] == "notification"
    client.close()


async def test_each_service_type_is_delivered(gateway: GatewayProcess, redis_client: redis.Redis,
                                              prefix: str) -> None:
    client = await gateway.connect()
    samples: dict[str, dict] = {
        "ride_request": {"requestId": "q"}, "ride_status": {"rideId": "r", "status": "started"},
        "driver_location": {"driverId": "d", "latitude": 1.5, "longitude": 2.5},
        "eta_update": {"rideId": "r", "etaSeconds": 5}, "notification": {"title": "t", "body": "b"},
        "order_status": {"orderId": "o", "status": "ready", "restaurant": "Dosa Point"},
    }
    for kind, payload in samples.items():
        publish(redis_client, prefix, client.user_id, {"type": kind, "payload": payload})
        assert (await client.recv(kind))["payload"] == payload
    client.close()


async def test_messages_for_one_user_arrive_in_publish_order(gateway: GatewayProcess, redis_client: redis.Redis,
                                                            prefix: str) -> None:
    client = await gateway.connect()
    for n in range(50):
        publish(redis_client, prefix, client.user_id, {"type": "driver_location",
                                                       "payload": {"driverId": "d", "latitude": n, "longitude": 0}})
    received = [(await client.recv("driver_location"))["payload"]["latitude"] for _ in range(50)]
    assert received == list(range(50))
    client.close()


