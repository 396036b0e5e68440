"""One client connection as the rest of the gateway sees it: identity, liveness, send and close.

Kept small (`__slots__`; heartbeats, stale and expiry checks are shared sweeps,
the only per-connection timer is the grace of an expired token) because an
instance holds tens of thousands of them; the socket behind it (the Tornado
handler during the upgrade, then ws_protocol.FrameProtocol) is reached only
through the `Transport` protocol so that the hub and the heartbeats stay free
of Tornado and can be tested without sockets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from .auth import Identity
from .errors import CLOSE_ERRORS, CloseCode, ErrorCode
from .limits import MessageLimiter
from .messages import IdGenerator, dumps, envelope, error_payload

log = logging.getLogger(__name__)


class Transport(Protocol):
    def write_frame(self, data: str | bytes) -> bool:
        """Queue one text frame; False when the socket is already gone."""

    def close_transport(self, code: int, reason: str) -> None: ...

    def buffered_bytes(self) -> int:
        """Bytes queued for the client and not yet written to the socket."""

    def on_drained(self, callback: Callable[[], None]) -> None:
        """Call `callback` once everything queued so far has reached the socket (or it closed)."""

    def drop_queued(self) -> int:
        """Forget what waits for the client now (it is being closed for not reading, so it would never
        read it); returns the bytes given back. Frames written afterwards (the close) still go out."""


class OutboundLimit(Protocol):
    def admits(self, conn: Connection, size: int) -> bool:
        """Whether `size` more bytes fit the client's outbound buffer; if not, the client is closed."""


class Connection:
    __slots__ = ("connection_id", "identity", "transport", "last_seen", "opened_at", "closed", "close_code",
                 "close_reason", "bucket", "remote_ip", "limiter", "expiry_timer", "coalesced", "opening",
                 "outbound", "epoch", "last_seq")

    def __init__(self, connection_id: str, identity: Identity, transport: Transport, remote_ip: str,
                 limiter: MessageLimiter | None = None, outbound: OutboundLimit | None = None) -> None:
        self.connection_id = connection_id
        self.identity = identity
        self.transport = transport
        self.remote_ip = remote_ip
        self.last_seen = time.monotonic()
        self.opened_at = time.time()
        self.closed = False
        self.close_code: int | None = None
        self.close_reason = ""
        self.bucket = -1  # heartbeat bucket; owned by heartbeat.HeartbeatScheduler
        self.limiter = limiter
        self.expiry_timer: asyncio.TimerHandle | None = None  # set while an expired token is in its grace
        self.coalesced: dict[str, bytes] | None = None  # latest-wins frames held while the socket is congested
        # Until `connected` is sent, what is sent waits here: a message for the user can arrive as soon
        # as the user's channel is subscribed, and `connected` is always the first frame a client gets.
        # Recorded messages wait here as (epoch, seq, frame): which of them are new to the client is
        # known only once the history position (and a replay) has been read.
        self.opening: list[str | bytes | tuple[str, int, bytes]] | None = []
        self.outbound = outbound
        # The history position this client has seen (PROTOCOL.md 7): a recorded message reaches it once.
        self.epoch: str | None = None
        self.last_seq = 0

    def touch(self) -> None:
        self.last_seen = time.monotonic()

    def send(self, data: str | bytes) -> bool:
        """Queue a frame within the outbound limit (acks, errors and heartbeats pile up on a client
        that does not read, as fan-out does); never raises, so one dead socket cannot break a loop."""
        outbound = self.outbound
        if outbound is not None and self.opening is None and not self.closed \
                and not outbound.admits(self, len(data)):
            return False
        return self.send_admitted(data)

    def send_admitted(self, data: str | bytes) -> bool:
        """Queue a frame whose size was already checked against the limit (fan-out checks it itself)."""
        if self.closed:
            return False
        if self.opening is not None:
            self.opening.append(data)
            return True
        return self.transport.write_frame(data)

    def take_record(self, epoch: str, seq: int) -> bool:
        """Whether a recorded message is new to this client (a replay, a gap fill and live delivery
        may all bring it); a new epoch means the user's history started again, so its seqs are new."""
        if epoch == self.epoch and seq <= self.last_seq:
            return False
        self.epoch, self.last_seq = epoch, seq
        return True

    def misses(self, epoch: str, seq: int) -> bool:
        """Whether recorded messages before this one never reached the client (PROTOCOL.md 7.4)."""
        if self.epoch is None or self.opening is not None:
            return False  # no position known yet: nothing to compare with
        if epoch == self.epoch:
            return seq > self.last_seq + 1
        return seq > 1  # numbering began again under a new epoch, and this is not its first message

    def hold_record(self, epoch: str, seq: int, frame: bytes) -> None:
        """A recorded message that arrived before `connected`; `release_held` decides if it is new."""
        if self.opening is not None and not self.closed:
            self.opening.append((epoch, seq, frame))

    def write_first(self, data: str | bytes) -> bool:
        """Write ahead of what is held: `connected`, then a replay, go before live messages."""
        if self.closed:
            return False
        return self.transport.write_frame(data)

    def release_held(self, epoch: str | None = None, seq: int = 0) -> None:
        """Send what arrived during the set-up. `connected` told the client it stands at `seq` of
        `epoch` (having had those messages in its replay, or not wanting them: without a resume
        nothing is replayed), so only later recorded messages go out, each once."""
        held, self.opening = self.opening, None
        if epoch is not None:
            self.epoch, self.last_seq = epoch, seq
        for item in held or ():
            if isinstance(item, tuple):
                if self.take_record(item[0], item[1]):
                    self.send(item[2])
            else:
                self.send(item)

    def send_error(self, ids: IdGenerator, code: ErrorCode, message: str, ref: str | None = None) -> None:
        self.send(dumps(envelope("error", error_payload(code, message, ref), ids.next())))

    def close(self, ids: IdGenerator, code: CloseCode, message: str) -> None:
        """Close with `code`; 4xxx codes are preceded by their error frame, as the contract promises."""
        if self.closed:
            return
        self.opening = None  # refused before `connected`: held messages are not for a client being closed
        error = CLOSE_ERRORS.get(code)
        if error is not None:  # the last frame, past any limit: the client is told why
            self.send_admitted(dumps(envelope("error", error_payload(error, message), ids.next())))
        self.mark_closed(code, message)
        self.transport.close_transport(int(code), message[:120])

    def mark_closed(self, code: int | None, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.close_code = code
            self.close_reason = reason

    def __repr__(self) -> str:
        i = self.identity
        return f"<Connection {self.connection_id} user={i.user_id} type={i.user_type} device={i.device_id}>"
