"""Contract section 7 storage: seq, epoch, history, replay, expiry, dedupe; embedded and Redis backends.

The contract tests run against both `MemoryHistory` and `RedisHistory` (the real Redis, a key
prefix of this module's own); the Redis-only ones check what only Redis has: concurrent writers,
key names and slots, key expiry, reloading the functions, the raw FCALL services use.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import redis
import redis.asyncio as aredis
import ujson
from redis.crc import key_slot

from tests.helpers import RedisServer, unique
from tornado_gateway.errors import ErrorCode, ValidationError
from tornado_gateway.history import History, MemoryHistory, check_message, decode_record, record_bytes
from tornado_gateway.history_redis import RedisHistory
from tornado_gateway.messages import service_frame
from tornado_gateway.redis_keys import Keys
from tornado_gateway.resp import PipelinedClient

EXACT_PAYLOAD = ('{"a":[],"b":{},"n":12345678901234567890,"f":0.1,"nested":{"l":[[],{}],"e":1e-7,"neg":-0.0},'
                 '"text":"caf\\u00e9 / \\"q\\" é 🚗","big":1.0000000000000002}')


def notification(n: int = 0, *, extra: str = "") -> str:
    return '{"type":"notification","payload":{"title":"t","body":"b' + str(n) + '"}' + extra + "}"


def now_ms() -> int:
    return int(time.time() * 1000)


def producer_message(record: bytes) -> Any:
    """The producer's message inside a stored or published record, parsed (the gateway parses it only
    when the record cannot be spliced)."""
    return ujson.loads(record[record.index(b',"message":') + len(b',"message":'):-1])


class Published:
    """What a backend published for one user, in order."""

    def __init__(self, receive: Callable[[float], Awaitable[bytes | None]]) -> None:
        self._receive = receive

    async def next(self, timeout: float = 2.0) -> bytes:
        data = await self._receive(timeout)
        assert data is not None, "nothing was published"
        return data

    async def nothing_more(self, timeout: float = 0.2) -> bool:
        return await self._receive(timeout) is None


@dataclass
class Backend:
    name: str
    history: History
    watch: Callable[[str], Awaitable[Published]]


Factory = Callable[..., Awaitable[Backend]]


@pytest.fixture(scope="module")
def keys(prefix: str) -> Keys:
    return Keys(prefix)


@pytest.fixture(params=["memory", "redis"])
async def make(pipelined: PipelinedClient,
               request: pytest.FixtureRequest, redis_async: aredis.Redis, keys: Keys) -> AsyncIterator[Factory]:
    """Builds the parametrised backend with the given settings, plus a way to watch what it publishes."""
    subscribers: list[aredis.client.PubSub] = []
    queues: dict[str, asyncio.Queue[bytes]] = {}

    def on_memory_publish(user_id: str, data: bytes) -> None:
        queues.setdefault(user_id, asyncio.Queue()).put_nowait(data)

    async def watch_memory(user_id: str) -> Published:
        queue = queues.setdefault(user_id, asyncio.Queue())

        async def receive(timeout: float) -> bytes | None:
            try:
                return await asyncio.wait_for(queue.get(), timeout)
            except TimeoutError:
                return None

        return Published(receive)

    async def watch_redis(user_id: str) -> Published:
        pubsub = redis_async.pubsub()
        subscribers.append(pubsub)
        await pubsub.subscribe(keys.user_channel(user_id))

        async def receive(timeout: float) -> bytes | None:
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
                if message is not None:
                    return bytes(message["data"])
            return None

        return Published(receive)

    async def factory(*, size: int = 100, ttl_s: float = 300, max_message_size: int = 65536) -> Backend:
        if request.param == "memory":
            memory = MemoryHistory(size, ttl_s, on_memory_publish, max_message_size=max_message_size)
            return Backend("memory", memory, watch_memory)
        history = RedisHistory(pipelined, keys, size, ttl_s, max_message_size)
        await history.load()
        return Backend("redis", history, watch_redis)

    yield factory
    for pubsub in subscribers:
        await pubsub.aclose()


async def record_many(history: History, user_id: str, count: int) -> list[int]:
    return [(await history.record(user_id, notification(n))).seq for n in range(count)]


def seqs(records: list[bytes]) -> list[int]:
    decoded = [decode_record(data) for data in records]
    return [record.seq for record in decoded if record is not None]


# --- seq and epoch -----------------------------------------------------------------------------


async def test_seqs_are_1_2_3_per_user_without_gaps(make: Factory) -> None:
    history = (await make()).history
    first, second = unique("u"), unique("u")
    assert await record_many(history, first, 3) == [1, 2, 3]
    assert await record_many(history, second, 2) == [1, 2]
    assert (await history.record(first, notification())).seq == 4


async def test_epoch_exists_from_the_first_position_and_the_first_record_belongs_to_it(make: Factory) -> None:
    history = (await make()).history
    user = unique("u")
    position = await history.position(user)
    assert position.seq == 0 and position.epoch
    result = await history.record(user, notification())
    assert (result.seq, result.epoch) == (1, position.epoch)
    replay = await history.since(user, position.epoch, 0)
    assert replay.recoverable and seqs(replay.records) == [1]


async def test_position_reports_the_last_seq_under_the_same_epoch(make: Factory) -> None:
    history = (await make()).history
    user = unique("u")
    results = [await history.record(user, notification(n)) for n in range(2)]
    position = await history.position(user)
    assert (position.epoch, position.seq) == (results[0].epoch, 2)


async def test_two_concurrent_writers_get_exactly_1_to_400_without_duplicates(redis_url: str, keys: Keys) -> None:
    clients = [PipelinedClient(redis_url) for _ in range(2)]  # two instances: two connections to Redis
    try:
        writers = [RedisHistory(client, keys, 500, 300, 65536) for client in clients]
        await writers[0].load()
        user = unique("u")
        results = await asyncio.gather(*(writer.record(user, notification(n))
                                         for n in range(200) for writer in writers))
        assert sorted(result.seq for result in results) == list(range(1, 401))
        assert len({result.epoch for result in results}) == 1
        replay = await writers[1].since(user, results[0].epoch or "", 0)
        assert seqs(replay.records) == list(range(1, 401))
    finally:
        for client in clients:
            await client.close()


# --- history and replay ------------------------------------------------------------------------


async def five_recorded(make: Factory, size: int) -> tuple[History, str, str]:
    """A history of `size` for a new user with five messages recorded: (history, user, epoch)."""
    history = (await make(size=size)).history
    user = unique("u")
    await record_many(history, user, 5)
    return history, user, (await history.position(user)).epoch


async def test_history_keeps_only_the_last_history_size_records(make: Factory) -> None:
    history, user, epoch = await five_recorded(make, size=3)
    replay = await history.since(user, epoch, 2)
    assert replay.recoverable and seqs(replay.records) == [3, 4, 5]


async def test_since_returns_the_records_after_since_in_order(make: Factory) -> None:
    history, user, epoch = await five_recorded(make, size=100)
    replay = await history.since(user, epoch, 2)
    assert (replay.recoverable, replay.epoch, replay.seq) == (True, epoch, 5)
    assert seqs(replay.records) == [3, 4, 5]
    bodies = [producer_message(record)["payload"]["body"] for record in replay.records]
    assert bodies == ["b2", "b3", "b4"]


async def test_since_equal_to_the_current_seq_is_recoverable_with_nothing_to_replay(make: Factory) -> None:
    history = (await make()).history
    user = unique("u")
    await record_many(history, user, 2)
    replay = await history.since(user, (await history.position(user)).epoch, 2)
    assert (replay.recoverable, replay.records) == (True, [])


async def test_since_older_than_what_is_kept_is_not_recoverable(make: Factory) -> None:
    history, user, epoch = await five_recorded(make, size=3)
    replay = await history.since(user, epoch, 1)
    assert (replay.recoverable, replay.epoch, replay.seq, replay.records) == (False, epoch, 5, [])


async def test_since_beyond_the_current_seq_is_not_recoverable(make: Factory) -> None:
    history = (await make()).history
    user = unique("u")
    await record_many(history, user, 2)
    replay = await history.since(user, (await history.position(user)).epoch, 3)
    assert (replay.recoverable, replay.seq, replay.records) == (False, 2, [])


async def test_another_epoch_is_not_recoverable(make: Factory) -> None:
    history = (await make()).history
    user = unique("u")
    await record_many(history, user, 2)
    replay = await history.since(user, "not-this-epoch", 0)
    assert (replay.recoverable, replay.records) == (False, [])
    assert replay.epoch == (await history.position(user)).epoch


async def test_a_user_without_history_is_not_recoverable(make: Factory) -> None:
    history = (await make()).history
    replay = await history.since(unique("u"), "some-epoch", 0)
    assert (replay.recoverable, replay.epoch, replay.seq, replay.records) == (False, "", 0, [])


async def test_negative_since_is_refused(make: Factory) -> None:
    history = (await make()).history
    with pytest.raises(ValueError, match="since"):
        await history.since(unique("u"), "e", -1)


async def test_history_is_dropped_after_history_ttl_and_restarts_under_a_new_epoch(make: Factory) -> None:
    history = (await make(ttl_s=1)).history
    user = unique("u")
    old = await history.record(user, notification())
    await asyncio.sleep(1.2)
    assert not (await history.since(user, old.epoch or "", 0)).recoverable
    new = await history.record(user, notification())
    assert new.seq == 1 and new.epoch != old.epoch


async def test_each_record_extends_the_history_by_history_ttl(make: Factory) -> None:
    history = (await make(ttl_s=1)).history
    user = unique("u")
    first = await history.record(user, notification())
    await asyncio.sleep(0.6)
    await history.record(user, notification())
    await asyncio.sleep(0.6)
    replay = await history.since(user, first.epoch or "", 0)
    assert replay.recoverable and seqs(replay.records) == [1, 2]


# --- what is published -------------------------------------------------------------------------


async def test_recorded_message_is_published_as_the_stored_record(make: Factory) -> None:
    backend = await make()
    user = unique("u")
    published = await backend.watch(user)
    result = await backend.history.record(user, notification(7))
    live = await published.next()
    stored = (await backend.history.since(user, result.epoch or "", 0)).records
    assert stored == [live]
    record = decode_record(live)
    assert record is not None
    assert (record.seq, record.epoch, record.id) == (1, result.epoch, result.message_id)
    assert producer_message(live) == {"type": "notification", "payload": {"title": "t", "body": "b7"}}


async def test_generated_message_ids_are_unique_per_message(make: Factory) -> None:
    history = (await make()).history
    user = unique("u")
    ids = [(await history.record(user, notification(n))).message_id for n in range(3)]
    assert len(set(ids)) == 3 and all(ids)


async def test_producer_id_and_timestamp_are_kept(make: Factory) -> None:
    history = (await make()).history
    user = unique("u")
    result = await history.record(user, notification(extra=',"id":"ride-7/offer \\"1\\"","timestamp":1767000000000'))
    assert result.message_id == 'ride-7/offer "1"'
    record = decode_record((await history.since(user, result.epoch or "", 0)).records[0])
    assert record is not None and (record.id, record.timestamp) == ('ride-7/offer "1"', 1767000000000)


async def test_the_stored_record_is_record_bytes_byte_for_byte(make: Factory) -> None:
    """Also for a producer id with characters that cjson escapes and ujson does not ('/', DEL)."""
    backend = await make()
    user = unique("u")
    expires_at = now_ms() + 60_000
    message = ('{"type":"notification","payload":{"title":"t","body":"b"},"id":"ride/7\\u007f \\\\/ \\"q\\" \x7f é",'
               f'"timestamp":1767000000000,"expiresAt":{expires_at}}}')
    result = await backend.history.record(user, message)
    assert result.message_id == 'ride/7\x7f \\/ "q" \x7f é'
    stored = (await backend.history.since(user, result.epoch or "", 0)).records[0]
    assert stored == record_bytes(result.seq, result.epoch or "", result.message_id, 1767000000000, expires_at,
                                  message.encode(), "notification", 0)


# Messages on both sides of the splice rule (history.splice_flags): what the gateway appends, or None.
SPLICE_CASES = [
    ('{"type":"notification","payload":{"title":"t","body":"b"}}', 3),
    ('{"type":"notification","payload":{"title":"t","body":"b"},"id":"n-1"}', 2),
    ('{"type":"notification","payload":{"title":"t","body":"b"},"timestamp":1767000000000}', 1),
    ('{"type":"notification","payload":{"title":"t","body":"b"},"id":"n/2 é","timestamp":1767000000000,'
     '"receipt":true}', 0),
    ('{"type":"notification","payload":{"title":"t","body":"b","timestamp":5},"receipt":true}', 3),
    ('{"type":"notification","payload":{"title":"t","body":"b"},"receipt":false}', None),
    ('{"type":"notification","payload":{"title":"t","body":"b"},"trace":"x1"}', None),
    ('{"type":"notification","payload":{"title":"t","body":"b"},"id":null}', None),
    ('{"type":"notification","payload":{"title":"t","body":"b"},"timestamp":1767000000000.5}', None),
    ('{"type":"notification","payload":{"title":"t","body":"b"},"timestamp":1.767e12}', None),
    ('{"type":"notification","payload":{"title":"t","body":"b"},"timestamp": 1767000000000}', None),
    ('{"type":"notification","payload":{"title":"t","body":"b"},"timestamp":"soon"}', None),
    ('{"type":"notification","payload":{"title":"t","body":"b"}} ', None),
]


@pytest.mark.parametrize(("message", "splice"), SPLICE_CASES)
async def test_both_backends_mark_the_same_records_for_splicing(make: Factory, message: str,
                                                              splice: int | None) -> None:
    backend = await make()
    user = unique("u")
    result = await backend.history.record(user, message)
    stored = (await backend.history.since(user, result.epoch or "", 0)).records[0]
    record = decode_record(stored)
    assert record is not None
    assert check_message(message, max_message_size=65536, now=now_ms()).splice == splice
    assert stored == record_bytes(result.seq, result.epoch or "", result.message_id, record.timestamp, None,
                                  message.encode(), "notification", splice)


@pytest.mark.parametrize(("message", "splice"), SPLICE_CASES)
def test_a_spliced_frame_says_what_the_re_encoded_frame_says(message: str, splice: int | None) -> None:
    checked = check_message(message, max_message_size=65536, now=now_ms())
    message_id = checked.producer_id or "ep-7"
    spliced = decode_record(record_bytes(7, "ep", message_id, checked.timestamp, None, message.encode(), checked.kind,
                                         checked.splice))
    parsed = decode_record(record_bytes(7, "ep", message_id, checked.timestamp, None, message.encode()))
    assert spliced is not None and parsed is not None and parsed.message is not None
    assert (spliced.frame is not None) == (splice is not None)
    re_encoded = service_frame(checked.kind, parsed.message["payload"], message_id, checked.timestamp, parsed.message,
                               None, 7)
    assert ujson.loads(spliced.frame or re_encoded) == ujson.loads(re_encoded)


def test_a_record_whose_head_is_not_laid_out_for_splicing_is_parsed_instead() -> None:
    data = (b'{"recorded":{"seq":1,"epoch":"e","timestamp":5,"id":"e-1","type":"notification","splice":2},'
            b'"message":{"type":"notification","payload":{"title":"t","body":"b"},"trace":"x"}}')
    record = decode_record(data)
    assert record is not None and record.frame is None
    assert record.message == {"type": "notification", "payload": {"title": "t", "body": "b"}, "trace": "x"}


async def test_payload_comes_back_byte_exact(make: Factory) -> None:
    backend = await make()
    user = unique("u")
    message = '{"type":"notification","payload":{"title":"t","body":"b","data":' + EXACT_PAYLOAD + '},"id":"exact"}'
    published = await backend.watch(user)
    result = await backend.history.record(user, message)
    stored = (await backend.history.since(user, result.epoch or "", 0)).records[0]
    assert stored.endswith(b',"message":' + message.encode() + b"}")
    assert await published.next() == stored
    data = producer_message(stored)["payload"]["data"]
    assert data["a"] == [] and data["b"] == {} and data["n"] == 12345678901234567890


@pytest.mark.parametrize("message", [
    '{"type":"driver_location","payload":{"driverId":"d1","latitude":12.9,"longitude":77.6,"extra":[]}}',
    '{"type":"eta_update","payload":{"rideId":"r1","etaSeconds":120},"id":"eta-1"}',
])
async def test_latest_value_types_get_seq_0_and_are_published_live_verbatim(make: Factory, message: str) -> None:
    backend = await make()
    user = unique("u")
    published = await backend.watch(user)
    result = await backend.history.record(user, message)
    assert (result.seq, result.epoch, result.recorded, result.duplicate) == (0, None, False, False)
    assert await published.next() == message.encode()
    assert (await backend.history.position(user)).seq == 0


async def test_history_size_0_records_nothing_and_publishes_verbatim(make: Factory) -> None:
    backend = await make(size=0)
    user = unique("u")
    published = await backend.watch(user)
    result = await backend.history.record(user, notification(extra=',"id":"n-1"'))
    assert (result.seq, result.recorded, result.message_id) == (0, False, "n-1")
    assert await published.next() == notification(extra=',"id":"n-1"').encode()
    assert (await backend.history.position(user)).seq == 0


# --- idempotency and expiry --------------------------------------------------------------------


async def test_duplicate_producer_id_returns_the_original_seq_and_is_not_published_twice(make: Factory) -> None:
    backend = await make()
    user = unique("u")
    published = await backend.watch(user)
    first = await backend.history.record(user, notification(1, extra=',"id":"offer-1"'))
    await backend.history.record(user, notification(2))
    again = await backend.history.record(user, notification(1, extra=',"id":"offer-1"'))
    assert (again.seq, again.duplicate, again.epoch, again.message_id) == (1, True, first.epoch, "offer-1")
    assert seqs([await published.next(), await published.next()]) == [1, 2]
    assert await published.nothing_more()
    assert (await backend.history.position(user)).seq == 2


async def test_an_id_recorded_by_the_previous_release_is_recognised(pipelined: PipelinedClient, keys: Keys,
                                                                    redis_async: aredis.Redis) -> None:
    """During a rolling upgrade an older release's function (which keeps no `noids` flag) records
    into the same history; its producer ids must still count."""
    history = RedisHistory(pipelined, keys, 100, 300, 65536)
    await history.load()
    user = unique("u")
    first = await history.record(user, notification(1))  # an epoch started by this release: noids 1
    await redis_async.hset(keys.history_meta(user), "seq", 2)  # the older release records seq 2 with id "old"
    await redis_async.zadd(keys.history_ids(user), {"old": 2})
    again = await history.record(user, notification(2, extra=',"id":"old"'))
    assert (first.seq, again.seq, again.duplicate) == (1, 2, True)


async def test_a_history_written_before_generations_existed_keeps_its_epoch(pipelined: PipelinedClient, keys: Keys,
                                                                           redis_async: aredis.Redis) -> None:
    history = RedisHistory(pipelined, keys, 100, 300, 65536)
    await history.load()
    user = unique("u")
    first = await history.record(user, notification(1))
    await redis_async.hdel(keys.history_meta(user), "gen", "noids")  # as the previous release wrote it
    second = await history.record(user, notification(2))
    assert (second.epoch, second.seq) == (first.epoch, 2)


async def test_a_producer_id_first_used_after_messages_without_ids_is_recognised(make: Factory) -> None:
    history = (await make()).history
    user = unique("u")
    await record_many(history, user, 2)
    first = await history.record(user, notification(extra=',"id":"late"'))
    await record_many(history, user, 1)
    again = await history.record(user, notification(extra=',"id":"late"'))
    assert (first.seq, again.seq, again.duplicate) == (3, 3, True)


async def test_a_trimmed_producer_id_is_recorded_again(make: Factory) -> None:
    history = (await make(size=2)).history
    user = unique("u")
    await history.record(user, notification(extra=',"id":"old"'))
    await record_many(history, user, 2)
    again = await history.record(user, notification(extra=',"id":"old"'))
    assert (again.seq, again.duplicate) == (4, False)


async def test_expires_at_already_passed_is_refused(make: Factory) -> None:
    history = (await make()).history
    user = unique("u")
    with pytest.raises(ValidationError, match="expiresAt has already passed"):
        await history.record(user, notification(extra=f',"expiresAt":{now_ms() - 1}'))
    assert (await history.position(user)).seq == 0


async def test_a_record_whose_expires_at_passes_is_skipped_by_since(make: Factory) -> None:
    history = (await make()).history
    user = unique("u")
    lapsing = await history.record(user, notification(1, extra=f',"expiresAt":{now_ms() + 300}'))
    await history.record(user, notification(2, extra=f',"expiresAt":{now_ms() + 60_000}'))
    await history.record(user, notification(3))
    assert seqs((await history.since(user, lapsing.epoch or "", 0)).records) == [1, 2, 3]
    await asyncio.sleep(0.4)
    replay = await history.since(user, lapsing.epoch or "", 0)
    assert replay.recoverable and seqs(replay.records) == [2, 3]
    record = decode_record(replay.records[0])
    assert record is not None and record.expires_at == producer_message(replay.records[0])["expiresAt"]


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("message", "reason"), [
    ("not json", "message is not valid JSON"),
    ('{"type":"notification","payload":{"title":"t","body":NaN}}', "message is not valid JSON"),
    ('{"type":"notification","payload":{"title":"t","body":0x10}}', "message is not valid JSON"),
    ('{"type":"notification","payload":{"title":"t","body":+1}}', "message is not valid JSON"),
    ('{"type":"notification","payload":{"title":"t","body":1e999}}', "message is not valid JSON"),
    ('{"type":"notification","payload":{"title":"t","body":Infinity}}', "message is not valid JSON"),
    (b'{"type":"notification","payload":{"title":"\xff","body":"b"}}', "message is not valid JSON"),
    ('[{"type":"notification"}]', "body must be a JSON object"),
    ('{"type":"connected","payload":{}}', "type must be one of ride_request, ride_status"),
    ('{"payload":{"title":"t","body":"b"}}', "type must be one of"),
    ('{"type":"notification","payload":[1]}', "payload must be an object"),
    ('{"type":"notification","payload":"hi"}', "payload must be an object"),
    ('{"type":"ride_status","payload":{"rideId":"r1","status":null}}', "ride_status payload is missing status"),
    ('{"type":"driver_location","payload":{"driverId":"d"}}', "payload is missing latitude, longitude"),
    ('{"type":"notification","payload":{"title":"t","body":"b"},"id":5}', "id must be a UTF-8 string of 1..128"),
    (notification(extra=f',"id":"{"x" * 129}"'), "id must be"),
    ('{"type":"notification","payload":{"title":"t","body":"b"},"expiresAt":"soon"}', "expiresAt must be an integer"),
    (notification(extra=',"expiresAt":9500000000000.5'), "expiresAt must be an integer"),
    ('{"type":"notification","payload":{"title":"t","body":"b"},"expiresAt":1000}', "expiresAt has already passed"),
    (notification(extra=f',"padding":"{"x" * 400}"'), "over MAX_MESSAGE_SIZE (400)"),
])
async def test_invalid_messages_are_refused_with_the_reason(make: Factory, message: str | bytes, reason: str) -> None:
    backend = await make(max_message_size=400)
    user = unique("u")
    published = await backend.watch(user)
    with pytest.raises(ValidationError) as refused:
        await backend.history.record(user, message)
    assert reason in refused.value.message
    assert await published.nothing_more(0.1)


@pytest.mark.parametrize(("message", "code"), [
    ("{", ErrorCode.INVALID_JSON),
    ('{"type":"heartbeat","payload":{}}', ErrorCode.UNKNOWN_TYPE),
    ('{"type":"notification","payload":{}}', ErrorCode.INVALID_MESSAGE),
])
async def test_refusals_carry_the_error_code_of_the_broadcast_api(make: Factory, message: str, code: ErrorCode) -> None:
    history = (await make()).history
    with pytest.raises(ValidationError) as refused:
        await history.record(unique("u"), message)
    assert refused.value.code == code


async def test_an_id_of_128_multibyte_characters_is_accepted(make: Factory) -> None:
    history = (await make()).history
    producer_id = "é" * 128
    result = await history.record(unique("u"), notification(extra=f',"id":"{producer_id}"'))
    assert result.message_id == producer_id


# --- Redis only ----------------------------------------------------------------------------------


@pytest.mark.parametrize("user_id", ["u1", "rider:42", "a{b}c", "{x}y", "{a{b}", "a{b", "a}b"])
async def test_keys_are_named_as_keys_says_and_share_the_slot_of_the_bare_user_id(pipelined: PipelinedClient,
        redis_async: aredis.Redis, keys: Keys, user_id: str) -> None:
    history = RedisHistory(pipelined, keys, 100, 300, 65536)
    await history.load()
    user = f"{unique('s')}{user_id}"
    await history.record(user, notification(extra=',"id":"p-1"'))
    names = [keys.history(user), keys.history_meta(user), keys.history_ids(user)]
    assert await redis_async.exists(*names) == 3
    if "}" not in user_id or Keys.hash_tag(user) is not None:
        assert {key_slot(name.encode()) for name in names} == {key_slot(user.encode())}


async def test_keys_of_different_users_never_collide(keys: Keys) -> None:
    users = ["b", "{b}", "{b}:meta", "b}:list:{b", "a}b", "x{b}", "b}:meta", "{b", "b{", "}:list:b"]
    names = [name for user in users for name in (keys.history(user), keys.history_meta(user), keys.history_ids(user))]
    assert len(set(names)) == len(names)


async def test_record_refreshes_the_expiry_of_all_of_the_users_keys(pipelined: PipelinedClient,
                                                                    redis_async: aredis.Redis, keys: Keys) -> None:
    history = RedisHistory(pipelined, keys, 100, 1, 65536)
    await history.load()
    user = unique("u")
    await history.record(user, notification(extra=',"id":"p-1"'))
    names = [keys.history(user), keys.history_meta(user), keys.history_ids(user)]
    assert all(0 < ttl <= 1000 for ttl in [await redis_async.pttl(name) for name in names])
    await asyncio.sleep(1.2)
    assert await redis_async.exists(*names) == 0


async def test_position_creates_the_epoch_with_history_ttl(pipelined: PipelinedClient,
                                                           redis_async: aredis.Redis, keys: Keys) -> None:
    history = RedisHistory(pipelined, keys, 100, 1, 65536)
    await history.load()
    user = unique("u")
    await history.position(user)
    assert 0 < await redis_async.pttl(keys.history_meta(user)) <= 1000


async def test_epoch_changes_after_the_keys_are_deleted_and_seq_restarts_at_1(pipelined: PipelinedClient,
        redis_async: aredis.Redis, keys: Keys) -> None:
    history = RedisHistory(pipelined, keys, 100, 300, 65536)
    await history.load()
    user = unique("u")
    old = await history.record(user, notification())
    await history.record(user, notification())
    await redis_async.delete(keys.history(user), keys.history_meta(user), keys.history_ids(user))
    position = await history.position(user)
    assert position.epoch != old.epoch and position.seq == 0
    assert (await history.record(user, notification())).seq == 1
    assert not (await history.since(user, old.epoch or "", 2)).recoverable


async def test_a_history_list_left_without_its_meta_is_discarded_by_the_new_epoch(pipelined: PipelinedClient,
        redis_async: aredis.Redis, keys: Keys) -> None:
    history = RedisHistory(pipelined, keys, 100, 300, 65536)
    await history.load()
    user = unique("u")
    await history.record(user, notification(extra=',"id":"p-1"'))
    await redis_async.delete(keys.history_meta(user))
    result = await history.record(user, notification(extra=',"id":"p-1"'))
    assert (result.seq, result.duplicate) == (1, False)
    assert seqs((await history.since(user, result.epoch or "", 0)).records) == [1]


async def test_trimming_drops_the_trimmed_producer_ids_from_the_index(pipelined: PipelinedClient,
                                                                      redis_async: aredis.Redis, keys: Keys) -> None:
    history = RedisHistory(pipelined, keys, 3, 300, 65536)
    await history.load()
    user = unique("u")
    for n in range(5):
        await history.record(user, notification(n, extra=f',"id":"p-{n}"'))
    assert await redis_async.llen(keys.history(user)) == 3
    assert await redis_async.zrange(keys.history_ids(user), 0, -1) == [b"p-2", b"p-3", b"p-4"]


async def test_fcall_publish_returns_the_seq_and_refuses_with_invalid_message(pipelined: PipelinedClient,
        redis_async: aredis.Redis, keys: Keys) -> None:
    await RedisHistory(pipelined, keys, 100, 300, 65536).load()
    user = unique("u")
    publish = keys.function("publish")
    assert await redis_async.fcall(publish, 1, user, notification(extra=',"id":"x"')) == 1
    assert await redis_async.fcall(publish, 1, user, notification(extra=',"id":"x"')) == 1  # duplicate
    assert await redis_async.fcall(publish, 1, user, notification()) == 2
    latest = '{"type":"eta_update","payload":{"rideId":"r","etaSeconds":3}}'
    assert await redis_async.fcall(publish, 1, user, latest) == 0
    with pytest.raises(redis.ResponseError, match=r"^INVALID_MESSAGE notification payload is missing body"):
        await redis_async.fcall(publish, 1, user, '{"type":"notification","payload":{"title":"t"}}')


async def test_fcall_record_returns_seq_duplicate_epoch_and_message_id(pipelined: PipelinedClient,
                                                                       redis_async: aredis.Redis, keys: Keys) -> None:
    await RedisHistory(pipelined, keys, 100, 300, 65536).load()
    user = unique("u")
    seq, duplicate, epoch, message_id = await redis_async.fcall(keys.function("record"), 1, user, notification())
    assert (seq, duplicate) == (1, 0) and message_id == epoch + b"-1"


async def test_load_is_skipped_when_redis_already_runs_the_same_library(own_redis: RedisServer) -> None:
    client, commands = aredis.Redis.from_url(own_redis.url), PipelinedClient(own_redis.url)
    try:
        await RedisHistory(commands, Keys("gw"), 100, 300, 65536).load()
        await RedisHistory(commands, Keys("gw"), 100, 300, 65536).load()
        assert (await client.info("commandstats"))["cmdstat_function|load"]["calls"] == 1
        await RedisHistory(commands, Keys("gw"), 50, 300, 65536).load()  # other settings: replaced
        assert (await client.info("commandstats"))["cmdstat_function|load"]["calls"] == 2
    finally:
        await client.aclose()
        await commands.close()


@pytest.fixture
async def own_history(own_redis: RedisServer) -> AsyncIterator[tuple[aredis.Redis, RedisHistory]]:
    """A loaded history on a private Redis, which a test may FUNCTION FLUSH."""
    client, commands = aredis.Redis.from_url(own_redis.url), PipelinedClient(own_redis.url)
    history = RedisHistory(commands, Keys("gw"), 100, 300, 65536)
    await history.load()
    yield client, history
    await client.aclose()
    await commands.close()


async def test_record_still_works_after_function_flush(own_history: tuple[aredis.Redis, RedisHistory]) -> None:
    client, history = own_history
    user = unique("u")
    assert (await history.record(user, notification())).seq == 1
    await client.function_flush()
    assert (await history.record(user, notification())).seq == 2
    assert (await history.position(user)).seq == 2


async def test_since_still_works_after_function_flush(own_history: tuple[aredis.Redis, RedisHistory]) -> None:
    client, history = own_history
    user = unique("u")
    epoch = (await history.record(user, notification())).epoch or ""
    await client.function_flush()
    assert seqs((await history.since(user, epoch, 0)).records) == [1]


# --- the record format (pure) -------------------------------------------------------------------


def test_decode_record_reads_a_record() -> None:
    data = record_bytes(3, "ep", "m-1", 1767000000000, 1767000060000, b'{"type":"notification","payload":{"a":[]}}')
    record = decode_record(data)
    assert record is not None
    assert (record.seq, record.epoch, record.id, record.timestamp, record.expires_at) == (
        3, "ep", "m-1", 1767000000000, 1767000060000)
    assert record.message == {"type": "notification", "payload": {"a": []}}


@pytest.mark.parametrize("data", [
    b'{"type":"notification","payload":{"title":"t","body":"b"},"id":"x","timestamp":1}',
    b'{"type":"notification","recorded":{"seq":1},"message":{}}',
    b'{"recorded":{"seq":"1","epoch":"e","id":"x","timestamp":1},"message":{}}',
    b'{"recorded":{"seq":1,"epoch":"e","id":"x","timestamp":1},"message":[]}',
    b"not json",
])
def test_decode_record_returns_none_for_anything_else(data: bytes) -> None:
    assert decode_record(data) is None


@pytest.mark.parametrize(("ttl_s", "margin_s"), [(300, 10), (60, 1), (5, 0)])
async def test_every_key_of_a_history_lives_at_least_history_ttl_and_at_most_a_tenth_more(
        pipelined: PipelinedClient, redis_async: aredis.Redis, ttl_s: int, margin_s: int) -> None:
    """The expiry is refreshed once per clock window (PROTOCOL.md, "HISTORY_TTL is a lower bound"),
    so right after a record every key expires between HISTORY_TTL and HISTORY_TTL + the window."""
    own = Keys(unique("gwttl"))
    history = RedisHistory(pipelined, own, 100, ttl_s, 65536)
    await history.load()
    user = unique("u")
    names = (own.history(user), own.history_meta(user), own.history_ids(user))
    try:
        for n in range(3):
            await history.record(user, notification(n, extra=f',"id":"p-{n}"'))
            for name in names:
                left_ms = await redis_async.pttl(name)
                assert ttl_s * 1000 - 100 <= left_ms <= (ttl_s + margin_s) * 1000, (name, left_ms)
    finally:
        await redis_async.delete(*names)
        await redis_async.function_delete(own.history_library())
