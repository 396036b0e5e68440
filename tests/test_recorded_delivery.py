"""PROTOCOL.md section 7 through the gateway: recorded broadcasts, seq, resume, expiry, duplicates, receipts.

Real gateway processes on the shared Redis (each module its own prefix), real WebSocket clients.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import redis

from tests.helpers import Client, GatewayProcess, make_token, module_gateway, unique

gateway = module_gateway({"HISTORY_SIZE": "50", "HISTORY_TTL": "60"})


def ride_request(n: int, **extra: Any) -> dict[str, Any]:
    return {"type": "ride_request", "payload": {"requestId": f"r{n}", "pickup": "MG Road"}, **extra}


async def broadcast(gateway: GatewayProcess, user: str, message: dict[str, Any]) -> tuple[int, Any]:
    return await gateway.http("POST", f"/broadcast/user/{user}", message)


async def resume(gateway: GatewayProcess, user: str, since: int, epoch: str, device: str = "phone") -> Client:
    url = gateway.ws_url(token=make_token(user, "driver"), userType="driver", deviceId=device, platform="ios",
                         since=str(since), epoch=epoch)
    client = await Client.open(url)
    client.user_id = user
    return client


async def test_connected_reports_the_users_epoch_and_last_seq(gateway: GatewayProcess) -> None:
    client = await gateway.connect(unique())
    connected = client.frames[0]["payload"]
    assert isinstance(connected["epoch"], str) and connected["epoch"]
    assert connected["seq"] == 0
    assert "recovered" not in connected
    client.close()


async def test_a_broadcast_is_recorded_and_reaches_the_client_with_its_seq(gateway: GatewayProcess) -> None:
    user = unique()
    client = await gateway.connect(user)
    status, body = await broadcast(gateway, user, ride_request(1))
    assert (status, body["seq"], body["devices"]) == (202, 1, 1)
    message = await client.recv("ride_request")
    assert message["seq"] == 1 and message["id"] == body["messageId"]
    assert message["payload"] == {"requestId": "r1", "pickup": "MG Road"}
    client.close()


async def test_a_client_that_resumes_gets_what_was_recorded_while_it_was_away_in_order(
        gateway: GatewayProcess) -> None:
    user = unique()
    client = await gateway.connect(user, device_id="phone")
    epoch = client.frames[0]["payload"]["epoch"]
    await broadcast(gateway, user, ride_request(1))
    assert (await client.recv("ride_request"))["seq"] == 1
    client.close()
    for n in range(2, 22):
        await broadcast(gateway, user, ride_request(n))
    back = await resume(gateway, user, since=1, epoch=epoch)
    connected = await back.recv("connected")
    assert connected["payload"]["recovered"] is True
    seqs = [(await back.recv("ride_request"))["seq"] for _ in range(20)]
    assert seqs == list(range(2, 22))
    assert await back.no_frame("ride_request", within=0.3)
    back.close()


async def test_an_expired_message_is_not_replayed(gateway: GatewayProcess) -> None:
    user = unique()
    client = await gateway.connect(user, device_id="phone")
    epoch = client.frames[0]["payload"]["epoch"]
    client.close()
    await broadcast(gateway, user, ride_request(1, expiresAt=int(time.time() * 1000) + 300))
    await broadcast(gateway, user, ride_request(2))
    await asyncio.sleep(0.4)
    back = await resume(gateway, user, since=0, epoch=epoch)
    await back.recv("connected")
    replayed = await back.recv("ride_request")
    assert (replayed["seq"], replayed["payload"]["requestId"]) == (2, "r2")
    back.close()


async def test_resuming_from_another_epoch_is_not_recovered(gateway: GatewayProcess) -> None:
    user = unique()
    await broadcast(gateway, user, ride_request(1))
    back = await resume(gateway, user, since=0, epoch="not-the-epoch")
    connected = (await back.recv("connected"))["payload"]
    assert connected["recovered"] is False and connected["seq"] == 1
    assert await back.no_frame("ride_request", within=0.3)
    back.close()


async def resumed_from_the_future(gateway: GatewayProcess, user: str) -> Client:
    """A client of the user that had epoch e and resumes with since=99 while the user's seq is 0."""
    first = await gateway.connect(user)
    epoch = first.frames[0]["payload"]["epoch"]
    first.close()
    return await resume(gateway, user, since=99, epoch=epoch)


async def test_resuming_from_a_seq_in_the_future_is_not_recovered(gateway: GatewayProcess) -> None:
    back = await resumed_from_the_future(gateway, unique())
    assert (await back.recv("connected"))["payload"]["recovered"] is False
    back.close()


async def test_after_an_unrecovered_resume_later_recorded_messages_arrive_live(gateway: GatewayProcess) -> None:
    user = unique()
    back = await resumed_from_the_future(gateway, user)
    assert (await back.recv("connected"))["payload"]["recovered"] is False
    await broadcast(gateway, user, ride_request(1))
    assert (await back.recv("ride_request"))["seq"] == 1
    back.close()


@pytest.mark.parametrize("query", [{"since": "abc", "epoch": "e"}, {"since": "-1", "epoch": "e"},
                                   {"since": "5"}, {"epoch": "e"}, {"since": "1", "epoch": "bad%21epoch"}])
