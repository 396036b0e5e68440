"""Contract sections 2 and 4: client frames, their validation, role rules, acks and where events go."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
import redis.asyncio

from tests.helpers import GatewayProcess

LOCATION = {"latitude": 12.97, "longitude": 77.59, "heading": 90, "speed": 8.5, "accuracy": 4,
            "timestamp": 1767000000000, "isAvailable": True, "tripId": "t-1"}


@pytest.fixture
async def events(redis_url: str, prefix: str) -> AsyncIterator[asyncio.Queue[dict]]:
    """Everything published to the gateway's event channels while the test runs."""
    client = redis.asyncio.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    await pubsub.psubscribe(f"{prefix}:events:*")
    queue: asyncio.Queue[dict] = asyncio.Queue()

    async def pump() -> None:
        async for message in pubsub.listen():
            if message["type"] == "pmessage":
                await queue.put({"channel": message["channel"].decode(), "data": json.loads(message["data"])})

    task = asyncio.create_task(pump())
    yield queue
    task.cancel()
    await pubsub.aclose()
    await client.aclose()


async def next_event(queue: asyncio.Queue[dict], user_id: str) -> dict:
    while True:
        event = await asyncio.wait_for(queue.get(), 5)
        if event["data"]["userId"] == user_id:
            return event


async def test_location_update_is_published_to_its_channel_with_the_contract_shape(
        gateway: GatewayProcess, events: asyncio.Queue[dict], prefix: str) -> None:
    client = await gateway.connect(device_id="dev-7")
    client.send({"type": "location_update", "payload": {**LOCATION, "unknown": "dropped"}})
    event = await next_event(events, client.user_id)
    assert event["channel"] == f"{prefix}:events:location_update"
    data = event["data"]
    assert set(data) == {"type", "userId", "userType", "deviceId", "serverId", "connectionId", "receivedAt", "id",
                         "payload"}
    assert data["type"] == "location_update"
    assert data["userType"] == "driver"
    assert data["deviceId"] == "dev-7"
    assert data["serverId"] == gateway.server_id
    assert data["connectionId"] == client.connection_id
    assert data["payload"] == LOCATION  # the unknown field was dropped
    client.close()


async def test_accepted_message_with_an_id_is_acked(gateway: GatewayProcess) -> None:
    client = await gateway.connect()
    reply = await client.request({"type": "location_update", "id": "loc-1", "payload": LOCATION})
    assert reply["type"] == "ack"
    assert reply["payload"] == {"id": "loc-1"}
    client.close()


async def test_client_id_becomes_the_event_id(gateway: GatewayProcess, events: asyncio.Queue[dict]) -> None:
    client = await gateway.connect()
    await client.request({"type": "location_update", "id": "loc-42", "payload": LOCATION})
    assert (await next_event(events, client.user_id))["data"]["id"] == "loc-42"
    client.close()


async def test_dispatch_response_goes_to_the_stream_and_its_channel_before_the_ack(
        gateway: GatewayProcess, events: asyncio.Queue[dict], redis_client: redis.Redis, prefix: str) -> None:
    client = await gateway.connect(user_type="delivery_partner")
    reply = await client.request({"type": "dispatch_response", "id": "dr-1",
                                  "payload": {"requestId": "req-1", "action": "reject", "reason": "too far"}})
    assert reply["type"] == "ack"
    entries = redis_client.xrevrange(f"{prefix}:stream:dispatch_response", count=20)
    mine = [json.loads(fields[b"data"]) for _id, fields in entries
            if json.loads(fields[b"data"])["userId"] == client.user_id]
    assert mine and mine[0]["payload"] == {"requestId": "req-1", "action": "reject", "reason": "too far"}
    event = await next_event(events, client.user_id)
    assert event["channel"] == f"{prefix}:events:dispatch_response"
    assert event["data"]["id"] == "dr-1"
    client.close()


@pytest.mark.parametrize("kind", ["location_update", "dispatch_response"])
@pytest.mark.parametrize("user_type", ["rider", "restaurant"])
async def test_driver_only_messages_are_forbidden_for_other_roles(gateway: GatewayProcess, kind: str,
                                                                  user_type: str) -> None:
    client = await gateway.connect(user_type=user_type)
    payload = LOCATION if kind == "location_update" else {"requestId": "r", "action": "accept"}
    reply = await client.request({"type": kind, "payload": payload})
    assert reply["type"] == "error"
    assert reply["payload"]["code"] == "FORBIDDEN"
    client.close()


async def test_heartbeat_ack_is_accepted_from_every_role(gateway: GatewayProcess) -> None:
    client = await gateway.connect(user_type="rider")
    reply = await client.request({"type": "heartbeat_ack", "payload": {"timestamp": 1}})
    assert reply["type"] == "ack"
    client.close()


