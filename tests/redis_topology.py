"""Redis topologies started from the installed binaries on free ports, stopped by pid.

A primary, a replica and three sentinels for the Sentinel tests (issue #11); three primaries and
three replicas for the Redis Cluster tests. Nothing is persisted: each node gets a scratch directory
(sentinels rewrite their config file, cluster nodes their nodes.conf), removed on stop. Nodes are
scripts/local_cluster.py's `Node`, and the cluster is its `LocalCluster` (start, create, settle): the
benchmarks and the tests start Redis the same way.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from scripts.local_cluster import LocalCluster, Node, NodeRow, cluster_nodes, cluster_port, slot_tables_agree

REDIS_CLI = shutil.which("redis-cli")
MASTER_NAME = "gwmaster"
NO_DISK = ("--save", "", "--appendonly", "no")

__all__ = ["MASTER_NAME", "REDIS_CLI", "ClusterTopology", "Node", "SentinelTopology"]


def scratch_node(port: int, *args: str, config: str | None = None) -> Node:
    """A Node in a scratch directory of its own (removed on stop), with a sentinel's config file
    written there if given: a sentinel rewrites it, so it must be writable and not shared."""
    directory = Path(tempfile.mkdtemp(prefix="redis-topology-"))
    config_file = None
    if config is not None:
        config_file = directory / "sentinel.conf"
        config_file.write_text(config)
    return Node(port, directory, args, config_file)


class SentinelTopology:
    """A primary, one replica (`--replicaof`) and three sentinels (quorum 2) watching them.

    `down_after_ms` and `failover_timeout_ms` are small so that a killed primary is replaced in
    about two seconds instead of Sentinel's default 30 s + 3 min."""

    def __init__(self, *, sentinels: int = 3, quorum: int = 2, down_after_ms: int = 1000,
                 failover_timeout_ms: int = 3000) -> None:
        self._ports: set[int] = set()
        self.primary = self._node(*NO_DISK)
        self.replica = self._node(*NO_DISK, "--replicaof", "127.0.0.1", str(self.primary.port))
        config = (f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.primary.port} {quorum}\n"
                  f"sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}\n"
                  f"sentinel failover-timeout {MASTER_NAME} {failover_timeout_ms}\n"
                  f"sentinel parallel-syncs {MASTER_NAME} 1\n")
        self.sentinels = [self._node("--sentinel", config=config) for _ in range(sentinels)]
        self.data_nodes = [self.primary, self.replica]

    def _node(self, *args: str, config: str | None = None) -> Node:
        """A node on a free port no other node of this topology took (none is bound before start)."""
        return scratch_node(cluster_port(self._ports), *args, config=config)

    @property
    def sentinel_addresses(self) -> str:
        return ",".join(s.address for s in self.sentinels)

    def start(self) -> SentinelTopology:
        self.primary.start()
        self.replica.start()
        for sentinel in self.sentinels:
            sentinel.start()
        self.wait_until(lambda: self.replica_in_sync(self.replica), 10, "the replica did not sync")
        self.wait_until(self.sentinels_agree, 15, "the sentinels did not discover each other and the replica")
        return self

    def stop(self) -> None:
        for node in [*self.sentinels, *self.data_nodes]:
            node.stop()
            node.remove()

    def master_address(self, sentinel: Node | None = None) -> tuple[str, int]:
        host, port = (sentinel or self.sentinels[0]).client().sentinel_get_master_addr_by_name(MASTER_NAME)
        return str(host.decode() if isinstance(host, bytes) else host), int(port)

    def node_at(self, port: int) -> Node:
        return next(node for node in self.data_nodes if node.port == port)

    def sentinels_agree(self) -> bool:
        """Each sentinel knows the other two and the replica: a failover can be decided."""
        try:
            for sentinel in self.sentinels:
                state = sentinel.client().sentinel_master(MASTER_NAME)
                if int(state["num-other-sentinels"]) < len(self.sentinels) - 1 or int(state["num-slaves"]) < 1:
                    return False
        except redis.exceptions.RedisError:
            return False
        return True

    @staticmethod
    def replica_in_sync(node: Node) -> bool:
        try:
            info = node.client().info("replication")
        except redis.exceptions.RedisError:
            return False
        return info.get("role") == "slave" and info.get("master_link_status") == "up"

    @staticmethod
    def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.05)
        raise RuntimeError(what)


