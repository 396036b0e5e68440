"""Heartbeats and the sweep for stale connections and expired tokens, spread over the interval in buckets.

Sending 100,000 heartbeats from one callback stalls the event loop for
seconds, and every other message waits behind it. Instead each connection
joins one of N buckets and a PeriodicCallback visits one bucket per tick, so
each tick touches 1/N of the connections and each connection is visited once
per interval. The frame is encoded once per tick, not once per connection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from tornado.ioloop import PeriodicCallback

from .connection import Connection
from .messages import IdGenerator, dumps, envelope, now_ms

log = logging.getLogger(__name__)

MIN_TICK_MS = 20.0
MAX_BUCKETS = 100


def bucket_plan(interval_s: float) -> tuple[int, float]:
    """(number of buckets, tick in milliseconds) so that one full round takes `interval_s`."""
    interval_ms = interval_s * 1000.0
    buckets = max(1, min(MAX_BUCKETS, int(interval_ms // MIN_TICK_MS)))
    return buckets, interval_ms / buckets


def is_stale(last_seen: float, now: float, timeout_s: float) -> bool:
    return now - last_seen > timeout_s


class HeartbeatScheduler:
    """Owns the buckets; `on_stale` closes a connection that has been silent too long."""

    __slots__ = ("_buckets", "_next_bucket", "_fill", "_tick_ms", "_timeout_s", "_ids", "_on_stale", "_timer",
                 "_on_tick", "_on_expired")

    def __init__(
        self,
        interval_s: float,
        timeout_s: float,
        ids: IdGenerator,
        on_stale: Callable[[Connection], None],
        on_expired: Callable[[Connection], None] | None = None,
        on_tick: Callable[[int, float], None] | None = None,
    ) -> None:
        count, self._tick_ms = bucket_plan(interval_s)
        self._buckets: list[set[Connection]] = [set() for _ in range(count)]
        self._next_bucket = 0
        self._fill = 0
        self._timeout_s = timeout_s
        self._ids = ids
        self._on_stale = on_stale
        self._on_expired = on_expired
        self._on_tick = on_tick
        self._timer: PeriodicCallback | None = None

    def add(self, conn: Connection) -> None:
        # Round-robin keeps buckets even, so every tick costs about the same.
        conn.bucket = self._fill
        self._fill = (self._fill + 1) % len(self._buckets)
        self._buckets[conn.bucket].add(conn)

    def remove(self, conn: Connection) -> None:
        if conn.bucket >= 0:
            self._buckets[conn.bucket].discard(conn)
            conn.bucket = -1

    def start(self) -> None:
        self._timer = PeriodicCallback(self.tick, self._tick_ms)
        self._timer.start()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None

    def tick(self) -> None:
        started = time.perf_counter()
        bucket = self._buckets[self._next_bucket]
        self._next_bucket = (self._next_bucket + 1) % len(self._buckets)
        if not bucket:
            return
        now = time.monotonic()
        frame = dumps(envelope("heartbeat", {"timestamp": now_ms()}, self._ids.next())).encode()
        stale = [conn for conn in bucket if is_stale(conn.last_seen, now, self._timeout_s)]
        for conn in stale:
            self._on_stale(conn)
        if self._on_expired is not None:
            wall = time.time()
            for conn in [conn for conn in bucket if conn.identity.expires_at <= wall]:
                self._on_expired(conn)
        for conn in list(bucket):  # a send may close a client over its outbound limit, leaving the bucket
            conn.send(frame)
        if self._on_tick is not None:
            self._on_tick(len(bucket), (time.perf_counter() - started) * 1000.0)
