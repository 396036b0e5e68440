"""The JSON Schema in schema/ is the Python definitions, and real frames match it.

The committed schema and TypeScript types must equal what the definitions generate (run `make schema`
after changing tornado_gateway/messages.py). Frames captured from a running gateway, in both directions,
and the events it puts on Redis, are checked with a standard validator (jsonschema, draft 2020-12); for
client messages the schema must accept what the gateway accepts and refuse what it refuses.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aredis
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from tests.helpers import ROOT, Client, GatewayProcess, make_token, module_gateway, unique
from tornado_gateway import schema

SCHEMA_PATH = ROOT / "schema" / "gateway.schema.json"
TS_DIR = ROOT / "clients" / "typescript"
JSON2TS = TS_DIR / "node_modules" / ".bin" / "json2ts"

gateway = module_gateway({"HEARTBEAT_INTERVAL": "0.3", "HEARTBEAT_TIMEOUT": "5"})


def validator(definition: str) -> Draft202012Validator:
    document = json.loads(SCHEMA_PATH.read_text())
    registry: Registry[Any] = Registry().with_resource(document["$id"], Resource.from_contents(document))
    return Draft202012Validator({"$ref": f"{document['$id']}#/$defs/{definition}"}, registry=registry)


def assert_valid(definition: str, instance: Any) -> None:
    errors = [error.message for error in validator(definition).iter_errors(instance)]
    assert not errors, f"{instance} is not a valid {definition}: {errors}"


def members(definition: str) -> set[str]:
    """The `type` values a union of the schema admits."""
    defs = json.loads(SCHEMA_PATH.read_text())["$defs"]
    return {defs[item["$ref"].rsplit("/", 1)[1]]["properties"]["type"]["const"] for item in defs[definition]["oneOf"]}


# --- the schema is the Python definitions ---------------------------------------------------------


def test_committed_schema_matches_the_python_definitions() -> None:
    assert SCHEMA_PATH.read_text() == schema.render(), "schema/ drifted from messages.py: run `make schema`"


def test_schema_is_valid_draft_2020_12() -> None:
    Draft202012Validator.check_schema(json.loads(SCHEMA_PATH.read_text()))


@pytest.mark.skipif(not JSON2TS.exists(), reason="clients/typescript/node_modules missing: `make schema` installs it")
def test_committed_typescript_types_match_the_schema(tmp_path: Path) -> None:
    out = tmp_path / "messages.ts"
    subprocess.run(["make", "--no-print-directory", f"TS_TYPES={out}", "types"], cwd=ROOT, check=True,
                   capture_output=True, timeout=120)
    committed = (TS_DIR / "src" / "messages.ts").read_text()
    assert out.read_text() == committed, "clients/typescript/src/messages.ts drifted: run `make schema`"


def test_every_type_of_the_contract_is_in_the_schema() -> None:
    assert members("ServerMessage") == {"connected", "heartbeat", "ack", "error", "ride_request", "ride_status",
                                        "driver_location", "eta_update", "notification", "order_status"}
    assert members("ClientMessage") == {"heartbeat_ack", "location_update", "dispatch_response",
                                        "token_refresh", "receipt"}
    assert members("GatewayEvent") == {"location_update", "dispatch_response", "receipt"}


# --- real frames against the schema ---------------------------------------------------------------


@pytest.fixture
async def events(redis_url: str, prefix: str) -> AsyncIterator[list[dict[str, Any]]]:
    """Every event the gateway puts on `<prefix>:events:*` while the test runs."""
    client = aredis.from_url(redis_url)
    pubsub = client.pubsub()
    await pubsub.psubscribe(f"{prefix}:events:*")
    seen: list[dict[str, Any]] = []

    async def read() -> None:
        async for message in pubsub.listen():
            if message["type"] == "pmessage":
                seen.append(json.loads(message["data"]))

    reader = asyncio.create_task(read())
    yield seen
    reader.cancel()
    await pubsub.aclose()
    await client.aclose()


SERVICE_MESSAGES: list[dict[str, Any]] = [
    {"type": "ride_request", "payload": {"requestId": "r1", "pickup": {"lat": 1.5, "lng": 2}}, "receipt": True,
     "expiresAt": int(time.time() * 1000) + 600_000, "id": "offer-1"},
    {"type": "ride_status", "payload": {"rideId": "r1", "status": "accepted"}},
    {"type": "driver_location", "payload": {"driverId": "d9", "latitude": 1.0, "longitude": 2.0}},
    {"type": "eta_update", "payload": {"rideId": "r1", "etaSeconds": 240}},
    {"type": "notification", "payload": {"title": "Hi", "body": "there"}, "receipt": True},
    {"type": "order_status", "payload": {"orderId": "o1", "status": "preparing"}},
]

CLIENT_MESSAGES: list[dict[str, Any]] = [
    {"type": "heartbeat_ack", "payload": {"timestamp": 1}},
    {"type": "location_update", "payload": {"latitude": 52.5, "longitude": 13.4, "timestamp": 1, "heading": 90,
                                            "speed": 3.5, "accuracy": 4, "isAvailable": True, "tripId": "t1"}},
    {"type": "dispatch_response", "payload": {"requestId": "r1", "action": "accept", "reason": ""}},
    {"type": "receipt", "payload": {"messageId": "offer-1"}},
]


async def test_frames_a_running_gateway_sends_match_the_schema(gateway: GatewayProcess) -> None:
    user = unique("schema")
    first = await gateway.connect(user, "driver", device_id="phone")
    for message in SERVICE_MESSAGES:
        assert (await gateway.http("POST", f"/broadcast/user/{user}", message))[0] == 202
    await first.recv("order_status")
    await first.recv("heartbeat")
    await first.request({"type": "heartbeat_ack", "payload": {"timestamp": 1}})  # an ack
    await first.request({"type": "nonsense", "payload": {}})  # an error with a ref
    resumed = await gateway.connect(user, "driver", device_id="tablet")
    resumed.close()
    frames = first.frames + resumed.frames
    for frame in frames:
        assert_valid("ServerMessage", frame)
    assert {frame["type"] for frame in frames} == members("ServerMessage")


async def test_resume_refusal_and_close_frames_match_the_schema(gateway: GatewayProcess) -> None:
    user = unique("schema")
    first = await gateway.connect(user, "driver")
    await gateway.http("POST", f"/broadcast/user/{user}", SERVICE_MESSAGES[1])
    epoch = first.frames[0]["payload"]["epoch"]
    recorded = await first.recv("ride_status")
    first.close()
    resumed = await Client.open(gateway.ws_url(token=make_token(user, "driver"), userType="driver", deviceId="d1",
                                               platform="ios", since=str(recorded["seq"] - 1), epoch=epoch))
    assert (await resumed.recv("connected"))["payload"]["recovered"] is True
    await resumed.recv("ride_status")
    rider = await gateway.connect(user, "rider", device_id="r")
    refused = await rider.request({"type": "location_update", "payload": CLIENT_MESSAGES[1]["payload"]})
    assert refused["payload"]["code"] == "FORBIDDEN"
    bad = await Client.open(gateway.ws_url(token=make_token(user, "driver"), userType="pilot", deviceId="d1",
                                           platform="ios"))
    code, before_close = await bad.closed()
    assert code == 4400
    for frame in [*resumed.frames, *rider.frames, *before_close]:
        assert_valid("ServerMessage", frame)


async def test_events_on_redis_match_the_schema(gateway: GatewayProcess, events: list[dict[str, Any]]) -> None:
    client = await gateway.connect(unique("schema"), "driver")
    for message in CLIENT_MESSAGES:
        assert_valid("ClientMessage", message)
        reply = await client.request(dict(message))
        assert reply["type"] == "ack", reply
    await _until(lambda: {event["type"] for event in events} >= members("GatewayEvent"))
    for event in events:
        assert_valid("GatewayEvent", event)


async def test_service_messages_the_gateway_accepts_match_the_schema(gateway: GatewayProcess) -> None:
    for message in SERVICE_MESSAGES:
        assert_valid("ServiceMessage", message)
        assert (await gateway.http("POST", f"/broadcast/user/{unique('schema')}", message))[0] == 202


INVALID_CLIENT_PAYLOADS: list[tuple[str, dict[str, Any]]] = [
    ("location_update", {"latitude": 91, "longitude": 0, "timestamp": 1}),
    ("location_update", {"latitude": 0, "longitude": -181, "timestamp": 1}),
    ("location_update", {"latitude": 0, "longitude": 0}),
    ("location_update", {"latitude": 0, "longitude": 0, "timestamp": 1, "heading": 361}),
    ("location_update", {"latitude": 0, "longitude": 0, "timestamp": 1, "speed": -1}),
    ("location_update", {"latitude": "0", "longitude": 0, "timestamp": 1}),
    ("location_update", {"latitude": 0, "longitude": 0, "timestamp": 1, "isAvailable": 1}),
    ("location_update", {"latitude": 0, "longitude": 0, "timestamp": 1, "tripId": ""}),
    ("dispatch_response", {"requestId": "r1", "action": "maybe"}),
    ("dispatch_response", {"action": "accept"}),
    ("dispatch_response", {"requestId": "x" * 129, "action": "accept"}),
    ("receipt", {"messageId": ""}),
    ("token_refresh", {}),
]


@pytest.mark.parametrize(("kind", "payload"), INVALID_CLIENT_PAYLOADS)
async def test_client_messages_the_gateway_refuses_the_schema_refuses(gateway: GatewayProcess, kind: str,
                                                                     payload: dict[str, Any]) -> None:
    message = {"type": kind, "payload": payload}
    assert list(validator("ClientMessage").iter_errors(message)), f"the schema accepts {message}"
    client = await gateway.connect(unique("schema"), "driver")
    reply = await client.request(dict(message))
    assert (reply["type"], reply["payload"]["code"]) == ("error", "INVALID_MESSAGE")
    client.close()


@pytest.mark.parametrize("kind", ["ride_request", "ride_status", "driver_location", "eta_update",
                                  "notification", "order_status"])
async def test_service_messages_missing_a_required_field_are_refused_by_both(gateway: GatewayProcess,
                                                                              kind: str) -> None:
    message = {"type": kind, "payload": {}}
    assert list(validator("ServiceMessage").iter_errors(message))
    status, _ = await gateway.http("POST", f"/broadcast/user/{unique('schema')}", message)
    assert status == 400


async def _until(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)
