"""A local Redis Cluster for benchmarks: N primaries (and optionally replicas) of the installed redis-server.

Every node listens on 127.0.0.1 on a free port below 22768, so that its cluster bus port (port + 10000)
is below the ephemeral range (32768+) too and no outgoing connection can take it; both are checked free
before a node starts. Nothing is persisted (`--save ""`, no AOF); each node has a scratch directory for
its nodes.conf and log, removed on stop. The cluster is created with `redis-cli --cluster create ...
--cluster-yes` and is ready when every node says `cluster_state:ok` and every node sees the same slot
table. Nodes are stopped by their own pid (SIGTERM, then SIGKILL); nothing else is touched, the shared
Redis on 127.0.0.1:6379 least of all. The test topologies (tests/redis_topology.py) build on `Node` and
`LocalCluster`, so that starting nodes, creating the cluster and waiting for it to settle exist once.

    with LocalCluster(primaries=3) as cluster:
        cluster.seed_url                  # redis://127.0.0.1:<port>: REDIS_URL for REDIS_CLUSTER=true
        cluster.pids, cluster.ports       # every node's, in start order
        cluster.primary_for_slot(0)       # the Node serving slot 0
        cluster.primary_for_key("u1")     # ... and the one serving key_slot(b"u1")

    python scripts/local_cluster.py --primaries 3 --replicas 0    # start one, print it, stop on Ctrl-C
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import redis
from redis.crc import key_slot

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.loadgen import (  # noqa: E402 - needs ROOT on sys.path when run as a file
    ClusterMap,
    free_port,
    read_cluster_map,
    redis_call,
    stop_process,
)

CLUSTER_BUS_OFFSET = 10000  # Redis Cluster's default: the node-to-node bus listens on port + 10000
EPHEMERAL_START = 32768  # net.ipv4.ip_local_port_range starts here (the Linux default)
SHARED_REDIS_PORT = 6379  # never ours (free_port's range excludes it; checked all the same)
START_ATTEMPTS = 5  # a port found free may be taken by someone else before the node binds it
SLOT_COUNT = 16384
UNHEALTHY_FLAGS = frozenset({"fail", "fail?", "handshake", "noaddr"})  # a CLUSTER NODES row not settled yet
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


@dataclass
class Node:
    """One redis-server process (a cluster node, a standalone server or a sentinel), owned by this process.

    It is started, killed and stopped by its own pid only, and keeps its port, directory and options, so
    that a killed node can be started again as the same node (a cluster node rejoins from its nodes.conf)."""

    port: int
    dir: Path
    args: tuple[str, ...] = ()  # appended to the common options: the role of the node
    config_file: Path | None = None  # first on the command line: a sentinel needs a writable one
    redis_server: str = REDIS_SERVER
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.address} is not running")
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exited(self) -> bool:
        """Started and gone without being stopped or killed here (kill() and stop() forget the process)."""
        return self.proc is not None and self.proc.poll() is not None

    def command(self) -> list[str]:
        config = [] if self.config_file is None else [str(self.config_file)]
        return [self.redis_server, *config, "--port", str(self.port), "--bind", "127.0.0.1", "--daemonize", "no",
                "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log"), *self.args]

    def launch(self, timeout_s: float = 10.0) -> bool:
        """Start the process and wait for its PONG. False, with the process stopped, if it never answers:
        most likely its port was taken meanwhile, and the caller may try another one."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if self._answers_ping(time.monotonic() + timeout_s):
            return True
        self.stop(5)
        return False

    def start(self, timeout_s: float = 10.0) -> Node:
        """launch(), or an error with the log: for a node that must come up on its own port (a restart)."""
        if not self.launch(timeout_s):
            raise RuntimeError(f"redis on {self.port} did not start; its log:\n{self.log_tail()}")
        return self

    def _answers_ping(self, deadline: float) -> bool:
        while time.monotonic() < deadline and self.running():
            try:
                if self.call("PING", timeout_s=0.5) == b"PONG":
                    return True
            except (OSError, RuntimeError):
                pass
            time.sleep(0.05)
        return False

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed, every connection reset."""
        if self.proc is not None:
            stop_process(self.proc, 10, graceful=signal.SIGKILL)
        self.proc = None

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit within the timeout."""
        if self.proc is not None:
            stop_process(self.proc, timeout_s)
        self.proc = None

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def call(self, *args: str | bytes | int, timeout_s: float = 2.0) -> object:
        return redis_call("127.0.0.1", self.port, *args, timeout_s=timeout_s)

    def info(self, command: str = "INFO", section: str = "server") -> dict[str, str]:
        """`INFO <section>` (or `CLUSTER INFO` with command="CLUSTER", section="INFO") as a dict."""
        reply = self.call(command, section)
        text = reply.decode() if isinstance(reply, bytes) else str(reply)
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def client(self, timeout: float = 2.0) -> redis.Redis:
        """A redis-py client of this node alone (the tests' way to talk to it)."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=timeout, socket_timeout=timeout)

    def role(self) -> str:
        """ROLE's first word: master, slave or sentinel."""
        reply = self.call("ROLE")
        first = reply[0] if isinstance(reply, list) else reply
        return first.decode() if isinstance(first, bytes) else str(first)

    def log_tail(self, chars: int = 2000) -> str:
        path = self.dir / "redis.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


