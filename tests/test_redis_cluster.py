"""Redis Cluster mode: two gateway instances on a real cluster of three primaries and three replicas.

The cluster is started from the installed redis-server and created with redis-cli on free ports,
stopped by pid (tests/redis_topology.py). The instances run with REDIS_CLUSTER=true and a REDIS_URL
naming one node; they discover the rest. In cluster mode a user's channel is the sharded channel
`<prefix>:user:{<userId>}` (services deliver with SPUBLISH), presence is `<prefix>:presence:{<userId>}`,
the instance's keys and control channel carry `{<serverId>}`, and client events stay classic
(`PUBLISH <prefix>:events:<type>`, streams `<prefix>:stream:<type>`).

One cluster serves the module's tests that leave it intact; the failover tests start their own.
The timings the failover tests print (-s) are what the README's failure-modes row should quote.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterException

from tests.helpers import Client, GatewayProcess, eventually, make_token, start_all, unique
from tests.redis_topology import REDIS_CLI, ClusterTopology, Node
from tests.test_sentinel import Device, Producer, first
from tornado_gateway.bus_redis import Probe
from tornado_gateway.bus_redis_cluster import ClusterBus
from tornado_gateway.config import ConfigError, load_settings
from tornado_gateway.metrics import Metrics
from tornado_gateway.publisher import Publisher
from tornado_gateway.redis_cluster import ClusterClient, ClusterEndpoint
from tornado_gateway.redis_keys import Keys

pytestmark = pytest.mark.skipif(REDIS_CLI is None, reason="redis-cli is not installed: it creates the Redis Cluster "
                                                          "these tests run on (Debian: apt-get install redis-tools)")

CLUSTER_ENV = {"REDIS_CLUSTER": "true", "INSTANCE_TTL": "2", "HISTORY_SIZE": "1000", "HISTORY_TTL": "120",
               "PROBE_INTERVAL": "0.5", "PROBE_TIMEOUT": "1.5"}


# --- names of the cluster layout (the spec of cluster mode) ------------------------------------


def user_channel(prefix: str, user: str) -> str:
    return f"{prefix}:user:{{{user}}}"


def presence_key(prefix: str, user: str) -> str:
    return f"{prefix}:presence:{{{user}}}"


def server_key(prefix: str, server_id: str) -> str:
    return f"{prefix}:server:{{{server_id}}}"


def control_channel(prefix: str, server_id: str) -> str:
    return f"{prefix}:control:{{{server_id}}}"


def notification(title: str) -> str:
    return json.dumps({"type": "notification", "payload": {"title": title, "body": "b"}})


def ride_request(ref: str, **extra: Any) -> str:
    return json.dumps({"type": "ride_request", "payload": {"requestId": ref}, **extra})


def shard_subscribers(node: Node, channel: str) -> int:
    """PUBSUB SHARDNUMSUB on that node: the sharded subscriptions to `channel` there."""
    reply = node.client().execute_command("PUBSUB", "SHARDNUMSUB", channel)
    return int(reply[1])


def shard_channels(node: Node, prefix: str) -> list[str]:
    """The gateway's sharded channels anyone is subscribed to on that node."""
    return sorted(c.decode() for c in node.client().execute_command("PUBSUB", "SHARDCHANNELS", f"{prefix}:*"))


def classic_channels(node: Node, prefix: str) -> list[str]:
    return sorted(c.decode() for c in node.client().pubsub_channels(f"{prefix}:*"))


async def resume(gateway: GatewayProcess, user: str, since: int, epoch: str, device: str) -> Client:
    client = await Client.open(gateway.ws_url(token=make_token(user, "driver"), userType="driver", deviceId=device,
                                              platform="ios", since=str(since), epoch=epoch))
    client.user_id = user
    return client


async def drain(client: Client, kind: str, quiet: float = 0.5) -> list[dict[str, Any]]:
    """Every `kind` frame until none comes for `quiet` seconds."""
    frames: list[dict[str, Any]] = []
    with contextlib.suppress(TimeoutError):
        while True:
            frames.append(await client.recv(kind, timeout=quiet))
    return frames


# --- fixtures -----------------------------------------------------------------------------------


def started_cluster() -> Iterator[ClusterTopology]:
    topology = ClusterTopology().start()
    print(f"\nRedis Cluster (3 primaries, 3 replicas) created and settled in {topology.startup_seconds:.2f} s")
    try:
        yield topology
    finally:
        topology.stop()


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterTopology]:
    yield from started_cluster()


@pytest.fixture(scope="module")
def prefix() -> str:
    """Overrides conftest's: nothing here touches the shared Redis, and the cluster is thrown away."""
    return unique("gwcluster")


def stop_all(gateways: list[GatewayProcess]) -> None:
    for gateway in gateways:
        if gateway.proc is not None:
            tail = gateway.log().splitlines()[-25:]
            print(f"\n--- last lines of {gateway.server_id}'s log ---\n" + "\n".join(tail))
        gateway.stop()


def cluster_gateway(topology: ClusterTopology, prefix: str, seed: Node, env: dict[str, str] | None = None
                    ) -> GatewayProcess:
    return GatewayProcess(f"redis://{seed.address}", prefix, {**CLUSTER_ENV, **(env or {})})


@pytest.fixture(scope="module")
def pair(cluster: ClusterTopology, prefix: str) -> Iterator[list[GatewayProcess]]:
    """Two instances, each seeded with a different primary."""
    seeds = cluster.primaries()
    gateways = [cluster_gateway(cluster, prefix, seeds[0]), cluster_gateway(cluster, prefix, seeds[1])]
    try:
        yield start_all(*gateways)
    finally:
        stop_all(gateways)


