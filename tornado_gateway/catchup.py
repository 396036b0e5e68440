"""Gap fill and catch-up (PROTOCOL.md 7.4): what a connected device missed is read back from the
history, in order, before anything newer reaches it.

A device stays connected through a subscriber reconnect (Redis blinked, or the self-probe replaced
a silent connection), and through Redis restarting empty. Whatever was recorded meanwhile shows
up either as a seq gap on the next live record, or, when nothing more is recorded, not at all
until the gateway asks: so both the gap and the reconnect call `fill(user)`. While a user's fill
reads the history, live records for that user wait behind it, and each device then takes every
record once (`Connection.take_record`), so a record that came both ways is not sent twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Final

from . import metrics as m
from .backoff import Backoff
from .bus import BusUnavailable
from .history import History
from .metrics import Metrics

log = logging.getLogger(__name__)

#: Users read back at once after a reconnect: bounded, so 100K users cost 100K/256 round trips
#: in sequence rather than 100K coroutines and one burst of 100K calls on Redis.
CATCH_UP_BATCH: Final = 256

Cursor = tuple[str, int]  # (epoch, last seq the furthest-behind device in that epoch has)


class CatchUp:
    """Owns the fills in progress; `cursors(user)` says where a user's devices stand, one position
    per epoch they are in (empty: no connected device with a history position), and
    `deliver(user, record)` hands a record to them."""

    def __init__(self, history: History, cursors: Callable[[str], list[Cursor]],
                 deliver: Callable[[str, bytes], None], metrics: Metrics, *, give_up_after_s: float) -> None:
        self._history = history
        self._cursors = cursors
        self._deliver = deliver
        self._metrics = metrics
        self._give_up_after_s = give_up_after_s  # past HISTORY_TTL there is nothing left to read
        self._held: dict[str, list[bytes]] = {}  # users being filled: live records waiting behind the fill
        self._again: set[str] = set()  # users whose fill must run once more (it may have read too early)
        self._tasks: set[asyncio.Task[None]] = set()

    def holding(self, user_id: str, data: bytes) -> bool:
        """Keep a live record back while the user's fill runs; False when none does."""
        held = self._held.get(user_id)
        if held is None:
            return False
        held.append(data)
        return True

    def fill(self, user_id: str, first: bytes | None = None) -> asyncio.Task[None] | None:
        """Read back what the user's devices missed; `first` (the record that showed the gap)
        waits behind it. None when a fill for the user is already running (it covers this one)."""
        held = self._held.get(user_id)
        if held is not None:
            if first is None:
                self._again.add(user_id)
            else:
                held.append(first)
            return None
        self._held[user_id] = [] if first is None else [first]
        task = asyncio.ensure_future(self._fill(user_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def catch_up(self, users: Iterable[str]) -> None:
        """After the subscriber reconnected: every listed user, a batch at a time."""
        batch: list[str] = []
        for user_id in users:
            batch.append(user_id)
            if len(batch) == CATCH_UP_BATCH:
                await self._fill_batch(batch)
                batch = []
        await self._fill_batch(batch)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _fill_batch(self, users: list[str]) -> None:
        """`asyncio.wait`, not `gather`: a pass cancelled by a newer reconnect must not cancel the
        fills it started (a cancelled fill would hand on the records held behind its gap)."""
        started = [self.fill(user_id) for user_id in users if self._cursors(user_id)]
        tasks = [task for task in started if task is not None]
        if tasks:
            await asyncio.wait(tasks)

    async def _fill(self, user_id: str) -> None:
        """A record that showed a gap is not passed on past it until the read back is done or
        pointless; then the read back records go first, then those held behind them."""
        try:
            records = await self._read_back(user_id)
        except asyncio.CancelledError:  # stop(): the instance is shutting down, its clients going
            self._held.pop(user_id, None)
            self._again.discard(user_id)
            raise
        except Exception:  # a bug must not keep the user's records held for good
            log.exception("gap fill for user %s failed", user_id)
            records = []
        held = self._held.pop(user_id, [])
        for data in records:
            self._deliver(user_id, data)
        for data in held:
            self._deliver(user_id, data)
        if records:
            self._metrics.incr(m.MESSAGES_GAP_FILLED, len(records))
        if user_id in self._again:
            self._again.discard(user_id)
            self.fill(user_id)

    async def _read_back(self, user_id: str) -> list[bytes]:
        """Retried while Redis is unavailable (the held records wait, in order), for as long as
        the history could still hold what is missing."""
        backoff = Backoff(base_s=0.1, cap_s=2.0)
        deadline = asyncio.get_running_loop().time() + self._give_up_after_s
        while cursors := self._cursors(user_id):
            try:
                return await self._read_all(user_id, cursors)
            except BusUnavailable as exc:
                if asyncio.get_running_loop().time() > deadline:
                    log.warning("gap for user %s not filled: history unavailable (%s)", user_id, exc)
                    self._metrics.incr(m.GAPS_UNFILLED)
                    return []
                await asyncio.sleep(backoff.next_delay())
        return []

    async def _read_all(self, user_id: str, cursors: list[Cursor]) -> list[bytes]:
        """Every read ends in the current epoch's history, so each answer is a tail of the same
        list: the longest one serves every device (each skips what it already had)."""
        longest: list[bytes] = []
        for epoch, since in cursors:
            records = await self._read(user_id, epoch, since)
            if len(records) > len(longest):
                longest = records
        return longest

    async def _read(self, user_id: str, epoch: str, since: int) -> list[bytes]:
        replay = await self._history.since(user_id, epoch, since)
        if replay.recoverable:
            return replay.records
        if replay.epoch and replay.epoch != epoch:
            # Numbering began again (the history was lost): all of the new epoch is news to the device.
            fresh = await self._history.since(user_id, replay.epoch, 0)
            if fresh.recoverable:
                return fresh.records
            self._metrics.incr(m.GAPS_UNFILLED)  # more of the new epoch than HISTORY_SIZE already
            return []
        if replay.epoch:
            log.warning("gap for user %s not filled: seqs after %d are no longer in the history", user_id, since)
            self._metrics.incr(m.GAPS_UNFILLED)
        return []
