"""Outbound flow control: what happens when clients read slower than messages arrive for them.

Whatever a socket does not take at once waits in the gateway (ws_protocol.FrameProtocol keeps it in
one buffer per client), so clients that stop reading would grow the instance's memory without bound.
Three rules bound it:

- **Latest-value messages are coalesced before anything is queued.** As soon as a client's socket
  has anything waiting, `driver_location` (per driver) and `eta_update` (per ride) are held in one
  slot per key and only the newest is written when the socket drains: a slow phone gets the current
  position instead of a backlog of stale ones, and a stall that ends costs no queue for them.
- **Per client**, past MAX_OUTBOUND_BUFFER bytes waiting (socket buffer plus held slots) the client
  is closed with 4503.
- **Per instance**, past OUTBOUND_BUDGET bytes waiting over all clients, the clients holding the most
  are closed with 4503 first, until the instance is back under SHED_TO of the budget. A whole cell
  tower stalling then costs at most the budget, not clients x MAX_OUTBOUND_BUFFER.

A closed slow client's queue is dropped at once (it cannot read it anyway); only its error and close
frames go out, behind at most what the transport already held.

The budget is kept as a running count of what the slow path saw queued per congested client (the
fast path, a socket with nothing waiting, does no bookkeeping at all). Sockets drain without telling
us until they are empty, so the count is an upper bound; before anyone is shed it is recounted from
the sockets themselves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Final

from .connection import Connection

#: type -> payload field whose value identifies the stream that a newer message supersedes.
LATEST_WINS: Final[dict[str, str]] = {"driver_location": "driverId", "eta_update": "rideId"}
#: Shedding goes on until the instance's queued bytes are back under this share of the budget, so
#: that the next message does not shed one more client, and the one after that another.
SHED_TO: Final = 7 / 8
#: A running count this far past the budget triggers an exact recount even while the last recount
#: found the instance just under it: bounds the overshoot without a recount per message.
RECOUNT_STEP: Final = 1 / 32
#: OUTBOUND_BUDGET=0: this much per connection the instance can hold (MAX_CONNECTIONS, by default the
#: open-file limit minus 512). An idle connection costs ~3.2 KB, so queues can at most about double
#: the memory of a full instance: 76 MiB for 19,488 connections.
BUDGET_PER_CONNECTION: Final = 4096


def coalesce_key(kind: str, payload: dict[str, Any]) -> str | None:
    field = LATEST_WINS.get(kind)
    if field is None:
        return None
    return f"{kind}:{payload.get(field)}"


def default_budget(max_connections: int) -> int:
    return max_connections * BUDGET_PER_CONNECTION


def held_bytes(conn: Connection) -> int:
    held = conn.coalesced
    return sum(map(len, held.values())) if held else 0


@dataclasses.dataclass(frozen=True, slots=True)
class Shed:
    """One time the instance's budget was reached: who was closed, and what that gave back."""

    clients: int
    freed_bytes: int
    queued_before: int
    budget: int