@pytest.fixture
def spawn() -> Iterator[Callable[..., GatewayProcess]]:
    """More instances for one test (their own prefix, a given seed, a short INSTANCE_TTL ...), stopped after it."""
    started: list[GatewayProcess] = []

    def factory(topology: ClusterTopology, prefix: str, seed: Node, env: dict[str, str] | None = None,
                *, wait: bool = True) -> GatewayProcess:
        gateway = cluster_gateway(topology, prefix, seed, env)
        started.append(gateway)
        return gateway.start(wait=wait)

    yield factory
    stop_all(started)


@pytest.fixture(scope="module")
def rc(cluster: ClusterTopology) -> Iterator[redis.RedisCluster]:
    """A service's view: redis-py's cluster client (it follows MOVED and routes by key)."""
    client = cluster.client()
    yield client
    client.close()


# --- delivery -----------------------------------------------------------------------------------


async def test_an_spublish_by_a_service_reaches_a_user_on_either_instance(
        cluster: ClusterTopology, pair: list[GatewayProcess], rc: redis.RedisCluster, prefix: str,
        clients: list[Client]) -> None:
    for gateway in pair:
        user = unique()
        client = await gateway.connect(user)
        clients.append(client)
        channel = user_channel(prefix, user)
        owner = cluster.primary_for_key(channel)
        # The instance subscribed with SSUBSCRIBE on the primary that serves the user's slot.
        await eventually(lambda owner=owner, channel=channel: shard_subscribers(owner, channel) == 1)
        assert rc.spublish(channel, notification("by SPUBLISH")) == 1
        assert (await client.recv("notification"))["payload"]["title"] == "by SPUBLISH"


async def test_a_broadcast_on_one_instance_reaches_a_user_on_the_other(
        pair: list[GatewayProcess], clients: list[Client]) -> None:
    first_gw, second_gw = pair
    user = unique()
    client = await second_gw.connect(user)
    clients.append(client)
    status, body = await first_gw.http("POST", f"/broadcast/user/{user}", json.loads(ride_request("r1")))
    assert status == 202, body
    assert (body["devices"], body["seq"]) == (1, 1)
    message = await client.recv("ride_request")
    assert (message["seq"], message["payload"]) == (1, {"requestId": "r1"})


async def test_users_on_every_shard_all_receive(cluster: ClusterTopology, pair: list[GatewayProcess],
                                                rc: redis.RedisCluster, prefix: str, clients: list[Client]) -> None:
    primaries = cluster.primaries()
    assert len(primaries) == 3
    users = [cluster.key_on(primary) for primary in primaries]
    connected = []
    for n, user in enumerate(users):
        client = await pair[n % 2].connect(user)
        clients.append(client)
        connected.append(client)
    for primary, user in zip(primaries, users, strict=True):
        channel = user_channel(prefix, user)
        await eventually(lambda p=primary, c=channel: shard_subscribers(p, c) == 1)
        for other in primaries:  # on its own shard only
            if other is not primary:
                assert channel not in shard_channels(other, prefix)
    for user in users:
        assert rc.spublish(user_channel(prefix, user), notification(f"live {user}")) == 1
        status, _body = await pair[1].http("POST", f"/broadcast/user/{user}", json.loads(ride_request(user)))
        assert status == 202
    for user, client in zip(users, connected, strict=True):
        assert (await client.recv("notification"))["payload"]["title"] == f"live {user}"
        recorded = await client.recv("ride_request")
        assert (recorded["seq"], recorded["payload"]["requestId"]) == (1, user)


async def test_a_user_with_a_device_on_each_instance_gets_every_message_on_both(
        cluster: ClusterTopology, pair: list[GatewayProcess], rc: redis.RedisCluster, prefix: str,
        clients: list[Client]) -> None:
    user = unique()
    phone = await pair[0].connect(user, device_id="phone")
    tablet = await pair[1].connect(user, device_id="tablet")
    clients += [phone, tablet]
    channel = user_channel(prefix, user)
    await eventually(lambda: shard_subscribers(cluster.primary_for_key(channel), channel) == 2)
    assert rc.spublish(channel, notification("both")) == 2
    assert rc.fcall(Keys(prefix).function("publish"), 1, user, ride_request("r1")) == 1
    for device in (phone, tablet):
        assert (await device.recv("notification"))["payload"]["title"] == "both"
        assert (await device.recv("ride_request"))["seq"] == 1
    status, body = await pair[0].http("POST", f"/broadcast/user/{user}", json.loads(ride_request("r2")))
    assert (status, body["devices"], body["seq"]) == (202, 2, 2)
    for device in (phone, tablet):
        assert (await device.recv("ride_request"))["seq"] == 2


async def test_the_same_device_on_the_other_instance_replaces_the_first_connection(
        pair: list[GatewayProcess], rc: redis.RedisCluster, prefix: str, clients: list[Client]) -> None:
    first_gw, second_gw = pair
    user = unique()
    old = await first_gw.connect(user, device_id="phone")
    new = await second_gw.connect(user, device_id="phone")
    clients += [old, new]
    code, frames = await old.closed()
    assert code == 4409
    assert frames[-1]["payload"]["code"] == "REPLACED"
    entry = json.loads(rc.hget(presence_key(prefix, user), "phone"))
    assert (entry["serverId"], entry["connectionId"]) == (second_gw.server_id, new.connection_id)
    assert (await new.request({"type": "heartbeat_ack", "payload": {}}))["type"] == "ack"


# --- presence and stats -------------------------------------------------------------------------


