"""Races between live delivery, replay, gap fill and the catch-up after a subscriber reconnect
(PROTOCOL.md 7.2, 7.4), made deterministic: one gateway in-process on the embedded history, a bus
whose subscription can be switched off (a Redis blip: what is published meanwhile is lost), and
history reads that can be held back. The end-to-end versions run on Redis in test_no_gaps.py and
test_delivery_faults.py; these pin the orderings those cannot force."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from tornado_gateway.auth import DeviceId, Identity, Resume, UserId
from tornado_gateway.bus import BusUnavailable, MemoryBus
from tornado_gateway.config import Settings
from tornado_gateway.connection import Connection
from tornado_gateway.gateway import Gateway
from tornado_gateway.history import MemoryHistory, Position, Replay
from tornado_gateway.metrics import Metrics
from tornado_gateway.presence import MemoryPresence

USER = "u1"


class Socket:
    """What a client was sent; a congested one holds back the replay until `drain()`."""

    def __init__(self, *, congested: bool = False) -> None:
        self.frames: list[dict[str, Any]] = []
        self.congested = congested
        self._drained: list[Callable[[], None]] = []

    def write_frame(self, data: str | bytes) -> bool:
        self.frames.append(json.loads(data))
        return True

    def close_transport(self, code: int, reason: str) -> None:
        return None

    def buffered_bytes(self) -> int:
        return 10**7 if self.congested else 0

    def on_drained(self, callback: Callable[[], None]) -> None:
        if self.congested:
            self._drained.append(callback)
        else:
            callback()

    def drain(self) -> None:
        self.congested = False
        for callback in self._drained:
            callback()

    def seqs(self) -> list[int]:
        return [frame["seq"] for frame in self.frames if frame["type"] == "ride_request"]

    def connected(self) -> dict[str, Any]:
        return next(frame["payload"] for frame in self.frames if frame["type"] == "connected")


class BlinkingBus(MemoryBus):
    """The embedded bus with a subscription that can go away: published meanwhile = never received."""

    def __init__(self) -> None:
        super().__init__()
        self.live = True

    def deliver(self, user_id: str, data: bytes) -> None:
        if self.live:
            super().deliver(user_id, data)


class HeldHistory(MemoryHistory):
    """The embedded history, whose reads can be made to wait (a slow Redis)."""

    def __init__(self, publish: Callable[[str, bytes], None]) -> None:
        super().__init__(100, 300, publish)
        self.reads: asyncio.Event | None = None
        self.down = False  # reads fail as with Redis unreachable

    async def position(self, user_id: str) -> Position:
        await self._read()
        return await super().position(user_id)

    async def since(self, user_id: str, epoch: str, since: int) -> Replay:
        await self._read()
        return await super().since(user_id, epoch, since)

    async def _read(self) -> None:
        if self.down:
            raise BusUnavailable("Redis unreachable")
        if self.reads is not None:
            await self.reads.wait()


class Setup:
    def __init__(self) -> None:
        self.bus = BlinkingBus()
        self.history = HeldHistory(self.bus.deliver)
        self.gateway = Gateway(Settings(server_id="t1"), MemoryPresence("t1"), self.bus, Metrics(None, 0, ""),
                               self.history)

    async def __aenter__(self) -> Setup:
        await self.bus.start(self.gateway)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self.gateway.catchup is not None
        await self.gateway.catchup.stop()

    def open(self, device: str, socket: Socket, resume: Resume | None = None) -> tuple[Connection, asyncio.Task[None]]:
        conn = self.gateway.admit(Identity(UserId(USER), "driver", DeviceId(device), "ios", 1e12), socket, "::1")
        return conn, asyncio.ensure_future(self.gateway.establish(conn, resume))

    async def connect(self, device: str) -> Socket:
        socket = Socket()
        await self.open(device, socket)[1]
        return socket

    async def record(self, *numbers: int) -> None:
        for n in numbers:
            await self.history.record(USER, json.dumps({"type": "ride_request", "payload": {"requestId": f"r{n}"}}))
        await settle()

    def blink(self) -> None:
        self.bus.live = False

    def reconnect(self) -> None:
        self.bus.live = True
        self.gateway.on_bus_reconnected()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)


async def test_a_device_that_opens_while_a_gap_fill_runs_gets_nothing_older_than_its_connected_seq() -> None:
    async with Setup() as s:
        phone = await s.connect("phone")
        await s.record(1, 2)
        s.blink()
        await s.record(3, 4, 5, 6)
        s.bus.live = True
        s.history.reads = asyncio.Event()  # the fill's read of 3..7 is slow
        await s.record(7)  # shows the gap
        tablet = Socket()
        _, opening = s.open("tablet", tablet)
        await settle()
        s.history.reads.set()
        await opening
        await settle()
        assert phone.seqs() == [1, 2, 3, 4, 5, 6, 7]
        assert tablet.connected()["seq"] == 7 and tablet.seqs() == []


async def test_devices_in_different_epochs_both_get_the_new_epochs_messages_after_a_reconnect() -> None:
    async with Setup() as s:
        phone = await s.connect("phone")
        await s.record(1, 2, 3, 4, 5)
        s.blink()
        s.history._users.clear()  # Redis restarted empty: the next record starts a new epoch
        await s.record(101, 102, 103)
        tablet = await s.connect("tablet")  # connects meanwhile, at seq 3 of the new epoch
        s.reconnect()
        await settle()
        await s.record(104)
        assert phone.seqs() == [1, 2, 3, 4, 5, 1, 2, 3, 4]
        assert tablet.seqs() == [4]


async def test_a_device_still_replaying_when_the_subscriber_reconnects_gets_what_was_recorded_meanwhile() -> None:
    async with Setup() as s:
        first = await s.connect("phone")
        await s.record(1, 2, 3, 4, 5)
        epoch = first.connected()["epoch"]
        s.blink()
        slow = Socket(congested=True)
        _, opening = s.open("phone", slow, Resume(since=2, epoch=epoch))  # replaying 3..5 to a slow reader
        await settle()
        await s.record(6)  # not received: the subscription is down
        s.reconnect()
        await settle()
        slow.drain()
        await opening
        await settle()
        assert slow.seqs() == [3, 4, 5, 6]


async def test_a_second_reconnect_during_a_catch_up_loses_nothing() -> None:
    async with Setup() as s:
        phone = await s.connect("phone")
        await s.record(1, 2)
        s.blink()
        await s.record(3, 4)
        s.history.reads = asyncio.Event()  # the catch-up's read is slow
        s.reconnect()
        await settle()
        await s.record(5)  # live, waits behind the catch-up
        s.reconnect()  # the subscription flaps: a new catch-up pass
        await settle()
        s.history.reads.set()
        await settle()
        await s.record(6)
        assert phone.seqs() == [1, 2, 3, 4, 5, 6]


async def test_a_device_in_a_stale_epoch_does_not_keep_a_gap_open_for_the_others() -> None:
    async with Setup() as s:
        phone = await s.connect("phone")
        await s.record(*range(1, 151))  # more than HISTORY_SIZE: the epoch's start is no longer kept
        s.history.down = True
        tablet = Socket()
        await s.open("tablet", tablet, Resume(since=7, epoch="an-old-epoch"))[1]  # no position read
        s.history.down = False
        s.blink()
        await s.record(151, 152)
        s.bus.live = True
        await s.record(153)
        assert phone.seqs()[-3:] == [151, 152, 153]


async def test_a_resume_whose_position_could_not_be_read_is_not_replayed_later() -> None:
    async with Setup() as s:
        first = await s.connect("phone")
        await s.record(1, 2, 3)
        epoch = first.connected()["epoch"]
        s.history.down = True
        tablet = Socket()
        await s.open("tablet", tablet, Resume(since=1, epoch=epoch))[1]
        assert tablet.connected()["recovered"] is False
        s.history.down = False
        s.blink()
        await s.record(4)
        s.bus.live = True
        await s.record(5)  # shows the gap: 4 is read back
        assert first.seqs() == [1, 2, 3, 4, 5]
        assert tablet.seqs() == [4, 5]  # both came after its `connected`; 2 and 3 (after its since) did not
