"""Redis CPU per command for what the gateway does per event, measured on Redis servers of its own, written into
docs/capacity/inputs.json for scripts/capacity.py (issue #11).

What one run does, every phase bounded:

1. starts two redis-server processes on free ports below 32768 (never the shared one on 6379), no persistence:
   a plain one, and a cluster-enabled one that is its own one-node cluster (`CLUSTER ADDSLOTSRANGE 0 16383`) for
   SPUBLISH; both are stopped by their pid at the end;
2. sets up what the gateway would have: one subscriber connection holding 10,000 user channels (`SUBSCRIBE`, or
   `SSUBSCRIBE` on the cluster node) read by a thread, subscribers on the location-event channels, the history
   function library of tornado_gateway.history_redis.render_library loaded for the prefix `cap`;
3. for each case, in rounds (every case once per round, so a machine that gets busier shifts them all alike),
   sends N commands as pipelines of `--depth` commands (a gateway writes tens of commands per loop iteration) over
   one connection, and reads the server's own accounting around them: `INFO commandstats` `usec_per_call`
   (the command's execution only) and `used_cpu_sys + used_cpu_user` (everything: reading and parsing the
   requests, execution, writing the replies and the messages to subscribers), less the server's idle CPU over
   the same time. The second divided by N is the figure the capacity model uses; the difference is the I/O share;
4. measures Redis memory per connected device (presence entry and user sets, the subscription) and per recorded
   message kept (history), from `used_memory` deltas;
5. measures the kernel's slab memory per idle TCP socket (the gateway's RSS does not include it), from
   /proc/meminfo over loopback connections this process opens;
6. writes medians (and every sample) into the inputs file, keeping every figure it does not own.

    python scripts/redis_costs.py                    # ~1-2 minutes, writes docs/capacity/inputs.json
    python scripts/redis_costs.py --rounds 3 --commands 5000 --no-write
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hiredis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.bench import calibrate  # noqa: E402 - needs ROOT on sys.path when run as a file
from scripts.loadgen import free_port, resp_command, stop_process  # noqa: E402
from tornado_gateway.history_redis import render_library  # noqa: E402
from tornado_gateway.presence_redis import REGISTER, UNREGISTER  # noqa: E402
from tornado_gateway.redis_keys import Keys  # noqa: E402

INPUTS = ROOT / "docs" / "capacity" / "inputs.json"
PREFIX = "cap"
KEYS = Keys(PREFIX)
CLUSTER_KEYS = Keys(PREFIX, cluster=True)  # REDIS_CLUSTER=true: hash-tagged names, SPUBLISH inside the function
USERS = 10_000  # user channels the subscriber connection holds (one gateway instance's users)
SERVER_ID = "gw-a-1"
HISTORY_SIZE, HISTORY_TTL_S, MAX_MESSAGE_SIZE = 100, 300.0, 65536  # the gateway's defaults (config.py)
MEMORY_DEVICES = 20_000
SOCKET_PAIRS = 4_000  # loopback connections for the kernel-memory figure (8,000 sockets)
QUIET_S = 0.1  # a subscriber that received nothing for this long has been sent everything

# What the gateway sends, byte for byte in shape (sizes are reported with the results).
USER_MESSAGE = (b'{"type":"driver_location","payload":{"driverId":"d-482913","latitude":12.971598,'
                b'"longitude":77.594562,"heading":184,"speed":8.4},"id":"dispatch-7-912873","timestamp":1764547200123}')
RECORDED_BODY = b'{"type":"ride_status","payload":{"rideId":"r-90817263","status":"driver_arriving","etaSeconds":240}'


def recorded_message(message_id: str | None) -> bytes:
    """A ride_status as a service records it: with a producer id (publisher.py's `message_id`, which makes a retry
    safe: the function then also keeps the id for dedupe) or without one (what bench.py and storm.py send)."""
    tail = b',"timestamp":1764547200123}'
    return RECORDED_BODY + (b',"id":"%s"' % message_id.encode() if message_id else b"") + tail


RECORDED_MESSAGE = recorded_message("ride-0-55120931")  # its size is reported
LOCATION_EVENT = (b'{"type":"location_update","userId":"u-1283746","userType":"driver","deviceId":"dev-99812",'
                  b'"serverId":"gw-a-1","connectionId":"gw-a-1-182733","receivedAt":1764547200123,'
                  b'"id":"gw-a-1-982731","payload":{"latitude":12.971598,"longitude":77.594562,"heading":184,'
                  b'"speed":8.4,"accuracy":5,"timestamp":1764547200101,"tripId":"t-7781"}}')


# --------------------------------------------------------------------------------------------
# Redis servers and connections of our own
# --------------------------------------------------------------------------------------------

class Resp:
    """A bare RESP connection: pipelines of pre-encoded commands, replies parsed by hiredis."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = hiredis.Reader()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def replies(self, n: int) -> list[Any]:
        out: list[Any] = []
        while len(out) < n:
            reply = self.reader.gets()
            if reply is False:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    raise ConnectionError("Redis closed the connection")
                self.reader.feed(chunk)
                continue
            out.append(reply)
        return out

    def call(self, *args: str | bytes | int) -> Any:
        self.send(encode(*args))
        (reply,) = self.replies(1)
        if isinstance(reply, hiredis.ReplyError):
            raise RuntimeError(f"{args[0]!r}: {reply}")
        return reply

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def encode(*args: str | bytes | int) -> bytes:
    return resp_command(*(a if isinstance(a, bytes) else str(a).encode() for a in args))