async def test_presence_instance_keys_and_cluster_stats_span_both_instances(
        cluster: ClusterTopology, spawn: Callable[..., GatewayProcess], rc: redis.RedisCluster,
        clients: list[Client]) -> None:
    prefix = unique("gwstats")  # only these two instances count in this prefix's /stats/cluster
    seeds = cluster.primaries()
    first_gw = spawn(cluster, prefix, seeds[1], {"INSTANCE_TTL": "1"}, wait=False)
    second_gw = spawn(cluster, prefix, seeds[2], {"INSTANCE_TTL": "1"}, wait=False)
    first_gw.wait_started()
    second_gw.wait_started()
    both, only_second = unique(), unique()
    clients += [await first_gw.connect(both, "rider", "phone"), await second_gw.connect(both, "rider", "tablet"),
                await first_gw.connect(user_type="driver"), await second_gw.connect(only_second, "restaurant", "till")]

    phone = json.loads(rc.hget(presence_key(prefix, both), "phone"))
    tablet = json.loads(rc.hget(presence_key(prefix, both), "tablet"))
    assert (phone["serverId"], tablet["serverId"]) == (first_gw.server_id, second_gw.server_id)
    assert phone["userType"] == "rider" and phone["connectionId"] == clients[0].connection_id
    assert {m.decode() for m in rc.smembers(f"{prefix}:servers")} == {first_gw.server_id, second_gw.server_id}
    for gateway in (first_gw, second_gw):
        key = server_key(prefix, gateway.server_id)
        assert rc.hget(key, "serverId") == gateway.server_id.encode()
        assert 0 < rc.pttl(key) <= 1000
        control = control_channel(prefix, gateway.server_id)
        assert shard_subscribers(cluster.primary_for_key(control), control) == 1  # a sharded control channel

    async def stats(gateway: GatewayProcess) -> dict[str, Any]:
        body: dict[str, Any] = (await gateway.http("GET", "/stats/cluster"))[1]
        return body

    for gateway in (first_gw, second_gw):  # an instance's own figures are live, the other's from its key
        async def settled(gateway: GatewayProcess = gateway) -> bool:  # refreshed every INSTANCE_TTL/3
            return (await stats(gateway))["totalConnections"] == 4

        await eventually(settled, timeout=8)
        cluster_stats = await stats(gateway)
        assert {s["serverId"] for s in cluster_stats["servers"]} == {first_gw.server_id, second_gw.server_id}
        assert [s["totalConnections"] for s in cluster_stats["servers"]] == [2, 2]
        assert cluster_stats["uniqueUsers"] == 3  # `both` once, not once per instance
        assert cluster_stats["byUserType"] == {"driver": 1, "rider": 2, "restaurant": 1, "delivery_partner": 0}


async def test_a_killed_instances_entries_on_every_shard_are_removed_by_the_survivor(
        cluster: ClusterTopology, spawn: Callable[..., GatewayProcess], rc: redis.RedisCluster,
        clients: list[Client]) -> None:
    prefix = unique("gwreap")
    seeds = cluster.primaries()
    survivor = spawn(cluster, prefix, seeds[0], {"INSTANCE_TTL": "1"}, wait=False)
    doomed = spawn(cluster, prefix, seeds[2], {"INSTANCE_TTL": "1"}, wait=False)
    survivor.wait_started()
    doomed.wait_started()
    orphans = [cluster.key_on(primary) for primary in seeds]  # presence hashes on all three shards
    for user in orphans:
        clients.append(await doomed.connect(user, device_id="orphan"))
    kept = cluster.key_on(seeds[1])
    clients.append(await survivor.connect(kept, device_id="kept"))
    for user in orphans:
        assert rc.hexists(presence_key(prefix, user), "orphan")

    doomed.signal(signal.SIGKILL)
    doomed.wait()
    killed_at = time.monotonic()

    def orphans_gone() -> bool:
        return not any(rc.hexists(presence_key(prefix, user), "orphan") for user in orphans)

    await eventually(orphans_gone, timeout=10)
    cleaned_in = time.monotonic() - killed_at
    await eventually(lambda: not rc.sismember(f"{prefix}:servers", doomed.server_id))
    assert not rc.exists(server_key(prefix, doomed.server_id))

    async def not_listed() -> bool:
        servers = (await survivor.http("GET", "/stats/cluster"))[1]["servers"]
        return doomed.server_id not in {s["serverId"] for s in servers}

    await eventually(not_listed)
    print(f"\ndead instance's entries on 3 shards removed {cleaned_in:.1f} s after SIGKILL (INSTANCE_TTL=1)")
    assert json.loads(rc.hget(presence_key(prefix, kept), "kept"))["serverId"] == survivor.server_id


# --- recorded messages --------------------------------------------------------------------------


async def test_the_record_functions_are_loaded_on_every_node(cluster: ClusterTopology,
                                                              pair: list[GatewayProcess], prefix: str) -> None:
    library = Keys(prefix).history_library()
    for node in cluster.nodes:  # primaries load it; replicas get it by replication
        assert node.client().function_list(library=library), f"no {library} on {node.address}"


