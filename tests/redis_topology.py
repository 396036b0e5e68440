"""Redis topologies started from the installed binaries on free ports, stopped by pid.

A primary, a replica and three sentinels for the Sentinel tests (issue #11); three primaries and
three replicas for the Redis Cluster tests. Nothing is persisted: each node gets a scratch directory
(sentinels rewrite their config file, cluster nodes their nodes.conf), removed on stop.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from scripts.loadgen import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli")
CLUSTER_BUS_OFFSET = 10000  # Redis Cluster's default: the node-to-node bus listens on port + 10000
MASTER_NAME = "gwmaster"


class Node:
    """One redis-server (or sentinel) process owned by the test."""

    def __init__(self, args: list[str], *, port: int | None = None, config: str | None = None) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="redis-topology-"))
        self.config = config
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Node:
        command = [REDIS_SERVER]
        if self.config is not None:  # sentinel: needs a writable config file
            path = self.dir / "sentinel.conf"
            path.write_text(self.config)
            command += [str(path), "--sentinel"]
        command += ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), *self.args]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.client(timeout=0.2).ping():
                    return self
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis on {self.port} did not start")

    def client(self, timeout: float = 2.0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=timeout, socket_timeout=timeout)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed, every connection reset."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def role(self) -> str:
        reply = self.client().execute_command("ROLE")
        return str(reply[0].decode() if isinstance(reply[0], bytes) else reply[0])


class SentinelTopology:
    """A primary, one replica (`--replicaof`) and three sentinels (quorum 2) watching them.

    `down_after_ms` and `failover_timeout_ms` are small so that a killed primary is replaced in
    about two seconds instead of Sentinel's default 30 s + 3 min."""

    def __init__(self, *, sentinels: int = 3, quorum: int = 2, down_after_ms: int = 1000,
                 failover_timeout_ms: int = 3000) -> None:
        no_disk = ["--save", "", "--appendonly", "no"]
        self._ports: set[int] = set()
        self.primary = Node(no_disk, port=self._port())
        self.replica = Node([*no_disk, "--replicaof", "127.0.0.1", str(self.primary.port)], port=self._port())
        config = (f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.primary.port} {quorum}\n"
                  f"sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}\n"
                  f"sentinel failover-timeout {MASTER_NAME} {failover_timeout_ms}\n"
                  f"sentinel parallel-syncs {MASTER_NAME} 1\n")
        self.sentinels = [Node([], port=self._port(), config=config) for _ in range(sentinels)]
        self.data_nodes = [self.primary, self.replica]

    def _port(self) -> int:
        """A free port no other node of this topology took (none is bound before start)."""
        port = free_port()
        while port in self._ports:
            port = free_port()
        self._ports.add(port)
        return port

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
    """Redis Cluster: three primaries and one replica each, created with `redis-cli --cluster create`.

    `node_timeout_ms` 1000 and `cluster-replica-validity-factor 0` (a replica may always stand for
    election, however long its link was down) make a killed primary replaced in about two seconds.
    `require_full_coverage` is Redis's default (yes): while a shard has no primary, every node
    answers CLUSTERDOWN, the other shards included, until the promotion. Ports are below 22768, so
    each cluster bus port (port + 10000) is free too and stays below the ephemeral range (32768+)
    where an outgoing connection could take it."""

    def __init__(self, *, primaries: int = 3, replicas_per_primary: int = 1, node_timeout_ms: int = 1000,
                 require_full_coverage: bool = True) -> None:
        self._ports: set[int] = set()
        self.node_timeout_ms = node_timeout_ms
        self.replicas_per_primary = replicas_per_primary
        args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",  # relative to --dir
                "--cluster-node-timeout", str(node_timeout_ms), "--cluster-replica-validity-factor", "0",
                "--cluster-require-full-coverage", "yes" if require_full_coverage else "no",
                "--appendonly", "no", "--save", "",
                "--repl-diskless-sync-delay", "0"]  # a replica's first sync at once, not after 5 s
        count = primaries * (1 + replicas_per_primary)
        self.nodes = [Node(args, port=self._port()) for _ in range(count)]
        self.ids: dict[str, Node] = {}  # node id -> Node
        self.startup_seconds = 0.0

    def _port(self) -> int:
        """A free port below 22768 whose bus port is free too, not taken by another node of this cluster."""
        while True:
            port = free_port()
            if port + CLUSTER_BUS_OFFSET >= 32768 or port in self._ports or port + CLUSTER_BUS_OFFSET in self._ports:
                continue
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port + CLUSTER_BUS_OFFSET))
                except OSError:
                    continue
            self._ports.update((port, port + CLUSTER_BUS_OFFSET))
            return port

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> ClusterTopology:
        if REDIS_CLI is None:
            raise RuntimeError("redis-cli is not installed: it creates the cluster")
        started = time.monotonic()
        try:
            for node in self.nodes:
                node.start()
            create = subprocess.run(
                [REDIS_CLI, "--cluster", "create", *(node.address for node in self.nodes),
                 "--cluster-replicas", str(self.replicas_per_primary), "--cluster-yes"],
                capture_output=True, timeout=60)
            if create.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{create.stdout.decode(errors='replace')}"
                                   f"{create.stderr.decode(errors='replace')}")
            self.ids = {node.client().execute_command("CLUSTER", "MYID").decode(): node for node in self.nodes}
            self.wait_until(self.settled, 30, "the cluster did not settle (state ok, slots and replicas agreed)")
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
            node.remove()

    def seed_url(self) -> str:
        """redis://<one primary>: what REDIS_URL names in cluster mode (any one node will do)."""
        return f"redis://{self.primaries()[0].address}"

    # --- who holds what -------------------------------------------------------------------------

    def live(self) -> list[Node]:
        return [node for node in self.nodes if node.proc is not None and node.proc.poll() is None]

    def cluster_nodes(self, via: Node | None = None) -> list[dict[str, object]]:
        """CLUSTER NODES as one node sees it: id, port, flags, master id (None for a primary), slots."""
        node = via or self.live()[0]
        text = node.client().execute_command("CLUSTER", "NODES")
        rows: list[dict[str, object]] = []
        for line in (text.decode() if isinstance(text, bytes) else str(text)).splitlines():
            fields = line.split()
            slots: list[tuple[int, int]] = []
            for item in fields[8:]:
                if item.startswith("["):  # a slot being migrated
                    continue
                low, _, high = item.partition("-")
                slots.append((int(low), int(high or low)))
            rows.append({"id": fields[0], "port": int(fields[1].split("@")[0].rsplit(":", 1)[1]),
                         "flags": set(fields[2].split(",")), "master": None if fields[3] == "-" else fields[3],
                         "connected": fields[7] == "connected", "slots": slots})
        return rows

    def slot_map(self, via: Node | None = None) -> dict[tuple[int, int], int]:
        """Slot range -> port of the primary serving it, as `via` sees it."""
        return {rng: int(row["port"])  # type: ignore[call-overload]
                for row in self.cluster_nodes(via) if "master" in row["flags"] and "fail" not in row["flags"]
                for rng in row["slots"]}  # type: ignore[attr-defined]

    def node_at(self, port: int) -> Node:
        return next(node for node in self.nodes if node.port == port)

    def primaries(self) -> list[Node]:
        """The live primaries serving slots, in slot order (the first one serves slot 0)."""
        by_range = sorted(self.slot_map().items())
        ports = list(dict.fromkeys(port for _rng, port in by_range))
        return [self.node_at(port) for port in ports]

    def replicas_of(self, primary: Node) -> list[Node]:
        primary_id = self.node_id(primary)
        return [self.node_at(int(row["port"])) for row in self.cluster_nodes()  # type: ignore[call-overload]
                if row["master"] == primary_id and "fail" not in row["flags"]]  # type: ignore[operator]

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
        replica_ids = {node_id for node_id, node in self.ids.items()
                       if any(row["id"] == node_id and row["master"] == killed_id
                              for row in self.cluster_nodes(self.live()[0]))}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                views = [self.cluster_nodes(node) for node in self.live()]
                states = [self._info(node)["cluster_state"] for node in self.live()]
            except redis.exceptions.RedisError:
                time.sleep(0.02)
                continue
            promoted = {row["id"] for view in views for row in view
                        if row["id"] in replica_ids and "master" in row["flags"] and row["slots"]}  # type: ignore[operator]
            if len(promoted) == 1 and all(s == "ok" for s in states) and self._views_agree(views):
                node = self.ids[str(promoted.pop())]
                return node, time.monotonic() - killed_at
            time.sleep(0.02)
        raise RuntimeError(f"no replica of {killed.address} was promoted within {timeout} s")

    def restart(self, node: Node) -> None:
        """Start a killed node again: with its nodes.conf it rejoins, as a replica of its successor."""
        node.start()
        self.wait_until(self.settled, 30, f"{node.address} did not rejoin")

    # --- settling -------------------------------------------------------------------------------

    def role_of(self, node: Node) -> set[str]:
        me = next(row for row in self.cluster_nodes(node) if "myself" in row["flags"])  # type: ignore[operator]
        return me["flags"]  # type: ignore[return-value]

    @staticmethod
    def _info(node: Node) -> dict[str, str]:
        text = node.client().execute_command("CLUSTER", "INFO")
        lines = (text.decode() if isinstance(text, bytes) else str(text)).splitlines()
        return dict(line.split(":", 1) for line in lines if ":" in line)

    @staticmethod
    def _views_agree(views: list[list[dict[str, object]]]) -> bool:
        """Every view has the same primaries with the same slots, all 16384 covered, no node flagged."""
        shapes = []
        for view in views:
            shape = sorted((str(row["id"]), tuple(row["slots"]))  # type: ignore[call-overload]
                           for row in view if "master" in row["flags"] and row["slots"])  # type: ignore[operator]
            covered = sum(high - low + 1 for _id, slots in shape for low, high in slots)
            if covered != 16384:
                return False
            shapes.append(shape)
        return all(shape == shapes[0] for shape in shapes)

    def settled(self) -> bool:
        """state ok on every live node, the same slot table everywhere, every node known and connected
        (no `fail`/`pfail`/`handshake`), and every replica in sync with its primary."""
        live = self.live()
        try:
            for node in live:
                if self._info(node).get("cluster_state") != "ok":
                    return False
            views = [self.cluster_nodes(node) for node in live]
            for view in views:
                alive = [row for row in view if int(row["port"]) in {n.port for n in live}]  # type: ignore[call-overload]
                if len(alive) != len(live):
                    return False
                for row in alive:
                    if row["flags"] & {"fail", "fail?", "handshake", "noaddr"} or not row["connected"]:  # type: ignore[operator]
                        return False
            if not self._views_agree(views):
                return False
            for node in live:
                info = node.client().info("replication")
                if info.get("role") == "slave" and info.get("master_link_status") != "up":
                    return False
        except redis.exceptions.RedisError:
            return False
        return True

    @staticmethod
    def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
        SentinelTopology.wait_until(check, timeout, what)