@dataclass(frozen=True)
class NodeRow:
    """One line of `CLUSTER NODES`: how one node sees another (or itself, flag `myself`)."""

    id: str
    port: int
    flags: frozenset[str]
    master: str | None  # the primary's id for a replica, None for a primary
    connected: bool
    slots: tuple[tuple[int, int], ...]  # (first, last), migrating/importing markers left out


def cluster_nodes(node: Node) -> list[NodeRow]:
    """CLUSTER NODES as `node` sees it: unlike CLUSTER SLOTS it shows failing and joining nodes too."""
    reply = node.call("CLUSTER", "NODES")
    return [parse_node_row(line) for line in (reply.decode() if isinstance(reply, bytes) else str(reply)).splitlines()]


def parse_node_row(line: str) -> NodeRow:
    fields = line.split()
    ranges = [item.partition("-") for item in fields[8:] if not item.startswith("[")]  # "[": a slot being migrated
    slots = tuple((int(low), int(high or low)) for low, _, high in ranges)
    return NodeRow(id=fields[0], port=int(fields[1].split("@")[0].rsplit(":", 1)[1]),
                   flags=frozenset(fields[2].split(",")), master=None if fields[3] == "-" else fields[3],
                   connected=fields[7] == "connected", slots=slots)


def slot_tables_agree(views: list[list[NodeRow]]) -> bool:
    """Every view has the same primaries with the same slots, and all 16384 slots covered."""
    shapes = []
    for view in views:
        shape = sorted((row.id, row.slots) for row in view if "master" in row.flags and row.slots)
        if sum(high - low + 1 for _id, slots in shape for low, high in slots) != SLOT_COUNT:
            return False
        shapes.append(shape)
    return all(shape == shapes[0] for shape in shapes)


def replicas_agree(views: list[list[NodeRow]], live_ports: set[int]) -> bool:
    """Every view gives each live node the same role (primary, or replica of the same primary): a node
    that `redis-cli --cluster create` made a replica is not still taken for an empty primary somewhere."""
    roles = [sorted((row.id, row.master or "") for row in view if row.port in live_ports) for view in views]
    return all(role == roles[0] for role in roles)


def view_problem(node: Node, view: list[NodeRow], live_ports: set[int]) -> str:
    """Why `node`'s view is not settled: a live node it does not know, or knows as failing, joining or
    disconnected ("" if none). Rows of nodes that are down on purpose (killed) are left out."""
    rows = [row for row in view if row.port in live_ports]
    if len(rows) != len(live_ports):
        return f"{node.address} does not know every live node yet"
    for row in rows:
        if row.flags & UNHEALTHY_FLAGS or not row.connected:
            return f"{node.address} sees 127.0.0.1:{row.port} as {','.join(sorted(row.flags))}"
    return ""