async def test_a_garbage_resume_request_is_4400(gateway: GatewayProcess, query: dict[str, str]) -> None:
    url = gateway.ws_url(token=make_token(unique(), "driver"), userType="driver", deviceId="d", platform="ios",
                         **query)
    client = await Client.open(url)
    code, frames = await client.closed()
    assert code == 4400
    assert frames[-1]["payload"]["code"] == "INVALID_PARAMS"


async def test_a_producer_id_sent_twice_is_delivered_once(gateway: GatewayProcess) -> None:
    user = unique()
    client = await gateway.connect(user)
    first = await broadcast(gateway, user, ride_request(1, id="dispatch-77"))
    again = await broadcast(gateway, user, ride_request(1, id="dispatch-77"))
    assert first[1]["seq"] == again[1]["seq"] == 1
    assert again[1]["duplicate"] is True and "duplicate" not in first[1]
    assert (await client.recv("ride_request"))["id"] == "dispatch-77"
    assert await client.no_frame("ride_request", within=0.3)
    client.close()


async def test_a_message_already_expired_is_refused(gateway: GatewayProcess) -> None:
    status, body = await broadcast(gateway, unique(), ride_request(1, expiresAt=int(time.time() * 1000) - 1))
    assert status == 400 and "expiresAt" in body["message"]


async def test_latest_value_types_are_live_only(gateway: GatewayProcess) -> None:
    user = unique()
    client = await gateway.connect(user)
    status, body = await broadcast(gateway, user, {"type": "eta_update", "payload": {"rideId": "x", "etaSeconds": 5}})
    assert status == 202 and "seq" not in body
    assert "seq" not in await client.recv("eta_update")
    client.close()


async def test_receipt_flag_and_expiry_are_passed_on_to_the_client(gateway: GatewayProcess) -> None:
    user = unique()
    client = await gateway.connect(user)
    expires = int(time.time() * 1000) + 60_000
    await broadcast(gateway, user, ride_request(1, receipt=True, expiresAt=expires))
    message = await client.recv("ride_request")
    assert message["receipt"] is True and message["expiresAt"] == expires
    client.close()


async def test_a_receipt_goes_to_the_receipt_stream_and_channel_and_is_acked(gateway: GatewayProcess,
                                                                            redis_client: redis.Redis,
                                                                            prefix: str) -> None:
    client = await gateway.connect(unique(), user_type="rider")
    before = redis_client.xlen(f"{prefix}:stream:receipt")
    reply = await client.request({"type": "receipt", "payload": {"messageId": "m-1", "extra": 1}})
    assert reply["type"] == "ack"
    entries = redis_client.xrange(f"{prefix}:stream:receipt", count=before + 1)
    event = json.loads(entries[-1][1][b"data"])
    assert (event["type"], event["payload"], event["userId"]) == ("receipt", {"messageId": "m-1"}, client.user_id)
    client.close()


async def test_a_service_calling_the_redis_function_records_like_the_broadcast_api(gateway: GatewayProcess,
                                                                                  redis_client: redis.Redis,
                                                                                  prefix: str) -> None:
    user = unique()
    client = await gateway.connect(user)
    function = f"{prefix.replace('-', '_')}_publish"
    seq = redis_client.fcall(function, 1, user, json.dumps(ride_request(1)))
    assert seq == 1
    assert (await client.recv("ride_request"))["seq"] == 1
    client.close()


async def test_a_client_resumes_on_another_instance(make_gateway) -> None:  # type: ignore[no-untyped-def]
    first, second = make_gateway(), make_gateway()
    user = unique()
    client = await first.connect(user, device_id="phone")
    epoch = client.frames[0]["payload"]["epoch"]
    client.close()
    for n in range(1, 6):
        await broadcast(first, user, ride_request(n))
    back = await resume(second, user, since=2, epoch=epoch)
    assert (await back.recv("connected"))["payload"]["recovered"] is True
    assert [(await back.recv("ride_request"))["seq"] for _ in range(3)] == [3, 4, 5]
    await broadcast(first, user, ride_request(6))
    assert (await back.recv("ride_request"))["seq"] == 6  # then live traffic, through the other instance
    back.close()


async def test_a_phone_back_after_10_s_on_the_other_instance_gets_all_20_requests_once_in_order_but_no_expired_one(
        make_gateway) -> None:  # type: ignore[no-untyped-def]
    first, second = make_gateway({"HISTORY_SIZE": "50"}), make_gateway({"HISTORY_SIZE": "50"})
    user = unique()
    phone = await first.connect(user, device_id="phone")
    epoch = phone.frames[0]["payload"]["epoch"]
    phone.close()
    dropped_at = time.monotonic()
    soon = int(time.time() * 1000) + 2000  # every fifth request is an offer that lapses while the phone is away
    for n in range(1, 21):
        lapsing = {"expiresAt": soon} if n % 5 == 0 else {}
        await broadcast(first if n % 2 else second, user, ride_request(n, **lapsing))
    await asyncio.sleep(10 - (time.monotonic() - dropped_at))
    back = await resume(second, user, since=0, epoch=epoch)
    assert (await back.recv("connected"))["payload"]["recovered"] is True
    expected = [n for n in range(1, 21) if n % 5]
    received = [(await back.recv("ride_request"))["payload"]["requestId"] for _ in expected]
    assert received == [f"r{n}" for n in expected]
    assert await back.no_frame("ride_request", within=0.5)
    back.close()