class Drain(threading.Thread):
    """Reads a subscriber connection and throws the bytes away, as fast as the socket gives them."""

    def __init__(self, conn: Resp) -> None:
        super().__init__(daemon=True)
        self.conn = conn
        self.received = 0
        self.last_at = time.monotonic()

    def run(self) -> None:
        while True:
            try:
                data = self.conn.sock.recv(1 << 20)
            except OSError:
                return
            if not data:
                return
            self.received += len(data)
            self.last_at = time.monotonic()


@dataclass
class OwnRedis:
    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path
    cluster: bool
    control: Resp = field(init=False)

    def info(self, section: str) -> dict[str, str]:
        text = self.control.call("INFO", section)
        assert isinstance(text, bytes)
        pairs = (line.split(":", 1) for line in text.decode().splitlines() if ":" in line)
        return {k: v for k, v in pairs}

    def cpu_s(self) -> float:
        info = self.info("cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

    def used_memory(self) -> int:
        return int(self.info("memory")["used_memory"])

    def commandstats(self) -> dict[str, tuple[int, float]]:
        stats: dict[str, tuple[int, float]] = {}
        for name, value in self.info("commandstats").items():
            fields: dict[str, str] = {}
            for part in value.split(","):
                key, _, number = part.partition("=")
                fields[key] = number
            stats[name.removeprefix("cmdstat_")] = (int(fields["calls"]), float(fields["usec_per_call"]))
        return stats


def start_redis(cluster: bool) -> OwnRedis:
    """A private redis-server on a free port below 32768 (loadgen.free_port: 20000-32767), no persistence."""
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="redis-costs-"))
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(workdir), "--logfile", str(workdir / "redis.log"), "--daemonize", "no"]
    if cluster:
        command += ["--cluster-enabled", "yes", "--cluster-config-file", str(workdir / "nodes.conf")]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    own = OwnRedis(proc, port, workdir, cluster)
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited: {(workdir / 'redis.log').read_text(errors='replace')[-2000:]}")
        try:
            own.control = Resp(port)
            own.control.call("PING")
            break
        except (OSError, RuntimeError):
            if time.monotonic() > deadline:
                stop_redis(own)
                raise RuntimeError("redis-server did not answer PING") from None
            time.sleep(0.1)
    if cluster:
        own.control.call("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        while b"cluster_state:ok" not in own.control.call("CLUSTER", "INFO"):
            if time.monotonic() > deadline:
                stop_redis(own)
                raise RuntimeError("the one-node cluster did not reach cluster_state:ok")
            time.sleep(0.1)
    return own


def stop_redis(own: OwnRedis) -> None:
    """Stop this script's own redis-server, by its pid (Popen), and remove its directory."""
    with contextlib.suppress(AttributeError):
        own.control.close()
    stop_process(own.proc, 10)
    shutil.rmtree(own.workdir, ignore_errors=True)


def idle_cpu_per_s(own: OwnRedis, samples: int = 3, seconds: float = 0.5) -> float:
    """The server's CPU while nobody sends anything (serverCron, clients cron): subtracted from every case."""
    rates = []
    for _ in range(samples):
        before, started = own.cpu_s(), time.monotonic()
        time.sleep(seconds)
        rates.append((own.cpu_s() - before) / (time.monotonic() - started))
    return statistics.median(rates)


def subscriber(own: OwnRedis, command: str, channels: Sequence[str], depth: int = 500) -> tuple[Resp, Drain]:
    """A connection subscribed to `channels` (one command per channel, as the gateway subscribes user by user),
    handed to a draining thread once every confirmation is read."""
    conn = Resp(own.port)
    for start in range(0, len(channels), depth):
        chunk = channels[start:start + depth]
        conn.send(b"".join(encode(command, c) for c in chunk))
        conn.replies(len(chunk))
    drain = Drain(conn)
    drain.start()
    return conn, drain


# --------------------------------------------------------------------------------------------
# one measurement
# --------------------------------------------------------------------------------------------

@dataclass
class Sample:
    # INFO commandstats: usec_per_call of the case's commands, per unit. Redis times a command by the clock, so
    # on a busy machine (Redis descheduled mid-command) it can exceed the CPU figure: read it as an upper bound.
    exec_us: float
    total_us: float  # used_cpu_sys + used_cpu_user over the run, less idle, per unit
    units: int
    seconds: float


def run_pipelined(own: OwnRedis, conn: Resp, commands: list[bytes], depth: int, stats_names: Sequence[str],
                  per_unit: int, idle: float, drains: Sequence[Drain] = ()) -> Sample:
    """Send `commands` in pipelines of `depth` and read the server's accounting around them.

    A unit is `per_unit` consecutive commands (2 for HSET + PEXPIRE). With subscribers, the run ends when they
    have been quiet for QUIET_S: the messages' writes are part of the cost."""
    batches = [b"".join(commands[i:i + depth]) for i in range(0, len(commands), depth)]
    counts = [min(depth, len(commands) - i) for i in range(0, len(commands), depth)]
    own.control.call("CONFIG", "RESETSTAT")
    cpu_before, started = own.cpu_s(), time.monotonic()
    errors = 0
    for batch, count in zip(batches, counts, strict=True):
        conn.send(batch)
        errors += sum(isinstance(r, hiredis.ReplyError) for r in conn.replies(count))
    while drains and time.monotonic() - max(d.last_at for d in drains) < QUIET_S:
        time.sleep(QUIET_S / 4)
    seconds = time.monotonic() - started
    cpu = own.cpu_s() - cpu_before
    if errors:
        raise RuntimeError(f"{errors} error replies in a run of {stats_names}")
    stats = own.commandstats()
    units = len(commands) // per_unit
    exec_total = 0.0
    for name in stats_names:
        calls, usec = stats.get(name, (0, 0.0))
        if calls < units:
            raise RuntimeError(f"commandstats counted {calls} {name} calls, expected at least {units}")
        exec_total += calls * usec
    return Sample(exec_total / units, max(0.0, cpu - idle * seconds) * 1e6 / units, units, seconds)


# --------------------------------------------------------------------------------------------
# the cases: what the gateway (or a service) sends per event
# --------------------------------------------------------------------------------------------

@dataclass
class Case:
    name: str  # the figure's key in inputs.json is `redis.<name>_us`
    what: str
    run: Callable[[int], Sample]  # round number -> one sample
    samples: list[Sample] = field(default_factory=list)


@dataclass
class Bench:
    plain: OwnRedis
    cluster: OwnRedis
    depth: int
    n: int
    idle_plain: float = 0.0
    idle_cluster: float = 0.0
    work: Resp = field(init=False)
    cluster_work: Resp = field(init=False)
    drains: list[Drain] = field(default_factory=list)
    user_drain: list[Drain] = field(default_factory=list)
    cluster_drain: list[Drain] = field(default_factory=list)
    open_conns: list[Resp] = field(default_factory=list)
    register_sha: str = ""
    unregister_sha: str = ""
    _sub: Resp | None = None  # the subscribe/unsubscribe cases' connection, new every round
    _sub_channels: list[str] = field(default_factory=list)
    rng: random.Random = field(default_factory=lambda: random.Random(11))

    def setup(self) -> None:
        self.work = Resp(self.plain.port)
        self.cluster_work = Resp(self.cluster.port)
        self.open_conns += [self.work, self.cluster_work]
        users = [KEYS.user_channel(f"u{i}") for i in range(USERS)]
        conn, drain = subscriber(self.plain, "SUBSCRIBE", users)
        self.open_conns.append(conn)
        self.user_drain = [drain]
        # Location events: one subscriber on `loc1`, four on `loc4` (the first also on `loc1`), none on `none`.
        event_drains = []
        for k in range(4):
            conn, drain = subscriber(self.plain, "SUBSCRIBE",
                                     [KEYS.events("loc4"), *([KEYS.events("loc1")] if k == 0 else [])])
            self.open_conns.append(conn)
            event_drains.append(drain)
        self.drains = event_drains
        conn, drain = subscriber(self.cluster, "SSUBSCRIBE", users)
        conn2, drain2 = subscriber(self.cluster, "SUBSCRIBE", [c + ":classic" for c in users])
        tagged = [CLUSTER_KEYS.user_channel(f"u{i}") for i in range(USERS)]
        conn3, drain3 = subscriber(self.cluster, "SSUBSCRIBE", tagged)
        self.open_conns += [conn, conn2, conn3]
        self.cluster_drain = [drain, drain2, drain3]
        self.register_sha = self.plain.control.call("SCRIPT", "LOAD", REGISTER).decode()
        self.unregister_sha = self.plain.control.call("SCRIPT", "LOAD", UNREGISTER).decode()
        source, _version = render_library(KEYS, size=HISTORY_SIZE, ttl_s=HISTORY_TTL_S,
                                          max_message_size=MAX_MESSAGE_SIZE)
        self.plain.control.call("FUNCTION", "LOAD", "REPLACE", source)
        source, _version = render_library(CLUSTER_KEYS, size=HISTORY_SIZE, ttl_s=HISTORY_TTL_S,
                                          max_message_size=MAX_MESSAGE_SIZE)
        self.cluster.control.call("FUNCTION", "LOAD", "REPLACE", source)
        self.idle_plain = idle_cpu_per_s(self.plain)
        self.idle_cluster = idle_cpu_per_s(self.cluster)

    def close(self) -> None:
        for conn in self.open_conns:
            conn.close()

    def random_users(self) -> list[int]:
        return [self.rng.randrange(USERS) for _ in range(self.n)]

    # --- pub/sub ---------------------------------------------------------------------------------

    def publish_user(self, _round: int) -> Sample:
        commands = [encode("PUBLISH", KEYS.user_channel(f"u{u}"), USER_MESSAGE) for u in self.random_users()]
        return run_pipelined(self.plain, self.work, commands, self.depth, ["publish"], 1, self.idle_plain,
                             self.user_drain)

    def publish_event(self, channel: str) -> Callable[[int], Sample]:
        def run(_round: int) -> Sample:
            commands = [encode("PUBLISH", KEYS.events(channel), LOCATION_EVENT)] * self.n
            return run_pipelined(self.plain, self.work, commands, self.depth, ["publish"], 1, self.idle_plain,
                                 self.drains)
        return run

    def spublish(self, _round: int) -> Sample:
        commands = [encode("SPUBLISH", KEYS.user_channel(f"u{u}"), USER_MESSAGE) for u in self.random_users()]
        return run_pipelined(self.cluster, self.cluster_work, commands, self.depth, ["spublish"], 1,
                             self.idle_cluster, self.cluster_drain)

    def publish_cluster_node(self, _round: int) -> Sample:
        commands = [encode("PUBLISH", KEYS.user_channel(f"u{u}") + ":classic", USER_MESSAGE)
                    for u in self.random_users()]
        return run_pipelined(self.cluster, self.cluster_work, commands, self.depth, ["publish"], 1,
                             self.idle_cluster, self.cluster_drain)

    def subscribe(self, round_: int) -> Sample:
        """SUBSCRIBE of a new user channel, then (the next case) its UNSUBSCRIBE, on a subscriber connection."""
        sub = self._sub = Resp(self.plain.port)
        self.open_conns.append(sub)
        self._sub_channels = [KEYS.user_channel(f"s{round_}-{i}") for i in range(self.n)]
        commands = [encode("SUBSCRIBE", c) for c in self._sub_channels]
        return run_pipelined(self.plain, sub, commands, self.depth, ["subscribe"], 1, self.idle_plain)

    def unsubscribe(self, _round: int) -> Sample:
        sub = self._sub
        assert sub is not None, "the subscribe case runs first"
        commands = [encode("UNSUBSCRIBE", c) for c in self._sub_channels]
        sample = run_pipelined(self.plain, sub, commands, self.depth, ["unsubscribe"], 1, self.idle_plain)
        sub.close()
        return sample

    # --- presence ----------------------------------------------------------------------------------

    def _presence_keys(self, user: str) -> list[str]:
        return [KEYS.presence(user), KEYS.server_users(SERVER_ID), KEYS.users()]

    def register_commands(self, tag: str, count: int) -> list[bytes]:
        now_us = int(time.time() * 1_000_000)
        commands = []
        for i in range(count):
            user, connection_id, stamp = f"{tag}-{i}", f"{SERVER_ID}-{100_000 + i}", now_us + i
            entry = json.dumps({"serverId": SERVER_ID, "connectionId": connection_id, "userType": "rider",
                                "platform": "ios", "connectedAt": stamp // 1000, "stamp": stamp},
                               separators=(",", ":"))
            commands.append(encode("EVALSHA", self.register_sha, 3, *self._presence_keys(user), "dev-1", entry,
                                   user, 10, stamp, connection_id))
        return commands

    def register(self, round_: int) -> Sample:
        """A new device of a new user: HGET (nothing), HLEN, HSET, SADD x2 inside the script."""
        return run_pipelined(self.plain, self.work, self.register_commands(f"r{round_}", self.n), self.depth,
                             ["evalsha"], 1, self.idle_plain)

    def unregister(self, round_: int) -> Sample:
        """The same devices leaving, each the user's last on the instance: HGET, HDEL, SREM, EXISTS, SREM."""
        commands = [encode("EVALSHA", self.unregister_sha, 3, *self._presence_keys(f"r{round_}-{i}"), "dev-1",
                           f"{SERVER_ID}-{100_000 + i}", f"r{round_}-{i}", 1) for i in range(self.n)]
        return run_pipelined(self.plain, self.work, commands, self.depth, ["evalsha"], 1, self.idle_plain)

    # --- history -----------------------------------------------------------------------------------

    def fcall_publish(self, round_: int) -> Sample:
        """A recorded message with a producer id to a user whose instance is subscribed: validate, dedupe,
        number, store, keep the id, PUBLISH."""
        commands = [encode("FCALL", KEYS.function("publish"), 1, f"u{u}", recorded_message(f"ride-{round_}-{i}"))
                    for i, u in enumerate(self.random_users())]
        return run_pipelined(self.plain, self.work, commands, self.depth, ["fcall"], 1, self.idle_plain,
                             self.user_drain)

    def fcall_publish_noid(self, _round: int) -> Sample:
        """The same without a producer id (as bench.py and storm.py record): no dedupe bookkeeping."""
        commands = [encode("FCALL", KEYS.function("publish"), 1, f"u{u}", recorded_message(None))
                    for u in self.random_users()]
        return run_pipelined(self.plain, self.work, commands, self.depth, ["fcall"], 1, self.idle_plain,
                             self.user_drain)

    def fcall_publish_cluster(self, round_: int) -> Sample:
        """The same on the cluster node, with the library as REDIS_CLUSTER=true renders it (hash-tagged keys, the
        SPUBLISH to the user's sharded channel, which the instance SSUBSCRIBEd)."""
        commands = [encode("FCALL", CLUSTER_KEYS.function("publish"), 1, f"u{u}",
                           recorded_message(f"ride-{round_}-{i}")) for i, u in enumerate(self.random_users())]
        return run_pipelined(self.cluster, self.cluster_work, commands, self.depth, ["fcall"], 1, self.idle_cluster,
                             self.cluster_drain)

    def fcall_position(self, _round: int) -> Sample:
        """What every connect without `since` reads: the user's epoch and seq."""
        commands = [encode("FCALL", KEYS.function("position"), 1, f"u{u}") for u in self.random_users()]
        return run_pipelined(self.plain, self.work, commands, self.depth, ["fcall"], 1, self.idle_plain)

    def fcall_ro_since(self, _round: int) -> Sample:
        """A resume that missed one message: the replay of one record (the storm replayed 1.4 per resume)."""
        users = sorted(set(self.random_users()))
        self.work.send(b"".join(encode("FCALL", KEYS.function("position"), 1, f"u{u}") for u in users))
        positions = {u: (reply[0], int(reply[1])) for u, reply in zip(users, self.work.replies(len(users)),
                                                                       strict=True)}
        picks = [self.rng.choice(users) for _ in range(self.n)]
        commands = [encode("FCALL_RO", KEYS.function("since"), 1, f"u{u}", positions[u][0],
                           max(0, positions[u][1] - 1)) for u in picks]
        return run_pipelined(self.plain, self.work, commands, self.depth, ["fcall_ro"], 1, self.idle_plain)

    # --- the rest -------------------------------------------------------------------------------------

    def instance_heartbeat(self, _round: int) -> Sample:
        """The instance key each process refreshes every housekeeping tick: HSET of its stats, PEXPIRE."""
        commands = []
        now = int(time.time())
        for i in range(self.n):
            key = KEYS.server(f"gw-{i % 64}")
            commands.append(encode("HSET", key, "serverId", f"gw-{i % 64}", "totalConnections", 19488,
                                   "uniqueUsers", 19400, "startedAt", now - 3600, "updatedAt", now * 1000 + i,
                                   "driver", 3900, "rider", 12000, "restaurant", 500, "delivery_partner", 3088))
            commands.append(encode("PEXPIRE", key, 15000))
        return run_pipelined(self.plain, self.work, commands, self.depth, ["hset", "pexpire"], 2, self.idle_plain)

    def sadd_users(self, round_: int) -> Sample:
        """In a Redis Cluster the presence script cannot reach `<prefix>:users` (another slot): the gateway sends a
        SADD of its own per connect, and a SREM per disconnect (presence_redis_cluster.py). One key, one shard."""
        commands = [encode("SADD", KEYS.users(), f"x{round_}-{i}") for i in range(self.n)]
        return run_pipelined(self.plain, self.work, commands, self.depth, ["sadd"], 1, self.idle_plain)

    def srem_users(self, round_: int) -> Sample:
        commands = [encode("SREM", KEYS.users(), f"x{round_}-{i}") for i in range(self.n)]
        return run_pipelined(self.plain, self.work, commands, self.depth, ["srem"], 1, self.idle_plain)

    def xadd(self, _round: int) -> Sample:
        """A client event appended to its stream (dispatch_response, receipts), trimmed approximately."""
        commands = [encode("XADD", KEYS.stream("dispatch_response"), "MAXLEN", "~", 100_000, "*", "data",
                           LOCATION_EVENT)] * self.n
        return run_pipelined(self.plain, self.work, commands, self.depth, ["xadd"], 1, self.idle_plain)

    def cases(self) -> list[Case]:
        return [
            Case("publish_user_1sub", "PUBLISH to a user channel, 1 subscriber (the instance holding the user; "
                 f"its connection holds {USERS:,} channels)", self.publish_user),
            Case("publish_0sub", "PUBLISH to a channel nobody subscribes to (the least a Redis Cluster node pays "
                 "for a classic PUBLISH broadcast to it)", self.publish_event("none")),
            Case("publish_event_1sub", "PUBLISH of a location_update event, 1 subscriber", self.publish_event("loc1")),
            Case("publish_event_4sub", "PUBLISH of a location_update event, 4 subscribers", self.publish_event("loc4")),
            Case("spublish_1sub", "SPUBLISH to a user channel, 1 subscriber (SSUBSCRIBE), on a one-node cluster "
                 "holding all slots", self.spublish),
            Case("publish_cluster_node_1sub", "classic PUBLISH to a user channel, 1 subscriber, on the same "
                 "cluster-enabled node (one node: no cluster-bus peers)", self.publish_cluster_node),
            Case("subscribe", "SUBSCRIBE of a new user channel (first device of a user on an instance)",
                 self.subscribe),
            Case("unsubscribe", "UNSUBSCRIBE of it (last device of the user leaves the instance)", self.unsubscribe),
            Case("register", "EVALSHA of presence_redis.REGISTER: a new device of a new user", self.register),
            Case("unregister", "EVALSHA of presence_redis.UNREGISTER: that device leaving", self.unregister),
            Case("fcall_publish", f"FCALL {KEYS.function('publish')}: one recorded ride_status with a producer id, "
                 "user subscribed", self.fcall_publish),
            Case("fcall_publish_noid", f"FCALL {KEYS.function('publish')}: the same without a producer id "
                 "(as bench.py and storm.py record)", self.fcall_publish_noid),
            Case("fcall_publish_cluster", f"FCALL {CLUSTER_KEYS.function('publish')} on the one-node cluster, the "
                 "library rendered for REDIS_CLUSTER=true (SPUBLISH inside), with a producer id",
                 self.fcall_publish_cluster),
            Case("fcall_position", f"FCALL {KEYS.function('position')} (every connect without since)",
                 self.fcall_position),
            Case("fcall_ro_since", f"FCALL_RO {KEYS.function('since')}: a resume with one record to replay",
                 self.fcall_ro_since),
            Case("instance_heartbeat", "HSET of the instance key (9 fields) + PEXPIRE, per pair",
                 self.instance_heartbeat),
            Case("sadd_users", "SADD of a user to the users set (cluster mode, per connect)", self.sadd_users),
            Case("srem_users", "SREM of it (cluster mode, per disconnect)", self.srem_users),
            Case("xadd", "XADD of a client event to its stream, MAXLEN ~ 100000", self.xadd),
        ]


# --------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------

def settle_memory(own: OwnRedis) -> int:
    time.sleep(0.2)
    return own.used_memory()


def redis_memory(bench: Bench, round_: int) -> dict[str, float]:
    """Bytes of Redis memory (used_memory) per connected device and per recorded message kept."""
    own, conn, n = bench.plain, bench.work, MEMORY_DEVICES
    before = settle_memory(own)
    commands = bench.register_commands(f"m{round_}", n)
    for start in range(0, n, 500):
        conn.send(b"".join(commands[start:start + 500]))
        conn.replies(len(commands[start:start + 500]))
    registered = settle_memory(own)
    sub = Resp(own.port)
    channels = [KEYS.user_channel(f"m{round_}-{i}") for i in range(n)]
    for start in range(0, n, 500):
        sub.send(b"".join(encode("SUBSCRIBE", c) for c in channels[start:start + 500]))
        sub.replies(len(channels[start:start + 500]))
    subscribed = settle_memory(own)
    sub.close()
    recorded: list[int] = []
    for k in range(5):  # users nobody subscribes to: the PUBLISH inside leaves no output buffer behind
        for start in range(0, n, 500):
            conn.send(b"".join(encode("FCALL", KEYS.function("publish"), 1, f"h{round_}-{i}",
                                      recorded_message(f"ride-{round_}-{k}-{i}"))
                               for i in range(start, min(n, start + 500))))
            conn.replies(min(500, n - start))
        recorded.append(settle_memory(own))
    return {"presence": (registered - before) / n, "subscription": (subscribed - registered) / n,
            "history_first": (recorded[0] - subscribed) / n, "history_record": (recorded[4] - recorded[0]) / (4 * n)}


def kernel_socket_memory(pairs: int = SOCKET_PAIRS, rounds: int = 5) -> list[float]:
    """KiB of kernel slab memory per idle, established TCP socket (both ends of loopback connections are
    counted: 2 x pairs sockets), after 200 bytes each way; the gateway's RSS does not include it."""
    def slab_kib() -> int:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("Slab:"):
                    return int(line.split()[1])
        raise RuntimeError("no Slab line in /proc/meminfo")

    results = []
    for _ in range(rounds):
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(4096)
            time.sleep(0.3)
            before = slab_kib()
            sockets: list[socket.socket] = []
            try:
                for _ in range(pairs):
                    client = socket.create_connection(listener.getsockname())
                    server, _addr = listener.accept()
                    sockets += [client, server]
                    client.sendall(b"x" * 200)
                    server.recv(1000)
                    server.sendall(b"y" * 200)
                    client.recv(1000)
                time.sleep(0.5)
                results.append((slab_kib() - before) / (2 * pairs))
            finally:
                for s in sockets:
                    s.close()
        time.sleep(0.5)
    return results


# --------------------------------------------------------------------------------------------
# the inputs file
# --------------------------------------------------------------------------------------------

def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}"


def redis_version() -> str:
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=True).stdout
    return next((p.removeprefix("v=") for p in out.split() if p.startswith("v=")), out.strip())


