"""PROCESSES=N: N full instances on one port (SO_REUSEPORT), each its own process and serverId.

One Python process uses one core and at most 20,000 file descriptors here, so
more connections or more cores mean more processes. The parent only
supervises: it restarts a child that dies unexpectedly (with a capped delay)
and forwards SIGTERM/SIGINT so that every child drains before the parent exits.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

log = logging.getLogger(__name__)

RESTART_DELAY_CAP_S = 10.0


def child_env(index: int, base_server_id: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PROCESSES"] = "1"
    env["REUSE_PORT"] = "1"
    if base_server_id:
        env["SERVER_ID"] = f"{base_server_id}-{index}"
    else:
        env.pop("SERVER_ID", None)
    return env


def supervise(processes: int, child_args: Sequence[str], base_server_id: str | None) -> int:
    command = [sys.executable, "-m", "tornado_gateway", *child_args]
    children: dict[int, subprocess.Popen[bytes]] = {}
    failures: dict[int, int] = {}
    stopping = False

    def spawn(index: int) -> None:
        children[index] = subprocess.Popen(command, env=child_env(index, base_server_id))
        log.info("started instance %d (pid %d)", index, children[index].pid)

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for index in range(processes):
        spawn(index)
    while children:
        time.sleep(0.2)
        for index, child in list(children.items()):
            code = child.poll()
            if code is None:
                continue
            del children[index]
            if stopping:
                continue
            failures[index] = failures.get(index, 0) + 1
            delay = min(RESTART_DELAY_CAP_S, 0.5 * 2 ** (failures[index] - 1))
            log.error("instance %d exited with %s; restarting in %.1f s", index, code, delay)
            time.sleep(delay)
            if not stopping:
                spawn(index)
    return 0