@dataclass
class LocalCluster:
    """`primaries` primaries with `replicas` replicas each, started by `start()` (or `with`), stopped by `stop()`."""

    primaries: int = 3
    replicas: int = 0
    node_timeout_ms: int = 5000
    extra_args: tuple[str, ...] = ()
    # Settled only once CLUSTER SLOTS lists every replica (replica_nodes(), describe()). Redis 7 leaves a
    # replica out until its replication offset is not 0, i.e. until the primary's first replication PING
    # (repl-ping-replica-period, 10 s): who only needs CLUSTER NODES' view of the replicas can skip that.
    replicas_in_slot_map: bool = True
    redis_server: str = REDIS_SERVER
    redis_cli: str = field(default_factory=lambda: shutil.which("redis-cli") or "/usr/bin/redis-cli")
    nodes: list[Node] = field(default_factory=list)
    workdir: Path | None = None
    startup_s: float = 0.0
    _map: ClusterMap | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()

    def start(self, timeout_s: float = 60.0) -> LocalCluster:
        if self.primaries < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 primaries")
        if shutil.which(self.redis_cli) is None and not Path(self.redis_cli).exists():
            raise RuntimeError("redis-cli is not installed: it creates the cluster (Debian: redis-tools)")
        started = time.monotonic()
        self.workdir = Path(tempfile.mkdtemp(prefix="local-cluster-"))
        try:
            taken: set[int] = set()
            for i in range(self.primaries * (1 + self.replicas)):
                self.nodes.append(self._start_node(i, taken))
            self._create(timeout_s)
            self.wait_settled(started + timeout_s - time.monotonic())
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started
        return self

    def stop(self) -> None:
        """Stop every node this object started, by its pid, and remove the scratch directory."""
        for node in self.nodes:
            node.stop()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        self._map = None

    def _start_node(self, index: int, taken: set[int]) -> Node:
        assert self.workdir is not None
        last_error = ""
        for _ in range(START_ATTEMPTS):
            port = cluster_port(taken)
            node = Node(port, self.workdir / f"node-{index}-{port}", redis_server=self.redis_server,
                        args=("--save", "", "--appendonly", "no",
                              "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",  # relative to --dir
                              "--cluster-node-timeout", str(self.node_timeout_ms),
                              "--repl-diskless-sync-delay", "0", *self.extra_args))  # a replica's first sync at once
            if node.launch():
                return node
            last_error = node.log_tail()  # most likely the port was taken meanwhile: another one
        raise RuntimeError(f"redis-server did not start in {START_ATTEMPTS} attempts; last log:\n{last_error}")

    def _create(self, timeout_s: float) -> None:
        create = subprocess.run(
            [self.redis_cli, "--cluster", "create", *(node.address for node in self.nodes),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True, timeout=timeout_s, check=False)
        if create.returncode != 0:
            raise RuntimeError("redis-cli --cluster create failed:\n"
                               f"{create.stdout.decode(errors='replace')}{create.stderr.decode(errors='replace')}")

    def live(self) -> list[Node]:
        """The nodes running now: all of them unless one was killed (a test's failover) and not restarted."""
        return [node for node in self.nodes if node.running()]

    def wait_settled(self, timeout_s: float, what: str = "the local cluster did not settle") -> None:
        """Wait until unsettled() finds nothing: after the create, and after a killed node was restarted."""
        deadline = time.monotonic() + timeout_s
        problem = "not asked yet"
        while time.monotonic() < deadline:
            problem = self.unsettled()
            if not problem:
                return
            time.sleep(0.05)
        raise RuntimeError(f"{what}: {problem}")

    def unsettled(self) -> str:
        """What is not settled yet ("" once all is): over the live nodes, cluster_state:ok on each, each
        knowing every other as connected and healthy, the same slot table everywhere, and every replica in
        sync. A node that exited on its own is a problem; one killed on purpose is left out."""
        crashed = [node for node in self.nodes if node.exited()]
        if crashed:
            return f"{crashed[0].address} exited: {crashed[0].log_tail()}"
        live = self.live()
        live_ports = {node.port for node in live}
        try:
            for node in live:
                if node.info("CLUSTER", "INFO").get("cluster_state") != "ok":
                    return f"{node.address}: cluster_state not ok"
            views = [cluster_nodes(node) for node in live]
            problem = next(filter(None, (view_problem(n, v, live_ports) for n, v in zip(live, views, strict=True))), "")
            if problem:
                return problem
            if not slot_tables_agree(views):
                return "the nodes do not agree on the slot table yet"
            if not replicas_agree(views, live_ports):
                return "the nodes do not agree on which node replicates which yet"
            for node in live:
                replication = node.info("INFO", "replication")
                if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                    return f"{node.address}: replica not in sync"
            self._map = read_cluster_map("127.0.0.1", live[0].port)
            replicas = sum(1 for row in views[0] if row.port in live_ports and row.master is not None)
            if self.replicas_in_slot_map and len(self._map.replicas) != replicas:
                return "CLUSTER SLOTS does not list every replica yet"
        except (OSError, RuntimeError) as exc:
            return str(exc)
        return ""

    # --- the small API ------------------------------------------------------------------------

    @property
    def seed_url(self) -> str:
        """redis://<the first primary>: REDIS_URL with REDIS_CLUSTER=true (any one node would do)."""
        return f"redis://{self.primary_nodes()[0].address}"

    @property
    def pids(self) -> list[int]:
        return [node.pid for node in self.nodes]

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def slot_map(self, refresh: bool = False) -> ClusterMap:
        """CLUSTER SLOTS, as loadgen reads it (asked once after start; `refresh` asks again)."""
        if self._map is None or refresh:
            self._map = read_cluster_map("127.0.0.1", self.nodes[0].port)
        return self._map

    def node_at(self, port: int) -> Node:
        return next(node for node in self.nodes if node.port == port)

    def primary_nodes(self) -> list[Node]:
        """The primaries, in the order of the slot map (ClusterMap.primaries: shard i is primary_nodes()[i])."""
        return [self.node_at(port) for _host, port in self.slot_map().primaries]

    def replica_nodes(self) -> list[Node]:
        return [self.node_at(port) for _host, port, _shard in self.slot_map().replicas]

    def shard_of(self, node: Node) -> int:
        """The index of the shard a node belongs to (its primary's index in the slot map)."""
        cluster = self.slot_map()
        for i, (_host, port) in enumerate(cluster.primaries):
            if port == node.port:
                return i
        return next(shard for _host, port, shard in cluster.replicas if port == node.port)

    def primary_for_slot(self, slot: int) -> Node:
        return self.primary_nodes()[self.slot_map().node_of_slot(slot)]

    def primary_for_key(self, key: str | bytes) -> Node:
        return self.primary_for_slot(key_slot(key.encode() if isinstance(key, str) else key))

    def describe(self) -> str:
        cluster = self.slot_map()
        lines = []
        for i, node in enumerate(self.primary_nodes()):
            slots = sum(last - first + 1 for first, last, owner in cluster.ranges if owner == i)
            replicas = [f"127.0.0.1:{port} (pid {self.node_at(port).pid})"
                        for _host, port, shard in cluster.replicas if shard == i]
            lines.append(f"shard {i}: primary {node.address} (pid {node.pid}), {slots} slots"
                         + (f", replicas {', '.join(replicas)}" if replicas else ""))
        return "\n".join(lines)


def cluster_port(taken: set[int]) -> int:
    """A free port (loadgen.free_port: 20000-32767) below 22768 whose bus port (+10000) is free too and
    below the ephemeral range; not one this cluster already took (none is bound until its node starts)."""
    for _ in range(10_000):
        port = free_port()
        bus = port + CLUSTER_BUS_OFFSET
        if bus >= EPHEMERAL_START or port == SHARED_REDIS_PORT or port in taken or bus in taken:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", bus))
            except OSError:
                continue
        taken.update((port, bus))
        return port
    raise RuntimeError("no free port pair (port, port + 10000) below 32768")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="local_cluster.py",
                                     description="Start a local Redis Cluster, print it, stop it on Ctrl-C.")
    parser.add_argument("--primaries", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=0, help="replicas per primary")
    args = parser.parse_args(argv)
    with LocalCluster(args.primaries, args.replicas) as cluster:
        print(f"REDIS_CLUSTER=true REDIS_URL={cluster.seed_url}   (up in {cluster.startup_s:.1f} s)")
        print(cluster.describe(), flush=True)
        stop = False

        def interrupted(_signum: int, _frame: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGINT, interrupted)
        signal.signal(signal.SIGTERM, interrupted)
        while not stop:
            time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
