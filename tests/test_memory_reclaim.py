"""Memory given back in quiet moments (memory.py): cyclic garbage is never frozen alive, cycles that die
among frozen objects are collected when the loop is quiet and the pause is predicted short, and freed heap
memory goes back to the system (issue #13)."""

from __future__ import annotations

import asyncio
import gc
import socket
import weakref
from collections.abc import Iterator

import pytest

from tests.helpers import Sink
from tornado_gateway.memory import TRIM_MIN_BYTES, Allocator, Reclaimer, rss_bytes
from tornado_gateway.ws_protocol import FrameProtocol


class Node:
    """Something that lives in a reference cycle: only the cyclic collector can free it."""

    def __init__(self) -> None:
        self.me = self


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    """These tests freeze the test process's objects: thaw them afterwards, for the tests that follow."""
    yield
    gc.unfreeze()


def cycle() -> weakref.ref[Node]:
    node = Node()
    return weakref.ref(node)  # the only strong reference left is the cycle itself


def test_garbage_from_before_a_freeze_is_collected_not_frozen_alive() -> None:
    reclaimer = Reclaimer(None, cpu=lambda: 0.0)
    dead = cycle()
    reclaimer.collect_young_and_freeze()
    assert dead() is None
    assert reclaimer.stats.young_pause_s > 0


def test_a_cycle_that_dies_among_frozen_objects_is_collected_in_a_quiet_moment() -> None:
    clock = Clock()
    reclaimer = Reclaimer(None, clock=clock, cpu=lambda: 0.0, full_interval_s=60.0, max_pause_s=10.0)
    node = Node()
    alive = weakref.ref(node)
    reclaimer.collect_young_and_freeze()  # alive then: frozen
    del node
    gc.collect()
    assert alive() is not None, "frozen objects are out of the collector's reach"
    reclaimer.tick(queued_bytes=0)
    assert alive() is not None, "not before FULL_GC_INTERVAL_S"
    clock.now += 61
    reclaimer.tick(queued_bytes=0)
    assert alive() is None
    assert reclaimer.stats.full_collections == 1 and reclaimer.stats.full_found >= 1


def test_no_full_collection_while_busy_while_clients_are_congested_or_when_it_would_pause_long() -> None:
    clock, cpu = Clock(), Clock()
    busy = Reclaimer(None, clock=clock, cpu=cpu, full_interval_s=1.0, max_pause_s=10.0)
    clock.now += 5
    cpu.now += 4  # 80% of a core since the last tick
    busy.tick(queued_bytes=0)
    clock.now += 5
    busy.tick(queued_bytes=4096)  # quiet, but slow clients hold bytes: not now
    long_pause = Reclaimer(None, clock=clock, cpu=lambda: 0.0, full_interval_s=1.0, max_pause_s=1e-9)
    clock.now += 5
    long_pause.tick(queued_bytes=0)
    assert busy.stats.full_collections == 0 and long_pause.stats.full_collections == 0


def test_freed_heap_memory_is_given_back_to_the_system() -> None:
    allocator = Allocator.load()
    if allocator is None:
        pytest.skip("not glibc: nothing to trim")
    reclaimer = Reclaimer(allocator, cpu=lambda: 0.0)
    blocks, keep, size = [], [], 1000  # a variable size: `b"x" * 1000` would be one constant, shared
    for n in range(60_000):  # 60 MB of 1 KB frames, with a survivor now and then so the heap's top stays in use
        blocks.append(b"x" * size)
        if n % 50 == 0:
            keep.append(b"k" * size)
    before = rss_bytes()
    del blocks
    assert rss_bytes() > before - TRIM_MIN_BYTES, "freed, but still the process's"
    reclaimer.trim_if_freed()
    assert reclaimer.stats.trims == 1
    assert reclaimer.stats.trimmed_bytes > 30_000_000
    reclaimer.trim_if_freed()
    assert reclaimer.stats.trims == 1, "once: nothing more was freed since"
    assert len(keep) == 1200


async def test_a_closed_connections_transport_is_freed_without_the_cyclic_collector() -> None:
    """On asyncio's own loop (EVENT_LOOP=asyncio, or no uvloop installed) a transport is a reference cycle;
    a connection that outlived a freeze would leave it behind for good. Once the socket is gone, reference
    counting alone must free it."""
    loop = asyncio.get_running_loop()
    server, peer = socket.socketpair()
    frames = FrameProtocol(Sink(), 65536)
    transport, _ = await loop.connect_accepted_socket(lambda: frames, server)
    freed = weakref.ref(transport)
    del transport
    gc.disable()
    try:
        frames.abort()
        peer.close()
        await asyncio.sleep(0.05)  # connection_lost runs from the loop
        assert freed() is None
    finally:
        gc.enable()
