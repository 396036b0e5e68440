"""Redis Sentinel (issue #11): the gateway follows a failover to the promoted replica.

A real primary, one replica and three sentinels (quorum 2, down after 1 s) on free ports, started
and stopped by pid (tests/redis_topology.py); two gateway instances configured with
REDIS_SENTINELS and a REDIS_URL whose host:port leads nowhere, so every connection must have come
from asking the sentinels. The README's failure-modes row quotes the timings this test prints (-s).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
import redis.asyncio as aredis

from tests.helpers import Client, GatewayProcess, make_token, unique
from tests.redis_topology import MASTER_NAME, Node, SentinelTopology
from tornado_gateway.config import ConfigError, load_settings
from tornado_gateway.publisher import Publisher
from tornado_gateway.redis_endpoint import SentinelEndpoint
from tornado_gateway.resp import PipelinedClient, RedisUnavailable, RespConnection

NOWHERE = "redis://127.0.0.1:1"  # REDIS_URL's host:port is ignored in Sentinel mode
PRODUCE_EVERY_S = 0.05


@pytest.fixture
def topology() -> Iterator[SentinelTopology]:
    started = SentinelTopology().start()
    yield started
    started.stop()


@dataclass
class Device:
    """A connected client and every recorded message it got: (requestId, seq, arrival time). A
    `POST /broadcast` answered `degraded` during the outage reaches the instance's own devices live,
    without a seq (README, failure modes): counted in `degraded`, and recorded again when retried."""

    client: Client
    got: list[tuple[str, int, float]] = field(default_factory=list)
    degraded: int = 0

    async def collect(self) -> None:
        while True:
            frame = await self.client.recv("ride_request", timeout=120)
            if "seq" not in frame:
                self.degraded += 1
                continue
            self.got.append((frame["payload"]["requestId"], int(frame["seq"]), time.monotonic()))

    def runs(self) -> list[list[int]]:
        """The seqs split where numbering began again (a new epoch)."""
        runs: list[list[int]] = []
        for _ref, seq, _at in self.got:
            if not runs or seq <= runs[-1][-1]:
                runs.append([])
            runs[-1].append(seq)
        return runs


@dataclass
class Producer:
    """Records one ride request every PRODUCE_EVERY_S, alternating POST /broadcast on each instance and
    FCALL through the Python publisher; a failed attempt is retried with the same id until acknowledged."""

    user: str
    gateways: list[GatewayProcess]
    publisher: Publisher
    acked: dict[str, tuple[int, float]] = field(default_factory=dict)  # requestId -> (seq, ack time)

    async def run(self) -> None:
        n = 0
        while True:
            n += 1
            ref = f"r{n}"
            acknowledged = False
            while not acknowledged:
                acknowledged = await self._record(n, ref)
                await asyncio.sleep(PRODUCE_EVERY_S)

    async def _record(self, n: int, ref: str) -> bool:
        message: dict[str, Any] = {"type": "ride_request", "payload": {"requestId": ref}, "id": f"{self.user}-{ref}"}
        try:
            if n % 3 == 2:
                result = await self.publisher.publish(self.user, "ride_request", message["payload"],
                                                      message_id=message["id"])
                seq = result.seq
            else:
                status, body = await self.gateways[n % 3].http("POST", f"/broadcast/user/{self.user}", message)
                if status != 202 or body.get("degraded"):
                    return False
                seq = int(body["seq"])
        except (redis.exceptions.RedisError, OSError):
            return False
        self.acked[ref] = (seq, time.monotonic())
        return True


async def first(check: Any, timeout: float, interval: float = 0.02) -> float:
    """The time at which `check` (async) first returned true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return time.monotonic()
        await asyncio.sleep(interval)
    raise AssertionError(f"not within {timeout} s")


async def ready_again(gateway: GatewayProcess, since: float) -> float:
    """When /ready was 200 again after the 503 that losing the primary caused (polled from `since` on)."""
    down = False
    deadline = since + 20
    while time.monotonic() < deadline:
        ready = await gateway.ready()
        if ready and down:
            return time.monotonic()
        down = down or not ready
        await asyncio.sleep(0.02)
    raise AssertionError(f"{gateway.server_id} not ready again within 20 s")


async def switch_announced(sentinel: Node) -> float:
    """When the sentinel published `+switch-master`: the promotion is in force."""
    client = aredis.Redis(host="127.0.0.1", port=sentinel.port)
    pubsub = client.pubsub()
    await pubsub.subscribe("+switch-master")
    try:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None:
                return time.monotonic()
    finally:
        await pubsub.aclose()
        await client.aclose()


def gateway_channels(node: Node, prefix: str) -> list[bytes]:
    """The gateway's channels anyone is subscribed to on that node (user and control channels)."""
    return list(node.client().pubsub_channels(f"{prefix}:*"))