def median_of(values: Sequence[float], digits: int = 2) -> float:
    return round(statistics.median(values), digits)


def figures(cases: list[Case], memory: list[dict[str, float]], sockets: list[float], run: dict[str, Any]
            ) -> dict[str, dict[str, Any]]:
    date = run["date"][:10]
    source = f"scripts/redis_costs.py ({run['command']}), {run['date']}"
    out: dict[str, dict[str, Any]] = {}
    for case in cases:
        totals = [s.total_us for s in case.samples]
        execs = [s.exec_us for s in case.samples]
        total, exec_ = median_of(totals), median_of(execs)
        out[f"redis.{case.name}_us"] = {
            "value": total, "unit": f"us of redis-server CPU per call: {case.what}", "kind": "measured",
            "measured": date,
            "source": source,
            "how": f"Pipelines of {run['depth']}, {case.samples[0].units:,} per run, median of "
                   f"{len(case.samples)} runs; used_cpu_sys+used_cpu_user less the idle CPU, per call (exec_us: "
                   "INFO commandstats usec_per_call, a clock time)",
            "exec_us": exec_, "io_share": round(max(0.0, 1 - exec_ / total), 2) if total > 0 else None,
            "samples_us": [round(v, 2) for v in totals], "samples_exec_us": [round(v, 2) for v in execs]}
    how_memory = (f"used_memory delta over {MEMORY_DEVICES:,} devices, median of {len(memory)} runs "
                  f"(HISTORY_SIZE={HISTORY_SIZE}, a {len(RECORDED_MESSAGE)}-byte ride_status)")
    for key, what in (("presence", "presence hash entry + the users and server-users set members, per device"),
                      ("subscription", "one SUBSCRIBEd user channel (server and client sides), per user"),
                      ("history_first", "a user's first recorded message: the history list, meta hash, TTLs"),
                      ("history_record", "each further recorded message kept")):
        values = [m[key] for m in memory]
        out[f"redis.memory_{key}_bytes"] = {"value": median_of(values, 0), "unit": f"bytes of used_memory: {what}",
                                            "kind": "measured", "measured": date, "source": source,
                                            "how": how_memory, "samples": [round(v) for v in values]}
    out["host.kernel_memory_per_socket_kb"] = {
        "value": median_of(sockets, 2), "unit": "KiB of kernel memory per idle TCP socket", "kind": "measured",
        "measured": date, "source": source,
        "how": f"/proc/meminfo Slab delta over {SOCKET_PAIRS:,} loopback connections ({2 * SOCKET_PAIRS:,} sockets, "
               "200 bytes each way, then idle), median of "
               f"{len(sockets)}; kernel {platform.release()}. Not in the gateway's RSS",
        "samples": [round(v, 2) for v in sockets]}
    return out


