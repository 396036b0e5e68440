"""A local Redis Cluster for benchmarks: N primaries (and optionally replicas) of the installed redis-server.

Every node listens on 127.0.0.1 on a free port below 22768, so that its cluster bus port (port + 10000)
is below the ephemeral range (32768+) too and no outgoing connection can take it; both are checked free
before a node starts. Nothing is persisted (`--save ""`, no AOF); each node has a scratch directory for
its nodes.conf and log, removed on stop. The cluster is created with `redis-cli --cluster create ...
--cluster-yes` and is ready when every node says `cluster_state:ok` and every node sees the same slot
table. Nodes are stopped by their own pid (SIGTERM, then SIGKILL); nothing else is touched, the shared
Redis on 127.0.0.1:6379 least of all.

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


@dataclass
class Node:
    """One redis-server process of the cluster, owned by this process."""

    port: int
    dir: Path
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

    def call(self, *args: str | bytes | int, timeout_s: float = 2.0) -> object:
        return redis_call("127.0.0.1", self.port, *args, timeout_s=timeout_s)

    def info(self, command: str = "INFO", section: str = "server") -> dict[str, str]:
        """`INFO <section>` (or `CLUSTER INFO` with command="CLUSTER", section="INFO") as a dict."""
        reply = self.call(command, section)
        text = reply.decode() if isinstance(reply, bytes) else str(reply)
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def log_tail(self, chars: int = 2000) -> str:
        path = self.dir / "redis.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


@dataclass
class LocalCluster:
    """`primaries` primaries with `replicas` replicas each, started by `start()` (or `with`), stopped by `stop()`."""

    primaries: int = 3
    replicas: int = 0
    node_timeout_ms: int = 5000
    extra_args: tuple[str, ...] = ()
    redis_server: str = field(default_factory=lambda: shutil.which("redis-server") or "/usr/bin/redis-server")
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
            create = subprocess.run(
                [self.redis_cli, "--cluster", "create", *(node.address for node in self.nodes),
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                capture_output=True, timeout=timeout_s, check=False)
            if create.returncode != 0:
                raise RuntimeError("redis-cli --cluster create failed:\n"
                                   f"{create.stdout.decode(errors='replace')}{create.stderr.decode(errors='replace')}")
            self._wait_settled(started + timeout_s)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started
        return self

    def stop(self) -> None:
        """Stop every node this object started, by its pid, and remove the scratch directory."""
        for node in self.nodes:
            if node.proc is not None:
                stop_process(node.proc, 10)
                node.proc = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        self._map = None

    def _start_node(self, index: int, taken: set[int]) -> Node:
        assert self.workdir is not None
        last_error = ""
        for _ in range(START_ATTEMPTS):
            port = cluster_port(taken)
            node = Node(port, self.workdir / f"node-{index}-{port}")
            node.dir.mkdir()
            command = [self.redis_server, "--port", str(port), "--bind", "127.0.0.1", "--daemonize", "no",
                       "--dir", str(node.dir), "--logfile", str(node.dir / "redis.log"),
                       "--save", "", "--appendonly", "no",
                       "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",  # relative to --dir
                       "--cluster-node-timeout", str(self.node_timeout_ms),
                       "--repl-diskless-sync-delay", "0", *self.extra_args]
            node.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if wait_ping(node, 10.0):
                return node
            last_error = node.log_tail()
            stop_process(node.proc, 5)  # most likely the port was taken meanwhile: another one
            node.proc = None
        raise RuntimeError(f"redis-server did not start in {START_ATTEMPTS} attempts; last log:\n{last_error}")

    def _wait_settled(self, deadline: float) -> None:
        """cluster_state:ok on every node and the same slot table seen by every node (and replicas in sync)."""
        problem = "not asked yet"
        while time.monotonic() < deadline:
            problem = self._unsettled()
            if not problem:
                return
            time.sleep(0.1)
        raise RuntimeError(f"the local cluster did not settle: {problem}")

    def _unsettled(self) -> str:
        try:
            for node in self.nodes:
                if not node.running():
                    return f"{node.address} exited: {node.log_tail()}"
                if node.info("CLUSTER", "INFO").get("cluster_state") != "ok":
                    return f"{node.address}: cluster_state not ok"
            maps = [read_cluster_map("127.0.0.1", node.port) for node in self.nodes]
            if any(m != maps[0] for m in maps) or len(maps[0].primaries) != self.primaries:
                return "the nodes do not agree on the slot table yet"
            if len(maps[0].replicas) != self.primaries * self.replicas:
                return "not every replica is in the slot table yet"
            for node in self.nodes:
                replication = node.info("INFO", "replication")
                if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                    return f"{node.address}: replica not in sync"
        except (OSError, RuntimeError) as exc:
            return str(exc)
        self._map = maps[0]
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


def wait_ping(node: Node, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not node.running():
            return False
        try:
            if node.call("PING", timeout_s=0.5) == b"PONG":
                return True
        except (OSError, RuntimeError):
            pass
        time.sleep(0.05)
    return False


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
