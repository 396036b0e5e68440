"""The instance's outbound budget and the per-client limit, without a gateway process (issue #13).

FlowControl against stand-in sockets whose queued bytes the test sets; then the frame protocol on a
real socket pair, to show that a client closed for not reading gives its queue back at once.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from tests.helpers import Sink
from tornado_gateway.auth import DeviceId, Identity, UserId
from tornado_gateway.connection import Connection
from tornado_gateway.flow import SHED_TO, FlowControl, Shed
from tornado_gateway.ws_protocol import FLUSH_CHUNK, FrameProtocol

KiB = 1024


class StalledSocket:
    """A socket the client stopped reading: everything written stays queued until `drain()`."""

    def __init__(self, queued: int = 0) -> None:
        self.queued = queued
        self.frames: list[bytes] = []
        self.dropped = 0
        self._drained: list[Callable[[], None]] = []

    def write_frame(self, data: str | bytes) -> bool:
        frame = data.encode() if isinstance(data, str) else data
        self.frames.append(frame)
        self.queued += len(frame)
        return True

    def close_transport(self, code: int, reason: str) -> None:
        return None

    def buffered_bytes(self) -> int:
        return self.queued

    def on_drained(self, callback: Callable[[], None]) -> None:
        if self.queued:
            self._drained.append(callback)
        else:
            callback()

    def drop_queued(self) -> int:
        dropped, self.queued = self.queued, 0
        self.dropped += dropped
        return dropped

    def drain(self) -> None:
        self.queued = 0
        callbacks, self._drained = self._drained, []
        for callback in callbacks:
            callback()


def connection(name: str, sock: StalledSocket) -> Connection:
    conn = Connection(name, Identity(UserId(name), "rider", DeviceId("d"), "ios", 0.0), sock, "127.0.0.1")
    conn.opening = None  # past `connected`
    return conn


class Recorder:
    def __init__(self) -> None:
        self.slow: list[tuple[str, bool]] = []
        self.sheds: list[Shed] = []
        self.coalesced = 0

    def flow(self, max_buffer: int, budget: int) -> FlowControl:
        return FlowControl(max_buffer, on_slow=self.closed, on_coalesced=self.count, budget=budget,
                           on_shed=self.sheds.append)

    def closed(self, conn: Connection, by_budget: bool) -> None:
        self.slow.append((conn.connection_id, by_budget))

    def count(self) -> None:
        self.coalesced += 1


def test_the_clients_holding_the_most_are_shed_first_when_the_budget_is_reached() -> None:
    recorder = Recorder()
    flow = recorder.flow(max_buffer=1024 * KiB, budget=300 * KiB)
    sizes = {"a": 50, "b": 100, "c": 5, "d": 90, "e": 40}  # KiB already waiting for each
    conns = {name: connection(name, StalledSocket(kib * KiB)) for name, kib in sizes.items()}
    for conn in conns.values():  # each gets a message, so the instance learns what each holds
        flow.deliver(conn, b"x" * 100, None)
    assert recorder.slow == [], "285 KiB (and 500 bytes) is under the budget"

    flow.deliver(conns["c"], b"y" * 80 * KiB, None)  # 365 KiB: over; c now holds 85 KiB
    assert [name for name, _ in recorder.slow] == ["b", "d"], "largest first, until under 7/8 of the budget"
    assert all(by_budget for _, by_budget in recorder.slow)
    [shed] = recorder.sheds
    assert shed.clients == 2 and shed.freed_bytes >= 190 * KiB
    assert flow.queued_bytes <= SHED_TO * 300 * KiB
    assert conns["b"].transport.buffered_bytes() == 0, "a shed client's queue is dropped at once"


def test_a_recount_spares_clients_whose_sockets_drained_meanwhile() -> None:
    recorder = Recorder()
    flow = recorder.flow(max_buffer=1024 * KiB, budget=300 * KiB)
    big, small = StalledSocket(200 * KiB), StalledSocket(50 * KiB)
    big_conn, small_conn = connection("big", big), connection("small", small)
    flow.deliver(big_conn, b"x", None)
    flow.deliver(small_conn, b"x", None)
    big.queued = 10 * KiB  # the client read most of it, without the socket draining completely
    flow.deliver(small_conn, b"z" * 60 * KiB, None)  # the running count says 310 KiB, the sockets hold 120
    assert recorder.slow == []


def test_the_per_client_limit_closes_only_that_client_and_drops_its_queue() -> None:
    recorder = Recorder()
    flow = recorder.flow(max_buffer=64 * KiB, budget=0)
    sock = StalledSocket(60 * KiB)
    conn = connection("slow", sock)
    flow.deliver(conn, b"x" * 5 * KiB, None)
    assert recorder.slow == [("slow", False)]
    assert sock.dropped == 60 * KiB and sock.queued == 0


def test_latest_value_messages_are_coalesced_before_anything_is_queued() -> None:
    recorder = Recorder()
    flow = recorder.flow(max_buffer=64 * KiB, budget=0)
    sock = StalledSocket(1)  # one byte the kernel refused: congested
    conn = connection("rider", sock)
    for n in range(1000):
        flow.deliver(conn, b'{"lat":%d}' % n, "driver_location:d1")
    flow.deliver(conn, b"status", None)
    assert sock.frames == [b"status"], "positions are held, not queued"
    assert recorder.coalesced == 999 and recorder.slow == []
    sock.drain()
    assert sock.frames == [b"status", b'{"lat":999}'], "the newest position goes out when the socket drains"


def test_a_stall_that_ends_before_the_limit_costs_nothing() -> None:
    recorder = Recorder()
    flow = recorder.flow(max_buffer=64 * KiB, budget=1024 * KiB)
    sock = StalledSocket(4 * KiB)
    conn = connection("rider", sock)
    flow.deliver(conn, b"ride_status-1", None)
    flow.deliver(conn, b"position-1", "driver_location:d1")
    flow.deliver(conn, b"ride_status-2", None)
    flow.deliver(conn, b"position-2", "driver_location:d1")
    assert flow.queued_bytes > 0
    sock.drain()
    assert not conn.closed and recorder.slow == []
    assert sock.frames == [b"ride_status-1", b"ride_status-2", b"position-2"]
    assert flow.queued_bytes == 0 and flow.congested_clients == 0


async def test_a_client_closed_for_not_reading_gives_its_queue_back_at_once() -> None:
    """On a real socket whose peer never reads: the 4503 drops the queue now, not 5 s later when the
    close times out; only the transport's last chunk and the error and close frames stay."""
    server, peer = socket.socketpair()
    for sock in (server, peer):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    frames = FrameProtocol(Sink(), 65536)
    await asyncio.get_running_loop().connect_accepted_socket(lambda: frames, server)
    conn = connection("stuck", StalledSocket())
    conn.transport = frames
    recorder = Recorder()
    flow = recorder.flow(max_buffer=1024 * KiB, budget=0)
    for _ in range(2000):
        flow.deliver(conn, b"n" * 400, None)
    queued = frames.buffered_bytes()
    assert queued > 700 * KiB
    flow.shed(conn)
    assert recorder.slow == [("stuck", False)]
    assert frames.buffered_bytes() <= FLUSH_CHUNK + 400, "all but the chunk already in the transport is gone"
    conn.close(_Ids(), 4503, "not reading")  # type: ignore[arg-type]
    assert frames.buffered_bytes() <= FLUSH_CHUNK + 400 + 200, "the error and close frames are tiny"
    frames.abort()
    peer.close()


class _Ids:
    def next(self) -> str:
        return "id-1"
