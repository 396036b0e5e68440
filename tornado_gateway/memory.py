"""Giving memory back in quiet moments: the allocator's free pages after a stall, and cyclic garbage.

Two things kept an instance's memory up for good (issue #13, measured in docs/BENCHMARKS.md):

- **Freed heap pages.** 200 stalled clients held 126 MB of 1 KB frames; once they were gone the
  instance stayed 126 MB up, and one `malloc_trim(0)` gave it all back in ~20 ms. glibc returns
  memory to the system only from the top of its heap; what was freed below a live allocation stays
  in the process until trimmed. So after a large amount was freed (`mallinfo2`'s free bytes grew by
  TRIM_MIN_BYTES since the last look), the reclaimer trims once.
- **Cyclic garbage frozen alive.** The gateway moves every live object out of the collector's
  reach (`gc.freeze`) on each housekeeping tick, because a full collection over 10,000 connections'
  objects stalls the loop for ~260 ms (measured, 200,000 objects). But a freeze also froze whatever
  cyclic garbage had not been collected yet, and a cycle among frozen objects that dies later is
  never seen again: both stayed until a restart (with the asyncio loop, 600 transports per 4,000
  connections churned). Now each tick collects the young generations first (the objects allocated
  since the last freeze: 0.1-1.2 ms at 10,000 steady connections; right after a connect storm the
  last 5 s of new connections, 34 ms for 2,000 and 125 ms for 10,000, while the storm's own automatic
  collections paused the loop up to 190-220 ms with or without this) and freezes only the survivors; and in a
  quiet moment (the process used under QUIET_CPU of a core since the last tick, nothing queued for
  slow clients), at most every FULL_GC_INTERVAL_S, when the full collection is predicted to pause
  the loop for at most FULL_GC_MAX_PAUSE_S (from the pause per object the last one measured),
  everything is unfrozen, collected and frozen again. Large instances rarely qualify: their cycles
  are broken by hand instead (the handler and its connection, the frame protocol and its transport).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import gc
import logging
import os
import time
from collections.abc import Callable
from typing import Final

log = logging.getLogger(__name__)

#: Trim once the allocator holds this much more free memory than at the last look.
TRIM_MIN_BYTES: Final = 4 * 1024 * 1024
#: A tick is quiet when the process used less than this share of one core since the last one.
QUIET_CPU: Final = 0.25
FULL_GC_INTERVAL_S: Final = 600.0
FULL_GC_MAX_PAUSE_S: Final = 0.05
#: Until a full collection measured it: seconds per tracked object (1.3 us measured on the 2-core box).
INITIAL_GC_COST_S: Final = 2e-6
PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class MallInfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (2.33+): every field a size_t."""

    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


class Allocator:
    """glibc's malloc, through ctypes; `None` from `load` elsewhere (musl, macOS): nothing to trim."""

    __slots__ = ("_trim", "_info")

    def __init__(self, trim: Callable[[int], int], info: Callable[[], MallInfo2]) -> None:
        self._trim = trim
        self._info = info

    @classmethod
    def load(cls) -> Allocator | None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            trim, info = libc.malloc_trim, libc.mallinfo2
        except (OSError, AttributeError):
            return None
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
        info.argtypes, info.restype = [], MallInfo2
        return cls(trim, info)

    def free_bytes(self) -> int:
        """Bytes malloc holds as free chunks (what a trim could give back, and more)."""
        return int(self._info().fordblks)

    def trim(self) -> None:
        self._trim(0)


