"""Redis topologies started from the installed binaries on free ports, stopped by pid.

A primary, a replica and three sentinels for the Sentinel tests (issue #11); the Cluster tests are
meant to add their topology here too. Nothing is persisted: each node gets a scratch directory
(sentinels must rewrite their config file), removed on stop.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

from scripts.loadgen import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
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
