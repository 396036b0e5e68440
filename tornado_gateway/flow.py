"""Outbound flow control: what happens when a client reads slower than messages arrive for it.

The transport queues whatever we write in its buffer, so a client that
stops reading would grow the instance's memory without bound. Past
MAX_OUTBOUND_BUFFER bytes the client is closed (4503, documented). Before that,
once the buffer is congested, latest-value-wins messages (`driver_location`
per driver, `eta_update` per ride) are held in one slot per key and only the
newest is written when the socket drains: a slow phone then gets the current
position instead of a backlog of stale ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from .connection import Connection

#: type -> payload field whose value identifies the stream that a newer message supersedes.
LATEST_WINS: Final[dict[str, str]] = {"driver_location": "driverId", "eta_update": "rideId"}
CONGESTED_BYTES: Final = 64 * 1024


def coalesce_key(kind: str, payload: dict[str, Any]) -> str | None:
    field = LATEST_WINS.get(kind)
    if field is None:
        return None
    return f"{kind}:{payload.get(field)}"


class FlowControl:
    __slots__ = ("_congested_bytes", "_max_buffer", "_on_coalesced", "_on_slow")

    def __init__(self, max_buffer: int, on_slow: Callable[[Connection], None],
                 on_coalesced: Callable[[], None], congested_bytes: int = CONGESTED_BYTES) -> None:
        self._max_buffer = max_buffer
        self._congested_bytes = min(congested_bytes, max_buffer) if max_buffer else congested_bytes
        self._on_slow = on_slow
        self._on_coalesced = on_coalesced

    def deliver(self, conn: Connection, frame: bytes, key: str | None) -> None:
        if conn.closed:
            return
        buffered = conn.transport.buffered_bytes()
        if buffered == 0 and conn.coalesced is None:
            conn.send_admitted(frame)  # the common case: the socket keeps up
            return
        if self._over_limit(conn, buffered, len(frame)):
            return
        if key is not None and (conn.coalesced is not None or buffered >= self._congested_bytes):
            self._hold(conn, key, frame)
            return
        conn.send_admitted(frame)

    def admits(self, conn: Connection, size: int) -> bool:
        """The same limit for every other frame: acks, errors, heartbeats."""
        return not self._over_limit(conn, conn.transport.buffered_bytes(), size)

    def _over_limit(self, conn: Connection, buffered: int, size: int) -> bool:
        """Past MAX_OUTBOUND_BUFFER the client is closed as too slow (4503)."""
        if self._max_buffer and buffered + size > self._max_buffer:
            self._on_slow(conn)
            return True
        return False

    def _hold(self, conn: Connection, key: str, frame: bytes) -> None:
        held = conn.coalesced
        if held is None:
            conn.coalesced = {key: frame}
            conn.transport.on_drained(lambda: self._flush(conn))  # may call back at once
            return
        if key in held:
            self._on_coalesced()  # an older value is superseded, never sent
        held[key] = frame

    def _flush(self, conn: Connection) -> None:
        held, conn.coalesced = conn.coalesced, None
        if held and not conn.closed:
            for frame in held.values():
                conn.send(frame)
