"""PROTOCOL.md 7 under faults: Redis stops and restarts while a producer keeps recording through one
instance and clients are on the other. Nothing acknowledged to the producer (202 with a seq) is lost
for a client that stays connected or that resumes, unless Redis itself lost it, and then the
client is told (`recovered: false`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from tests.helpers import Client, GatewayProcess, RedisServer, eventually, make_token, unique

HISTORY = {"HISTORY_SIZE": "1000", "HISTORY_TTL": "120"}


async def resume(gateway: GatewayProcess, user: str, since: int, epoch: str) -> Client:
    url = gateway.ws_url(token=make_token(user, "driver"), userType="driver", deviceId="phone", platform="ios",
                         since=str(since), epoch=epoch)
    client = await Client.open(url)
    client.user_id = user
    return client


@dataclass
class Produced:
    acknowledged: dict[str, list[int]]  # seqs per user
    unheard: int = 0  # acknowledged while no instance was subscribed to the user's channel


async def produce(gateway: GatewayProcess, users: list[str], seconds: float, r: redis.Redis) -> Produced:
    """Ride requests to each user in turn for `seconds`, noting the acknowledged seqs."""
    produced = Produced({user: [] for user in users})
    loop = asyncio.get_running_loop()
    deadline, n = loop.time() + seconds, 0
    while loop.time() < deadline:
        for user in users:
            n += 1
            status, body = await gateway.http("POST", f"/broadcast/user/{user}",
                                              {"type": "ride_request", "payload": {"requestId": f"r{n}"}})
            if status == 202 and isinstance(body, dict) and "seq" in body:
                produced.acknowledged[user].append(body["seq"])
                produced.unheard += body["devices"] > 0 and not subscribed(r, gateway, user)
        await asyncio.sleep(0.02)
    return produced


def subscribed(r: redis.Redis, gateway: GatewayProcess, user: str) -> bool:
    channel = f"{gateway.prefix}:user:{user}"
    try:
        return int(dict(r.pubsub_numsub(channel))[channel.encode()]) > 0
    except redis.ConnectionError:
        return False


async def ride_request_seqs(client: Client, quiet_s: float = 1.5) -> list[int]:
    """Every ride request the client gets until none has come for `quiet_s`."""
    seqs: list[int] = []
    while True:
        try:
            frame: dict[str, Any] = await client.recv("ride_request", timeout=quiet_s)
        except (TimeoutError, AssertionError):
            return seqs
        seqs.append(frame["seq"])


async def restart_after(redis_server: RedisServer, delay_s: float, down_s: float) -> None:
    await asyncio.sleep(delay_s)
    redis_server.stop()
    await asyncio.sleep(down_s)
    redis_server.start()


def assert_complete(received: list[int], acknowledged: list[int]) -> None:
    assert acknowledged, "the producer got no acknowledgement at all"
    assert len(received) == len(set(received)), "a recorded message arrived twice"
    assert received == list(range(1, len(received) + 1)), "recorded messages arrived out of order or with a gap"
    lost = set(acknowledged) - set(received)
    assert not lost, f"{len(lost)} acknowledged messages lost"


async def test_no_acknowledged_message_is_lost_through_a_redis_restart_from_disk(
        make_gateway: Callable[..., GatewayProcess], persistent_redis: RedisServer) -> None:
    producer_side = make_gateway(HISTORY, url=persistent_redis.url)
    client_side = make_gateway(HISTORY, url=persistent_redis.url)
    staying_user, resuming_user = unique(), unique()
    staying = await client_side.connect(staying_user, device_id="phone")
    away = await client_side.connect(resuming_user, device_id="phone")
    epoch = away.frames[0]["payload"]["epoch"]
    away.close()  # drops before the first message; resumes once everything is over

    outage = asyncio.ensure_future(restart_after(persistent_redis, delay_s=1.0, down_s=1.5))
    produced = await produce(producer_side, [staying_user, resuming_user], 4.5, persistent_redis.client())
    await outage
    await eventually(client_side.ready, timeout=10)

    acknowledged = produced.acknowledged
    assert produced.unheard > 0  # the instance resubscribed after the producer was back: a real window
    assert_complete(await ride_request_seqs(staying), acknowledged[staying_user])
    assert staying.ws.close_code is None
    back = await resume(producer_side, resuming_user, since=0, epoch=epoch)
    assert (await back.recv("connected"))["payload"]["recovered"] is True
    assert_complete(await ride_request_seqs(back), acknowledged[resuming_user])
    staying.close()
    back.close()


async def test_a_client_resuming_after_redis_restarted_empty_is_told_it_was_not_recovered(
        make_gateway: Callable[..., GatewayProcess], own_redis: RedisServer) -> None:
    first, second = make_gateway(HISTORY, url=own_redis.url), make_gateway(HISTORY, url=own_redis.url)
    user = unique()
    client = await first.connect(user, device_id="phone")
    epoch = client.frames[0]["payload"]["epoch"]
    for n in range(3):
        await first.http("POST", f"/broadcast/user/{user}", {"type": "ride_request", "payload": {"requestId": f"r{n}"}})
    assert await ride_request_seqs(client, quiet_s=0.5) == [1, 2, 3]
    client.close()
    own_redis.stop()
    own_redis.start()  # empty: the history is gone
    await eventually(second.ready, timeout=10)

    back = await resume(second, user, since=3, epoch=epoch)
    connected = (await back.recv("connected"))["payload"]
    assert connected["recovered"] is False and connected["epoch"] != epoch and connected["seq"] == 0
    status, body = await first.http("POST", f"/broadcast/user/{user}",
                                    {"type": "ride_request", "payload": {"requestId": "after"}})
    assert (status, body["seq"]) == (202, 1)
    assert await ride_request_seqs(back, quiet_s=0.5) == [1]
    back.close()


async def test_after_redis_restores_an_older_snapshot_seqs_are_not_reused_and_a_resume_is_not_recovered(
        make_gateway: Callable[..., GatewayProcess], snapshotting_redis: RedisServer) -> None:
    gateway = make_gateway(HISTORY, url=snapshotting_redis.url)
    staying_user, resuming_user = unique(), unique()
    staying = await gateway.connect(staying_user, device_id="phone")
    away = await gateway.connect(resuming_user, device_id="phone")
    epoch = away.frames[0]["payload"]["epoch"]
    users = [staying_user, resuming_user]
    r = snapshotting_redis.client()
    await record_for(gateway, users, 1, 2, 3)
    r.save()  # the snapshot Redis will come back from: seq 3
    await record_for(gateway, users, 4, 5)
    assert await ride_request_seqs(away, quiet_s=0.5) == [1, 2, 3, 4, 5]
    away.close()
    snapshotting_redis.stop()  # no final save: 4 and 5 are gone from Redis
    snapshotting_redis.start()
    await eventually(gateway.ready, timeout=10)

    await record_for(gateway, users, 6, 7, 8)
    back = await resume(gateway, resuming_user, since=5, epoch=epoch)
    connected = (await back.recv("connected"))["payload"]
    assert connected["recovered"] is False and connected["epoch"] != epoch
    staying_got = [(await staying.recv("ride_request"))["payload"]["requestId"] for _ in range(8)]
    assert staying_got == [f"r{n}" for n in range(1, 9)]  # 6-8 under a new epoch, none skipped
    staying.close()
    back.close()


async def record_for(gateway: GatewayProcess, users: list[str], *numbers: int) -> None:
    for n in numbers:
        for user in users:
            status, _body = await gateway.http("POST", f"/broadcast/user/{user}",
                                               {"type": "ride_request", "payload": {"requestId": f"r{n}"}})
            assert status == 202