async def test_records_by_fcall_and_a_resume_on_the_other_instance(
        pair: list[GatewayProcess], rc: redis.RedisCluster, prefix: str, clients: list[Client]) -> None:
    first_gw, second_gw = pair
    function = Keys(prefix).function("publish")
    user = unique()
    phone = await first_gw.connect(user, device_id="phone")
    clients.append(phone)
    epoch = phone.frames[0]["payload"]["epoch"]
    assert [rc.fcall(function, 1, user, ride_request(f"r{n}")) for n in (1, 2, 3)] == [1, 2, 3]
    assert [(await phone.recv("ride_request"))["seq"] for _ in range(3)] == [1, 2, 3]
    phone.close()
    assert [rc.fcall(function, 1, user, ride_request(f"r{n}")) for n in (4, 5)] == [4, 5]
    assert rc.fcall(function, 1, user, json.dumps({**json.loads(ride_request("r5")), "id": "p-5"})) == 6
    assert rc.fcall(function, 1, user, json.dumps({**json.loads(ride_request("r5")), "id": "p-5"})) == 6  # dedupe
    back = await resume(second_gw, user, since=3, epoch=epoch, device="phone")
    clients.append(back)
    connected = (await back.recv("connected"))["payload"]
    assert (connected["recovered"], connected["epoch"], connected["seq"]) == (True, epoch, 6)
    replayed = await drain(back, "ride_request")
    assert [(m["seq"], m["payload"]["requestId"]) for m in replayed] == [(4, "r4"), (5, "r5"), (6, "r5")]
    assert rc.fcall(function, 1, user, ride_request("r7")) == 7
    assert (await back.recv("ride_request"))["seq"] == 7  # then live, through the other instance


async def test_the_python_publisher_for_cluster_records_for_users_on_every_shard(
        cluster: ClusterTopology, pair: list[GatewayProcess], prefix: str, clients: list[Client]) -> None:
    first_gw, second_gw = pair
    users = [cluster.key_on(primary) for primary in cluster.primaries()]
    devices = [await second_gw.connect(user, device_id="phone") for user in users]
    clients.extend(devices)
    publisher = Publisher.for_cluster(cluster.seed_url(), prefix=prefix)
    try:
        results = [await publisher.publish(user, "ride_request", {"requestId": user}, message_id=f"offer-{user}")
                   for user in users]
        again = await publisher.publish(users[0], "ride_request", {"requestId": users[0]},
                                        message_id=f"offer-{users[0]}")
    finally:
        await publisher._redis.aclose()
    assert [(r.seq, r.duplicate) for r in results] == [(1, False)] * 3
    assert (again.seq, again.duplicate) == (1, True)
    for device, result in zip(devices, results, strict=True):
        message = await device.recv("ride_request")
        assert (message["seq"], message["id"], message["payload"]) == (1, result.message_id,
                                                                       {"requestId": device.user_id})
    assert await devices[0].no_frame("ride_request", within=0.3)  # the duplicate was not sent again
    devices[1].close()
    back = await resume(first_gw, users[1], since=0, epoch=results[1].epoch or "", device="phone")
    clients.append(back)
    assert (await back.recv("connected"))["payload"]["recovered"] is True
    assert (await back.recv("ride_request"))["payload"] == {"requestId": users[1]}


async def test_receipts_reach_the_classic_event_channel_and_the_stream(
        cluster: ClusterTopology, pair: list[GatewayProcess], rc: redis.RedisCluster, prefix: str,
        clients: list[Client]) -> None:
    # A service subscribes (classic SUBSCRIBE) on any node, here a replica no instance was seeded with:
    # a classic PUBLISH in a cluster reaches every node.
    listener_node = cluster.replicas_of(cluster.primaries()[2])[0]
    pubsub = listener_node.client().pubsub()
    pubsub.subscribe(f"{prefix}:events:receipt")
    assert pubsub.get_message(timeout=1)["type"] == "subscribe"
    client = await pair[1].connect(unique(), user_type="rider")
    clients.append(client)
    message_id = unique("m")
    try:
        reply = await client.request({"type": "receipt", "payload": {"messageId": message_id}})
        assert reply["type"] == "ack"
        event = await eventually(lambda: pubsub.get_message(timeout=0.01), timeout=5)
    finally:
        pubsub.close()
    published = json.loads(event["data"])
    assert (published["type"], published["payload"], published["userId"]) == ("receipt", {"messageId": message_id},
                                                                               client.user_id)
    entries = rc.xrange(f"{prefix}:stream:receipt")
    streamed = [json.loads(fields[b"data"]) for _id, fields in entries]
    assert [e["payload"] for e in streamed if e["userId"] == client.user_id] == [{"messageId": message_id}]


async def test_with_event_shards_location_updates_go_to_sharded_channels_one_partition_per_driver(
        cluster: ClusterTopology, spawn: Callable[..., GatewayProcess], rc: redis.RedisCluster,
        clients: list[Client]) -> None:
    """EVENT_SHARDS=4: a service SSUBSCRIBEs the four `<prefix>:events:location_update:{n}` channels
    (redis-py's cluster pub/sub sends each to its slot's node) and gets every update, each driver's
    always on one partition (their order kept); nothing goes to the classic channel any more."""
    prefix = unique("gwevents")
    gateway = spawn(cluster, prefix, cluster.primaries()[0], {"EVENT_SHARDS": "4"})
    partitions = [f"{prefix}:events:location_update:{{{n}}}" for n in range(4)]
    assert len({cluster.primary_for_key(channel).port for channel in partitions}) > 1  # spread over shards
    sharded = rc.pubsub()
    sharded.ssubscribe(*partitions)
    classic = cluster.primaries()[1].client().pubsub()
    classic.subscribe(f"{prefix}:events:location_update")
    drivers = [await gateway.connect(unique("drv")) for _ in range(8)]
    clients.extend(drivers)
    try:
        for n, driver in enumerate(drivers * 2):
            reply = await driver.request({"type": "location_update", "payload": {
                "latitude": 12.9, "longitude": 77.6, "timestamp": n}})
            assert reply["type"] == "ack"
        seen: dict[str, set[str]] = {}  # driver -> the partitions its updates came on
        received = 0
        while received < 16:
            message = await eventually(lambda: sharded.get_sharded_message(timeout=0.01), timeout=5)
            if message["type"] == "smessage":
                received += 1
                seen.setdefault(json.loads(message["data"])["userId"], set()).add(message["channel"].decode())
        classic_messages = [m for m in iter(lambda: classic.get_message(timeout=0.2), None) if m["type"] == "message"]
    finally:
        sharded.close()
        classic.close()
    assert set(seen) == {driver.user_id for driver in drivers}
    assert all(len(channels) == 1 and channels <= set(partitions) for channels in seen.values()), seen
    assert classic_messages == []


