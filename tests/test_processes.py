"""PROCESSES=N: N full instances on one port, supervised by the parent."""

from __future__ import annotations

import asyncio
import os
import signal

import psutil

from tests.helpers import GatewayProcess, eventually, unique


async def test_processes_share_the_port_as_separate_instances(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gateway: GatewayProcess = make_gateway({"PROCESSES": "2", "LOG_LEVEL": "WARNING"})
    # SO_REUSEPORT spreads new connections over both children once both are listening.
    seen = await eventually(lambda: _serves_both(gateway), timeout=15)
    assert seen == {f"{gateway.server_id}-0", f"{gateway.server_id}-1"}


async def test_a_child_that_dies_is_restarted(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gateway: GatewayProcess = make_gateway({"PROCESSES": "2", "LOG_LEVEL": "WARNING"})
    parent = psutil.Process(gateway.proc.pid)
    children = parent.children()
    assert len(children) == 2
    victim = children[0].pid
    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        pids = {c.pid for c in parent.children() if c.status() != psutil.STATUS_ZOMBIE}
        return len(pids) == 2 and victim not in pids

    await eventually(replaced, timeout=10)
    await eventually(lambda: _serves_both(gateway), timeout=10)


async def test_sigterm_reaches_every_child_and_the_parent_exits_0(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gateway: GatewayProcess = make_gateway({"PROCESSES": "2", "LOG_LEVEL": "WARNING",
                                            "SHUTDOWN_DRAIN_SECONDS": "0"})
    children = psutil.Process(gateway.proc.pid).children()
    client = await gateway.connect(unique())
    gateway.signal(signal.SIGTERM)
    assert (await client.closed(timeout=10))[0] == 1001
    assert gateway.wait(15) == 0
    for child in children:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


async def _serves_both(gateway: GatewayProcess) -> set[str] | None:
    seen = set()
    for _ in range(30):
        client = await gateway.connect()
        seen.add(client.frames[0]["payload"]["serverId"])
        client.close()
        await asyncio.sleep(0)
    return seen if len(seen) == 2 else None
