"""PROCESSES=N: N full instances on one port (SO_REUSEPORT), each its own process and serverId.

One Python process uses one core and at most 20,000 file descriptors here, so
more connections or more cores mean more processes. The parent only
supervises: it restarts a child that dies unexpectedly (with a capped delay)
and forwards SIGTERM/SIGINT so that every child drains before the parent exits.

The restart delay is a time to restart at, not a sleep: while one child waits
out its backoff, the parent keeps noticing the others (a second child dying is
restarted on its own schedule, not after the first one's delay) and a SIGTERM
ends the wait at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Protocol

log = logging.getLogger(__name__)

RESTART_DELAY_CAP_S = 10.0
FIRST_RESTART_DELAY_S = 0.5
POLL_S = 0.2
#: A child that ran this long before it died starts its backoff from the first delay again.
STABLE_AFTER_S = 60.0


class Child(Protocol):
    """What the supervisor needs of a child process (subprocess.Popen, or a test's stand-in)."""

    pid: int

    def poll(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...


def child_env(index: int, base_server_id: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PROCESSES"] = "1"
    env["REUSE_PORT"] = "1"
    if base_server_id:
        env["SERVER_ID"] = f"{base_server_id}-{index}"
    else:
        env.pop("SERVER_ID", None)
    return env


def restart_delay(failures: int) -> float:
    """0.5 s doubling per consecutive failure, capped at RESTART_DELAY_CAP_S."""
    return min(RESTART_DELAY_CAP_S, FIRST_RESTART_DELAY_S * 2.0 ** (failures - 1))


@dataclasses.dataclass(slots=True)
class Slot:
    """One of the N instances: its current process, or when it is due to be started again."""

    index: int
    process: Child | None = None
    started_at: float = 0.0
    failures: int = 0  # consecutive short-lived runs
    restart_at: float | None = None


class Supervisor:
    """The parent's state; `step(now)` is one pass of its loop, so tests can drive it with a fake clock."""

    def __init__(self, processes: int, spawn: Callable[[int], Child],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._spawn = spawn
        self._clock = clock
        self.slots = [Slot(index) for index in range(processes)]
        self.stopping = False

    def start(self) -> None:
        for slot in self.slots:
            self._start(slot)

    def _start(self, slot: Slot) -> None:
        slot.process = self._spawn(slot.index)
        slot.started_at = self._clock()
        slot.restart_at = None
        log.info("started instance %d (pid %d)", slot.index, slot.process.pid)

    def stop(self, signum: int) -> None:
        """Forward a stop signal to every child; pending restarts are cancelled."""
        self.stopping = True
        for slot in self.slots:
            slot.restart_at = None
            if slot.process is not None and slot.process.poll() is None:
                slot.process.send_signal(signum)

    def step(self) -> bool:
        """Notice exits, schedule or perform restarts; False once every child is gone while stopping."""
        now = self._clock()
        for slot in self.slots:
            if slot.process is not None:
                self._check(slot, now)
            elif slot.restart_at is not None and now >= slot.restart_at and not self.stopping:
                self._start(slot)
        return not self.stopping or any(slot.process is not None for slot in self.slots)

    def _check(self, slot: Slot, now: float) -> None:
        assert slot.process is not None
        code = slot.process.poll()
        if code is None:
            return
        slot.process = None
        if self.stopping:
            return
        slot.failures = 1 if now - slot.started_at >= STABLE_AFTER_S else slot.failures + 1
        delay = restart_delay(slot.failures)
        slot.restart_at = now + delay
        log.error("instance %d exited with %s; restarting in %.1f s", slot.index, code, delay)


def supervise(processes: int, child_args: Sequence[str], base_server_id: str | None) -> int:
    command = [sys.executable, "-m", "tornado_gateway", *child_args]

    def spawn(index: int) -> Child:
        return subprocess.Popen(command, env=child_env(index, base_server_id))

    supervisor = Supervisor(processes, spawn)
    signal.signal(signal.SIGTERM, lambda signum, _frame: supervisor.stop(signum))
    signal.signal(signal.SIGINT, lambda signum, _frame: supervisor.stop(signum))
    supervisor.start()
    while supervisor.step():
        time.sleep(POLL_S)
    return 0