async def test_event_shards_without_a_cluster_is_refused_at_start() -> None:
    with pytest.raises(ConfigError, match="EVENT_SHARDS needs REDIS_CLUSTER"):
        load_settings(env={"EVENT_SHARDS": "4", "JWT_SECRET": "x"})


async def test_an_instance_whose_redis_url_node_is_down_starts_from_redis_cluster_seeds(
        cluster: ClusterTopology, rc: redis.RedisCluster, prefix: str, clients: list[Client]) -> None:
    gateway = GatewayProcess("redis://127.0.0.1:1", prefix,
                             {**CLUSTER_ENV, "REDIS_CLUSTER_SEEDS": f"127.0.0.1:1,{cluster.primaries()[2].address}"})
    try:
        gateway.start()
        client = await gateway.connect(cluster.key_on(cluster.primaries()[0]))
        clients.append(client)
        rc.spublish(user_channel(prefix, client.user_id), notification("seeded"))
        assert (await client.recv("notification"))["payload"]["title"] == "seeded"
    finally:
        stop_all([gateway])


async def test_an_instance_seeded_with_a_replica_discovers_the_cluster(
        cluster: ClusterTopology, spawn: Callable[..., GatewayProcess], rc: redis.RedisCluster, prefix: str,
        clients: list[Client]) -> None:
    """REDIS_URL may name any one node, a replica too."""
    replica = cluster.replicas_of(cluster.primaries()[0])[0]
    gateway = spawn(cluster, prefix, replica)
    users = [cluster.key_on(primary) for primary in cluster.primaries()]
    devices = [await gateway.connect(user) for user in users]
    clients.extend(devices)
    for user, device in zip(users, devices, strict=True):
        channel = user_channel(prefix, user)
        await eventually(lambda c=channel: shard_subscribers(cluster.primary_for_key(c), c) == 1)
        assert rc.spublish(channel, notification("found")) == 1
        assert (await device.recv("notification"))["payload"]["title"] == "found"
    assert shard_channels(replica, prefix) == []  # nothing subscribed on the replica itself


# --- failover (each test its own cluster) -------------------------------------------------------


@pytest.fixture
def fresh_cluster() -> Iterator[ClusterTopology]:
    yield from started_cluster()


@pytest.fixture
def failover_pair(fresh_cluster: ClusterTopology) -> Iterator[list[GatewayProcess]]:
    """Two instances seeded with two different primaries; the tests fail over the third shard. The
    default INSTANCE_TTL: with 2 s an instance whose server key lives on the failed shard loses it
    during the ~2.5 s failover (it writes it back, and its presence, once the shard is back)."""
    prefix = unique("gwfailover")
    seeds = fresh_cluster.primaries()
    env = {"INSTANCE_TTL": "15"}
    gateways = [cluster_gateway(fresh_cluster, prefix, seed, env) for seed in seeds[:2]]
    try:
        yield start_all(*gateways)
    finally:
        stop_all(gateways)


class ClusterPublisher:
    """The Producer's publisher here: half of the records (by their number, so that a retry takes the
    same path) through `Publisher.for_cluster`, the others by a bare `FCALL <prefix>_publish` on
    redis-py's cluster client, as a service in any language would. A call is given up after 3 s;
    redis-py's cluster errors that are not RedisErrors (no node for the slot, ...) are raised as
    ConnectionError, so the Producer retries them with the same id like any outage.

    The bare FCALL names its node (the primary of the userId's slot, from the client's slot map):
    redis-py 8.1 otherwise finds the key of FCALL (a command with movable keys) by `COMMAND GETKEYS`
    on its default node, the seed, and once that node is dead every FCALL fails with a
    ConnectionError before it is routed and the slot map is never refreshed (only other commands,
    or a call with `target_nodes`, refresh it)."""

    def __init__(self, seed_url: str, prefix: str) -> None:
        self.publisher = Publisher.for_cluster(seed_url, prefix=prefix)
        self.raw = AsyncRedisCluster.from_url(seed_url, socket_connect_timeout=0.5, socket_timeout=1.0)
        self.function = Keys(prefix).function("publish")
        self.errors: dict[str, int] = {}
        self.last_error: dict[str, str] = {}

    async def publish(self, user: str, kind: str, payload: dict[str, Any], *, message_id: str) -> Any:
        path = "Publisher.for_cluster" if int(message_id.rsplit("-r", 1)[1]) // 3 % 2 == 0 else "bare FCALL"
        try:
            if path == "Publisher.for_cluster":
                return await asyncio.wait_for(self.publisher.publish(user, kind, payload, message_id=message_id), 3)
            body = json.dumps({"type": kind, "payload": payload, "id": message_id})
            await self.raw.initialize()  # the slot map (a no-op once read, until an error asks for it again)
            seq = await asyncio.wait_for(self.raw.execute_command(
                "FCALL", self.function, 1, user, body, target_nodes=self.raw.get_node_from_key(user)), 3)
            return SimpleNamespace(seq=int(seq))
        except (RedisClusterException, TimeoutError) as exc:
            self._count(path, exc)
            raise redis.exceptions.ConnectionError(f"{type(exc).__name__}: {exc}") from exc
        except redis.exceptions.RedisError as exc:
            self._count(path, exc)
            raise

    def _count(self, path: str, exc: BaseException) -> None:
        key = f"{path}: {type(exc).__name__}"
        self.errors[key] = self.errors.get(key, 0) + 1
        self.last_error[path] = f"{type(exc).__name__}: {exc}"

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.publisher._redis.aclose()
        with contextlib.suppress(Exception):
            await self.raw.aclose()


