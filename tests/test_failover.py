"""Instances die and are deployed: clients move to a survivor and keep receiving; nothing is left behind."""

from __future__ import annotations

import asyncio
import signal
import time

import redis

from tests.helpers import Client, GatewayProcess, eventually, unique


async def cluster_ids(gateway: GatewayProcess) -> set[str]:
    status, body = await gateway.http("GET", "/stats/cluster")
    return {s["serverId"] for s in body["servers"]} if status == 200 else set()


async def test_clients_of_a_killed_instance_reconnect_elsewhere_and_receive(make_gateway,  # type: ignore[no-untyped-def]
                                                                          redis_client: redis.Redis,
                                                                          prefix: str) -> None:
    survivor = make_gateway({"INSTANCE_TTL": "2"})
    doomed = make_gateway({"INSTANCE_TTL": "2"})
    users = [unique() for _ in range(20)]
    clients = [await doomed.connect(user, device_id="phone") for user in users]
    doomed.signal(signal.SIGKILL)
    doomed.wait()
    killed_at = time.monotonic()
    for client in clients:
        assert (await client.closed(timeout=5))[0] in (1006, None)  # no close frame from a dead process
    moved = [await survivor.connect(user, device_id="phone") for user in users]
    for user, client in zip(users, moved, strict=True):
        status, _body = await survivor.http("POST", f"/broadcast/user/{user}",
                                           {"type": "notification", "payload": {"title": "moved", "body": "ok"}})
        assert status == 202
        assert (await client.recv("notification"))["payload"]["title"] == "moved"

    async def doomed_forgotten() -> bool:
        return doomed.server_id not in await cluster_ids(survivor) and not redis_client.exists(
            f"{prefix}:server:{doomed.server_id}:users")

    await eventually(doomed_forgotten, timeout=10)
    cleaned_in = time.monotonic() - killed_at
    print(f"\ndead instance cleaned {cleaned_in:.1f} s after SIGKILL (INSTANCE_TTL=2)")
    assert cleaned_in < 2 + 5
    for user in users:  # the survivor's entries are intact, the dead one's are gone
        entry = redis_client.hget(f"{prefix}:presence:{user}", "phone")
        assert entry is not None and survivor.server_id.encode() in entry
    for client in moved:
        client.close()


async def test_deploy_spreads_reconnects_over_the_drain_window(make_gateway) -> None:  # type: ignore[no-untyped-def]
    survivor = make_gateway({"LOG_LEVEL": "WARNING"})
    leaving = make_gateway({"SHUTDOWN_DRAIN_SECONDS": "2", "LOG_LEVEL": "WARNING"})
    count = 300
    users = [unique() for _ in range(count)]
    clients = [await leaving.connect(user, device_id="phone") for user in users]
    started = time.monotonic()
    leaving.signal(signal.SIGTERM)
    closed_at: list[float] = []
    reconnected_at: list[float] = []

    async def follow(user: str, client: Client) -> None:
        code, _ = await client.closed(timeout=15)
        assert code == 1001
        closed_at.append(time.monotonic() - started)
        moved = await survivor.connect(user, device_id="phone")
        reconnected_at.append(time.monotonic() - started)
        moved.close()

    await asyncio.gather(*(follow(user, client) for user, client in zip(users, clients, strict=True)))
    assert leaving.wait(15) == 0
    spread = max(closed_at) - min(closed_at)
    per_100ms = max(sum(1 for t in closed_at if b / 10 <= t < (b + 1) / 10) for b in range(40))
    print(f"\ndeploy of {count} clients: closes spread over {spread:.2f} s, peak {per_100ms} per 100 ms, "
          f"all reconnected to the survivor {max(reconnected_at):.2f} s after SIGTERM")
    assert len(reconnected_at) == count
    assert spread >= 1.0, "closes are spread over the drain window, not sent at once"
    assert per_100ms < count / 4
