"""A client that stops reading cannot grow the gateway's memory without bound."""

from __future__ import annotations

import asyncio
import json

import psutil
import pytest
import redis

from tests.helpers import GatewayProcess, RawSocketClient, client_frame, eventually, make_token, unique

LIMIT = 64 * 1024


def note(n: int) -> str:
    return json.dumps({"type": "notification", "payload": {"title": f"n{n}", "body": "x" * 2000}})


def stats_total(gateway: GatewayProcess) -> int:
    import urllib.request

    with urllib.request.urlopen(f"{gateway.base}/stats", timeout=5) as response:
        return int(json.loads(response.read())["totalConnections"])


async def test_client_that_stops_reading_is_closed_with_4503_and_forgotten(
        make_gateway, redis_client: redis.Redis, prefix: str) -> None:  # type: ignore[no-untyped-def]
    gateway = make_gateway({"MAX_OUTBOUND_BUFFER": str(LIMIT)})
    user = unique()
    stuck = RawSocketClient(gateway.port, make_token(user), "driver", "stuck")
    assert stuck.read_frame()[0] == 1  # connected
    pipe = redis_client.pipeline()
    for n in range(3000):  # ~6 MB: more than the kernel buffers plus the limit
        pipe.publish(f"{prefix}:user:{user}", note(n))
    pipe.execute()
    await eventually(lambda: stats_total(gateway) == 0, timeout=10)
    await eventually(lambda: not redis_client.hexists(f"{prefix}:presence:{user}", "stuck"))
    # The client never reads, so the error and close frames it is owed sit behind megabytes it will
    # not read either; the gateway's own record of the close is what can be checked.
    log = gateway.log()
    assert "outbound buffer over" in log
    assert "device=stuck" in log and "code=4503" in log
    stuck.close()


async def test_fast_clients_of_the_same_user_keep_receiving(make_gateway, redis_client: redis.Redis,  # type: ignore[no-untyped-def]
                                                            prefix: str) -> None:
    gateway = make_gateway({"MAX_OUTBOUND_BUFFER": str(LIMIT)})
    user = unique()
    stuck = RawSocketClient(gateway.port, make_token(user, "rider"), "rider", "stuck")
    reader = await gateway.connect(user, "rider", "reader")
    received = 0

    async def read_all() -> None:
        nonlocal received
        while received < 1500:
            await reader.recv("notification")
            received += 1

    task = asyncio.create_task(read_all())
    for n in range(1500):
        redis_client.publish(f"{prefix}:user:{user}", note(n))
        if n % 100 == 0:
            await asyncio.sleep(0)
    await asyncio.wait_for(task, 20)
    assert received == 1500
    stuck.close()
    reader.close()


async def test_latest_value_messages_are_coalesced_for_a_congested_client(
        make_gateway, redis_client: redis.Redis, prefix: str) -> None:  # type: ignore[no-untyped-def]
    gateway = make_gateway({"MAX_OUTBOUND_BUFFER": str(4 * 1024 * 1024)})
    user = unique()
    slow = RawSocketClient(gateway.port, make_token(user, "rider"), "rider", "slow")
    assert slow.read_frame()[0] == 1
    pipe = redis_client.pipeline()
    for n in range(5000):  # 10 MB: more than the kernel's socket buffers hold
        pipe.publish(f"{prefix}:user:{user}", json.dumps({"type": "driver_location", "payload": {
            "driverId": "drv-1", "latitude": n / 100, "longitude": 0, "pad": "y" * 2000}}))
    pipe.execute()
    await asyncio.sleep(1.0)
    latitudes = []
    slow.sock.settimeout(2)
    try:
        while True:
            opcode, payload = slow.read_frame()
            if opcode == 1:
                message = json.loads(payload)
                if message["type"] == "driver_location":
                    latitudes.append(message["payload"]["latitude"])
    except (TimeoutError, OSError):
        pass
    assert latitudes[-1] == 49.99, "the newest position is always delivered"
    assert len(latitudes) < 5000, "stale positions were dropped, not queued"
    assert latitudes == sorted(latitudes), "positions never go back in time"
    slow.close()


@pytest.mark.soak
async def test_memory_stays_flat_while_a_thousand_slow_clients_are_fed(
        make_gateway, redis_client: redis.Redis, prefix: str) -> None:  # type: ignore[no-untyped-def]
    await _slow_clients_memory(make_gateway, redis_client, prefix, clients=1000, publishes=600)


async def test_memory_stays_flat_while_slow_clients_are_fed(make_gateway, redis_client: redis.Redis,  # type: ignore[no-untyped-def]
                                                           prefix: str) -> None:
    await _slow_clients_memory(make_gateway, redis_client, prefix, clients=200, publishes=300)


async def _slow_clients_memory(make_gateway, redis_client: redis.Redis, prefix: str, *, clients: int,  # type: ignore[no-untyped-def]
                               publishes: int) -> None:
    """Every slow client is offered publishes x 2 KB; without the limit the gateway would hold all of it."""
    gateway = make_gateway({"MAX_OUTBOUND_BUFFER": str(LIMIT), "MAX_DEVICES_PER_USER": "0",
                            "SOCKET_SNDBUF": "16384", "LOG_LEVEL": "WARNING"})
    process = psutil.Process(gateway.proc.pid)
    user = unique()
    sockets = [RawSocketClient(gateway.port, make_token(user, "rider"), "rider", f"d{n}") for n in range(clients)]
    await eventually(lambda: stats_total(gateway) == clients, timeout=30)
    baseline = process.memory_info().rss
    samples = []
    for n in range(publishes):
        redis_client.publish(f"{prefix}:user:{user}", note(n))
        if n % 50 == 0:
            await asyncio.sleep(0.2)
            samples.append(process.memory_info().rss)
    await eventually(lambda: stats_total(gateway) == 0, timeout=30)
    peak_growth = max(samples) - baseline
    offered = clients * publishes * 2000
    print(f"\n{clients} slow clients, {offered / 1e6:.0f} MB offered: RSS baseline {baseline / 1e6:.1f} MB, "
          f"peak growth {peak_growth / 1e6:.1f} MB, final {process.memory_info().rss / 1e6:.1f} MB")
    # Bounded by the per-client limit (plus the frame in flight), far below what was offered.
    assert peak_growth < clients * (LIMIT + 32 * 1024) + 20_000_000
    assert peak_growth < offered / 4
    for sock in sockets:
        sock.close()


async def test_a_client_that_sends_acked_messages_and_never_reads_is_closed_at_the_outbound_limit(
        make_gateway) -> None:  # type: ignore[no-untyped-def]
    """Acks (and errors, and heartbeats) count against MAX_OUTBOUND_BUFFER like fan-out does."""
    gateway = make_gateway({"MAX_OUTBOUND_BUFFER": str(LIMIT), "SOCKET_SNDBUF": "4096",
                            "RATE_LIMIT_PER_SECOND": "0"})
    stuck = RawSocketClient(gateway.port, make_token(unique()), "driver", "acker")
    assert stuck.read_frame()[0] == 1  # connected; from here on the client never reads
    frames = b"".join(client_frame(0x1, json.dumps({"type": "heartbeat_ack", "id": f"ack-{n:05d}",
                                                     "payload": {"timestamp": n}}).encode())
                      for n in range(4000))  # ~400 KB of acks owed: kernel buffers plus the limit, several times
    stuck.sock.sendall(frames)
    await eventually(lambda: stats_total(gateway) == 0, timeout=10)
    log = gateway.log()
    assert "outbound buffer over" in log
    assert "device=acker" in log and "code=4503" in log
    stuck.close()