def write_inputs(path: Path, new: dict[str, dict[str, Any]], run: dict[str, Any]) -> None:
    """Replace this script's figures in the inputs file; every other figure and field is kept as it is."""
    doc: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"figures": {}}
    doc.setdefault("figures", {}).update(new)
    doc["redis_costs_run"] = run
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="redis_costs.py", description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--rounds", type=int, default=5, help="runs of every case (medians over them)")
    parser.add_argument("--commands", type=int, default=20_000, help="commands (units) per run of a case")
    parser.add_argument("--depth", type=int, default=32, help="commands per pipelined write (the gateway: tens)")
    parser.add_argument("--memory-rounds", type=int, default=3, help="runs of the memory measurement")
    parser.add_argument("--inputs", type=Path, default=INPUTS, help="the inputs file to update")
    parser.add_argument("--no-write", action="store_true", help="print the figures instead of writing them")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if shutil.which("redis-server") is None:
        raise SystemExit("redis_costs.py: redis-server is not on the PATH")
    calibration_before = calibrate()
    load_before = os.getloadavg()[0]
    plain = start_redis(cluster=False)
    try:
        cluster = start_redis(cluster=True)
    except BaseException:
        stop_redis(plain)
        raise
    bench = Bench(plain, cluster, args.depth, args.commands)
    try:
        bench.setup()
        cases = bench.cases()
        for round_ in range(args.rounds):
            for case in cases:
                case.samples.append(case.run(round_))
            print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(
                f"{c.name} {c.samples[-1].total_us:.2f}" for c in cases), flush=True)
        memory = [redis_memory(bench, r) for r in range(args.memory_rounds)]
    finally:
        bench.close()
        stop_redis(cluster)
        stop_redis(plain)
    sockets = kernel_socket_memory()
    run = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
           "command": " ".join(["python scripts/redis_costs.py", *argv]).strip(), "machine": machine(),
           "redis": redis_version(), "depth": args.depth, "commands_per_run": args.commands, "rounds": args.rounds,
           "calibration_ms": [round(calibration_before, 1), round(calibrate(), 1)],
           "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
           "message_bytes": {"user_message": len(USER_MESSAGE), "recorded_message": len(RECORDED_MESSAGE),
                             "location_event": len(LOCATION_EVENT)}}
    new = figures(cases, memory, sockets, run)
    if args.no_write:
        print(json.dumps({"figures": new, "redis_costs_run": run}, indent=2))
    else:
        write_inputs(args.inputs, new, run)
        print(f"wrote {len(new)} figures into {args.inputs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
