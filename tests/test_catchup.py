"""Gap fill (PROTOCOL.md 7.4) against the real history in Redis: what a connected device missed is
read back and handed on in order, ahead of the record that showed the gap and of those arriving
while the history is read; a device's own position decides what is news to it."""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers import unique
from tornado_gateway.catchup import CatchUp, Cursor
from tornado_gateway.history import History, decode_record
from tornado_gateway.history_redis import RedisHistory
from tornado_gateway.metrics import Metrics
from tornado_gateway.redis_keys import Keys
from tornado_gateway.resp import PipelinedClient


@pytest.fixture
async def history(pipelined: PipelinedClient, prefix: str) -> History:
    redis_history = RedisHistory(pipelined, Keys(prefix), size=5, ttl_s=60, max_message_size=65536)
    await redis_history.load()
    return redis_history


class Device:
    """Where one connected device stands, and the seqs handed to it."""

    def __init__(self, cursor: Cursor | None) -> None:
        self.cursor = cursor
        self.got: list[int] = []
        self.delivered = asyncio.Event()

    def deliver(self, _user_id: str, data: bytes) -> None:
        record = decode_record(data)
        assert record is not None
        self.got.append(record.seq)
        self.delivered.set()


def catch_up_for(history: History, device: Device, metrics: Metrics | None = None) -> CatchUp:
    return CatchUp(history, lambda _user: [device.cursor] if device.cursor else [], device.deliver,
                   metrics or Metrics(None, 0, ""), give_up_after_s=5)


async def record(history: History, user: str, n: int) -> bytes:
    """Records one ride request and returns the record as it went out on the user's channel."""
    result = await history.record(user, f'{{"type":"ride_request","payload":{{"requestId":"r{n}"}}}}')
    replay = await history.since(user, result.epoch or "", result.seq - 1)
    return replay.records[-1]


async def settled(catchup: CatchUp) -> None:
    await asyncio.sleep(0.05)
    await catchup.stop()


async def test_the_missed_records_come_before_the_one_that_showed_the_gap(history: History) -> None:
    user = unique()
    first = await record(history, user, 1)
    epoch = decode_record(first).epoch  # type: ignore[union-attr]
    device = Device((epoch, 1))
    for n in (2, 3):
        await record(history, user, n)
    showed_gap = await record(history, user, 4)
    catchup = catch_up_for(history, device)
    catchup.fill(user, showed_gap)
    await asyncio.wait_for(device.delivered.wait(), 2)
    await settled(catchup)
    assert device.got == [2, 3, 4, 4]  # the record that showed the gap comes again; take_record drops it


async def test_records_arriving_during_the_fill_wait_behind_it(history: History) -> None:
    user = unique()
    epoch = decode_record(await record(history, user, 1)).epoch  # type: ignore[union-attr]
    live = await record(history, user, 2)
    device = Device((epoch, 0))
    catchup = catch_up_for(history, device)
    catchup.fill(user)
    assert catchup.holding(user, live)  # seq 2 arriving live while the fill reads
    await asyncio.wait_for(device.delivered.wait(), 2)
    await settled(catchup)
    assert device.got == [1, 2, 2]  # read back first, then the live copy (which take_record drops)
    assert not catchup.holding(user, live)  # the fill is over: live records go straight through


async def test_after_the_history_was_lost_the_new_epoch_is_read_from_its_first_record(history: History) -> None:
    user = unique()
    await record(history, user, 1)
    device = Device(("an-epoch-redis-forgot", 7))
    catchup = catch_up_for(history, device)
    catchup.fill(user)
    await asyncio.wait_for(device.delivered.wait(), 2)
    await settled(catchup)
    assert device.got == [1]


async def test_a_gap_longer_than_the_history_is_counted_and_the_records_still_go_on(history: History) -> None:
    user = unique()
    epoch = decode_record(await record(history, user, 1)).epoch  # type: ignore[union-attr]
    device = Device((epoch, 1))
    for n in range(2, 9):  # HISTORY_SIZE is 5: seq 2 and 3 are gone
        showed_gap = await record(history, user, n)
    metrics = Metrics(None, 0, "")
    catchup = catch_up_for(history, device, metrics)
    catchup.fill(user, showed_gap)
    await asyncio.wait_for(device.delivered.wait(), 2)
    await settled(catchup)
    assert device.got == [8]
    assert metrics._counters["messages.gaps_unfilled"] == 1