def rss_bytes() -> int:
    """This process's resident memory, from /proc (0 where there is none)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0


@dataclasses.dataclass(slots=True)
class ReclaimStats:
    """What the reclaimer did, for logs and tests."""

    young_pause_s: float = 0.0  # the last tick's collection of the unfrozen generations
    max_young_pause_s: float = 0.0
    full_collections: int = 0
    full_pause_s: float = 0.0  # the last full collection
    full_found: int = 0  # unreachable objects the last full collection freed
    trims: int = 0
    trimmed_bytes: int = 0  # RSS given back by the last trim


class Reclaimer:
    """Called once per housekeeping tick (`tick`); every step measures its own pause."""

    __slots__ = ("_allocator", "_clock", "_cpu", "_last_wall", "_last_cpu", "_free_seen", "_last_full",
                 "_cost_per_object", "stats", "_full_interval_s", "_max_pause_s")

    def __init__(self, allocator: Allocator | None, *, clock: Callable[[], float] = time.monotonic,
                 cpu: Callable[[], float] = time.process_time, full_interval_s: float = FULL_GC_INTERVAL_S,
                 max_pause_s: float = FULL_GC_MAX_PAUSE_S) -> None:
        self._allocator = allocator
        self._clock = clock
        self._cpu = cpu
        self._last_wall = clock()
        self._last_cpu = cpu()
        self._free_seen = allocator.free_bytes() if allocator is not None else 0
        self._last_full = self._last_wall
        self._cost_per_object = INITIAL_GC_COST_S
        self._full_interval_s = full_interval_s
        self._max_pause_s = max_pause_s
        self.stats = ReclaimStats()

    def tick(self, queued_bytes: int) -> None:
        """`queued_bytes`: what the instance holds for slow clients now (flow.FlowControl)."""
        quiet = self._quiet() and queued_bytes == 0
        self.collect_young_and_freeze()
        if quiet and self._full_due():
            self.collect_everything()
        self.trim_if_freed()

    def _quiet(self) -> bool:
        wall, cpu = self._clock(), self._cpu()
        elapsed = wall - self._last_wall
        busy = (cpu - self._last_cpu) / elapsed if elapsed > 0 else 1.0
        self._last_wall, self._last_cpu = wall, cpu
        return busy < QUIET_CPU

    def collect_young_and_freeze(self) -> None:
        """Collect what was allocated since the last freeze, then freeze the survivors: garbage is never
        frozen, and collections stay small between ticks."""
        started = time.perf_counter()
        gc.collect()  # frozen objects are not visited: only the young ones cost anything
        gc.freeze()
        pause = time.perf_counter() - started
        self.stats.young_pause_s = pause
        self.stats.max_young_pause_s = max(self.stats.max_young_pause_s, pause)
        if pause > self._max_pause_s:
            log.info("collecting the objects of the last housekeeping interval paused the loop %.0f ms", pause * 1e3)

    def _full_due(self) -> bool:
        if self._clock() - self._last_full < self._full_interval_s:
            return False
        return gc.get_freeze_count() * self._cost_per_object <= self._max_pause_s

    def collect_everything(self) -> None:
        """Unfreeze, collect every generation, freeze again: cycles that died among frozen objects."""
        objects = gc.get_freeze_count()
        started = time.perf_counter()
        gc.unfreeze()
        found = gc.collect()
        gc.freeze()
        pause = time.perf_counter() - started
        self._last_full = self._clock()
        if objects:
            self._cost_per_object = pause / objects
        stats = self.stats
        stats.full_collections += 1
        stats.full_pause_s, stats.full_found = pause, found
        log.log(logging.INFO if found else logging.DEBUG,
                "full garbage collection in a quiet moment: %d objects, %d unreachable, %.1f ms",
                objects, found, pause * 1e3)

    def trim_if_freed(self) -> None:
        """One malloc_trim once the allocator sits on TRIM_MIN_BYTES more free memory than before."""
        allocator = self._allocator
        if allocator is None:
            return
        free = allocator.free_bytes()
        if free - self._free_seen < TRIM_MIN_BYTES:
            self._free_seen = min(self._free_seen, free)  # reused meanwhile: measure growth from here
            return
        before = rss_bytes()
        started = time.perf_counter()
        allocator.trim()
        pause = time.perf_counter() - started
        self._free_seen = allocator.free_bytes()
        given_back = max(0, before - rss_bytes())
        self.stats.trims += 1
        self.stats.trimmed_bytes = given_back
        log.info("gave %.1f MB of freed memory back to the system (malloc_trim, %.1f ms)", given_back / 1e6,
                 pause * 1e3)