async def stop(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def all_delivered(producers: dict[str, Producer], devices: dict[str, list[Device]], timeout: float = 5) -> None:
    """Give the devices up to `timeout` to receive every acknowledged record (the test asserts after)."""
    def done() -> bool:
        return all(set(producers[user].acked) <= {ref for ref, _s, _a in d.got}
                   for user, pair in devices.items() for d in pair)

    with contextlib.suppress(AssertionError):
        await eventually(done, timeout=timeout)


def longest_silence(device: Device, start: float, end: float) -> float:
    """The longest time between two deliveries to the device within [start, end]."""
    times = [start] + [at for _ref, _seq, at in device.got if start <= at <= end] + [end]
    return max(b - a for a, b in itertools.pairwise(times))


@pytest.mark.parametrize("victim_index", [2, 0], ids=["not-a-seed", "the-seed-node"])
async def test_a_killed_primary_is_replaced_and_delivery_resumes_on_every_shard(
        fresh_cluster: ClusterTopology, failover_pair: list[GatewayProcess], victim_index: int) -> None:
    """Users on all three shards with a device on each instance, a producer per user recording every
    50 ms (POST /broadcast on either instance, Publisher.for_cluster, bare FCALL; retried with the same
    id until acknowledged); one shard's primary is killed: one nobody named (`not-a-seed`), or the node
    the first instance and both of the test's publishers were seeded with (`the-seed-node`: what was
    discovered must outlive the seed). Every record acknowledged with a seq
    reaches both devices once and in order (a new epoch on the failed shard at most); a device that
    was away resumes on the other instance: recovered on the intact shards, and on the failed one
    either recovered with everything or `recovered: false`."""
    cluster = fresh_cluster
    first_gw, second_gw = failover_pair
    prefix = first_gw.prefix
    primaries = cluster.primaries()
    victim = primaries[victim_index]  # the first instance was seeded with primaries[0], the second with [1]
    users = [cluster.key_on(primary) for primary in primaries]
    shard_of = {user: f"shard{n}" + (" (killed)" if n == victim_index else "") for n, user in enumerate(users)}
    failed = users[victim_index]
    devices = {user: [Device(await first_gw.connect(user, device_id="phone")),
                      Device(await second_gw.connect(user, device_id="tablet"))] for user in users}
    away = {user: await first_gw.connect(user, device_id="watch") for user in users}
    publisher = ClusterPublisher(cluster.seed_url(), prefix)
    producers = {user: Producer(user, [first_gw, second_gw, first_gw], publisher) for user in users}  # type: ignore[arg-type]
    collectors = [asyncio.create_task(d.collect()) for pair in devices.values() for d in pair]
    producing = [asyncio.create_task(p.run()) for p in producers.values()]
    away_state: dict[str, tuple[str, int, str]] = {}
    resumed: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    try:
        try:
            await asyncio.sleep(1.0)
            for user, watch in away.items():
                frame = await watch.recv("ride_request")
                epoch = next(f for f in watch.frames if f["type"] == "connected")["payload"]["epoch"]
                away_state[user] = (frame["payload"]["requestId"], int(frame["seq"]), epoch)
                watch.close()
            await asyncio.sleep(1.0)

            acked_before = {user: dict(p.acked) for user, p in producers.items()}
            killed_at = cluster.kill_primary(victim)
            promoted, promotion_s = await asyncio.to_thread(cluster.wait_for_promotion, victim, killed_at)
            promoted_at = killed_at + promotion_s

            def delivered_after_promotion(user: str, device: Device) -> bool:
                acked_late = {ref for ref, (_seq, at) in producers[user].acked.items() if at > promoted_at}
                return any(ref in acked_late for ref, _seq, _at in device.got)

            resumed_at = {}
            for user, pair in devices.items():
                arrived = []
                for name, device in zip(("phone on the first", "tablet on the second"), pair, strict=True):
                    try:
                        arrived.append(await first(lambda u=user, d=device: _true(delivered_after_promotion(u, d)), 10))
                    except AssertionError:
                        raise AssertionError(f"{shard_of[user]}, {name} instance: no record acknowledged after the "
                                             f"promotion delivered within 10 s ({len(device.got)} received, "
                                             f"{len(producers[user].acked)} acknowledged; producer errors "
                                             f"{publisher.errors}, last ones {publisher.last_error})") from None
                resumed_at[user] = max(arrived)
            for gateway in failover_pair:
                await eventually(gateway.ready, timeout=10)
            await asyncio.sleep(1.5)  # more records on the new primary
        finally:
            await stop(producing)
        ended_at = time.monotonic()
        await all_delivered(producers, devices)
        for user, (_ref, seq, epoch) in away_state.items():
            back = await resume(second_gw, user, since=seq, epoch=epoch, device="watch")
            connected = (await back.recv("connected"))["payload"]
            resumed[user] = (connected, await drain(back, "ride_request"))
            back.close()
    finally:
        await stop(collectors)
        await publisher.close()

    report = [f"\ncluster failover: {victim.address} killed; replica {promoted.address} promoted "
              f"{promotion_s:.2f} s after the kill (every node agreeing, state ok)"]
    for user in users:
        pair = devices[user]
        report.append(
            f"  {shard_of[user]}: first delivery of a record acknowledged after the promotion "
            f"{resumed_at[user] - killed_at:.2f} s after the kill ({resumed_at[user] - promoted_at:+.2f} s from the "
            f"promotion); longest silence on a device "
            f"{max(longest_silence(d, killed_at - 1, ended_at) for d in pair):.2f} s; "
            f"{len(producers[user].acked)} acknowledged ({len(acked_before[user])} before the kill); epochs seen "
            f"{[len(d.runs()) for d in pair]}; resume: recovered={resumed[user][0].get('recovered')}, "
            f"{len(resumed[user][1])} replayed")
    report.append(f"  producer errors by kind: {publisher.errors}; live-only (degraded) deliveries: "
                  f"{[d.degraded for pair in devices.values() for d in pair]}")
    print("\n".join(report))

    for user in users:
        acked = producers[user].acked
        for device in devices[user]:
            assert device.client.ws.close_code is None
            refs = {ref for ref, _seq, _at in device.got}
            missing = sorted(set(acked) - refs, key=lambda r: int(r[1:]))
            assert not missing, f"{shard_of[user]}: acknowledged but not delivered: {missing}"
            runs = device.runs()
            assert len(runs) <= (2 if user == failed else 1), (shard_of[user], runs)
            for run in runs:
                assert run == list(range(run[0], run[0] + len(run))), (shard_of[user], run)  # once each, in order
        assert resumed_at[user] - promoted_at < 5, shard_of[user]
        connected, replayed = resumed[user]
        away_ref, _seq, _epoch = away_state[user]
        expected = {ref for ref in acked if int(ref[1:]) > int(away_ref[1:])}
        if user != failed:
            assert connected["recovered"] is True, shard_of[user]
        if connected["recovered"]:
            assert expected <= {m["payload"]["requestId"] for m in replayed}, shard_of[user]
        else:
            assert replayed == []
    assert promotion_s < 10

    # Every gateway subscription of the failed shard is on the promoted primary now.
    for user in users:
        channel = user_channel(prefix, user)
        owner = cluster.primary_for_key(channel)
        assert shard_subscribers(owner, channel) == 2, shard_of[user]
    assert shard_channels(promoted, prefix) != []


async def test_a_manual_failover_moves_the_sharded_subscriptions_off_the_demoted_primary(
        fresh_cluster: ClusterTopology, failover_pair: list[GatewayProcess]) -> None:
    """CLUSTER FAILOVER on a replica demotes its primary while it is up: Redis unsubscribes the sharded
    subscribers of the moved slots (`sunsubscribe` pushes); the instances must subscribe again on the
    new primary and lose nothing the producer recorded meanwhile."""
    cluster = fresh_cluster
    first_gw, second_gw = failover_pair
    prefix = first_gw.prefix
    primaries = cluster.primaries()
    old_primary = primaries[2]
    replica = cluster.replicas_of(old_primary)[0]
    users = [cluster.key_on(primary) for primary in primaries]
    devices = {user: [Device(await first_gw.connect(user, device_id="phone")),
                      Device(await second_gw.connect(user, device_id="tablet"))] for user in users}
    publisher = ClusterPublisher(cluster.seed_url(), prefix)
    producers = {user: Producer(user, [first_gw, second_gw, first_gw], publisher) for user in users}  # type: ignore[arg-type]
    collectors = [asyncio.create_task(d.collect()) for pair in devices.values() for d in pair]
    producing = [asyncio.create_task(p.run()) for p in producers.values()]
    moved = user_channel(prefix, users[2])
    try:
        try:
            await eventually(lambda: shard_subscribers(old_primary, moved) == 2)
            await asyncio.sleep(0.5)
            replica.client().execute_command("CLUSTER", "FAILOVER")
            asked_at = time.monotonic()
            await first(lambda: _true("master" in cluster.role_of(replica)), 10)
            switched_at = time.monotonic()
            left_at = await first(lambda: _true(not shard_channels(old_primary, prefix)), 10)
            on_new_at = await first(lambda: _true(shard_subscribers(replica, moved) == 2), 10)
            await asyncio.sleep(1.5)
        finally:
            await stop(producing)
        await all_delivered(producers, devices)
    finally:
        await stop(collectors)
        await publisher.close()
    print(f"\nCLUSTER FAILOVER: replica primary {switched_at - asked_at:.2f} s after it was asked; no gateway "
          f"channel left on the old primary {left_at - switched_at:+.2f} s after the switch, both instances "
          f"subscribed on the new one {on_new_at - switched_at:+.2f} s after it; epochs seen on the moved shard "
          f"{[len(d.runs()) for d in devices[users[2]]]}; producer errors {publisher.errors}")
    for user in users:
        for device in devices[user]:
            assert device.client.ws.close_code is None
            missing = sorted(set(producers[user].acked) - {ref for ref, _s, _a in device.got},
                             key=lambda r: int(r[1:]))
            assert not missing, f"{user}: acknowledged but not delivered: {missing}"
            for run in device.runs():
                assert run == list(range(run[0], run[0] + len(run))), run
    assert shard_channels(old_primary, prefix) == []
    assert classic_channels(old_primary, prefix) == []


async def _true(value: bool) -> bool:
    return value


# --- resharding ---------------------------------------------------------------------------------


def migrate_slot(cluster: ClusterTopology, slot: int, source: Node, target: Node) -> None:
    """What `redis-cli --cluster reshard` does for one slot: IMPORTING/MIGRATING, MIGRATE its keys,
    then SETSLOT NODE on every primary."""
    source_client, target_client = source.client(), target.client()
    target_client.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", cluster.node_id(source))
    source_client.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", cluster.node_id(target))
    while keys := source_client.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
        source_client.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
    for primary in cluster.primaries():
        primary.client().execute_command("CLUSTER SETSLOT", slot, "NODE", cluster.node_id(target))


async def test_a_users_slot_moved_by_a_resharding_keeps_delivering_in_order_on_both_instances(
        fresh_cluster: ClusterTopology, spawn: Callable[..., GatewayProcess], clients: list[Client]) -> None:
    """A slot moves to another primary while the user has a device on each instance and records keep
    coming: Redis drops the sharded subscriptions there (`sunsubscribe`), both instances subscribe on
    the new owner, the history moves with the slot (same epoch, numbering goes on), nothing is lost."""
    cluster = fresh_cluster
    prefix = unique("gwreshard")
    seeds = cluster.primaries()
    first_gw, second_gw = (spawn(cluster, prefix, seed) for seed in seeds[:2])
    source = seeds[2]
    target = seeds[0]
    user = cluster.key_on(source)
    channel = user_channel(prefix, user)
    devices = [await first_gw.connect(user, device_id="phone"), await second_gw.connect(user, device_id="tablet")]
    clients.extend(devices)
    epoch = devices[0].frames[0]["payload"]["epoch"]
    publisher = Publisher.for_cluster(cluster.seed_url(), prefix=prefix)
    try:
        seqs = [(await publisher.publish(user, "ride_request", {"requestId": f"r{n}"})).seq for n in range(1, 4)]
        migrate_slot(cluster, cluster.client().keyslot(user), source, target)
        await eventually(lambda: shard_subscribers(target, channel) == 2, timeout=5)
        seqs += [(await publisher.publish(user, "ride_request", {"requestId": f"r{n}"})).seq for n in range(4, 7)]
    finally:
        await publisher.aclose()
    assert seqs == [1, 2, 3, 4, 5, 6]
    for device in devices:
        frames = [await device.recv("ride_request") for _ in range(6)]
        assert [(f["seq"], f["payload"]["requestId"]) for f in frames] == [(n, f"r{n}") for n in range(1, 7)]
    assert shard_subscribers(source, channel) == 0
    back = await resume(second_gw, user, since=2, epoch=epoch, device="watch")
    clients.append(back)
    connected = (await back.recv("connected"))["payload"]
    assert (connected["recovered"], connected["epoch"]) == (True, epoch)
    assert [m["seq"] for m in await drain(back, "ride_request")] == [3, 4, 5, 6]


async def test_commands_for_a_slot_being_migrated_follow_ask_to_the_importing_node(cluster: ClusterTopology) -> None:
    """Mid-migration the old owner answers ASK for a key it no longer has: the client sends ASKING
    and the command to the importing node, without changing its map (the slot is still the old one's)."""
    endpoint = ClusterEndpoint(cluster.seed_url())
    await endpoint.start()
    commands = ClusterClient(endpoint)
    source, target = cluster.primaries()[0], cluster.primaries()[1]
    key = f"ask-test:{{{cluster.key_on(source)}}}"
    slot = key_slot(key.encode())
    source_client, target_client = source.client(), target.client()
    try:
        assert await commands.call("SET", key, "before") == b"OK"
        target_client.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", cluster.node_id(source))
        source_client.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", cluster.node_id(target))
        source_client.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", key)
        assert await commands.call("GET", key) == b"before"
        assert await commands.call("SET", key, "during") == b"OK"
        assert endpoint.owner(slot) == ("127.0.0.1", source.port)  # ASK changes no map
    finally:
        for primary in cluster.primaries():  # finish the migration: the slot is the target's
            primary.client().execute_command("CLUSTER SETSLOT", slot, "NODE", cluster.node_id(target))
        await commands.close()
        await endpoint.stop()
    assert target_client.get(key) == b"during"


class CountingListener:
    def __init__(self) -> None:
        self.reconnects = 0
        self.messages: list[tuple[str, bytes]] = []

    def on_user_message(self, user_id: str, data: bytes) -> None:
        self.messages.append((user_id, data))

    def on_control(self, data: bytes) -> None:
        pass

    def on_bus_reconnected(self) -> None:
        self.reconnects += 1


async def test_a_user_leaving_and_coming_back_at_once_is_not_taken_for_a_moved_slot(cluster: ClusterTopology) -> None:
    """Our own SUNSUBSCRIBE's reply, read after the channel is wanted again, is not Redis dropping
    the slot: no re-placement, no resync of every user, and the channel still delivers."""
    prefix = unique("gwflap")
    endpoint = ClusterEndpoint(cluster.seed_url())
    await endpoint.start()
    keys = Keys(prefix, cluster=True)
    bus = ClusterBus(ClusterClient(endpoint), endpoint, keys, unique("gw"), Metrics("", 0, "x"), stream_maxlen=100,
                     probe=Probe(0, 1))
    listener = CountingListener()
    await bus.start(listener)
    try:
        await bus.subscribe_user("u1")
        for _ in range(3):
            bus.unsubscribe_user("u1")
            await bus.subscribe_user("u1")
        await asyncio.sleep(1.0)
        cluster.client().spublish(keys.user_channel("u1"), "hello")
        await eventually(lambda: listener.messages, timeout=3)
        assert (listener.reconnects, listener.messages, bus.ready) == (0, [("u1", b"hello")], True)
    finally:
        await bus.stop()
        await endpoint.stop()
