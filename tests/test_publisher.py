"""Contract 7.1: the Python publisher records through the gateway's Redis function."""

from __future__ import annotations

import time

import pytest
import redis.asyncio as aredis
import ujson

from tests.helpers import unique
from tornado_gateway.history import decode_record
from tornado_gateway.history_redis import RedisHistory
from tornado_gateway.publisher import FunctionNotLoaded, Publisher, PublishRefused
from tornado_gateway.redis_keys import Keys
from tornado_gateway.resp import PipelinedClient


@pytest.fixture
async def history(pipelined: PipelinedClient, prefix: str) -> RedisHistory:
    """What a gateway instance does at start: load the functions the publisher calls."""
    history = RedisHistory(pipelined, Keys(prefix), 100, 300, 65536)
    await history.load()
    return history


async def test_publisher_records_and_returns_seq_and_duplicate(redis_async: aredis.Redis, prefix: str,
                                                               history: RedisHistory) -> None:
    publisher = Publisher(redis_async, prefix)
    user = unique("u")
    first = await publisher.publish(user, "ride_request", {"requestId": "r1"}, message_id="offer-r1")
    second = await publisher.publish(user, "notification", {"title": "t", "body": "b"})
    again = await publisher.publish(user, "ride_request", {"requestId": "r1"}, message_id="offer-r1")
    assert (first.seq, first.duplicate, first.message_id) == (1, False, "offer-r1")
    assert (second.seq, second.duplicate, second.epoch) == (2, False, first.epoch)
    assert (again.seq, again.duplicate, again.message_id) == (1, True, "offer-r1")
    assert (await history.position(user)).seq == 2


async def test_publisher_sends_expires_at_and_receipt_in_the_message(redis_async: aredis.Redis, prefix: str,
                                                                     history: RedisHistory) -> None:
    user = unique("u")
    expires_at = int(time.time() * 1000) + 60_000
    result = await Publisher(redis_async, prefix).publish(user, "ride_request", {"requestId": "r1", "stops": []},
                                                          expires_at_ms=expires_at, receipt=True)
    record = decode_record((await history.since(user, result.epoch or "", 0)).records[0])
    assert record is not None and record.id == result.message_id and record.expires_at == expires_at
    assert record.frame is not None  # the publisher writes messages that clients get as they are
    assert ujson.loads(record.frame) == {"type": "ride_request", "payload": {"requestId": "r1", "stops": []},
                                         "expiresAt": expires_at, "receipt": True, "id": result.message_id,
                                         "timestamp": record.timestamp, "seq": 1}


async def test_publisher_delivers_latest_value_types_live_with_seq_0(redis_async: aredis.Redis, prefix: str,
                                                                     history: RedisHistory) -> None:
    result = await Publisher(redis_async, prefix).publish(unique("u"), "eta_update", {"rideId": "r1", "etaSeconds": 90})
    assert (result.seq, result.epoch, result.duplicate) == (0, None, False)


async def test_refused_message_raises_publish_refused_with_the_reason(redis_async: aredis.Redis, prefix: str,
                                                                      history: RedisHistory) -> None:
    with pytest.raises(PublishRefused, match="ride_status payload is missing status") as refused:
        await Publisher(redis_async, prefix).publish(unique("u"), "ride_status", {"rideId": "r1"})
    assert refused.value.reason == "ride_status payload is missing status"


async def test_expired_message_raises_publish_refused(redis_async: aredis.Redis, prefix: str,
                                                      history: RedisHistory) -> None:
    with pytest.raises(PublishRefused, match="expiresAt has already passed"):
        await Publisher(redis_async, prefix).publish(unique("u"), "notification", {"title": "t", "body": "b"},
                                                     expires_at_ms=int(time.time() * 1000) - 1)


async def test_unencodable_payload_raises_publish_refused(redis_async: aredis.Redis, prefix: str) -> None:
    with pytest.raises(PublishRefused, match="cannot be encoded as JSON"):
        await Publisher(redis_async, prefix).publish(unique("u"), "notification", {"title": "t", "body": float("nan")})


async def test_publisher_without_a_loaded_function_says_to_start_a_gateway(redis_async: aredis.Redis) -> None:
    with pytest.raises(FunctionNotLoaded, match="start a gateway instance first"):
        await Publisher(redis_async, unique("nolibrary")).publish(unique("u"), "notification",
                                                                  {"title": "t", "body": "b"})