@pytest.fixture
async def started(topology: SentinelTopology) -> AsyncIterator[list[GatewayProcess]]:
    prefix = unique("gwsentinel")
    env = {"REDIS_SENTINELS": topology.sentinel_addresses, "REDIS_SENTINEL_MASTER": MASTER_NAME,
           "PROBE_INTERVAL": "0.5", "PROBE_TIMEOUT": "1.5"}
    gateways = [GatewayProcess(NOWHERE, prefix, env) for _ in range(2)]
    for gateway in gateways:
        gateway.start()
    yield gateways
    for gateway in gateways:
        gateway.stop()


async def test_a_killed_primary_is_replaced_and_both_instances_deliver_again(
        topology: SentinelTopology, started: list[GatewayProcess]) -> None:
    first_gw, second_gw = started
    prefix = first_gw.prefix
    user = unique()
    devices = [Device(await first_gw.connect(user, device_id="phone")),
               Device(await second_gw.connect(user, device_id="tablet"))]
    away = await first_gw.connect(user, device_id="watch")  # leaves before the kill, resumes after it
    publisher = Publisher.for_sentinels(topology.sentinel_addresses, MASTER_NAME, prefix,
                                        socket_connect_timeout=0.5, socket_timeout=2.0)
    producer = Producer(user, [first_gw, second_gw, first_gw], publisher)
    tasks = [asyncio.create_task(d.collect()) for d in devices] + [asyncio.create_task(producer.run())]
    old_primary, promoted = topology.primary, topology.replica
    try:
        await asyncio.sleep(1.0)
        away_seq = int((await away.recv("ride_request"))["seq"])
        away_connected = next(f for f in away.frames if f["type"] == "connected")["payload"]
        away.close()
        await asyncio.sleep(1.0)

        switched = asyncio.create_task(switch_announced(topology.sentinels[0]))
        await asyncio.sleep(0.1)
        acked_before = dict(producer.acked)
        old_primary.kill()
        killed_at = time.monotonic()
        readiness = [asyncio.create_task(ready_again(gateway, killed_at)) for gateway in started]
        replicated = int(promoted.client().hget(f"{prefix}:history:{{{user}}}:meta", "seq") or 0)
        switch_at = await asyncio.wait_for(switched, 15)
        ready_at = list(await asyncio.gather(*readiness))
        delivered_at = [await first(lambda d=d: _async(any(ref not in acked_before for ref, _s, _at in d.got)), 15)
                        for d in devices]  # the first record acknowledged after the kill, on each instance
        await asyncio.sleep(1.5)  # a few more records on the new primary
        acked_after = {ref: seq for ref, (seq, at) in producer.acked.items() if at > max(ready_at)}
        away_again = await Client.open(second_gw.ws_url(
            token=make_token(user, "driver"), userType="driver", deviceId="watch", platform="ios",
            since=str(away_seq), epoch=away_connected["epoch"]))
        resumed_payload = (await away_again.recv("connected"))["payload"]
        away_again.close()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await publisher._redis.aclose()

    last_acked_before = max((seq for seq, _at in acked_before.values()), default=0)
    print(f"\nfailover: +switch-master {switch_at - killed_at:.2f} s after the kill; ready "
          f"{[round(at - switch_at, 2) for at in ready_at]} s after it; first delivery "
          f"{[round(at - killed_at, 2) for at in delivered_at]} s after the kill; "
          f"{len(acked_before)} records acknowledged before the kill (last seq {last_acked_before}), "
          f"{replicated} of them on the replica when it was killed; resume after the failover: "
          f"recovered={resumed_payload.get('recovered')}; live-only (degraded) deliveries during the outage: "
          f"{[d.degraded for d in devices]}")
    for device in devices:
        assert device.client.ws.close_code is None
        refs = {ref for ref, _seq, _at in device.got}
        assert set(acked_before) <= refs  # acknowledged before the kill: delivered (before it, as it happens)
        assert set(acked_after) <= refs  # acknowledged after the promotion: delivered
        runs = device.runs()
        assert len(runs) <= 2, runs  # one new epoch at most: the promoted replica's
        for run in runs:
            assert run == list(range(run[0], run[0] + len(run))), run  # once each, in order, no gap
    assert max(ready_at) - switch_at < 5
    assert max(delivered_at) - switch_at < 5
    # The promoted replica starts a new history generation (it may lack what replication had not
    # carried), so a resume across the failover says recovered: false, never a silent gap.
    assert resumed_payload["recovered"] is False

    # The old primary comes back as a replica: nothing of the gateway may be subscribed there.
    new_host, new_port = topology.master_address()
    assert new_port == promoted.port
    old_primary.args = [*old_primary.args, "--replicaof", new_host, str(new_port)]
    old_primary.start()
    await asyncio.sleep(1.5)  # a probe round or two
    assert old_primary.role() == "slave"
    assert gateway_channels(old_primary, prefix) == []
    assert len(gateway_channels(promoted, prefix)) >= 3  # both control channels and the user's
    numsub = dict(promoted.client().pubsub_numsub(f"{prefix}:user:{user}"))
    assert numsub[f"{prefix}:user:{user}".encode()] == 2