class ClusterTopology:
    """Redis Cluster: three primaries and one replica each, a scripts/local_cluster.LocalCluster.

    `node_timeout_ms` 1000 and `cluster-replica-validity-factor 0` (a replica may always stand for
    election, however long its link was down) make a killed primary replaced in about two seconds.
    `require_full_coverage` is Redis's default (yes): while a shard has no primary, every node
    answers CLUSTERDOWN, the other shards included, until the promotion. LocalCluster picks ports
    below 22768, so each cluster bus port (port + 10000) is free too and stays below the ephemeral
    range (32768+) where an outgoing connection could take it. What this class adds is for the
    tests: node ids, the live slot map (it changes on a failover), kill/restart and redis-py clients."""

    def __init__(self, *, primaries: int = 3, replicas_per_primary: int = 1, node_timeout_ms: int = 1000,
                 require_full_coverage: bool = True) -> None:
        self.node_timeout_ms = node_timeout_ms
        self.replicas_per_primary = replicas_per_primary
        self.local = LocalCluster(primaries, replicas_per_primary, node_timeout_ms, extra_args=(
            "--cluster-replica-validity-factor", "0",
            "--cluster-require-full-coverage", "yes" if require_full_coverage else "no"),
            replicas_in_slot_map=False)  # replicas_of() reads CLUSTER NODES: no need to wait ~10 s more
        self.ids: dict[str, Node] = {}  # node id -> Node
        self.startup_seconds = 0.0

    @property
    def nodes(self) -> list[Node]:
        return self.local.nodes

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> ClusterTopology:
        if REDIS_CLI is None:
            raise RuntimeError("redis-cli is not installed: it creates the cluster")
        self.local.start()
        try:
            self.ids = {self._my_id(node): node for node in self.nodes}
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = self.local.startup_s
        return self

    def stop(self) -> None:
        self.local.stop()

    def seed_url(self) -> str:
        """redis://<one primary>: what REDIS_URL names in cluster mode (any one node will do)."""
        return f"redis://{self.primaries()[0].address}"

    # --- who holds what -------------------------------------------------------------------------

    def live(self) -> list[Node]:
        return self.local.live()

    def cluster_nodes(self, via: Node | None = None) -> list[NodeRow]:
        """CLUSTER NODES as one node sees it (the first live one unless told)."""
        return cluster_nodes(via or self.live()[0])

    def slot_map(self, via: Node | None = None) -> dict[tuple[int, int], int]:
        """Slot range -> port of the primary serving it, as `via` sees it now (not LocalCluster's
        map, read once at start: a failover or a migration changes it)."""
        return {rng: row.port for row in self.cluster_nodes(via)
                if "master" in row.flags and "fail" not in row.flags for rng in row.slots}

    def node_at(self, port: int) -> Node:
        return self.local.node_at(port)

    def primaries(self) -> list[Node]:
        """The live primaries serving slots, in slot order (the first one serves slot 0)."""
        by_range = sorted(self.slot_map().items())
        ports = list(dict.fromkeys(port for _rng, port in by_range))
        return [self.node_at(port) for port in ports]

    def replicas_of(self, primary: Node) -> list[Node]:
        primary_id = self.node_id(primary)
        return [self.node_at(row.port) for row in self.cluster_nodes()
                if row.master == primary_id and "fail" not in row.flags]

    def node_id(self, node: Node) -> str:
        return next(node_id for node_id, known in self.ids.items() if known is node)

    def primary_for_slot(self, slot: int) -> Node:
        for (low, high), port in self.slot_map().items():
            if low <= slot <= high:
                return self.node_at(port)
        raise LookupError(f"no primary serves slot {slot}")

    def primary_for_key(self, key: str) -> Node:
        return self.primary_for_slot(key_slot(key.encode()))

    def key_on(self, primary: Node, prefix: str = "u") -> str:
        """A new id (`<prefix>-<hex>`) whose slot the given primary serves: a userId on that shard."""
        ranges = [rng for rng, port in self.slot_map().items() if port == primary.port]
        while True:
            candidate = f"{prefix}-{uuid.uuid4().hex[:10]}"
            slot = key_slot(candidate.encode())
            if any(low <= slot <= high for low, high in ranges):
                return candidate

    def client(self, **options: object) -> RedisCluster:
        """A redis-py cluster client that may start from any live node (it discovers the rest)."""
        startup = [ClusterNode("127.0.0.1", node.port) for node in self.live()]
        options.setdefault("socket_connect_timeout", 1.0)
        options.setdefault("socket_timeout", 2.0)
        return RedisCluster(startup_nodes=startup, **options)  # type: ignore[arg-type]

    # --- faults ---------------------------------------------------------------------------------

    def kill_primary(self, node: Node) -> float:
        """SIGKILL a primary; returns the monotonic time of the kill (for wait_for_promotion)."""
        assert "master" in self.role_of(node), f"{node.address} is not a primary"
        node.kill()
        return time.monotonic()

    def wait_for_promotion(self, killed: Node, killed_at: float, timeout: float = 20) -> tuple[Node, float]:
        """Wait until a replica of the killed primary serves its slots and every live node agrees,
        with state ok everywhere. Returns the promoted node and the seconds since the kill."""
        killed_id = self.node_id(killed)
        replica_ids = {row.id for row in self.cluster_nodes() if row.master == killed_id and row.id in self.ids}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                views = [self.cluster_nodes(node) for node in self.live()]
                states = [node.info("CLUSTER", "INFO").get("cluster_state") for node in self.live()]
            except (OSError, RuntimeError):
                time.sleep(0.02)
                continue
            promoted = {row.id for view in views for row in view
                        if row.id in replica_ids and "master" in row.flags and row.slots}
            if len(promoted) == 1 and all(s == "ok" for s in states) and slot_tables_agree(views):
                return self.ids[promoted.pop()], time.monotonic() - killed_at
            time.sleep(0.02)
        raise RuntimeError(f"no replica of {killed.address} was promoted within {timeout} s")

    def restart(self, node: Node) -> None:
        """Start a killed node again: with its nodes.conf it rejoins, as a replica of its successor."""
        node.start()
        self.local.wait_settled(30, f"{node.address} did not rejoin")

    # --- settling -------------------------------------------------------------------------------

    def role_of(self, node: Node) -> set[str]:
        """The flags `node` gives itself in CLUSTER NODES (`master` or `slave`, with `myself`)."""
        return set(next(row for row in self.cluster_nodes(node) if "myself" in row.flags).flags)

    def settled(self) -> bool:
        """LocalCluster's settle check, over the live nodes (see LocalCluster.unsettled)."""
        return not self.local.unsettled()

    @staticmethod
    def _my_id(node: Node) -> str:
        reply = node.call("CLUSTER", "MYID")
        return reply.decode() if isinstance(reply, bytes) else str(reply)