async def test_unknown_type_gets_unknown_type_and_the_connection_stays(gateway: GatewayProcess) -> None:
    client = await gateway.connect()
    reply = await client.request({"type": "teleport", "payload": {}})
    assert reply["payload"]["code"] == "UNKNOWN_TYPE"
    assert (await client.request({"type": "heartbeat_ack", "payload": {}}))["type"] == "ack"
    client.close()


async def test_invalid_json_gets_invalid_json(gateway: GatewayProcess) -> None:
    client = await gateway.connect()
    client.send("{not json")
    error = await client.recv("error")
    assert error["payload"]["code"] == "INVALID_JSON"
    client.close()


async def test_binary_frame_gets_invalid_json(gateway: GatewayProcess) -> None:
    client = await gateway.connect()
    client.send(b'{"type": "heartbeat_ack", "payload": {}}')
    assert (await client.recv("error"))["payload"]["code"] == "INVALID_JSON"
    client.close()


@pytest.mark.parametrize("payload", [
    {"latitude": 91, "longitude": 0, "timestamp": 1},
    {"latitude": 0, "longitude": -181, "timestamp": 1},
    {"latitude": 0, "longitude": 0},
    {"latitude": "12", "longitude": 0, "timestamp": 1},
    {"latitude": 0, "longitude": 0, "timestamp": 1, "heading": 361},
    {"latitude": 0, "longitude": 0, "timestamp": 1, "speed": -1},
    {"latitude": 0, "longitude": 0, "timestamp": 1, "accuracy": -0.5},
    {"latitude": 0, "longitude": 0, "timestamp": 1, "isAvailable": "yes"},
    {"latitude": 0, "longitude": 0, "timestamp": 1, "tripId": 7},
    {"latitude": True, "longitude": 0, "timestamp": 1},
], ids=["lat-range", "lon-range", "no-timestamp", "lat-string", "heading", "speed", "accuracy", "isAvailable",
        "tripId", "lat-bool"])
async def test_location_update_outside_its_schema_gets_invalid_message_with_ref(
        gateway: GatewayProcess, payload: dict) -> None:
    client = await gateway.connect()
    reply = await client.request({"type": "location_update", "id": "bad-1", "payload": payload})
    assert reply["type"] == "error"
    assert reply["payload"]["code"] == "INVALID_MESSAGE"
    assert reply["payload"]["ref"] == "bad-1"
    client.close()


@pytest.mark.parametrize("payload", [{"action": "accept"}, {"requestId": "r1", "action": "maybe"},
                                     {"requestId": "", "action": "accept"}, {"requestId": "r1"}])
async def test_dispatch_response_outside_its_schema_gets_invalid_message(gateway: GatewayProcess,
                                                                          payload: dict) -> None:
    client = await gateway.connect()
    reply = await client.request({"type": "dispatch_response", "payload": payload})
    assert reply["payload"]["code"] == "INVALID_MESSAGE"
    client.close()


@pytest.mark.parametrize("frame", ['[1, 2]', '{"payload": {}}', '{"type": "heartbeat_ack", "payload": []}',
                                   '{"type": 5}'])
async def test_frames_that_are_not_envelopes_get_invalid_message(gateway: GatewayProcess, frame: str) -> None:
    client = await gateway.connect()
    client.send(frame)
    assert (await client.recv("error"))["payload"]["code"] == "INVALID_MESSAGE"
    client.close()


async def test_rejected_message_is_not_acked_and_not_published(gateway: GatewayProcess,
                                                               events: asyncio.Queue[dict]) -> None:
    client = await gateway.connect()
    await client.request({"type": "location_update", "id": "x", "payload": {"latitude": 100}})
    await client.request({"type": "location_update", "id": "y", "payload": LOCATION})
    assert (await next_event(events, client.user_id))["data"]["id"] == "y"
    client.close()


async def test_frame_over_the_maximum_size_closes_with_1009(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gateway = make_gateway({"MAX_MESSAGE_SIZE": "1024"})
    client = await gateway.connect()
    client.send(json.dumps({"type": "location_update", "payload": {**LOCATION, "pad": "x" * 2000}}))
    code, _frames = await client.closed()
    assert code == 1009


async def test_frame_at_the_maximum_size_is_accepted(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gateway = make_gateway({"MAX_MESSAGE_SIZE": "1024"})
    client = await gateway.connect()
    frame = {"type": "heartbeat_ack", "id": "big", "payload": {"pad": ""}}
    frame["payload"]["pad"] = "x" * (1024 - len(json.dumps(frame)))
    assert len(json.dumps(frame)) == 1024
    client.send(json.dumps(frame))
    assert (await client.recv("ack"))["payload"]["id"] == "big"
    client.close()


