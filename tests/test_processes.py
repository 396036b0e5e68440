"""PROCESSES=N: N full instances on one port, supervised by the parent."""

from __future__ import annotations

import asyncio
import os
import signal

import psutil

from tests.helpers import GatewayProcess, eventually, unique
from tornado_gateway.supervisor import STABLE_AFTER_S, Supervisor, restart_delay


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


class FakeChild:
    """A child process the test kills by setting its exit code."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.code: int | None = None
        self.signals: list[int] = []

    def poll(self) -> int | None:
        return self.code

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)
        self.code = 0


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fake_supervisor(processes: int) -> tuple[Supervisor, list[FakeChild], FakeClock]:
    spawned: list[FakeChild] = []
    clock = FakeClock()

    def spawn(index: int) -> FakeChild:
        spawned.append(FakeChild(1000 + len(spawned)))
        return spawned[-1]

    supervisor = Supervisor(processes, spawn, clock)
    supervisor.start()
    return supervisor, spawned, clock


def test_a_child_in_its_restart_backoff_does_not_hold_up_the_others() -> None:
    supervisor, spawned, clock = fake_supervisor(2)
    first, second = spawned
    for _ in range(4):  # child 0 crashes at once, four times: its delay grows to 4 s
        supervisor.slots[0].process.code = 1  # type: ignore[union-attr]
        supervisor.step()
        clock.now = supervisor.slots[0].restart_at  # type: ignore[assignment]
        supervisor.step()
    assert supervisor.slots[0].failures == 4
    supervisor.slots[0].process.code = 1  # type: ignore[union-attr]
    supervisor.step()
    assert supervisor.slots[0].restart_at == clock.now + 8.0, "0.5 s doubling per failure"
    second.code = 1  # the other child dies while the first waits out its 8 s
    clock.now += 0.2
    supervisor.step()
    clock.now += 0.5
    supervisor.step()
    assert supervisor.slots[1].process is not None and supervisor.slots[1].process is not second, \
        "restarted after its own 0.5 s, not after the first one's 8 s"
    assert supervisor.slots[0].process is None
    assert first.code == 1


def test_a_stop_during_a_backoff_ends_the_supervisor_at_once() -> None:
    supervisor, spawned, clock = fake_supervisor(2)
    spawned[0].code = 1
    supervisor.step()
    assert supervisor.slots[0].restart_at is not None
    supervisor.stop(signal.SIGTERM)
    assert spawned[1].signals == [signal.SIGTERM]
    assert not supervisor.step(), "every child gone: the parent exits without waiting out the delay"
    clock.now += 60
    assert len(spawned) == 2, "and nothing is restarted"


def test_a_child_that_ran_for_a_while_restarts_from_the_first_delay() -> None:
    supervisor, spawned, clock = fake_supervisor(1)
    supervisor.slots[0].failures = 5
    clock.now += STABLE_AFTER_S + 1
    spawned[0].code = 1
    supervisor.step()
    assert supervisor.slots[0].restart_at == clock.now + restart_delay(1) == clock.now + 0.5