class FlowControl:
    __slots__ = ("_max_buffer", "_budget", "_queued", "_used", "_recount_at", "high_water", "_on_slow",
                 "_on_coalesced", "_on_shed")

    def __init__(self, max_buffer: int, on_slow: Callable[[Connection, bool], None], on_coalesced: Callable[[], None],
                 *, budget: int = 0, on_shed: Callable[[Shed], None] | None = None) -> None:
        self._max_buffer = max_buffer
        self._budget = budget
        # Congested clients only (something waiting at their last slow-path visit): client -> bytes.
        self._queued: dict[Connection, int] = {}
        self._used = 0
        self._recount_at = budget
        self.high_water = 0  # the most the running count reached; the memory reclaimer resets it
        self._on_slow = on_slow
        self._on_coalesced = on_coalesced
        self._on_shed = on_shed

    @property
    def queued_bytes(self) -> int:
        """What the instance holds for congested clients (an upper bound, see the module's docstring)."""
        return self._used

    @property
    def congested_clients(self) -> int:
        return len(self._queued)

    def deliver(self, conn: Connection, frame: bytes, key: str | None) -> None:
        if conn.closed:
            return
        buffered = conn.transport.buffered_bytes()
        if buffered == 0 and conn.coalesced is None:
            conn.send_admitted(frame)  # the common case: the socket keeps up
            return
        self._queue(conn, frame, key, buffered)

    def admits(self, conn: Connection, size: int) -> bool:
        """The same limits for every other frame: acks, errors, heartbeats."""
        buffered = conn.transport.buffered_bytes()
        if buffered == 0 and conn.coalesced is None:
            return True
        queued = self._within_limit(conn, buffered, size)
        if queued is None:
            return False
        self._track(conn, queued + size)
        return True

    def _within_limit(self, conn: Connection, buffered: int, size: int) -> int | None:
        """What waits for `conn` (socket plus held slots), or None when `size` more would pass
        MAX_OUTBOUND_BUFFER: then the client has been shed."""
        queued = buffered + held_bytes(conn)
        if self._max_buffer and queued + size > self._max_buffer:
            self.shed(conn)
            return None
        return queued

    def shed(self, conn: Connection) -> None:
        """Close a client as too slow (4503), dropping what waits for it first."""
        self._forget(conn)
        self._on_slow(conn, False)

    def _queue(self, conn: Connection, frame: bytes, key: str | None, buffered: int) -> None:
        """The socket is not keeping up: a latest-value message replaces its predecessor, anything
        else waits in order, within the client's limit; then the instance's budget is checked."""
        queued = self._within_limit(conn, buffered, len(frame))
        if queued is None:
            return
        if key is not None:
            queued += self._hold(conn, key, frame)
        else:
            conn.send_admitted(frame)
            queued += len(frame)
        self._track(conn, queued)

    def _hold(self, conn: Connection, key: str, frame: bytes) -> int:
        """Keep `frame` as the newest of its stream until the socket drains; returns the growth."""
        held = conn.coalesced
        if held is None:
            conn.coalesced = {key: frame}
            conn.transport.on_drained(lambda: self._flush(conn))  # may call back at once
            return len(frame)
        previous = held.get(key)
        held[key] = frame
        if previous is None:
            return len(frame)
        self._on_coalesced()  # an older value is superseded, never sent
        return len(frame) - len(previous)

    def _flush(self, conn: Connection) -> None:
        held, conn.coalesced = conn.coalesced, None
        if held and not conn.closed:
            for frame in held.values():
                conn.send(frame)

    # --- the instance's budget ---------------------------------------------------------------

    def _track(self, conn: Connection, queued: int) -> None:
        tracked = self._queued
        previous = tracked.get(conn)
        tracked[conn] = queued
        self._used += queued - (previous or 0)
        if previous is None:  # registered after the entry exists: a socket drained already calls back at once
            conn.transport.on_drained(lambda: self._untrack(conn))
        if self._used > self.high_water:
            self.high_water = self._used
        if self._budget and self._used > self._recount_at:
            self._enforce()

    def _untrack(self, conn: Connection) -> None:
        queued = self._queued.pop(conn, None)
        if queued is not None:
            self._used -= queued

    def _forget(self, conn: Connection) -> int:
        """Drop everything waiting for `conn` now; returns how many bytes that was."""
        self._untrack(conn)
        freed = held_bytes(conn)
        conn.coalesced = None
        return freed + conn.transport.drop_queued()

    def _recount(self) -> None:
        """Replace the running count by what the sockets and slots hold right now."""
        exact = {conn: conn.transport.buffered_bytes() + held_bytes(conn) for conn in self._queued}
        self._queued = exact
        self._used = sum(exact.values())

    def _enforce(self) -> None:
        """Over the budget by the running count: recount, then shed the clients holding the most until
        the instance is back under SHED_TO of the budget."""
        self._recount()
        before = self._used
        if before > self._budget:
            target = int(self._budget * SHED_TO)
            victims: list[Connection] = []
            remaining = before
            for conn in sorted(self._queued, key=self._queued.__getitem__, reverse=True):
                if remaining <= target:
                    break
                remaining -= self._queued[conn]
                victims.append(conn)
            freed = 0
            for conn in victims:
                freed += self._forget(conn)
                self._on_slow(conn, True)
            if self._on_shed is not None:
                self._on_shed(Shed(len(victims), freed, before, self._budget))
        self._recount_at = max(self._budget, self._used + int(self._budget * RECOUNT_STEP))
