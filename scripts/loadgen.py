"""Load generator for tornado-gateway (and, for comparison, the python-socketio server in socketio_server.py).

Why it looks like this:

- One Python process cannot hold 100,000 sockets here (20,000 open files per process) and one core
  cannot drive them, so the sockets are spread over worker processes (<= ~15,000 each), and the
  workers spread their sockets over source addresses 127.0.0.2, 127.0.0.3, ... because one
  source/destination address pair only has ~28,000 ephemeral ports.
- The client must cost much less than the server it measures, on the same 2-core box. Tornado's
  WebSocket client costs a coroutine, a future and several buffers per socket; the client here is
  a bare `asyncio.Protocol` (uvloop when installed): an HTTP upgrade request, a minimal frame
  parser for the unmasked server frames and masked client frames (RFC 6455 5.3).
- The generator reports its own CPU (workers, publisher, collector) next to the gateway's, so a
  reader can tell when the generator, not the gateway, is the limit.

Phases of one run: connect (paced), hold (idle, heartbeats answered), then optional fan-out
steps (Redis PUBLISH, FCALL <prefix>_publish or HTTP POST /broadcast) and upstream steps
(location_update to the events channel), then a final count of who is still connected. Everything
is bounded by time. Fan-out steps of different paths alternate rate by rate (publish 1000, fcall
1000, publish 4000, ...), so paths compared with each other run seconds apart on a noisy machine.

The fan-out message type is `driver_location` by default: a latest-value type that the gateway
never records, whatever the path. `--message-type ride_status` sends a recorded type instead, so
that `fcall` and `http` measure recording (PROTOCOL.md 7.1) while `publish` stays live-only; each
step reports how many deliveries carried the envelope `seq` that only recorded messages have.

`--redis-cluster`: the gateway runs in Redis Cluster mode (`REDIS_CLUSTER=true`) and `--redis` names one
node. A user's channel is then the sharded channel `<prefix>:user:{<userId>}`: the `publish` path sends
`SPUBLISH` to it, and `fcall` sends `FCALL <prefix>_publish 1 <userId> ...`, each command to the primary
serving its slot (`redis.crc.key_slot`), over one pipelined connection per primary. The slot map is read
once at start (`CLUSTER SLOTS`): enough for a benchmark, where nothing reshards. `--redis-pid` then takes
one pid per node (`--redis-pid 11,12,13`), and each step reports Redis CPU in total and node by node, with
the share of the messages each primary was sent (`redis_nodes`). Without `--redis-cluster` the publisher
is unchanged, to the byte: PUBLISH `<prefix>:user:<userId>` on one connection.

`--stall N` adds a mass stall after the hold (issue #13): N clients, spread over the workers and
connected with a tiny receive buffer, stop reading at once (`pause_reading`: their kernel buffers
fill and the gateway's writes back up, as with phones behind a stalled cell tower) while messages
keep flowing to everyone (`--stall-rate`: `driver_location` and `ride_status` round-robin over all
users) plus a flood for the stalled ones only (`--flood-rate` of `--flood-type`). It reports the
healthy clients' deliveries (lost, p50/p99), the server's RSS before, at its peak during and after
the stall, and how many stalled clients the server shed. With `--resume-after S` the stalled clients
read again after S seconds and the report says whether every one is still connected, got every
`ride_status` sent to it and, per driver, the newest position sent.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import errno
import json
import math
import multiprocessing
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from multiprocessing.sharedctypes import SynchronizedArray
from typing import Any, Literal, NotRequired, Protocol, TypedDict, cast
from urllib.parse import urlsplit

import hiredis
import jwt
import psutil
import ujson
from redis.crc import key_slot

Flavor = Literal["gateway", "socketio"]
Via = Literal["publish", "fcall", "http"]
RedisCpuSource = Literal["proc", "info"]
MessageType = Literal["driver_location", "ride_status"]

MAX_SOCKETS_PER_WORKER = 15_000
SOCKETS_PER_SOURCE_ADDRESS = 5_000
HANDSHAKE_TIMEOUT_S = 20.0
COUNTER_FLUSH_S = 0.25
DRAIN_GRACE_S = 3.0
STALL_SETTLE_S = 6.0  # after a stall: in-flight messages, catch-up, and the server's 5 s abort of shed sockets
RSS_SAMPLE_S = 0.2
PROBE_S = 1.0  # stalled clients read this long after the stall, to learn which ones the server closed
RSS_SETTLED = 1.2  # "back": within 20% of the RSS before the stall
RSS_SETTLE_MAX_S = 20.0  # four housekeeping ticks
LINGER_RESET = struct.pack("ii", 1, 0)
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux

# Worker counters live in one shared array, one row per worker, so progress costs no messages.
C_OPEN, C_OPENED, C_FAILED, C_CLOSED, C_HEARTBEATS, C_MESSAGES, C_UPSTREAM, C_PENDING = range(8)
N_COUNTERS = 8

# What the fan-out sends, by --message-type: the payload fields the gateway requires of that type
# (PROTOCOL.md section 5). driver_location is never recorded; ride_status is recorded by FCALL and
# POST /broadcast (7.1). The client counts deliveries of either.
REQUIRED_FIELDS: dict[str, bytes] = {
    "driver_location": b'"driverId":"d","latitude":1.5,"longitude":2.5',
    "ride_status": b'"rideId":"r","status":"driver_arriving"',
    "notification": b'"title":"t","body":"b"',
}
SERVICE_TYPES = frozenset(REQUIRED_FIELDS)


# --------------------------------------------------------------------------------------------
# configuration and reports
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    host: str
    port: int
    flavor: Flavor
    secret: str
    prefix: str
    redis_host: str
    redis_port: int
    message_type: MessageType = "driver_location"
    cluster: ClusterMap | None = None  # --redis-cluster: SPUBLISH/FCALL to the primary of each slot


SLOT_MAX = 16383


@dataclass(frozen=True)
class ClusterMap:
    """A Redis Cluster's slot map, from one `CLUSTER SLOTS` at start (nothing reshards during a benchmark).

    `primaries` in the order CLUSTER SLOTS first names them; `ranges` are (first slot, last slot,
    index into `primaries`), sorted; `replicas` are (host, port, index of their primary)."""

    primaries: tuple[tuple[str, int], ...]
    ranges: tuple[tuple[int, int, int], ...]
    replicas: tuple[tuple[str, int, int], ...] = ()

    def node_of_slot(self, slot: int) -> int:
        """Index into `primaries` of the primary serving `slot`."""
        at = bisect.bisect_right(self.ranges, (slot, SLOT_MAX + 1, 0)) - 1
        if at < 0 or not self.ranges[at][0] <= slot <= self.ranges[at][1]:
            raise LookupError(f"no primary serves slot {slot}")
        return self.ranges[at][2]

    def node_of_key(self, key: bytes) -> int:
        """The primary a command on `key` must go to (a channel for SPUBLISH, the userId for FCALL)."""
        return self.node_of_slot(key_slot(key))

    def label(self, index: int) -> str:
        host, port = self.primaries[index]
        return f"{host}:{port}"


def redis_call(host: str, port: int, *args: str | bytes | int, timeout_s: float = 5.0) -> Any:
    """One command on a short blocking connection (the slot map, a node's pid): never on the hot path."""
    reader = hiredis.Reader()
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.sendall(resp_command(*(a if isinstance(a, bytes) else str(a).encode() for a in args)))
        while (reply := reader.gets()) is False:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError(f"{host}:{port} closed the connection")
            reader.feed(data)
    if isinstance(reply, hiredis.ReplyError):
        raise RuntimeError(f"{host}:{port}: {' '.join(map(str, args))}: {reply}")
    return reply


def read_cluster_map(host: str, port: int) -> ClusterMap:
    """`CLUSTER SLOTS` of one node: the primaries, which slots each serves, and their replicas."""
    reply = redis_call(host, port, "CLUSTER", "SLOTS")
    primaries: list[tuple[str, int]] = []
    ranges: list[tuple[int, int, int]] = []
    replicas: list[tuple[str, int, int]] = []

    def address(node: list[Any]) -> tuple[str, int]:
        name = node[0].decode() if isinstance(node[0], bytes) else str(node[0])
        return (name or host, int(node[1]))  # an empty host means "the address you asked me on"

    # In slot order, so that every node's answer gives the same map (primary 0 serves slot 0).
    for first, last, primary, *others in sorted(reply, key=lambda entry: int(entry[0])):
        owner = address(primary)
        if owner not in primaries:
            primaries.append(owner)
        index = primaries.index(owner)
        ranges.append((int(first), int(last), index))
        for other in others:
            replica = (*address(other), index)
            if replica not in replicas:
                replicas.append(replica)
    replicas.sort(key=lambda r: (r[2], r[1]))
    covered = sum(last - first + 1 for first, last, _ in ranges)
    if covered != SLOT_MAX + 1:
        raise RuntimeError(f"the Redis Cluster at {host}:{port} serves {covered} of {SLOT_MAX + 1} slots")
    return ClusterMap(tuple(primaries), tuple(ranges), tuple(replicas))


def redis_process_id(host: str, port: int) -> int:
    """The pid a Redis node reports (`INFO server` process_id): which node a --redis-pid is."""
    text = redis_call(host, port, "INFO", "server")
    for line in (text.decode() if isinstance(text, bytes) else str(text)).splitlines():
        if line.startswith("process_id:"):
            return int(line.split(":", 1)[1])
    raise RuntimeError(f"{host}:{port} reports no process_id")


@dataclass(frozen=True)
class StallPlan:
    """--stall: clients that stop reading while messages flow (see the module's docstring)."""

    stalled: int
    seconds: float
    resume_after_s: float = 0.0  # 0: they never read again (shed by the server, or dropped by us after the window)
    rate: int = 1000  # messages/s to everyone, round-robin
    flood_rate: int = 0  # messages/s more, to the stalled clients only
    flood_type: str = "notification"  # notification queues up in the gateway; driver_location is coalesced
    flood_bytes: int = 500  # size of a flood notification
    rcvbuf: int = 4096  # SO_RCVBUF of a stalled client's socket

    def every(self, connections: int) -> int:
        """Client index i stalls when i % every == 0 (the first `stalled` such indexes)."""
        return max(1, connections // self.stalled) if self.stalled else 0

    def stalls(self, index: int, connections: int) -> bool:
        every = self.every(connections)
        return every > 0 and index % every == 0 and index // every < self.stalled


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    target: Target
    first_user: int
    count: int
    connect_rate: float
    concurrency: int
    source_ips: tuple[str, ...]
    run_id: str
    connect_timeout_s: float
    connections: int = 0  # in the whole run: which indexes stall depends on it
    stall: StallPlan | None = None


@dataclass
class LoadConfig:
    target: Target
    connections: int
    connect_rate: float
    workers: int
    hold_s: float
    fanout_via: list[Via]
    fanout_rates: list[int]
    step_s: float
    upstream_rates: list[int]
    server_pid: int | None
    run_id: str
    connect_timeout_s: float
    concurrency: int
    source_ips: tuple[str, ...]
    json_out: str | None = None
    quiet: bool = False
    http_rates: list[int] | None = None  # POST /broadcast rates when they differ from fanout_rates
    redis_pid: int | None = None  # a Redis we may measure (its CPU per message), e.g. one bench.py started
    stall: StallPlan | None = None
    redis_pids: tuple[int, ...] = ()  # more Redis processes to measure: a cluster's nodes, one per shard
    # How Redis CPU is read: "proc" (psutil, /proc ticks of 10 ms: what every earlier figure used) or "info"
    # (each node's own INFO cpu, getrusage in microseconds: per-node figures of short steps need it).
    redis_cpu: RedisCpuSource = "proc"

    def measured_redis_pids(self) -> list[int]:
        """Every Redis pid whose CPU the steps report, `redis_pid` first."""
        return list(dict.fromkeys([*([self.redis_pid] if self.redis_pid else []), *self.redis_pids]))

    def per_node_redis(self) -> bool:
        """Steps break Redis CPU down node by node (`redis_nodes`): a cluster, or several Redis pids."""
        return self.target.cluster is not None or len(self.measured_redis_pids()) > 1

    def extended_report(self) -> bool:
        """The report gains the Redis idle CPU of the hold, each step's window and node-by-node figures.
        Never for one Redis measured as before, whose reports stay as they were, key for key."""
        return bool(self.measured_redis_pids()) and (self.per_node_redis() or self.redis_cpu != "proc")

    def rates_for(self, via: Via) -> list[int]:
        """HTTP costs the server ~10x a PUBLISH, so its steps may use their own, lower rates."""
        return self.http_rates if via == "http" and self.http_rates is not None else self.fanout_rates


class ConnectReport(TypedDict):
    target: int
    connected: int
    failed: int
    seconds: float
    rate_per_s: float
    gateway_cpu_s: float
    gateway_ms_per_conn: float
    loadgen_cpu_s: float


class HoldReport(TypedDict):
    seconds: float
    connected_start: int
    connected_end: int
    heartbeats: int
    heartbeats_per_s: float
    gateway_cpu_pct: float
    loadgen_cpu_pct: float
    rss_baseline_mb: float
    rss_mb: float
    rss_per_conn_kb: float
    redis_cpu_pct: NotRequired[float]  # extended reports only: all measured Redis over the hold (its idle)


class StepReport(TypedDict):
    kind: str  # "publish", "http" or "upstream"
    target_rate: int
    seconds: float
    sent: int
    accepted: int
    no_receiver: int
    errors: int  # refused by the server (HTTP status >= 300, a Redis error reply to FCALL)
    delivered: int
    sequenced: int  # deliveries whose envelope carried `seq`: the message was recorded
    lost: int
    delivered_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    gateway_cpu_s: float
    gateway_us_per_msg: float
    gateway_cpu_pct: float
    redis_cpu_s: float  # 0 unless the run was given --redis-pid
    redis_us_per_msg: float
    redis_cpu_pct: float
    loadgen_cpu_pct: float
    driver_cpu_pct: float
    # Only in extended reports (--redis-cluster, several --redis-pid, --redis-cpu info): the window's wall
    # seconds (step plus drain), and the Redis CPU above node by node.
    window_s: NotRequired[float]
    redis_nodes: NotRequired[list[RedisNodeStep]]


class RedisNodeStep(TypedDict):
    """One measured Redis process over one step: its CPU, and the commands the publisher sent it."""

    pid: int
    node: str  # host:port; "" when the pid is none of the cluster's nodes (or there is no cluster)
    role: str  # "primary", "replica" or ""
    shard: int  # index of the shard's primary in the cluster map (-1: unknown)
    cpu_s: float
    cpu_pct: float  # of one core, over the step window
    cpu_share: float  # of all measured Redis CPU in the window, 0..1
    sent: int  # commands the publisher sent to this node (0 for replicas, and for POST /broadcast steps)
    sent_share: float  # of all commands the publisher sent in the step, 0..1


class RedisClusterReport(TypedDict):
    seed: str
    primaries: list[str]
    replicas: list[str]
    nodes: dict[str, str]  # measured pid -> host:port


class StallReport(TypedDict):
    stalled: int
    healthy: int
    seconds: float
    resumed: bool
    sent_healthy: int
    delivered_healthy: int
    lost_healthy: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    sent_stalled: int
    healthy_closed: int  # healthy clients the server closed during the stall: must be 0
    stalled_lost: int  # stalled clients whose connection the server ended (4503, then the socket)
    stalled_open: int  # still connected after the stall (resumed: must be all of them)
    stale_positions: int  # resumed clients whose newest position per driver is not the newest sent
    missing_statuses: int  # ride_status messages sent to resumed clients and never received
    rss_baseline_mb: float  # before the stall
    rss_peak_mb: float  # the highest sample during the stall (every 0.2 s)
    rss_final_mb: float  # after the stalled clients are gone (or caught up)
    rss_final_after_s: float  # how long after that the final sample was taken
    gateway_cpu_pct: float


class RunReport(TypedDict):
    flavor: str
    connections: int
    workers: int
    gateway_processes: int
    connect: ConnectReport
    hold: HoldReport
    steps: list[StepReport]
    final_connected: int
    close_codes: dict[str, int]
    gateway_rss_end_mb: float
    stall: StallReport | None
    redis_cluster: NotRequired[RedisClusterReport]  # only with --redis-cluster
    redis_cpu_source: NotRequired[str]  # extended reports only: "proc" or "info"


# --------------------------------------------------------------------------------------------
# WebSocket client (one per socket; kept small on purpose)
# --------------------------------------------------------------------------------------------

def mask_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A final client frame, masked with a random key (servers must reject unmasked client frames)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = random.getrandbits(32).to_bytes(4, "big")
    if n == 0:
        return header + key
    stream = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")
    return header + key + masked


def now_us() -> int:
    return time.time_ns() // 1000


class Stats:
    """Per-worker tallies; latencies are kept per phase tag so each step is reported separately."""

    def __init__(self) -> None:
        self.counters = [0] * N_COUNTERS
        self.close_codes: dict[str, int] = {}
        self.latencies: dict[str, list[int]] = {}
        self.sequenced: dict[str, int] = {}

    def record_error(self, name: str) -> None:
        self.close_codes[f"connect:{name}"] = self.close_codes.get(f"connect:{name}", 0) + 1

    def record_close(self, code: int | None) -> None:
        key = str(code) if code is not None else "none"
        self.close_codes[key] = self.close_codes.get(key, 0) + 1

    def record_message(self, payload: dict[str, Any], sequenced: bool = False) -> None:
        self.counters[C_MESSAGES] += 1
        tag = payload.get("phase")
        sent = payload.get("sentAt")
        if isinstance(tag, str) and isinstance(sent, int):
            self.latencies.setdefault(tag, []).append(now_us() - sent)
            if sequenced:
                self.sequenced[tag] = self.sequenced.get(tag, 0) + 1

    def take(self, tag: str) -> tuple[list[int], int]:
        """A finished step's latencies and how many of its deliveries were recorded (carried `seq`)."""
        return self.latencies.pop(tag, []), self.sequenced.pop(tag, 0)


class WsClient(asyncio.Protocol):
    """One WebSocket: HTTP upgrade, then frames. Answers heartbeats (gateway) or pings (Engine.IO)."""

    __slots__ = ("index", "flavor", "stats", "request", "transport", "buf", "state", "ready", "close_code",
                 "stalled", "positions", "statuses")

    def __init__(self, index: int, flavor: Flavor, stats: Stats, request: bytes,
                 ready: asyncio.Future[bool], stalled: bool = False) -> None:
        self.index = index
        self.flavor = flavor
        self.stats = stats
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.state = 0  # 0 handshake, 1 upgraded (waiting for the welcome), 2 open, 3 closed
        self.ready = ready
        self.close_code: int | None = None
        self.stalled = stalled  # one of --stall's clients: what it gets is checked, not timed
        self.positions: dict[str, int] = {}  # stalled: driverId -> the newest `n` received
        self.statuses = 0  # stalled: ride_status messages received

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if self.state == 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self._fail()
                return
            buf = buf[end + 4:]
            self.state = 1
        self.buf = self._frames(buf)

    def _frames(self, buf: bytes) -> bytes:
        """Parse complete server frames from `buf`; returns the incomplete rest."""
        while len(buf) >= 2:
            opcode = buf[0] & 0x0F
            length = buf[1] & 0x7F
            offset = 2
            if length == 126:
                if len(buf) < 4:
                    break
                length = int.from_bytes(buf[2:4], "big")
                offset = 4
            elif length == 127:
                if len(buf) < 10:
                    break
                length = int.from_bytes(buf[2:10], "big")
                offset = 10
            end = offset + length
            if len(buf) < end:
                break
            self._frame(opcode, buf[offset:end])
            buf = buf[end:]
            if self.state == 3:
                return b""
        return buf

    def _frame(self, opcode: int, payload: bytes) -> None:
        if opcode == 0x1:
            if self.flavor == "gateway":
                self._gateway_text(payload)
            else:
                self._socketio_text(payload)
        elif opcode == 0x8:
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
            self._closed_by_server()
        elif opcode == 0x9:
            self.send(payload, 0xA)

    def _gateway_text(self, payload: bytes) -> None:
        message = ujson.loads(payload)
        kind = message.get("type")
        if kind == "heartbeat":
            self.stats.counters[C_HEARTBEATS] += 1
            stamp = message.get("payload", {}).get("timestamp", 0)
            self.send(b'{"type":"heartbeat_ack","payload":{"timestamp":%d}}' % stamp)
        elif self.stalled and kind in SERVICE_TYPES:
            self._stalled_message(kind, message["payload"])
        elif kind in SERVICE_TYPES:
            self.stats.record_message(message["payload"], "seq" in message)
        elif kind == "connected":
            self._opened()

    def _stalled_message(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "ride_status":
            self.statuses += 1
        elif kind == "driver_location":
            driver, n = str(payload.get("driverId")), int(payload.get("n", -1))
            if n > self.positions.get(driver, -1):
                self.positions[driver] = n

    def stall(self) -> None:
        if self.transport is not None and self.state == 2:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and self.state == 2:
            self.transport.resume_reading()

    def _socketio_text(self, payload: bytes) -> None:
        if payload == b"2":
            self.stats.counters[C_HEARTBEATS] += 1
            self.send(b"3")
        elif payload.startswith(b"42"):
            event = ujson.loads(payload[2:])
            if event and event[0] in SERVICE_TYPES:
                self.stats.record_message(event[1])
        elif payload.startswith(b"0{"):
            self.send(b"40")  # Engine.IO open -> Socket.IO connect to the default namespace
        elif payload.startswith(b"40"):
            self._opened()
        elif payload.startswith(b"44"):
            self._fail()

    def _opened(self) -> None:
        if self.state == 1:
            self.state = 2
            self.stats.counters[C_OPEN] += 1
            self.stats.counters[C_OPENED] += 1
            if not self.ready.done():
                self.ready.set_result(True)

    def _fail(self) -> None:
        if not self.ready.done():
            self.ready.set_result(False)
        self.state = 3
        if self.transport is not None:
            self.transport.abort()

    def _closed_by_server(self) -> None:
        if self.state == 2:
            self.stats.counters[C_OPEN] -= 1
            self.stats.counters[C_CLOSED] += 1
            self.stats.record_close(self.close_code)
        elif not self.ready.done():
            self.ready.set_result(False)
        self.state = 3
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state != 3:
            self._closed_by_server()

    def send(self, payload: bytes, opcode: int = 0x1) -> None:
        if self.transport is not None and self.state < 3:
            self.transport.write(mask_frame(payload, opcode))

    def shutdown(self) -> None:
        """Our own close at the end of a run: not counted as a server close, and a RST (no TIME_WAIT)."""
        if self.state == 2:
            self.stats.counters[C_OPEN] -= 1
        self.state = 3
        if self.transport is not None and not self.transport.is_closing():
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError, ValueError):  # ValueError: the socket is already gone
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            self.transport.abort()


def user_id(run_id: str, index: int) -> str:
    return f"{run_id}-{index}"


def upgrade_request(target: Target, uid: str, device: str) -> bytes:
    token = jwt.encode({"sub": uid, "userType": "driver", "exp": int(time.time()) + 24 * 3600},
                       target.secret, algorithm="HS256")
    query = f"token={token}&userType=driver&deviceId={device}&platform=ios"
    path = f"/ws?{query}" if target.flavor == "gateway" else f"/socket.io/?EIO=4&transport=websocket&{query}"
    return (f"GET {path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\n\r\n").encode()


def install_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


# --------------------------------------------------------------------------------------------
# worker process
# --------------------------------------------------------------------------------------------

async def poll_pipe(pipe: Pipe, commands: asyncio.Queue[tuple[Any, ...]]) -> None:
    """Move commands from the coordinator's pipe into a queue; a closed pipe means stop."""
    while True:
        try:
            while pipe.poll():
                commands.put_nowait(pipe.recv())
        except (EOFError, OSError):
            commands.put_nowait(("stop",))
            return
        await asyncio.sleep(0.02)


class Worker:
    """Owns up to ~15,000 sockets; obeys commands from the coordinator over a pipe."""

    def __init__(self, spec: WorkerSpec, pipe: Pipe, counters: SynchronizedArray[int]) -> None:
        self.spec = spec
        self.pipe = pipe
        self.shared = counters
        self.stats = Stats()
        self.clients: list[WsClient] = []
        self.commands: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

    async def run(self) -> None:
        # Polled, not add_reader(): the event loop would make the pipe non-blocking, and sending a large
        # reply (latency lists, the connected users) then fails with EAGAIN when the pipe is full.
        reader = asyncio.ensure_future(poll_pipe(self.pipe, self.commands))
        flusher = asyncio.ensure_future(self._flush_counters())
        try:
            while True:
                command = await self.commands.get()
                if command[0] == "stop":
                    break
                await self._execute(command)
        finally:
            for client in self.clients:
                client.shutdown()
            self._publish_counters()
            flusher.cancel()
            reader.cancel()
            self.pipe.send(("stopped", self.stats.close_codes))

    async def _execute(self, command: tuple[Any, ...]) -> None:
        name = command[0]
        if name == "connect":
            await self.connect_all()
            self.pipe.send(("connected", [c.index for c in self.clients if c.state == 2]))
        elif name == "upstream":
            sent = await self.upstream(float(command[1]), float(command[2]), str(command[3]))
            self.pipe.send(("upstream_done", sent))
        elif name == "latencies":
            self.pipe.send(("latencies", self.stats.take(str(command[1]))))
        elif name == "open_count":
            self.pipe.send(("open_count", sum(1 for c in self.clients if c.state == 2)))
        elif name in ("stall", "resume", "drop_stalled"):
            self.pipe.send((name, self._stall_command(name)))
        elif name == "probe_stalled":
            self._stall_command("resume")  # a paused socket never sees the server's reset: read to find out
            await asyncio.sleep(float(command[1]))
            self.pipe.send((name, sum(1 for c in self.clients if c.stalled and c.state == 3)))
        elif name == "stalled_results":
            self.pipe.send(("stalled_results", {c.index: (c.positions, c.statuses, c.state == 2)
                                                for c in self.clients if c.stalled}))
        elif name == "healthy_closed":
            self.pipe.send(("healthy_closed", sum(1 for c in self.clients if not c.stalled and c.state == 3)))

    def _stall_command(self, name: str) -> int:
        """Stop reading, read again, or drop (RST) the stalled clients; returns how many there are."""
        stalled = [c for c in self.clients if c.stalled]
        for client in stalled:
            if name == "stall":
                client.stall()
            elif name == "resume":
                client.resume()
            else:
                client.shutdown()
        return len(stalled)

    async def _flush_counters(self) -> None:
        while True:
            self._publish_counters()
            await asyncio.sleep(COUNTER_FLUSH_S)

    def _publish_counters(self) -> None:
        base = self.spec.index * N_COUNTERS
        for i, value in enumerate(self.stats.counters):
            self.shared[base + i] = value

    async def connect_all(self) -> None:
        """Open the worker's sockets at its share of the connect rate, with bounded handshakes in flight."""
        spec = self.spec
        limit = asyncio.Semaphore(spec.concurrency)
        tasks: list[asyncio.Task[None]] = []
        requests = [upgrade_request(spec.target, user_id(spec.run_id, spec.first_user + i), f"d{spec.first_user + i}")
                    for i in range(spec.count)]
        started = time.monotonic()
        deadline = started + spec.count / spec.connect_rate + spec.connect_timeout_s
        for i, request in enumerate(requests):
            due = started + i / spec.connect_rate
            delay = due - time.monotonic()
            if delay > 0.002:
                await asyncio.sleep(delay)
            if time.monotonic() > deadline:
                self.stats.counters[C_FAILED] += spec.count - i
                break
            await limit.acquire()
            tasks.append(asyncio.ensure_future(self._connect_one(spec.first_user + i, request, limit)))
        if tasks:
            await asyncio.wait(tasks, timeout=max(1.0, deadline - time.monotonic() + HANDSHAKE_TIMEOUT_S))

    async def _connect_one(self, index: int, request: bytes, limit: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[bool] = loop.create_future()
        source = self.spec.source_ips[(index // SOCKETS_PER_SOURCE_ADDRESS) % len(self.spec.source_ips)]
        plan = self.spec.stall
        stalls = plan is not None and plan.stalls(index, self.spec.connections)
        client = WsClient(index, self.spec.target.flavor, self.stats, request, ready, stalls)
        self.stats.counters[C_PENDING] += 1
        ok = False
        sock = bound_socket(source, plan.rcvbuf if plan is not None and stalls else 0)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (self.spec.target.host, self.spec.target.port)),
                                   HANDSHAKE_TIMEOUT_S)
            await loop.create_connection(lambda: client, sock=sock)
            ok = await asyncio.wait_for(ready, HANDSHAKE_TIMEOUT_S)
        except TimeoutError:
            sock.close()
            self.stats.record_error("timeout")
        except OSError as exc:
            sock.close()
            self.stats.record_error(errno.errorcode.get(exc.errno or 0, str(exc)))
        finally:
            self.stats.counters[C_PENDING] -= 1
            limit.release()
        if ok:
            self.clients.append(client)
        else:
            self.stats.counters[C_FAILED] += 1
            client.shutdown()

    async def upstream(self, rate: float, seconds: float, tag: str) -> int:
        """Send location_update frames round-robin over the open sockets at `rate` per second."""
        open_clients = [c for c in self.clients if c.state == 2]
        if not open_clients or rate <= 0:
            await asyncio.sleep(seconds)
            return 0
        socketio = self.spec.target.flavor == "socketio"
        sent = 0
        cursor = 0
        started = time.monotonic()
        end = started + seconds
        while (now := time.monotonic()) < end:
            due = int((now - started) * rate) - sent
            for _ in range(due):
                client = open_clients[cursor % len(open_clients)]
                cursor += 1
                body = (b'{"latitude":12.97,"longitude":77.59,"timestamp":%d,"tripId":"%s-%d-%d"}'
                        % (now_us(), tag.encode(), self.spec.index, sent))
                client.send(b'42["location_update",' + body + b"]" if socketio
                            else b'{"type":"location_update","payload":' + body + b"}")
                sent += 1
            self.stats.counters[C_UPSTREAM] = sent
            await asyncio.sleep(0.005)
        return sent


def bound_socket(source: str, rcvbuf: int = 0) -> socket.socket:
    """A non-blocking socket bound to `source` without choosing its port yet.

    bind(addr, 0) picks a port unique for the address alone and gets slower as ports fill up (the
    connect rate collapsed after ~4,000 sockets); IP_BIND_ADDRESS_NO_PORT lets connect() pick the
    port per 4-tuple instead, which is cheap.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if rcvbuf:  # before connect(): the window it advertises follows it, so the sender backs up for real
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((source, 0))
    sock.setblocking(False)
    return sock


def worker_main(spec: WorkerSpec, pipe: Pipe, counters: SynchronizedArray[int]) -> None:
    install_uvloop()
    raise_file_limit()
    asyncio.run(Worker(spec, pipe, counters).run())


def raise_file_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --------------------------------------------------------------------------------------------
# publisher process: Redis PUBLISH or FCALL (raw RESP, pipelined) or HTTP POST /broadcast (keep-alive)
# --------------------------------------------------------------------------------------------

class RespReplies(asyncio.Protocol):
    """A pipelined Redis connection whose replies (in command order) go to `on_reply`; error replies
    are counted and the first one kept, so a step that did nothing says why."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.errors = 0
        self.first_error = ""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if isinstance(reply, hiredis.ReplyError):
                self.errors += 1
                self.first_error = self.first_error or str(reply)[:200]
            self.on_reply(reply)

    def on_reply(self, reply: Any) -> None:
        raise NotImplementedError


class RespCounter(RespReplies):
    """Counts replies to PUBLISH or FCALL. `:0` to a PUBLISH means nobody was subscribed (a message
    nobody can get); a refused FCALL (or a function not loaded) counts as an error."""

    def __init__(self) -> None:
        super().__init__()
        self.replies = 0
        self.zero = 0

    def on_reply(self, reply: Any) -> None:
        self.replies += 1
        if reply == 0:
            self.zero += 1


#: Where servers started by the harness and the tests listen: below the ephemeral range (32768+), so
#: a port found free cannot be taken by an outgoing connection before the server binds it.
SERVER_PORTS = range(20000, 32768)


def free_port() -> int:
    """A port in SERVER_PORTS that nothing is bound to right now."""
    for port in random.sample(SERVER_PORTS, 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {SERVER_PORTS}")


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float, *, graceful: int = signal.SIGTERM) -> None:
    """Ask a process this harness started to stop, and kill it if it does not within the timeout."""
    if proc.poll() is None:
        proc.send_signal(graceful)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def resp_command(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


class HttpConn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with one request in flight at a time."""

    def __init__(self, on_idle: Callable[[HttpConn], None]) -> None:
        self.on_idle = on_idle
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.ok = 0
        self.errors = 0
        self.first_error = ""
        self.no_receiver = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[:end].lower()
        start = head.find(b"content-length:")
        length = int(head[start + 15:].split(b"\r\n", 1)[0]) if start >= 0 else 0
        if len(self.buf) < end + 4 + length:
            return
        body = self.buf[end + 4:end + 4 + length]
        self.buf = self.buf[end + 4 + length:]
        if head.startswith(b"http/1.1 2"):
            self.ok += 1
            if b'"devices":0' in body.replace(b" ", b""):
                self.no_receiver += 1
        else:
            self.errors += 1
            self.first_error = self.first_error or (head.split(b"\r\n", 1)[0] + b" " + body[:200]).decode(
                errors="replace")
        self.on_idle(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


@dataclass
class PublishResult:
    sent: int = 0
    accepted: int = 0
    no_receiver: int = 0
    errors: int = 0
    first_error: str = ""
    by_node: list[int] = field(default_factory=list)  # --redis-cluster: commands sent to each primary


@dataclass
class StallSent:
    """What the publisher sent during a stall: counts for the healthy clients and, per stalled user,
    what must arrive if it reads again."""

    sent_healthy: int = 0
    sent_stalled: int = 0
    statuses: dict[str, int] = field(default_factory=dict)  # stalled user -> ride_status messages sent
    positions: dict[str, dict[str, int]] = field(default_factory=dict)  # stalled user -> driverId -> newest n
    errors: int = 0
    first_error: str = ""


def stall_message(prefix: str, uid: str, kind: str, n: int, tag: str, driver: str = "A", pad: bytes = b"") -> bytes:
    """One PUBLISH of the stall phase: the type's required fields, send time, a sequence number, the tag."""
    if kind == "driver_location":
        body = b'"driverId":"%s","latitude":1.5,"longitude":2.5' % driver.encode()
    elif kind == "ride_status":
        body = b'"rideId":"r","status":"driver_arriving"'
    else:
        body = b'"title":"t","body":"%s"' % pad
    message = b'{"type":"%s","payload":{%s,"sentAt":%d,"n":%d,"phase":"%s"}}' % (
        kind.encode(), body, now_us(), n, tag.encode())
    return resp_command(b"PUBLISH", f"{prefix}:user:{uid}".encode(), message)


def publish_function(prefix: str) -> str:
    """`<prefix>_publish` as the gateway registers it (redis_keys.Keys.function): Redis function names
    take only letters, digits and `_`, so every other character of the prefix becomes `_`."""
    return "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in prefix) + "_publish"


class Publisher:
    """Sends service messages to random connected users at a paced rate, carrying send time and phase."""

    def __init__(self, target: Target, users: list[str]) -> None:
        self.target = target
        self.users = users
        self.kind = target.message_type.encode()
        self.required = REQUIRED_FIELDS[target.message_type]
        self.function = publish_function(target.prefix).encode()
        # --redis-cluster: each user's primary, found once (the channel's hash tag is the userId, so the
        # SPUBLISH channel and the FCALL key share the slot; the channel is what is hashed, as Redis does).
        cluster = target.cluster
        self.node_of: dict[str, int] = ({uid: cluster.node_of_key(self.sharded_channel(uid)) for uid in users}
                                        if cluster is not None else {})

    def body(self, tag: str, n: int) -> bytes:
        """The payload: the type's required fields, then send time (latency) and step tag (which step)."""
        return b'{%s,"sentAt":%d,"n":%d,"phase":"%s"}' % (self.required, now_us(), n, tag.encode())

    def envelope(self, payload: bytes) -> bytes:
        """The message JSON a service sends, as PUBLISH, FCALL and POST /broadcast all take it."""
        return b'{"type":"' + self.kind + b'","payload":' + payload + b"}"

    def redis_message(self, uid: str, payload: bytes) -> tuple[bytes, bytes]:
        """(channel, message) a service would publish for this flavor."""
        prefix = self.target.prefix
        if self.target.flavor == "gateway":
            return f"{prefix}:user:{uid}".encode(), self.envelope(payload)
        # python-socketio's AsyncRedisManager format (JSON on one channel; every server process reads all)
        message = (b'{"method":"emit","event":"' + self.kind + b'","data":[' + payload + b'],"binary":false,'
                   b'"namespace":"/","room":"' + uid.encode() + b'","skip_sid":null,"callback":null,'
                   b'"host_id":"loadgen"}')
        return f"{prefix}:socketio".encode(), message

    def redis_command(self, via: Via, uid: str, payload: bytes) -> bytes:
        """Live-only PUBLISH, or the recording `FCALL <prefix>_publish 1 <userId> <message>` (7.1)."""
        if via == "fcall":
            return resp_command(b"FCALL", self.function, b"1", uid.encode(), self.envelope(payload))
        channel, message = self.redis_message(uid, payload)
        return resp_command(b"PUBLISH", channel, message)

    def sharded_channel(self, uid: str) -> bytes:
        """The gateway's user channel in cluster mode (redis_keys.Keys.user_channel): `<prefix>:user:{<userId>}`."""
        return f"{self.target.prefix}:user:{{{uid}}}".encode()

    def cluster_command(self, via: Via, uid: str, payload: bytes) -> bytes:
        """Cluster mode: live-only `SPUBLISH <prefix>:user:{<userId>}`, or the same FCALL as on one Redis."""
        if via == "fcall":
            return resp_command(b"FCALL", self.function, b"1", uid.encode(), self.envelope(payload))
        return resp_command(b"SPUBLISH", self.sharded_channel(uid), self.envelope(payload))

    async def publish(self, rate: float, seconds: float, tag: str, via: Via = "publish") -> PublishResult:
        """Pipelined PUBLISH or FCALL on one Redis connection, written every 2 ms."""
        if self.target.cluster is not None:
            return await self.publish_cluster(self.target.cluster, rate, seconds, tag, via)
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(RespCounter, self.target.redis_host, self.target.redis_port)
        assert proto.transport is not None
        result = PublishResult()
        started = time.monotonic()
        end = started + seconds
        while (now := time.monotonic()) < end:
            due = int((now - started) * rate) - result.sent
            if due > 0:
                batch = []
                for _ in range(due):
                    batch.append(self.redis_command(via, random.choice(self.users), self.body(tag, result.sent)))
                    result.sent += 1
                proto.transport.write(b"".join(batch))
            await asyncio.sleep(0.002)
        for _ in range(500):  # replies for up to 5 s
            if proto.replies >= result.sent:
                break
            await asyncio.sleep(0.01)
        result.accepted = proto.replies - proto.errors
        result.no_receiver = proto.zero if via == "publish" else 0  # FCALL's 0 means "not recorded"
        result.errors, result.first_error = proto.errors, proto.first_error
        proto.transport.close()
        return result

    async def publish_cluster(self, cluster: ClusterMap, rate: float, seconds: float, tag: str,
                              via: Via) -> PublishResult:
        """`publish` on a Redis Cluster: SPUBLISH or FCALL, each to the primary of its slot, pipelined on
        one connection per primary, each connection written every 2 ms with what is due for it. Pacing,
        payloads and the choice of users are those of `publish`; a MOVED reply (the map went stale)
        counts as an error, with its text kept."""
        loop = asyncio.get_running_loop()
        protos: list[RespCounter] = []
        for host, port in cluster.primaries:
            _, proto = await loop.create_connection(RespCounter, host, port)
            assert proto.transport is not None
            protos.append(proto)
        result = PublishResult(by_node=[0] * len(protos))
        started = time.monotonic()
        end = started + seconds
        while (now := time.monotonic()) < end:
            due = int((now - started) * rate) - result.sent
            if due > 0:
                batches: list[list[bytes]] = [[] for _ in protos]
                for _ in range(due):
                    uid = random.choice(self.users)
                    node = self.node_of[uid]
                    batches[node].append(self.cluster_command(via, uid, self.body(tag, result.sent)))
                    result.by_node[node] += 1
                    result.sent += 1
                for proto, batch in zip(protos, batches, strict=True):
                    if batch and proto.transport is not None:
                        proto.transport.write(b"".join(batch))
            await asyncio.sleep(0.002)
        for _ in range(500):  # replies for up to 5 s
            if sum(p.replies for p in protos) >= result.sent:
                break
            await asyncio.sleep(0.01)
        result.errors = sum(p.errors for p in protos)
        result.accepted = sum(p.replies for p in protos) - result.errors
        result.no_receiver = sum(p.zero for p in protos) if via == "publish" else 0  # FCALL's 0: "not recorded"
        result.first_error = next((p.first_error for p in protos if p.first_error), "")
        for proto in protos:
            if proto.transport is not None:
                proto.transport.close()
        return result

    async def broadcast(self, rate: float, seconds: float, tag: str, connections: int = 64) -> PublishResult:
        """POST /broadcast/user/{id} over keep-alive connections; a request is sent when one is idle."""
        loop = asyncio.get_running_loop()
        idle: list[HttpConn] = []
        conns: list[HttpConn] = []
        for _ in range(connections):
            _, conn = await loop.create_connection(lambda: HttpConn(idle.append), self.target.host, self.target.port)
            conns.append(conn)
            idle.append(conn)
        result = PublishResult()
        started = time.monotonic()
        end = started + seconds
        host = f"{self.target.host}:{self.target.port}".encode()
        while (now := time.monotonic()) < end:
            due = int((now - started) * rate) - result.sent
            while due > 0 and idle:
                conn = idle.pop()
                uid = random.choice(self.users).encode()
                body = self.envelope(self.body(tag, result.sent))
                if conn.transport is None:
                    continue
                conn.transport.write(b"POST /broadcast/user/%s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json"
                                     b"\r\nContent-Length: %d\r\n\r\n%s" % (uid, host, len(body), body))
                result.sent += 1
                due -= 1
            await asyncio.sleep(0.001)
        for _ in range(500):  # outstanding responses for up to 5 s
            if len(idle) >= len(conns):
                break
            await asyncio.sleep(0.01)
        result.accepted = sum(c.ok for c in conns)
        result.errors = sum(c.errors for c in conns)
        result.first_error = next((c.first_error for c in conns if c.first_error), "")
        result.no_receiver = sum(c.no_receiver for c in conns)
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()
        return result


class StallPublisher:
    """The stall phase's traffic: round-robin over everyone (`driver_location` rounds for drivers A
    and B, then `ride_status` rounds), plus a flood for the stalled users only."""

    def __init__(self, target: Target, users: list[str], plan: StallPlan, tag: str, stalled: list[str]) -> None:
        self.prefix = target.prefix
        self.users = users
        self.plan = plan
        self.tag = tag
        self.stalled = stalled
        self.stalled_set = set(stalled)
        self.sent = StallSent()
        self.n = 0
        self.pad = b"x" * max(0, plan.flood_bytes - 90)

    def everyone(self, i: int) -> bytes:
        uid = self.users[i % len(self.users)]
        round_ = i // len(self.users)
        kind = "ride_status" if round_ % 2 else "driver_location"
        return self.message(uid, kind, "AB"[(round_ // 2) % 2], self.tag)

    def flood(self, i: int) -> bytes:
        uid = self.stalled[i % len(self.stalled)]
        kind = self.plan.flood_type
        return self.message(uid, kind, "AB"[(i // len(self.stalled)) % 2], self.tag + "F")

    def message(self, uid: str, kind: str, driver: str, tag: str) -> bytes:
        self.n += 1
        if uid in self.stalled_set:
            self.sent.sent_stalled += 1
            if kind == "ride_status":
                self.sent.statuses[uid] = self.sent.statuses.get(uid, 0) + 1
            elif kind == "driver_location":
                self.sent.positions.setdefault(uid, {})[driver] = self.n
        else:
            self.sent.sent_healthy += 1
        return stall_message(self.prefix, uid, kind, self.n, tag, driver, self.pad)

    async def run(self, redis_host: str, redis_port: int) -> StallSent:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(RespCounter, redis_host, redis_port)
        assert proto.transport is not None
        plan = self.plan
        started = time.monotonic()
        end = started + plan.seconds
        background = flooded = 0
        while (now := time.monotonic()) < end:
            batch = []
            for _ in range(int((now - started) * plan.rate) - background):
                batch.append(self.everyone(background))
                background += 1
            if self.stalled:
                for _ in range(int((now - started) * plan.flood_rate) - flooded):
                    batch.append(self.flood(flooded))
                    flooded += 1
            if batch:
                proto.transport.write(b"".join(batch))
            await asyncio.sleep(0.002)
        for _ in range(500):  # replies for up to 5 s
            if proto.replies >= background + flooded:
                break
            await asyncio.sleep(0.01)
        self.sent.errors, self.sent.first_error = proto.errors, proto.first_error
        proto.transport.close()
        return self.sent


def publisher_main(target: Target, pipe: Pipe) -> None:
    """Separate process so its CPU is measured on its own and it does not steal the workers' loop."""
    install_uvloop()
    users: list[str] = pipe.recv()
    publisher = Publisher(target, users)
    while True:
        command = pipe.recv()
        if command[0] == "stop":
            return
        if command[0] == "stall":
            plan, tag, stalled = command[1:]
            stall = StallPublisher(target, users, plan, tag, stalled)
            pipe.send(asyncio.run(stall.run(target.redis_host, target.redis_port)))
            continue
        via, rate, seconds, tag = command[1:]
        if via == "http":
            result = asyncio.run(publisher.broadcast(float(rate), float(seconds), str(tag)))
        else:
            result = asyncio.run(publisher.publish(float(rate), float(seconds), str(tag), via))
        pipe.send(result)


# --------------------------------------------------------------------------------------------
# collector process: what reaches <prefix>:events:location_update
# --------------------------------------------------------------------------------------------

class EventCollector(asyncio.Protocol):
    """Subscribed to the events channel; keeps latencies by the phase tag carried in tripId."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.latencies: dict[str, list[int]] = {}
        self.subscribed = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if not isinstance(reply, list) or len(reply) != 3:
                continue
            if reply[0] == b"subscribe":
                if not self.subscribed.done():
                    self.subscribed.set_result(True)
                continue
            self._event(cast(bytes, reply[2]))

    def _event(self, data: bytes) -> None:
        now = now_us()
        try:
            payload = ujson.loads(data)["payload"]
            tag = payload["tripId"].rsplit("-", 2)[0]
            self.latencies.setdefault(tag, []).append(now - int(payload["timestamp"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            return


async def collect(target: Target, pipe: Pipe) -> None:
    loop = asyncio.get_running_loop()
    collector = EventCollector()
    transport, _ = await loop.create_connection(lambda: collector, target.redis_host, target.redis_port)
    channel = f"{target.prefix}:events:location_update".encode()
    transport.write(resp_command(b"SUBSCRIBE", channel))
    await asyncio.wait_for(collector.subscribed, 5.0)
    pipe.send(("subscribed",))
    queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
    reader = asyncio.ensure_future(poll_pipe(pipe, queue))
    while True:
        command = await queue.get()
        if command[0] == "stop":
            break
        pipe.send(collector.latencies.pop(str(command[1]), []))
    reader.cancel()
    transport.close()


def collector_main(target: Target, pipe: Pipe) -> None:
    install_uvloop()
    asyncio.run(collect(target, pipe))


# --------------------------------------------------------------------------------------------
# measurement helpers (coordinator side)
# --------------------------------------------------------------------------------------------

class ProcessGroup:
    """CPU seconds and RSS of a set of processes (a server's parent and children, or our own helpers)."""

    def __init__(self, pids: Sequence[int], include_children: bool) -> None:
        self.pids = list(pids)
        self.include_children = include_children

    def processes(self) -> list[psutil.Process]:
        found: list[psutil.Process] = []
        for pid in self.pids:
            try:
                proc = psutil.Process(pid)
                found.append(proc)
                if self.include_children:
                    found.extend(proc.children(recursive=True))
            except psutil.NoSuchProcess:
                continue
        return found

    def cpu_s(self) -> float:
        total = 0.0
        for proc in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def rss_bytes(self) -> int:
        total = 0
        for proc in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += int(proc.memory_info().rss)
        return total

    def count(self) -> int:
        return len(self.processes())


class CpuMeter(Protocol):
    def cpu_s(self) -> float: ...


class RedisInfoCpu:
    """One Redis node's CPU as the node reports it (`INFO cpu`: used_cpu_sys + used_cpu_user, from
    getrusage, in microseconds). /proc's utime and stime (psutil) count 10 ms ticks, too coarse for one
    node of a cluster over a few seconds; asking costs the node one INFO per reading."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    def cpu_s(self) -> float:
        text = redis_call(self.host, self.port, "INFO", "cpu")
        fields = dict(line.split(":", 1) for line in (text.decode() if isinstance(text, bytes) else str(text))
                      .splitlines() if ":" in line)
        return float(fields["used_cpu_sys"]) + float(fields["used_cpu_user"])


class MeterSum:
    def __init__(self, meters: Sequence[CpuMeter]) -> None:
        self.meters = list(meters)

    def cpu_s(self) -> float:
        return sum(meter.cpu_s() for meter in self.meters)


class CpuWindow:
    """CPU used by a process group between construction and `stop()`."""

    def __init__(self, group: CpuMeter) -> None:
        self.group = group
        self.cpu0 = group.cpu_s()
        self.t0 = time.monotonic()

    def stop(self) -> tuple[float, float]:
        """(cpu seconds, wall seconds)."""
        return self.group.cpu_s() - self.cpu0, time.monotonic() - self.t0


@dataclass(frozen=True)
class StepCpu:
    """CPU seconds over one step window, by who spent them, and the window's wall seconds."""

    server: float
    loadgen: float
    driver: float
    redis: float
    wall: float
    redis_nodes: tuple[float, ...] = ()  # the Redis CPU node by node, in the order of the measured pids


@dataclass(frozen=True)
class StepWindows:
    """Windows opened together at the start of a step, so every figure covers the same seconds."""

    server: CpuWindow
    loadgen: CpuWindow
    driver: CpuWindow
    redis: CpuWindow
    redis_nodes: tuple[CpuWindow, ...] = ()

    def stop(self) -> StepCpu:
        server, wall = self.server.stop()
        return StepCpu(server, self.loadgen.stop()[0], self.driver.stop()[0], self.redis.stop()[0], wall,
                       tuple(window.stop()[0] for window in self.redis_nodes))


@dataclass(frozen=True)
class Deliveries:
    """What the clients received in one step: latency samples (one per delivery), and how many of
    those deliveries carried an envelope `seq`, i.e. were recorded."""

    latencies: list[int]
    sequenced: int = 0


def percentile(sorted_values: list[int], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, math.ceil(fraction * len(sorted_values)) - 1))
    return float(sorted_values[index])


def latency_summary(values: list[int]) -> tuple[float, float, float]:
    """(p50, p99, max) in milliseconds from microsecond samples."""
    values.sort()
    if not values:
        return 0.0, 0.0, 0.0
    return percentile(values, 0.50) / 1000, percentile(values, 0.99) / 1000, values[-1] / 1000


# --------------------------------------------------------------------------------------------
# coordinator
# --------------------------------------------------------------------------------------------

def fanout_order(config: LoadConfig) -> list[tuple[Via, int]]:
    """Steps rate by rate, every path at one rate before the next rate (publish 1000, fcall 1000,
    publish 4000, ...): paths that are compared run seconds apart, not a whole sweep apart, so a
    machine that gets busier during the run shifts both sides of a ratio alike."""
    rates = sorted({rate for via in config.fanout_via for rate in config.rates_for(via)})
    return [(via, rate) for rate in rates for via in config.fanout_via if rate in config.rates_for(via)]


@dataclass
class Helpers:
    worker_pipes: list[Pipe] = field(default_factory=list)
    worker_procs: list[multiprocessing.process.BaseProcess] = field(default_factory=list)
    publisher_pipe: Pipe | None = None
    publisher_proc: multiprocessing.process.BaseProcess | None = None
    collector_pipe: Pipe | None = None
    collector_proc: multiprocessing.process.BaseProcess | None = None


class Coordinator:
    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self.ctx = multiprocessing.get_context("fork")
        self.counters: SynchronizedArray[int] = self.ctx.Array("q", config.workers * N_COUNTERS, lock=False)
        self.helpers = Helpers()
        self.server = ProcessGroup([config.server_pid] if config.server_pid else [], include_children=True)
        self.redis: CpuMeter = ProcessGroup(config.measured_redis_pids(), include_children=False)
        # Extended reports (a cluster, several Redis pids, or --redis-cpu info): each pid is also measured on
        # its own, and named by its node (its INFO process_id); with "info" each node reports its own CPU.
        self.extended = config.extended_report()
        self.redis_pids = config.measured_redis_pids() if self.extended else []
        self.redis_labels = redis_labels(config.target, self.redis_pids) if self.redis_pids else {}
        self.redis_meters: list[CpuMeter] = [self.node_meter(pid) for pid in self.redis_pids]
        if config.redis_cpu == "info" and self.redis_meters:
            self.redis = MeterSum(self.redis_meters)
        self.steps: list[StepReport] = []
        self.close_codes: dict[str, int] = {}
        self.connected_users: list[str] = []
        self.connected_indexes: list[int] = []

    # --- helpers -----------------------------------------------------------------------------

    def node_meter(self, pid: int) -> CpuMeter:
        """How one Redis pid's CPU is read: psutil, or with --redis-cpu info its node's INFO cpu."""
        label = self.redis_labels.get(pid)
        if self.config.redis_cpu == "info":
            if label is None:
                raise SystemExit(f"loadgen.py: --redis-cpu info: Redis pid {pid} is none of the nodes at --redis")
            host, _, port = label[0].rpartition(":")
            return RedisInfoCpu(host, int(port))
        return ProcessGroup([pid], include_children=False)

    def log(self, text: str) -> None:
        if not self.config.quiet:
            print(text, flush=True)

    def counter(self, which: int) -> int:
        return sum(self.counters[w * N_COUNTERS + which] for w in range(self.config.workers))

    def loadgen_group(self) -> ProcessGroup:
        return ProcessGroup([p.pid for p in self.helpers.worker_procs if p.pid is not None], include_children=False)

    def driver_group(self) -> ProcessGroup:
        procs = [self.helpers.publisher_proc, self.helpers.collector_proc]
        return ProcessGroup([p.pid for p in procs if p is not None and p.pid is not None], include_children=False)

    def start_workers(self) -> None:
        config = self.config
        per = math.ceil(config.connections / config.workers)
        for w in range(config.workers):
            first = w * per
            count = max(0, min(per, config.connections - first))
            spec = WorkerSpec(w, config.target, first, count, max(1.0, config.connect_rate / config.workers),
                              max(1, config.concurrency // config.workers), config.source_ips, config.run_id,
                              config.connect_timeout_s, config.connections, config.stall)
            parent, child = self.ctx.Pipe()
            proc = self.ctx.Process(target=worker_main, args=(spec, child, self.counters), daemon=True)
            proc.start()
            self.helpers.worker_pipes.append(parent)
            self.helpers.worker_procs.append(proc)

    def start_publisher(self) -> None:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=publisher_main, args=(self.config.target, child), daemon=True)
        proc.start()
        parent.send(self.connected_users)
        self.helpers.publisher_pipe, self.helpers.publisher_proc = parent, proc

    def start_collector(self) -> None:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=collector_main, args=(self.config.target, child), daemon=True)
        proc.start()
        if not parent.poll(10):
            raise RuntimeError("event collector did not subscribe")
        parent.recv()
        self.helpers.collector_pipe, self.helpers.collector_proc = parent, proc

    def ask_workers(self, command: tuple[Any, ...], timeout: float) -> list[Any]:
        for pipe in self.helpers.worker_pipes:
            pipe.send(command)
        replies: list[Any] = []
        deadline = time.monotonic() + timeout
        for pipe in self.helpers.worker_pipes:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"worker did not answer {command[0]} within {timeout:.0f} s")
            replies.append(pipe.recv()[1])
        return replies

    # --- phases --------------------------------------------------------------------------------

    def connect_phase(self) -> ConnectReport:
        config = self.config
        gateway = CpuWindow(self.server)
        loadgen = CpuWindow(self.loadgen_group())
        for pipe in self.helpers.worker_pipes:
            pipe.send(("connect",))
        started = time.monotonic()
        limit = config.connections / config.connect_rate + config.connect_timeout_s + HANDSHAKE_TIMEOUT_S + 10
        replies: list[list[int]] = []
        pending = list(self.helpers.worker_pipes)
        last_open = 0
        next_line = started + 1.0
        while pending and time.monotonic() - started < limit:
            for pipe in list(pending):
                if pipe.poll(0):
                    replies.append(pipe.recv()[1])
                    pending.remove(pipe)
            time.sleep(0.05)
            if time.monotonic() < next_line:
                continue
            next_line += 1.0
            now_open = self.counter(C_OPEN)
            self.log(f"[connect] {time.monotonic() - started:6.1f}s open={now_open}/{config.connections} "
                     f"failed={self.counter(C_FAILED)} in_flight={self.counter(C_PENDING)} "
                     f"rate={now_open - last_open}/s")
            last_open = now_open
        if pending:
            raise RuntimeError("connect phase did not finish in time")
        seconds = time.monotonic() - started
        gw_cpu, _ = gateway.stop()
        lg_cpu, _ = loadgen.stop()
        indexes = sorted(i for reply in replies for i in reply)
        self.connected_indexes = indexes
        self.connected_users = [user_id(config.run_id, i) for i in indexes]
        connected = len(indexes)
        return {"target": config.connections, "connected": connected, "failed": config.connections - connected,
                "seconds": round(seconds, 2), "rate_per_s": round(connected / seconds, 1) if seconds else 0.0,
                "gateway_cpu_s": round(gw_cpu, 3),
                "gateway_ms_per_conn": round(1000 * gw_cpu / connected, 4) if connected else 0.0,
                "loadgen_cpu_s": round(lg_cpu, 3)}

    def hold_phase(self, rss_baseline: int) -> HoldReport:
        config = self.config
        time.sleep(min(2.0, config.hold_s))  # let the connect burst's garbage and buffers settle
        start_open = self.counter(C_OPEN)
        heartbeats0 = self.counter(C_HEARTBEATS)
        gateway = CpuWindow(self.server)
        loadgen = CpuWindow(self.loadgen_group())
        redis_idle = CpuWindow(self.redis) if self.extended else None
        end = time.monotonic() + max(0.0, config.hold_s - 2.0)
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 10.0))
            self.log(f"[hold] open={self.counter(C_OPEN)} heartbeats={self.counter(C_HEARTBEATS) - heartbeats0} "
                     f"closed_by_server={self.counter(C_CLOSED)} gateway_rss={self.server.rss_bytes() / 2**20:.0f} MB")
        gw_cpu, wall = gateway.stop()
        lg_cpu, _ = loadgen.stop()
        rss = self.server.rss_bytes()
        connected = self.counter(C_OPEN)
        heartbeats = self.counter(C_HEARTBEATS) - heartbeats0
        report: HoldReport = {
            "seconds": round(wall, 1), "connected_start": start_open, "connected_end": connected,
            "heartbeats": heartbeats, "heartbeats_per_s": round(heartbeats / wall, 1) if wall else 0.0,
            "gateway_cpu_pct": round(100 * gw_cpu / wall, 2) if wall else 0.0,
            "loadgen_cpu_pct": round(100 * lg_cpu / wall, 2) if wall else 0.0,
            "rss_baseline_mb": round(rss_baseline / 2**20, 1), "rss_mb": round(rss / 2**20, 1),
            "rss_per_conn_kb": round((rss - rss_baseline) / 1024 / connected, 2) if connected else 0.0}
        if redis_idle is not None:
            redis_cpu, redis_wall = redis_idle.stop()
            report["redis_cpu_pct"] = round(100 * redis_cpu / redis_wall, 3) if redis_wall else 0.0
        return report

    def step_windows(self) -> StepWindows:
        """CPU of the server, the load generator, the driver (publisher or collector) and Redis over a step."""
        return StepWindows(CpuWindow(self.server), CpuWindow(self.loadgen_group()), CpuWindow(self.driver_group()),
                           CpuWindow(self.redis), tuple(CpuWindow(meter) for meter in self.redis_meters))

    def fanout_step(self, via: Via, rate: int) -> StepReport:
        config = self.config
        tag = f"{via}{rate}r{random.randrange(1 << 30)}"
        assert self.helpers.publisher_pipe is not None
        windows = self.step_windows()
        self.helpers.publisher_pipe.send(("run", via, rate, config.step_s, tag))
        if not self.helpers.publisher_pipe.poll(config.step_s + 30):
            raise RuntimeError("publisher did not finish its step")
        result: PublishResult = self.helpers.publisher_pipe.recv()
        time.sleep(DRAIN_GRACE_S)
        cpu = windows.stop()
        if result.first_error:
            self.log(f"[{via} {rate}/s] {result.errors} refused, the first: {result.first_error}")
        replies: list[tuple[list[int], int]] = self.ask_workers(("latencies", tag), 30)
        deliveries = Deliveries([v for latencies, _ in replies for v in latencies], sum(n for _, n in replies))
        return self.step_report(via, rate, result, deliveries, cpu)

    def stall_phase(self, plan: StallPlan) -> StallReport:
        """Stop the stalled clients reading, let messages flow for `plan.seconds` (resuming them after
        `plan.resume_after_s` if set), then measure what the healthy got and the server's memory."""
        config = self.config
        stalled_users = [user_id(config.run_id, i) for i in self.connected_indexes
                         if plan.stalls(i, config.connections)]
        if self.helpers.publisher_pipe is None:
            self.start_publisher()
        assert self.helpers.publisher_pipe is not None
        baseline = self.server.rss_bytes()
        tag = f"stall{random.randrange(1 << 30)}"
        self.ask_workers(("stall",), 30)
        self.log(f"[stall] {len(stalled_users)} clients stopped reading; RSS {baseline / 2**20:.1f} MB")
        gateway = CpuWindow(self.server)
        self.helpers.publisher_pipe.send(("stall", plan, tag, stalled_users))
        peak, resumed = self._stall_window(plan, baseline)
        sent: StallSent = self.helpers.publisher_pipe.recv()
        if sent.first_error:
            self.log(f"[stall] {sent.errors} PUBLISH refused, the first: {sent.first_error}")
        # The tail: in-flight messages reach the healthy, resumed clients catch up, and a shed client's
        # socket is aborted CLOSE_TIMEOUT_S after its 4503.
        peak = max(peak, self._sample_peak(STALL_SETTLE_S))
        cpu, wall = gateway.stop()
        latencies = [v for lat, _ in self.ask_workers(("latencies", tag), 30) for v in lat]
        results: dict[int, tuple[dict[str, int], int, bool]] = {}
        for reply in self.ask_workers(("stalled_results",), 30):
            results.update(reply)
        healthy_closed = sum(self.ask_workers(("healthy_closed",), 30))
        stalled_lost = sum(1 for _p, _s, is_open in results.values() if not is_open)
        if not resumed:
            stalled_lost = sum(self.ask_workers(("probe_stalled", PROBE_S), 30 + PROBE_S))
            self.ask_workers(("drop_stalled",), 30)
        final, after = self._settle_rss(baseline)
        stale = missing = 0
        if resumed:
            for index, (positions, statuses, is_open) in results.items():
                uid = user_id(config.run_id, index)
                expected = sent.positions.get(uid, {})
                stale += int(is_open and any(positions.get(d) != n for d, n in expected.items()))
                missing += max(0, sent.statuses.get(uid, 0) - statuses)
        p50, p99, worst = latency_summary(latencies)
        report: StallReport = {
            "stalled": len(stalled_users), "healthy": len(self.connected_users) - len(stalled_users),
            "seconds": plan.seconds, "resumed": resumed, "sent_healthy": sent.sent_healthy,
            "delivered_healthy": len(latencies), "lost_healthy": max(0, sent.sent_healthy - len(latencies)),
            "p50_ms": round(p50, 2), "p99_ms": round(p99, 2), "max_ms": round(worst, 2),
            "sent_stalled": sent.sent_stalled, "healthy_closed": healthy_closed,
            "stalled_lost": stalled_lost, "stalled_open": len(results) - stalled_lost,
            "stale_positions": stale, "missing_statuses": missing,
            "rss_baseline_mb": round(baseline / 2**20, 1), "rss_peak_mb": round(peak / 2**20, 1),
            "rss_final_mb": round(final / 2**20, 1), "rss_final_after_s": round(after, 1),
            "gateway_cpu_pct": round(100 * cpu / wall, 1) if wall else 0.0}
        self.log(format_stall(report))
        return report

    def _stall_window(self, plan: StallPlan, baseline: int) -> tuple[int, bool]:
        """While the publisher runs: the server's peak RSS, and the resume when it is due."""
        assert self.helpers.publisher_pipe is not None
        started = time.monotonic()
        peak, resumed = baseline, False
        while not self.helpers.publisher_pipe.poll(RSS_SAMPLE_S):
            peak = max(peak, self.server.rss_bytes())
            elapsed = time.monotonic() - started
            if plan.resume_after_s and not resumed and elapsed >= plan.resume_after_s:
                self.ask_workers(("resume",), 30)
                resumed = True
                self.log(f"[stall] {elapsed:.1f}s: the stalled clients read again")
            if elapsed > plan.seconds + 30:
                raise RuntimeError("publisher did not finish the stall phase")
        if plan.resume_after_s and not resumed:  # due at (or after) the end of the window: what they get
            self.ask_workers(("resume",), 30)  # is then only what waited for them in the gateway
            resumed = True
            self.log(f"[stall] {time.monotonic() - started:.1f}s: the stalled clients read again")
        return peak, resumed

    def _sample_peak(self, seconds: float) -> int:
        peak, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            peak = max(peak, self.server.rss_bytes())
            time.sleep(RSS_SAMPLE_S)
        return peak

    def _settle_rss(self, baseline: int) -> tuple[int, float]:
        """The server's RSS once it is back within RSS_SETTLED of the baseline, or after RSS_SETTLE_MAX_S:
        it gives memory back on its housekeeping tick (every 5 s by default)."""
        started = time.monotonic()
        rss = self.server.rss_bytes()
        while rss > baseline * RSS_SETTLED and time.monotonic() - started < RSS_SETTLE_MAX_S:
            time.sleep(RSS_SAMPLE_S)
            rss = self.server.rss_bytes()
        return rss, time.monotonic() - started

    def upstream_step(self, rate: int) -> StepReport:
        config = self.config
        tag = f"up{rate}r{random.randrange(1 << 30)}"
        assert self.helpers.collector_pipe is not None
        windows = self.step_windows()
        sent = sum(self.ask_workers(("upstream", rate / config.workers, config.step_s, tag), config.step_s + 30))
        time.sleep(DRAIN_GRACE_S)
        cpu = windows.stop()
        self.helpers.collector_pipe.send(("latencies", tag))
        latencies: list[int] = self.helpers.collector_pipe.recv()
        return self.step_report("upstream", rate, PublishResult(sent, sent), Deliveries(latencies), cpu)

    def step_report(self, kind: str, rate: int, result: PublishResult, deliveries: Deliveries,
                    cpu: StepCpu) -> StepReport:
        p50, p99, worst = latency_summary(deliveries.latencies)
        delivered = len(deliveries.latencies)
        seconds = self.config.step_s

        def per_msg(cpu_s: float) -> float:
            return round(1e6 * cpu_s / delivered, 1) if delivered else 0.0

        def pct(cpu_s: float) -> float:
            return round(100 * cpu_s / cpu.wall, 1)

        report: StepReport = {
            "kind": kind, "target_rate": rate, "seconds": seconds, "sent": result.sent, "accepted": result.accepted,
            "no_receiver": result.no_receiver, "errors": result.errors, "delivered": delivered,
            "sequenced": deliveries.sequenced, "lost": max(0, result.sent - delivered),
            "delivered_per_s": round(delivered / seconds, 1), "p50_ms": round(p50, 2), "p99_ms": round(p99, 2),
            "max_ms": round(worst, 2), "gateway_cpu_s": round(cpu.server, 3),
            "gateway_us_per_msg": per_msg(cpu.server), "gateway_cpu_pct": pct(cpu.server),
            "redis_cpu_s": round(cpu.redis, 3), "redis_us_per_msg": per_msg(cpu.redis),
            "redis_cpu_pct": pct(cpu.redis), "loadgen_cpu_pct": pct(cpu.loadgen), "driver_cpu_pct": pct(cpu.driver)}
        if self.extended:
            report["window_s"] = round(cpu.wall, 3)
            report["redis_nodes"] = self.node_steps(result, cpu)
        self.log(format_step(report))
        return report

    def node_steps(self, result: PublishResult, cpu: StepCpu) -> list[RedisNodeStep]:
        """The step's Redis CPU node by node, next to the share of the commands each primary was sent."""
        total_cpu, total_sent = sum(cpu.redis_nodes), sum(result.by_node)
        nodes: list[RedisNodeStep] = []
        for pid, cpu_s in zip(self.redis_pids, cpu.redis_nodes, strict=True):
            node, role, shard = self.redis_labels.get(pid, ("", "", -1))
            if self.config.target.cluster is None:  # one Redis: the node at --redis got every command
                sent = result.sent if node == f"{self.config.target.redis_host}:{self.config.target.redis_port}" else 0
            else:
                sent = result.by_node[shard] if role == "primary" and 0 <= shard < len(result.by_node) else 0
            nodes.append({"pid": pid, "node": node, "role": role, "shard": shard, "cpu_s": round(cpu_s, 3),
                          "cpu_pct": round(100 * cpu_s / cpu.wall, 1) if cpu.wall else 0.0,
                          "cpu_share": round(cpu_s / total_cpu, 4) if total_cpu else 0.0, "sent": sent,
                          "sent_share": round(sent / total_sent, 4) if total_sent else 0.0})
        return nodes

    # --- the run -------------------------------------------------------------------------------

    def run(self) -> RunReport:
        config = self.config
        rss_baseline = self.server.rss_bytes()
        self.start_workers()
        try:
            connect = self.connect_phase()
            self.log(format_connect(connect))
            hold = self.hold_phase(rss_baseline)
            self.log(format_hold(hold))
            stall = self.stall_phase(config.stall) if config.stall is not None else None
            fanout = fanout_order(config)
            if fanout:
                self.start_publisher()
                for via, rate in fanout:
                    self.steps.append(self.fanout_step(via, rate))
            if config.upstream_rates:
                self.start_collector()
                for rate in config.upstream_rates:
                    self.steps.append(self.upstream_step(rate))
            final_connected = sum(self.ask_workers(("open_count",), 30))
            rss_end = self.server.rss_bytes()
        finally:
            self.stop_helpers()
        report: RunReport = {
            "flavor": config.target.flavor, "connections": config.connections, "workers": config.workers,
            "gateway_processes": self.server.count(), "connect": connect, "hold": hold, "steps": self.steps,
            "final_connected": final_connected, "close_codes": self.close_codes,
            "gateway_rss_end_mb": round(rss_end / 2**20, 1), "stall": stall}
        if self.extended:
            report["redis_cpu_source"] = config.redis_cpu
        cluster = config.target.cluster
        if cluster is not None:
            report["redis_cluster"] = {
                "seed": f"{config.target.redis_host}:{config.target.redis_port}",
                "primaries": [cluster.label(i) for i in range(len(cluster.primaries))],
                "replicas": [f"{host}:{port}" for host, port, _ in cluster.replicas],
                "nodes": {str(pid): label[0] for pid, label in self.redis_labels.items()}}
        return report

    def stop_helpers(self) -> None:
        for pipe in self.helpers.worker_pipes:
            with contextlib.suppress(OSError):
                pipe.send(("stop",))
        for pipe in self.helpers.worker_pipes:
            with contextlib.suppress(OSError, EOFError):
                if pipe.poll(30):
                    for code, count in pipe.recv()[1].items():
                        self.close_codes[code] = self.close_codes.get(code, 0) + count
        for other in (self.helpers.publisher_pipe, self.helpers.collector_pipe):
            if other is not None:
                with contextlib.suppress(OSError):
                    other.send(("stop",))
        procs = [*self.helpers.worker_procs, self.helpers.publisher_proc, self.helpers.collector_proc]
        for proc in procs:
            if proc is not None:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)


def redis_labels(target: Target, pids: Sequence[int]) -> dict[int, tuple[str, str, int]]:
    """pid -> (host:port, role, shard) for the measured Redis pids that are nodes at --redis (the cluster's
    primaries and replicas, or the one Redis): each node is asked its `process_id` (the same machine, so
    the same pid namespace)."""
    cluster = target.cluster
    if cluster is None:
        nodes = [(target.redis_host, target.redis_port, "", -1)]
    else:
        nodes = [(host, port, "primary", i) for i, (host, port) in enumerate(cluster.primaries)]
        nodes += [(host, port, "replica", i) for host, port, i in cluster.replicas]
    wanted, labels = set(pids), {}
    for host, port, role, shard in nodes:
        try:
            pid = redis_process_id(host, port)
        except (OSError, RuntimeError):
            continue
        if pid in wanted:
            labels[pid] = (f"{host}:{port}", role, shard)
    return labels


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------

def format_connect(c: ConnectReport) -> str:
    return (f"[connect] {c['connected']}/{c['target']} in {c['seconds']} s ({c['rate_per_s']}/s), "
            f"failed {c['failed']}; gateway CPU {c['gateway_cpu_s']} s = {c['gateway_ms_per_conn']} ms/conn; "
            f"loadgen CPU {c['loadgen_cpu_s']} s")


def format_hold(h: HoldReport) -> str:
    return (f"[hold] {h['seconds']} s: open {h['connected_start']} -> {h['connected_end']}, "
            f"heartbeats {h['heartbeats']} ({h['heartbeats_per_s']}/s); gateway CPU {h['gateway_cpu_pct']}%, "
            f"loadgen CPU {h['loadgen_cpu_pct']}%; RSS {h['rss_baseline_mb']} -> {h['rss_mb']} MB "
            f"= {h['rss_per_conn_kb']} KB/conn")


def format_step(s: StepReport) -> str:
    return (f"[{s['kind']} {s['target_rate']}/s] sent {s['sent']} delivered {s['delivered']} "
            f"(with seq {s['sequenced']}) lost {s['lost']} refused {s['errors']} "
            f"({s['delivered_per_s']}/s) p50 {s['p50_ms']} p99 {s['p99_ms']} max {s['max_ms']} ms; "
            f"gateway {s['gateway_us_per_msg']} us/msg ({s['gateway_cpu_pct']}% CPU), "
            f"Redis {s['redis_us_per_msg']} us/msg ({s['redis_cpu_pct']}% CPU{format_nodes(s)}), "
            f"loadgen {s['loadgen_cpu_pct']}%, publisher+collector {s['driver_cpu_pct']}%")


def sent_share(s: StepReport, n: RedisNodeStep) -> str:
    """The node's share of the commands the publisher sent: only the Redis fan-out steps send any."""
    return f"{100 * n['sent_share']:.1f}%" if s["kind"] in ("publish", "fcall") else "-"


def format_nodes(s: StepReport) -> str:
    """`: 127.0.0.1:7001 12.1% (share of Redis CPU 33%, of commands 34.0%), ...`: each node, when broken down."""
    nodes = s.get("redis_nodes")
    if not nodes:
        return ""
    return ": " + ", ".join(f"{n['node'] or n['pid']} {n['cpu_pct']}% (share of Redis CPU {100 * n['cpu_share']:.0f}%, "
                            f"of commands {sent_share(s, n)})" for n in nodes)


def format_stall(s: StallReport) -> str:
    return (f"[stall] {s['stalled']} stalled / {s['healthy']} healthy for {s['seconds']} s"
            f"{' (resumed)' if s['resumed'] else ''}: healthy sent {s['sent_healthy']} delivered "
            f"{s['delivered_healthy']} lost {s['lost_healthy']} p50 {s['p50_ms']} p99 {s['p99_ms']} "
            f"max {s['max_ms']} ms, "
            f"healthy closed {s['healthy_closed']}; stalled: {s['stalled_lost']} shed, {s['stalled_open']} open, "
            f"stale positions {s['stale_positions']}, missing statuses {s['missing_statuses']}; RSS "
            f"{s['rss_baseline_mb']} -> peak {s['rss_peak_mb']} -> {s['rss_final_mb']} MB "
            f"({s['rss_final_after_s']} s after); gateway CPU {s['gateway_cpu_pct']}%")


def format_table(report: RunReport) -> str:
    c, h = report["connect"], report["hold"]
    lines = [
        f"flavor={report['flavor']} connections={report['connections']} workers={report['workers']} "
        f"server processes={report['gateway_processes']}",
        "",
        "| phase | value |",
        "| --- | --- |",
        f"| connected | {c['connected']} / {c['target']} (failed {c['failed']}) |",
        f"| connect rate | {c['rate_per_s']}/s |",
        f"| server CPU per new connection | {c['gateway_ms_per_conn']} ms |",
        f"| server RSS | {h['rss_baseline_mb']} -> {h['rss_mb']} MB ({h['rss_per_conn_kb']} KB/conn) |",
        f"| idle server CPU | {h['gateway_cpu_pct']}% of one core (loadgen {h['loadgen_cpu_pct']}%) |",
        f"| heartbeats received | {h['heartbeats']} ({h['heartbeats_per_s']}/s) |",
        f"| still connected at the end | {report['final_connected']} |",
        f"| closes by the server | {report['close_codes'] or 'none'} |",
        "",
        "| step | target/s | sent | delivered | with seq | lost | delivered/s | p50 ms | p99 ms | max ms "
        "| server us/msg | server CPU% | Redis us/msg | loadgen CPU% | publisher CPU% |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    stall = report.get("stall")
    if stall:  # right under "closes by the server", still in the phase table
        row = lines.index(f"| closes by the server | {report['close_codes'] or 'none'} |") + 1
        lines.insert(row, f"| stall | {format_stall(stall).removeprefix('[stall] ')} |")
    for s in report["steps"]:
        lines.append(f"| {s['kind']} | {s['target_rate']} | {s['sent']} | {s['delivered']} | {s['sequenced']} | "
                     f"{s['lost']} | {s['delivered_per_s']} | {s['p50_ms']} | {s['p99_ms']} | {s['max_ms']} | "
                     f"{s['gateway_us_per_msg']} | {s['gateway_cpu_pct']} | {s['redis_us_per_msg']} | "
                     f"{s['loadgen_cpu_pct']} | {s['driver_cpu_pct']} |")
    nodes = [(s, n) for s in report["steps"] for n in s.get("redis_nodes", [])]
    if nodes:
        lines += ["", "| step | target/s | Redis node | role | CPU % | share of Redis CPU | share of commands sent |",
                  "| --- | ---: | --- | --- | ---: | ---: | ---: |"]
        lines += [f"| {s['kind']} | {s['target_rate']} | {n['node'] or n['pid']} | {n['role'] or '-'} | "
                  f"{n['cpu_pct']} | {100 * n['cpu_share']:.1f}% | {sent_share(s, n)} |" for s, n in nodes]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def source_addresses(count: int, base: int) -> tuple[str, ...]:
    """127.<b>.<x>.<y>: a fresh block per run, so the TIME_WAIT ports a previous run left cannot run us out."""
    return tuple(f"127.{base}.{(2 + i) // 250}.{(2 + i) % 250 + 2}" for i in range(count))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="loadgen.py",
        description="Load generator for tornado-gateway / the python-socketio comparison server. Connects C "
                    "WebSocket clients (answering heartbeats), holds them, then optionally runs fan-out steps "
                    "(Redis PUBLISH and/or POST /broadcast) and upstream steps (location_update), and prints "
                    "a table with the server's and its own CPU. Every phase is bounded in time.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--url", default="ws://127.0.0.1:4010", help="server base URL (host and port are used)")
    parser.add_argument("--flavor", choices=["gateway", "socketio"], default="gateway",
                        help="wire protocol: tornado-gateway JSON frames or Engine.IO/Socket.IO v4")
    parser.add_argument("--secret", default=os.environ.get("JWT_SECRET", ""), help="JWT HS256 secret ($JWT_SECRET)")
    parser.add_argument("--prefix", default=os.environ.get("REDIS_PREFIX", "gateway"),
                        help="the server's REDIS_PREFIX ($REDIS_PREFIX)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379", help="Redis for PUBLISH and the events channel")
    parser.add_argument("--server-pid", type=int, help="server pid; its children are included in CPU/RSS figures")
    parser.add_argument("--redis-pid", type=int_list, action="extend",
                        help="pid of the Redis at --redis, to report its CPU per message (a Redis you started); "
                             "with --redis-cluster, one pid per node (comma list or repeated): CPU in total "
                             "and node by node")
    parser.add_argument("--redis-cpu", choices=["proc", "info"], default="proc",
                        help="how Redis CPU is read: proc (psutil on --redis-pid: /proc ticks of 10 ms, as every "
                             "earlier figure) or info (each node's INFO cpu, in microseconds; the pids are matched "
                             "to the nodes by their INFO process_id). info also adds the Redis idle CPU of the hold "
                             "and node-by-node figures to the report")
    parser.add_argument("--redis-cluster", action="store_true",
                        help="the gateway runs with REDIS_CLUSTER=true and --redis names one node: the publish "
                             "path sends SPUBLISH <prefix>:user:{<userId>} and fcall its FCALL, each to the "
                             "primary of its slot (the map from CLUSTER SLOTS, read once at start)")
    parser.add_argument("-c", "--connections", type=int, default=2000, help="WebSocket clients (one user each)")
    parser.add_argument("--connect-rate", type=float, default=2000.0, help="new connections per second, in total")
    parser.add_argument("--concurrency", type=int, default=1000, help="handshakes in flight, in total")
    parser.add_argument("--workers", type=int, default=0,
                        help=f"client processes (0: one per {MAX_SOCKETS_PER_WORKER // 1000}K connections, at least 1)")
    parser.add_argument("--source-ips", type=int, default=0,
                        help=f"source addresses (0: one per {SOCKETS_PER_SOURCE_ADDRESS} connections, at least 2)")
    parser.add_argument("--source-block", type=int, default=0,
                        help="second octet of the source addresses 127.B.x.y (0: random per run)")
    parser.add_argument("--connect-timeout", type=float, default=0.0,
                        help="seconds allowed for the connect phase beyond C/rate (0: 30 + 20%% of C/rate)")
    parser.add_argument("--hold", type=float, default=10.0, help="seconds to hold idle (CPU/RSS/heartbeats)")
    parser.add_argument("--fanout", default="",
                        help="comma list of publish,fcall,http: fan-out paths to run (Redis PUBLISH, live-only; "
                             "FCALL <prefix>_publish, recording; POST /broadcast/user/{id})")
    parser.add_argument("--rates", type=int_list, default=[1000, 2000, 4000, 8000],
                        help="fan-out rates (messages/s), one step each")
    parser.add_argument("--http-rates", type=int_list, default=None,
                        help="rates of the http path, when they should differ from --rates")
    parser.add_argument("--message-type", choices=sorted(REQUIRED_FIELDS), default="driver_location",
                        help="fan-out message type: driver_location is never recorded; ride_status is recorded "
                             "by fcall and http (PROTOCOL.md 7.1)")
    parser.add_argument("--step", type=float, default=10.0, help="seconds per fan-out/upstream step")
    parser.add_argument("--upstream", type=int_list, default=[], help="upstream total rates (updates/s), one step each")
    parser.add_argument("--stall", type=int, default=0,
                        help="after the hold, this many clients stop reading at once while messages flow (issue #13)")
    parser.add_argument("--stall-seconds", type=float, default=10.0, help="how long messages flow during the stall")
    parser.add_argument("--resume-after", type=float, default=0.0,
                        help="the stalled clients read again after this many seconds (0: never; dropped afterwards)")
    parser.add_argument("--stall-rate", type=int, default=1000,
                        help="messages/s to everyone during the stall (driver_location and ride_status rounds)")
    parser.add_argument("--flood-rate", type=int, default=0, help="messages/s more, to the stalled clients only")
    parser.add_argument("--flood-type", choices=["notification", "driver_location"], default="notification",
                        help="what the flood is: notification queues up in the gateway, driver_location is coalesced")
    parser.add_argument("--flood-bytes", type=int, default=500, help="size of a flood notification")
    parser.add_argument("--stall-rcvbuf", type=int, default=4096, help="SO_RCVBUF of a stalled client's socket")
    parser.add_argument("--run-id", default="", help="user id prefix (default: random)")
    parser.add_argument("--json", help="write the report as JSON to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    parts = urlsplit(args.url)
    redis_parts = urlsplit(args.redis)
    if not args.secret:
        raise SystemExit("loadgen.py: --secret (or JWT_SECRET) is required")
    target = Target(parts.hostname or "127.0.0.1", parts.port or 80, args.flavor, args.secret, args.prefix,
                    redis_parts.hostname or "127.0.0.1", redis_parts.port or 6379, args.message_type)
    workers = args.workers or max(1, math.ceil(args.connections / MAX_SOCKETS_PER_WORKER))
    if math.ceil(args.connections / workers) > MAX_SOCKETS_PER_WORKER:
        raise SystemExit(f"loadgen.py: more than {MAX_SOCKETS_PER_WORKER} sockets per worker; raise --workers")
    ips = args.source_ips or max(2, math.ceil(args.connections / SOCKETS_PER_SOURCE_ADDRESS))
    base = args.source_block if args.source_block else random.randrange(1, 255)
    timeout = args.connect_timeout or 30.0 + 0.2 * args.connections / args.connect_rate
    fanout = [v.strip() for v in args.fanout.split(",") if v.strip()]
    for via in fanout:
        if via not in ("publish", "fcall", "http"):
            raise SystemExit(f"loadgen.py: unknown fan-out path {via!r}")
    if "fcall" in fanout and args.flavor != "gateway":
        raise SystemExit("loadgen.py: fcall is the gateway's recording function; python-socketio has none")
    if args.redis_cluster:
        if args.flavor != "gateway":
            raise SystemExit("loadgen.py: --redis-cluster is the gateway's cluster mode; python-socketio has none")
        if args.stall:
            raise SystemExit("loadgen.py: --stall publishes with PUBLISH to one Redis; not in --redis-cluster")
        target = dataclasses.replace(target, cluster=read_cluster_map(target.redis_host, target.redis_port))
    pids: list[int] = args.redis_pid or []
    return LoadConfig(target=target, connections=args.connections, connect_rate=args.connect_rate, workers=workers,
                      hold_s=args.hold, fanout_via=cast(list[Via], fanout), fanout_rates=args.rates,
                      step_s=args.step, upstream_rates=args.upstream, server_pid=args.server_pid,
                      run_id=args.run_id or f"lg{random.randrange(16**6):06x}",
                      connect_timeout_s=timeout, concurrency=args.concurrency, source_ips=source_addresses(ips, base),
                      json_out=args.json, quiet=args.quiet, http_rates=args.http_rates,
                      redis_pid=pids[0] if pids else None, stall=stall_plan(args), redis_pids=tuple(pids[1:]),
                      redis_cpu=cast(RedisCpuSource, args.redis_cpu))


def stall_plan(args: argparse.Namespace) -> StallPlan | None:
    if args.stall <= 0:
        return None
    if args.flavor != "gateway":
        raise SystemExit("loadgen.py: --stall speaks the gateway's protocol only")
    if args.stall > args.connections:
        raise SystemExit("loadgen.py: --stall is more than --connections")
    return StallPlan(args.stall, args.stall_seconds, args.resume_after, args.stall_rate, args.flood_rate,
                     args.flood_type, args.flood_bytes, args.stall_rcvbuf)


def run(config: LoadConfig) -> RunReport:
    report = Coordinator(config).run()
    if config.json_out:
        with open(config.json_out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    config = config_from_args(parse_args(argv))
    raise_file_limit()
    report = run(config)
    print(format_table(report))
    if config.stall is not None:  # the stalled clients leave (shed or dropped) unless they resumed
        return 0 if report["stall"] is not None and not report["stall"]["healthy_closed"] else 1
    return 0 if report["final_connected"] == report["connect"]["connected"] else 1


if __name__ == "__main__":
    sys.exit(main())