async def test_a_live_demotion_moves_every_subscription_off_the_demoted_node(
        topology: SentinelTopology, started: list[GatewayProcess]) -> None:
    """SENTINEL FAILOVER demotes a primary that is still up and still accepts SUBSCRIBE: the gateways
    must leave it (on `+switch-master`, a READONLY reply or the self-probe) and deliver from the new one."""
    first_gw, second_gw = started
    prefix = first_gw.prefix
    user = unique()
    devices = [Device(await first_gw.connect(user, device_id="phone")),
               Device(await second_gw.connect(user, device_id="tablet"))]
    tasks = [asyncio.create_task(d.collect()) for d in devices]
    old_primary, promoted = topology.primary, topology.replica
    try:
        topology.sentinels[0].client().execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
        started_at = time.monotonic()
        await first(lambda: _async(topology.master_address()[1] == promoted.port), 15, 0.05)
        switched_at = time.monotonic()
        left_at = await first(lambda: _async(not gateway_channels(old_primary, prefix)), 10)
        for gateway in started:
            await first(gateway.ready, 10)
        for n in range(3):
            status, body = await second_gw.http("POST", f"/broadcast/user/{user}",
                                                {"type": "ride_request", "payload": {"requestId": f"after{n}"}})
            assert status == 202, body
        await first(lambda: _async(all(len(d.got) >= 3 for d in devices)), 5)
        # Sentinel turns the old primary into a replica only on its next INFO round (about 10 s later);
        # until then it is a primary nobody should write to. Once it is a replica: still nothing there.
        demoted_at = await first(lambda: _async(old_primary.role() == "slave"), 25, 0.1)
        assert not gateway_channels(old_primary, prefix)
        for gateway in started:
            assert await gateway.ready()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    print(f"\nSENTINEL FAILOVER: switched {switched_at - started_at:.2f} s after it was asked; no gateway "
          f"channel left on the old primary {left_at - switched_at:.2f} s after the switch (polled every 20 ms); "
          f"Sentinel demoted it {demoted_at - switched_at:.1f} s after the switch")
    assert len(gateway_channels(promoted, prefix)) >= 3
    for device in devices:
        assert [ref for ref, _seq, _at in device.got][-3:] == ["after0", "after1", "after2"]
        assert device.client.ws.close_code is None


async def test_a_replica_is_refused_as_primary_and_a_readonly_write_drops_the_connection(
        topology: SentinelTopology) -> None:
    """The two defences a `+switch-master` usually makes unnecessary (it came first in every run above):
    ROLE on connect, and READONLY as "reconnect and ask again"."""
    replica_url = f"redis://127.0.0.1:{topology.replica.port}"
    conn = RespConnection(replica_url)
    with pytest.raises(ConnectionError, match="not the primary"):
        await conn.connect(require_primary=True)
    conn.close()

    commands = PipelinedClient(replica_url)  # as if the sentinels had just named the node, now demoted
    try:
        assert await commands.call("PING") == b"PONG"
        observer = topology.replica.client()  # one connection, reused: it counts only the others
        opened = int(observer.info("stats")["total_connections_received"])
        with pytest.raises(RedisUnavailable, match="demoted"):
            await commands.call("SET", "k", "v")
        assert int(observer.info("stats")["total_connections_received"]) == opened
        assert await commands.call("PING") == b"PONG"  # on a new connection: the next one asks again
        assert int(observer.info("stats")["total_connections_received"]) == opened + 1
    finally:
        await commands.close()


async def _async(value: bool) -> bool:
    return value


# --- settings and endpoint units (no processes) -------------------------------------------------


def test_sentinel_settings_are_checked() -> None:
    env = {"JWT_SECRET": "x" * 32, "REDIS_SENTINELS": "10.0.0.1:26379, [::1]:26380", "REDIS_SENTINEL_MASTER": "m"}
    assert load_settings(env).redis_sentinels == ("10.0.0.1:26379", "[::1]:26380")
    for bad in ({"REDIS_SENTINELS": "10.0.0.1:26379"}, {"REDIS_SENTINEL_MASTER": "m"},
                {"REDIS_SENTINELS": "10.0.0.1", "REDIS_SENTINEL_MASTER": "m"},
                {"REDIS_SENTINELS": "h:1", "REDIS_SENTINEL_MASTER": "m", "REDIS_URL": "memory://"}):
        with pytest.raises(ConfigError):
            load_settings({"JWT_SECRET": "x" * 32, **bad})


async def test_the_primary_url_keeps_credentials_db_and_tls_options_of_redis_url() -> None:
    endpoint = SentinelEndpoint("rediss://app:pw@ignored:6379/2?ssl_cert_reqs=none", [("127.0.0.1", 1)], "m",
                                password="s p")
    endpoint._lookup = (time.monotonic(), ("10.1.2.3", 6380))
    assert await endpoint.primary_url() == "rediss://app:pw@10.1.2.3:6380/2?ssl_cert_reqs=none"
    assert endpoint.sentinel_url(("10.0.0.9", 26379)) == "rediss://:s%20p@10.0.0.9:26379?ssl_cert_reqs=none"
    assert endpoint.sentinel_options()["ssl"] is True and endpoint.sentinel_options()["password"] == "s p"
    with contextlib.suppress(Exception):
        await endpoint.stop()
