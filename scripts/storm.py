"""Reconnect storm: every client dropped at once, all resuming on the other instance while messages keep being
recorded for them (PROTOCOL.md 7.2), then checked message by message.

What one run does, every phase bounded in time:

1. starts its own redis-server (a free port below 32768; never the shared one) and two gateway
   processes on it (distinct SERVER_ID, same REDIS_URL and prefix);
2. connects N clients, one user each (`driver`, one device), client i to instance i % 2, from
   worker processes (at most 15,000 sockets each: the 20,000-open-files limit) spread over source
   addresses 127.B.x.y (one source/destination pair has only ~28,000 ephemeral ports);
3. records messages for them at a steady rate with `FCALL <prefix>_publish 1 <userId> <json>`
   (`ride_status`, a recorded type), round-robin over the users so each gets one every N/rate s;
4. drops every socket at one instant (RST: SO_LINGER 0 and abort, no close frame), then at once
   reconnects every client to the OTHER instance with `since=<last seq it handled>&epoch=<epoch>`,
   retrying a failed attempt with jittered exponential backoff, while recording continues;
5. after recovery records a few more seconds, stops, waits until every client has the last seq
   recorded for its user (quiescence), and checks each client: the seqs it received over both
   connections are exactly first..last (no gap, no duplicate, in order) and every resume said
   `recovered: true` with the same epoch.

Reported: recovery time (drop -> every client reconnected and its replay delivered, i.e. it holds
the seq `connected` announced), p50/p99 of reconnect and catch-up times, gaps/duplicates, and the
cost of the storm window in Redis (redis-server CPU seconds via psutil, commands processed and
per-command calls from INFO commandstats, used_memory before/after) and in the gateways (CPU
seconds), each next to the same figures per second in the steady recording-only window before the
drop. The client side reuses scripts/loadgen.py's raw WebSocket protocol, sockets and CPU probes.

    python scripts/storm.py                         # 20,000 clients, ~3 minutes
    python scripts/storm.py -c 2000 --rate 1000     # a small one
    python scripts/storm.py --write-doc             # also write the "Reconnect storm" section of docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime
import errno
import itertools
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from multiprocessing.sharedctypes import SynchronizedArray
from pathlib import Path
from typing import Any, TypedDict, cast
from urllib.parse import quote

import jwt
import psutil
import redis
import ujson

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.loadgen import (  # noqa: E402 - needs ROOT on sys.path when run as a file
    C_OPEN,
    LINGER_RESET,
    MAX_SOCKETS_PER_WORKER,
    SOCKETS_PER_SOURCE_ADDRESS,
    CpuWindow,
    ProcessGroup,
    RespReplies,
    Stats,
    WsClient,
    bound_socket,
    install_uvloop,
    percentile,
    poll_pipe,
    raise_file_limit,
    resp_command,
    source_addresses,
    stop_process,
)
from tornado_gateway.redis_keys import Keys  # noqa: E402

SECRET = "storm-secret-0123456789abcdef-0123456789abcdef"
PREFIX = "storm"
SERVER_IDS = ("storm-a", "storm-b")
DOC = ROOT / "docs" / "BENCHMARKS.md"
DEFAULT_JSON = Path(tempfile.gettempdir()) / "tornado-gateway-bench" / "storm.json"
LOW_PORTS = (20_000, 32_000)  # servers listen below the ephemeral range (32768-60999)
DEFAULT_HISTORY_SIZE = 100
SOCKETS_PER_WORKER = 5_000  # default split: 20,000 clients -> 4 workers, so both cores drive the storm
BACKOFF_FIRST_S, BACKOFF_CAP_S = 0.25, 4.0
STEADY_SETTLE_S = 2.0
COUNTER_FLUSH_S = 0.1

# Worker counters in one shared array, one row per worker (progress without messages).
W_OPEN, W_CONNECTED, W_RECONNECTED, W_CAUGHT_UP, W_FAILED_ATTEMPTS, W_RECORDS, W_UNEXPECTED_CLOSES = range(7)
W_COUNTERS = 7
# The recorder's progress: messages sent, integer replies (seqs), error replies.
R_SENT, R_SEQS, R_ERRORS = range(3)


# --------------------------------------------------------------------------------------------
# configuration and report
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StormConfig:
    clients: int = 20_000
    record_rate: float = 2_000.0  # recorded messages per second, all users together
    connect_rate: float = 1_000.0  # initial connections per second, in total
    warm_s: float = 12.0  # recording before the drop (the steady window is all but its first 2 s)
    after_s: float = 5.0  # recording after recovery, delivered live on the new connections
    storm_timeout_s: float = 120.0  # the longest a client may try to reconnect
    quiesce_timeout_s: float = 20.0
    # One attempt: TCP connect + upgrade + `connected`. 30 s, not 10: at 10 s the 20K storm on this machine never
    # recovers (docs/BENCHMARKS.md, "Reconnect storm"); iOS' URLSession waits 60 s, browsers longer.
    handshake_timeout_s: float = 30.0
    concurrency: int = 0  # reconnect handshakes in flight per worker; 0 = every client at once
    offline_s: float = 0.0  # clients stay away this long after the drop before reconnecting
    jitter_s: float = 0.0  # each client's first reconnect attempt waits uniform(0, jitter_s) more
    workers: int = 0  # 0: one per 5,000 clients, at least 2
    source_ips: int = 0  # 0: one per 5,000 clients, at least 2
    history_size: int = 0  # 0: computed from the per-user rate and the storm timeout (at least 100)
    json_out: str | None = None
    quiet: bool = False

    def worker_count(self) -> int:
        return self.workers or max(2, math.ceil(self.clients / SOCKETS_PER_WORKER))

    def per_user_rate(self) -> float:
        return self.record_rate / self.clients

    def required_history(self) -> int:
        """Messages recorded for one user while its client may be away: from the last seq it handled
        to the replay read, at most the storm timeout plus the offline time (and a second of slack)."""
        return math.ceil(self.per_user_rate() * (self.storm_timeout_s + self.offline_s + self.jitter_s + 1.0)) + 1

    def effective_history_size(self) -> int:
        return self.history_size or max(DEFAULT_HISTORY_SIZE, 2 * self.required_history())


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    first_user: int
    count: int
    targets: tuple[tuple[str, int], ...]
    source_ips: tuple[str, ...]
    run_id: str
    handshake_timeout_s: float
    concurrency: int
    storm_timeout_s: float


class Timings(TypedDict):
    p50_s: float
    p99_s: float
    max_s: float


class RedisCost(TypedDict):
    seconds: float
    cpu_s: float
    cpu_pct: float
    commands: int
    commands_per_s: float
    calls: dict[str, int]  # per command, most called first
    net_in_mb: float
    net_out_mb: float


class GatewayCost(TypedDict):
    seconds: float
    cpu_s: float
    cpu_pct: float  # of one core, both instances together
    per_instance_cpu_s: list[float]


class Verification(TypedDict):
    clients: int
    exact: int  # received exactly first..last, in order
    clients_with_gaps: int
    reconnected_with_gaps: int  # of those, clients that did reconnect: a delivery failure, not a client left out
    missing_seqs: int
    clients_with_duplicates: int
    duplicate_deliveries: int
    clients_out_of_order: int
    unexpected_seqs: int  # seqs that were never recorded for the user (or came before its first)
    resumes: int
    not_recovered: int
    epoch_changed: int
    not_reconnected: int
    not_caught_up: int
    not_quiescent: int  # clients that had not received their user's last seq when the wait ended
    unexpected_closes: int
    close_codes: dict[str, int]
    error_codes: dict[str, int]
    connect_errors: dict[str, int]
    samples: list[str]


class StormReport(TypedDict):
    clients: int
    connected: int
    workers: int
    record_rate: float
    per_user_rate: float
    history_size: int
    history_needed: int
    concurrency: int
    offline_s: float
    jitter_s: float
    handshake_timeout_s: float
    connect_s: float
    drop_spread_ms: float
    recovery_s: float  # drop -> the last client caught up (replay delivered)
    all_reconnected_s: float  # drop -> the last `connected`
    reconnect: Timings  # drop -> `connected` on the other instance, per client
    caught_up: Timings  # drop -> holding the seq that `connected` announced, per client
    attempts: dict[str, int]  # reconnect attempts per client -> clients
    replayed: int  # messages the resumes brought (connected seq - since, summed)
    recorded_total: int
    recorded_during_storm: int
    record_errors: int
    first_record_error: str
    verification: Verification
    redis_steady: RedisCost
    redis_storm: RedisCost
    redis_memory_mb: dict[str, float]  # used_memory at the steady window's start, before the drop, after recovery, end
    caught_up_by_s: dict[str, int]  # clients caught up n seconds after the drop, every second
    redis_keys: dict[str, int]
    gateway_steady: GatewayCost
    gateway_storm: GatewayCost
    loadgen_storm_cpu_s: float
    per_client: dict[str, float]  # storm cost above the steady rate, per reconnected client
    gateway_connections_after: list[int]
    gateway_log_problems: list[str]
    redis_version: str
    ok: bool


# --------------------------------------------------------------------------------------------
# worker process: clients that remember every seq they received, across their connections
# --------------------------------------------------------------------------------------------

class User:
    """One client (one user, one device) over all its connections."""

    __slots__ = ("index", "uid", "token", "home", "current", "epoch", "first_seq", "seqs", "sock", "since",
                 "resumes", "not_recovered", "epoch_changed", "target_seq", "t_connected", "t_caught_up",
                 "attempts", "reconnecting")

    def __init__(self, index: int, uid: str, token: str) -> None:
        self.index = index
        self.uid = uid
        self.token = token
        self.home = index % 2
        self.current = self.home
        self.epoch: str | None = None
        self.first_seq = 0  # `seq` of the first `connected`: everything after it must arrive
        self.seqs: list[int] = []  # every recorded seq received, in arrival order, over all connections
        self.sock: StormSocket | None = None
        self.since = 0  # sent on the storm reconnect
        self.resumes = 0
        self.not_recovered = 0
        self.epoch_changed = 0
        self.target_seq: int | None = None  # `seq` of the storm reconnect's `connected`
        self.t_connected = 0.0
        self.t_caught_up = 0.0
        self.attempts = 0  # storm reconnect attempts
        self.reconnecting = False

    def last_handled(self) -> int:
        return self.seqs[-1] if self.seqs else self.first_seq


class StormSocket(WsClient):
    """loadgen's raw client, with recorded messages and `connected` handed to the worker."""

    __slots__ = ("user", "worker", "resuming", "storm")

    def __init__(self, worker: StormWorker, user: User, request: bytes, ready: asyncio.Future[bool],
                 resuming: bool, storm: bool) -> None:
        super().__init__(user.index, "gateway", worker.stats, request, ready)
        self.user = user
        self.worker = worker
        self.resuming = resuming
        self.storm = storm

    def _gateway_text(self, payload: bytes) -> None:
        if self.ready.cancelled():  # the attempt timed out: whatever still arrives is for an abandoned socket
            return
        message = ujson.loads(payload)
        seq = message.get("seq")
        if seq is not None:
            self.worker.on_record(self, int(seq))
            return
        kind = message.get("type")
        if kind == "connected":
            if self.state == 1:
                self.worker.on_connected(self, message["payload"])
            self._opened()
        elif kind == "error":
            self.worker.on_error(str(message.get("payload", {}).get("code")))
        else:
            super()._gateway_text(payload)  # heartbeats

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # SO_LINGER 0 now, so that the drop is one abort() per socket (a RST) and all of them fit in a few ms.
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        super().connection_made(transport)

    def drop(self) -> None:
        """Reset the connection, no close frame: loadgen's shutdown() without its setsockopt (SO_LINGER is
        already 0), which also fails with ValueError on a socket uvloop has already closed."""
        if self.state == 2:
            self.stats.counters[C_OPEN] -= 1
        self.state = 3
        if self.transport is not None:
            self.transport.abort()

    def _closed_by_server(self) -> None:
        was_open = self.state == 2
        super()._closed_by_server()
        if was_open:
            self.worker.on_lost(self)


class StormWorker:
    """Owns a share of the clients; obeys the coordinator's commands over a pipe."""

    def __init__(self, spec: WorkerSpec, pipe: Pipe, shared: SynchronizedArray[int], secret: str) -> None:
        self.spec = spec
        self.pipe = pipe
        self.shared = shared
        self.stats = Stats()
        self.counters = [0] * W_COUNTERS
        self.commands: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        expiry = int(time.time()) + 24 * 3600
        self.users = [User(i, f"{spec.run_id}-{i}",
                           jwt.encode({"sub": f"{spec.run_id}-{i}", "userType": "driver", "exp": expiry}, secret,
                                      algorithm="HS256"))
                      for i in range(spec.first_user, spec.first_user + spec.count)]
        self.tasks: set[asyncio.Task[bool]] = set()
        self.errors: dict[str, int] = {}
        self.protocol_violations: list[str] = []
        self.stopping = False
        self.t_drop = 0.0
        self.limit: asyncio.Semaphore | None = None

    # --- frames ---------------------------------------------------------------------------------

    def on_connected(self, sock: StormSocket, payload: dict[str, Any]) -> None:
        user, now = sock.user, time.time()
        epoch, seq = payload.get("epoch"), int(payload.get("seq", 0))
        if not sock.resuming:
            user.epoch, user.first_seq = epoch, seq
            self.counters[W_CONNECTED] += 1
            return
        user.resumes += 1
        recovered = payload.get("recovered") is True
        if not recovered:
            user.not_recovered += 1
        if epoch != user.epoch:
            user.epoch_changed += 1
        if sock.storm and user.t_connected == 0.0:
            user.t_connected, user.target_seq = now, seq
            self.counters[W_RECONNECTED] += 1
            if seq <= user.since or not recovered:  # nothing to replay (or nothing will be)
                self.caught_up(user, now)

    def on_record(self, sock: StormSocket, seq: int) -> None:
        user = sock.user
        if sock.state != 2 or user.sock is not sock:
            self.protocol_violations.append(f"{user.uid}: seq {seq} outside an open connection (state {sock.state})")
            return
        user.seqs.append(seq)
        self.counters[W_RECORDS] += 1
        if user.target_seq is not None and user.t_caught_up == 0.0 and seq >= user.target_seq:
            self.caught_up(user, time.time())

    def caught_up(self, user: User, now: float) -> None:
        user.t_caught_up = now
        self.counters[W_CAUGHT_UP] += 1

    def on_error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def on_lost(self, sock: StormSocket) -> None:
        """The server closed an open connection (or it broke): reconnect with `since`, as an app would,
        except after 4409 (replaced) and 4400/4401 (a request that will not improve)."""
        user = sock.user
        if self.stopping or user.sock is not sock:
            return
        self.counters[W_UNEXPECTED_CLOSES] += 1
        if sock.close_code in (4409, 4400, 4401) or user.reconnecting:
            return
        self.spawn(self.connect(user, user.current, resuming=True, storm=False,
                                deadline=time.monotonic() + self.spec.storm_timeout_s))

    # --- connecting -----------------------------------------------------------------------------

    def request(self, user: User, instance: int, resuming: bool) -> bytes:
        host, port = self.spec.targets[instance]
        query = f"token={user.token}&userType=driver&deviceId=d{user.index}&platform=ios"
        if resuming:
            query += f"&since={user.last_handled()}&epoch={quote(user.epoch or '', safe='')}"
        return (f"GET /ws?{query} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                f"Sec-WebSocket-Version: 13\r\n\r\n").encode()

    def spawn(self, coroutine: Any) -> None:
        task: asyncio.Task[bool] = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def connect(self, user: User, instance: int, *, resuming: bool, storm: bool, deadline: float,
                      delay: float = 0.0) -> bool:
        """Attempts until one gets `connected` or the deadline passes; backoff 0.25 s doubling to 4 s,
        full jitter (what a well-behaved app does)."""
        user.reconnecting = True
        try:
            if delay > 0:
                await asyncio.sleep(delay)
            attempt = 0
            while not self.stopping and time.monotonic() < deadline:
                if storm:
                    user.attempts += 1
                if await self.attempt(user, instance, resuming, storm, attempt):
                    return True
                self.counters[W_FAILED_ATTEMPTS] += 1
                backoff = min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2 ** attempt) * random.random()
                attempt += 1
                await asyncio.sleep(min(backoff, max(0.0, deadline - time.monotonic())))
            return False
        finally:
            user.reconnecting = False

    async def attempt(self, user: User, instance: int, resuming: bool, storm: bool, attempt: int) -> bool:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[bool] = loop.create_future()
        client = StormSocket(self, user, self.request(user, instance, resuming), ready, resuming, storm)
        user.sock, user.current = client, instance
        source = self.spec.source_ips[(user.index // SOCKETS_PER_SOURCE_ADDRESS + attempt) % len(self.spec.source_ips)]
        limit = self.limit
        if limit is not None:
            await limit.acquire()
        sock = bound_socket(source)
        ok = False
        try:
            deadline = loop.time() + self.spec.handshake_timeout_s
            await asyncio.wait_for(loop.sock_connect(sock, self.spec.targets[instance]), self.spec.handshake_timeout_s)
            await loop.create_connection(lambda: client, sock=sock)
            ok = await asyncio.wait_for(ready, max(0.01, deadline - loop.time()))
        except TimeoutError:
            self.stats.record_error("timeout")
        except OSError as exc:
            self.stats.record_error(errno.errorcode.get(exc.errno or 0, str(exc)))
        finally:
            if limit is not None:
                limit.release()
        if not ok:
            if client.transport is None:
                sock.close()
            client.drop()
            if not ready.done():
                ready.cancel()
        return ok

    async def connect_all(self, rate: float, concurrency: int, timeout_s: float) -> int:
        """The initial connections, paced at `rate`, each to its home instance, without `since`."""
        limit = asyncio.Semaphore(concurrency)
        started = time.monotonic()
        deadline = started + len(self.users) / rate + timeout_s
        tasks: list[asyncio.Task[bool]] = []

        async def one(user: User) -> bool:
            try:
                return await self.connect(user, user.home, resuming=False, storm=False, deadline=deadline)
            finally:
                limit.release()

        for i, user in enumerate(self.users):
            delay = started + i / rate - time.monotonic()
            if delay > 0.002:
                await asyncio.sleep(delay)
            await limit.acquire()
            tasks.append(asyncio.ensure_future(one(user)))
        if tasks:
            await asyncio.wait(tasks, timeout=max(1.0, deadline - time.monotonic() + self.spec.handshake_timeout_s))
        return sum(1 for t in tasks if t.done() and not t.cancelled() and t.result())

    async def storm(self, t_drop: float, offline_s: float, jitter_s: float) -> tuple[float, float]:
        """Drop every socket at `t_drop` (wall clock, shared by all workers), then reconnect them all."""
        await asyncio.sleep(max(0.0, t_drop - time.time()))
        self.t_drop = t_drop
        first = time.time()
        for user in self.users:
            user.since = user.last_handled()
            if user.sock is not None:
                user.sock.drop()
        last = time.time()
        self.limit = asyncio.Semaphore(self.spec.concurrency) if self.spec.concurrency > 0 else None
        if offline_s > 0:
            await asyncio.sleep(max(0.0, t_drop + offline_s - time.time()))
        deadline = time.monotonic() + self.spec.storm_timeout_s
        for user in self.users:
            if user.epoch is not None:  # never connected: nothing to resume
                self.spawn(self.connect(user, 1 - user.home, resuming=True, storm=True, deadline=deadline,
                                        delay=random.uniform(0.0, jitter_s)))
        return first, last

    # --- verification ---------------------------------------------------------------------------

    async def verify(self, last_seqs: list[int], timeout_s: float) -> dict[str, Any]:
        """Wait until every client holds its user's last recorded seq (or the timeout), then compare."""
        deadline = time.monotonic() + timeout_s
        pending = [(u, last) for u, last in zip(self.users, last_seqs, strict=True) if u.epoch is not None]
        while time.monotonic() < deadline:
            pending = [(u, last) for u, last in pending if last > u.first_seq and (not u.seqs or u.seqs[-1] < last)]
            if not pending:
                break
            await asyncio.sleep(0.1)
        not_quiescent = {u.index for u, _ in pending}
        result: dict[str, Any] = {
            "clients": 0, "exact": 0, "clients_with_gaps": 0, "reconnected_with_gaps": 0, "missing_seqs": 0,
            "clients_with_duplicates": 0,
            "duplicate_deliveries": 0, "clients_out_of_order": 0, "unexpected_seqs": 0, "resumes": 0,
            "not_recovered": 0, "epoch_changed": 0, "not_reconnected": 0, "not_caught_up": 0,
            "not_quiescent": len(not_quiescent), "unexpected_closes": self.counters[W_UNEXPECTED_CLOSES],
            "close_codes": dict(self.stats.close_codes), "error_codes": dict(self.errors),
            "samples": list(self.protocol_violations[:5])}
        reconnect: list[float] = []
        caught: list[float] = []
        attempts: dict[str, int] = {}
        replayed = 0
        for user, last in zip(self.users, last_seqs, strict=True):
            if user.epoch is None:
                continue
            result["clients"] += 1
            expected = list(range(user.first_seq + 1, last + 1))
            received = user.seqs
            seen = set(received)
            missing = len(set(expected) - seen)
            duplicates = len(received) - len(seen)
            unexpected = len(seen - set(expected))
            ordered = all(a < b for a, b in itertools.pairwise(received))
            result["exact"] += received == expected
            result["clients_with_gaps"] += missing > 0
            result["reconnected_with_gaps"] += missing > 0 and user.t_connected != 0.0
            result["missing_seqs"] += missing
            result["clients_with_duplicates"] += duplicates > 0
            result["duplicate_deliveries"] += duplicates
            result["clients_out_of_order"] += not ordered
            result["unexpected_seqs"] += unexpected
            result["resumes"] += user.resumes
            result["not_recovered"] += user.not_recovered
            result["epoch_changed"] += user.epoch_changed
            if user.t_connected == 0.0:
                result["not_reconnected"] += 1
            else:
                reconnect.append(user.t_connected - self.t_drop)
                replayed += max(0, (user.target_seq or 0) - user.since)
            if user.t_caught_up == 0.0:
                result["not_caught_up"] += 1
            else:
                caught.append(user.t_caught_up - self.t_drop)
            attempts[str(user.attempts)] = attempts.get(str(user.attempts), 0) + 1
            if received != expected and len(result["samples"]) < 5 + 5 * (user.t_connected != 0.0):
                # Clients that did reconnect first: a gap there is a delivery failure, not a client left out.
                result["samples"].insert(
                    0 if user.t_connected else len(result["samples"]),
                    f"{user.uid}: expected {user.first_seq + 1}..{last}, since {user.since}, storm connected seq "
                    f"{user.target_seq} after {user.attempts} attempt(s) "
                    f"({user.t_connected - self.t_drop if user.t_connected else 0:.2f} s), got {compress(received)}"
                    + (" (still waiting at the end)" if user.index in not_quiescent else ""))
        connect_errors = {k.removeprefix("connect:"): v for k, v in self.stats.close_codes.items()
                          if k.startswith("connect:")}
        result["close_codes"] = {k: v for k, v in self.stats.close_codes.items() if not k.startswith("connect:")}
        result["connect_errors"] = connect_errors
        return {"verification": result, "reconnect": reconnect, "caught_up": caught, "attempts": attempts,
                "replayed": replayed}

    # --- loop -----------------------------------------------------------------------------------

    async def run(self, connect_rate: float, connect_concurrency: int) -> None:
        reader = asyncio.ensure_future(poll_pipe(self.pipe, self.commands))
        flusher = asyncio.ensure_future(self.flush())
        try:
            while True:
                command = await self.commands.get()
                name = command[0]
                if name == "stop":
                    break
                if name == "connect":
                    connected = await self.connect_all(connect_rate, connect_concurrency, float(command[1]))
                    self.pipe.send(("connected", connected))
                elif name == "storm":
                    dropped = await self.storm(float(command[1]), float(command[2]), float(command[3]))
                    self.pipe.send(("dropped", dropped))
                elif name == "verify":
                    self.pipe.send(("verified", await self.verify(list(command[1]), float(command[2]))))
        finally:
            self.stopping = True
            for task in list(self.tasks):
                task.cancel()
            for user in self.users:
                if user.sock is not None:
                    user.sock.drop()
            self.publish()
            flusher.cancel()
            reader.cancel()
            with contextlib.suppress(OSError):
                self.pipe.send(("stopped",))

    async def flush(self) -> None:
        while True:
            self.publish()
            await asyncio.sleep(COUNTER_FLUSH_S)

    def publish(self) -> None:
        self.counters[W_OPEN] = self.stats.counters[C_OPEN]
        base = self.spec.index * W_COUNTERS
        for i, value in enumerate(self.counters):
            self.shared[base + i] = value


def compress(seqs: list[int]) -> str:
    """[1, 2, 3, 5, 5, 6] -> '1-3,5,5-6': a client's seqs, short enough for a report line."""
    runs: list[str] = []
    start = prev = None
    for seq in seqs:
        if start is not None and prev is not None and seq == prev + 1:
            prev = seq
            continue
        if start is not None:
            runs.append(f"{start}-{prev}" if start != prev else str(start))
        start = prev = seq
    if start is not None:
        runs.append(f"{start}-{prev}" if start != prev else str(start))
    text = ",".join(runs)
    return text if len(text) < 200 else text[:200] + "..."


def worker_main(spec: WorkerSpec, pipe: Pipe, shared: SynchronizedArray[int], secret: str, connect_rate: float,
                connect_concurrency: int) -> None:
    install_uvloop()
    raise_file_limit()
    asyncio.run(StormWorker(spec, pipe, shared, secret).run(connect_rate, connect_concurrency))


# --------------------------------------------------------------------------------------------
# recorder process: FCALL <prefix>_publish at a steady rate, keeping the seq each call returned
# --------------------------------------------------------------------------------------------

class RecordReplies(RespReplies):
    """Matches pipelined FCALL replies to the users they were for (Redis answers in order)."""

    def __init__(self, users: int) -> None:
        super().__init__()
        self.pending: deque[int] = deque()
        self.last = [0] * users
        self.seqs = 0

    def on_reply(self, reply: Any) -> None:
        index = self.pending.popleft()
        if isinstance(reply, int):
            self.seqs += 1
            self.last[index] = max(self.last[index], reply)


async def record(redis_port: int, users: list[str], rate: float, pipe: Pipe,
                 progress: SynchronizedArray[int]) -> None:
    loop = asyncio.get_running_loop()
    function = Keys(PREFIX).function("publish").encode()
    _, replies = await loop.create_connection(lambda: RecordReplies(len(users)), "127.0.0.1", redis_port)
    assert replies.transport is not None
    commands: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
    reader = asyncio.ensure_future(poll_pipe(pipe, commands))
    order = list(range(len(users)))
    random.shuffle(order)  # round-robin in a shuffled order: every user gets one message per len(users)/rate s
    names = [u.encode() for u in users]
    sent = 0
    started = time.monotonic()
    while commands.empty():
        due = int((time.monotonic() - started) * rate) - sent
        if due > 0:
            batch = []
            for _ in range(due):
                index = order[sent % len(order)]
                message = b'{"type":"ride_status","payload":{"rideId":"r%d","status":"driver_arriving","n":%d}}' \
                    % (index, sent)
                batch.append(resp_command(b"FCALL", function, b"1", names[index], message))
                replies.pending.append(index)
                sent += 1
            replies.transport.write(b"".join(batch))
            progress[R_SENT], progress[R_SEQS], progress[R_ERRORS] = sent, replies.seqs, replies.errors
        await asyncio.sleep(0.002)
    for _ in range(1000):  # the replies still in flight, for up to 10 s
        if replies.seqs + replies.errors >= sent:
            break
        await asyncio.sleep(0.01)
    progress[R_SENT], progress[R_SEQS], progress[R_ERRORS] = sent, replies.seqs, replies.errors
    pipe.send(("recorded", sent, replies.seqs, replies.errors, replies.first_error, replies.last))
    reader.cancel()
    replies.transport.close()


def recorder_main(redis_port: int, users: list[str], rate: float, pipe: Pipe,
                  progress: SynchronizedArray[int]) -> None:
    install_uvloop()
    asyncio.run(record(redis_port, users, rate, pipe, progress))


# --------------------------------------------------------------------------------------------
# servers: our own redis-server and two gateways, all stopped by pid
# --------------------------------------------------------------------------------------------

def die_with_parent() -> None:
    """A child started here gets SIGTERM if this process dies first (Linux prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)


def free_low_port(taken: set[int]) -> int:
    """A free port below the ephemeral range, so no client socket of ours can be holding it."""
    for _ in range(500):
        port = random.randrange(*LOW_PORTS)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        taken.add(port)
        return port
    raise RuntimeError("no free port below 32768")


def http_status(port: int, path: str) -> int:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            return int(s.recv(100).split(b" ", 2)[1])
    except (OSError, ValueError, IndexError):
        return 0


def http_json(port: int, path: str) -> dict[str, Any]:
    """{} when the gateway does not answer within 5 s (its accept queue may be full)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5.0) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return cast(dict[str, Any], json.loads(data.split(b"\r\n\r\n", 1)[1]))
    except (OSError, ValueError, IndexError):
        return {}


@dataclass
class Servers:
    redis_proc: subprocess.Popen[bytes] | None = None
    redis_port: int = 0
    gateways: list[subprocess.Popen[bytes]] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def start(self, history_size: int) -> None:
        taken: set[int] = set()
        self.redis_port = free_low_port(taken)
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.redis_proc = subprocess.Popen(
            [binary, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.redis().ping():
                    break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline or self.redis_proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        script = Path(sys.executable).with_name("tornado-gateway")
        command = [str(script)] if script.exists() else [sys.executable, "-m", "tornado_gateway"]
        for server_id in SERVER_IDS:
            port = free_low_port(taken)
            log_path = Path(tempfile.mkstemp(prefix=f"storm-{server_id}-", suffix=".log")[1])
            env = {**os.environ, "PORT": str(port), "BIND_ADDRESS": "127.0.0.1", "SERVER_ID": server_id,
                   "REDIS_URL": f"redis://127.0.0.1:{self.redis_port}", "REDIS_PREFIX": PREFIX, "JWT_SECRET": SECRET,
                   "GATEWAY_API_KEY": SECRET,
                   "HISTORY_SIZE": str(history_size), "PROCESSES": "1", "STATSD_HOST": "", "LOG_LEVEL": "WARNING",
                   "SHUTDOWN_DRAIN_SECONDS": "1", "PYTHONUNBUFFERED": "1"}
            with open(log_path, "ab") as log:
                self.gateways.append(subprocess.Popen(command, env=env, cwd=ROOT, stdout=log,
                                                      stderr=subprocess.STDOUT, preexec_fn=die_with_parent))
            self.ports.append(port)
            self.logs.append(log_path)
        deadline = time.monotonic() + 30
        for proc, port, log_path in zip(self.gateways, self.ports, self.logs, strict=True):
            while http_status(port, "/ready") != 200:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"gateway on :{port} did not become ready:\n"
                                       f"{log_path.read_text(errors='replace')[-3000:]}")
                time.sleep(0.1)

    def redis(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.redis_port, socket_timeout=10)

    def gateway_pids(self) -> list[int]:
        return [p.pid for p in self.gateways]

    def log_problems(self) -> list[str]:
        """Lines of the gateways' logs (WARNING and above) worth a reader's attention, first ones only."""
        lines: list[str] = []
        for server_id, path in zip(SERVER_IDS, self.logs, strict=True):
            with contextlib.suppress(OSError):
                lines += [f"{server_id}: {line[:300]}" for line in path.read_text(errors="replace").splitlines()
                          if line.strip() and "shutting down" not in line.lower()]
        return lines[:20]

    def stop(self) -> None:
        for proc in self.gateways:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # both drain at once
        for proc in self.gateways:
            stop_process(proc, 20)
        if self.redis_proc is not None:
            stop_process(self.redis_proc, 10)
        for path in self.logs:
            path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------

@dataclass
class RedisSnapshot:
    at: float
    cpu_s: float
    commands: int
    calls: dict[str, int]
    used_memory: int
    keys: int
    net_in: int
    net_out: int


def redis_snapshot(client: redis.Redis, pid: int) -> RedisSnapshot:
    times = psutil.Process(pid).cpu_times()
    info: dict[str, Any] = client.info("everything")
    calls = {key.removeprefix("cmdstat_"): int(value["calls"]) for key, value in info.items()
             if key.startswith("cmdstat_") and isinstance(value, dict)}
    return RedisSnapshot(time.monotonic(), times.user + times.system, int(info["total_commands_processed"]), calls,
                         int(info["used_memory"]), int(client.dbsize()),
                         int(info["total_net_input_bytes"]), int(info["total_net_output_bytes"]))


def redis_cost(before: RedisSnapshot, after: RedisSnapshot) -> RedisCost:
    seconds = max(1e-9, after.at - before.at)
    calls = {name: after.calls.get(name, 0) - before.calls.get(name, 0) for name in after.calls}
    calls = dict(sorted(((k, v) for k, v in calls.items() if v > 0), key=lambda kv: -kv[1]))
    commands = after.commands - before.commands
    cpu = after.cpu_s - before.cpu_s
    return {"seconds": round(seconds, 2), "cpu_s": round(cpu, 3), "cpu_pct": round(100 * cpu / seconds, 1),
            "commands": commands, "commands_per_s": round(commands / seconds, 1), "calls": calls,
            "net_in_mb": round((after.net_in - before.net_in) / 2**20, 2),
            "net_out_mb": round((after.net_out - before.net_out) / 2**20, 2)}


@dataclass
class GatewaySnapshot:
    at: float
    cpu_s: list[float]


def gateway_snapshot(pids: list[int]) -> GatewaySnapshot:
    return GatewaySnapshot(time.monotonic(), [ProcessGroup([pid], include_children=False).cpu_s() for pid in pids])


def gateway_cost(before: GatewaySnapshot, after: GatewaySnapshot) -> GatewayCost:
    seconds = max(1e-9, after.at - before.at)
    per = [round(b - a, 3) for a, b in zip(before.cpu_s, after.cpu_s, strict=True)]
    return {"seconds": round(seconds, 2), "cpu_s": round(sum(per), 3),
            "cpu_pct": round(100 * sum(per) / seconds, 1), "per_instance_cpu_s": per}


def by_second(values: list[float]) -> dict[str, int]:
    """{"1": clients done within 1 s, "2": within 2 s, ...} up to the last one."""
    if not values:
        return {}
    ordered = sorted(values)
    out: dict[str, int] = {}
    index = 0
    for second in range(1, math.ceil(ordered[-1]) + 1):
        while index < len(ordered) and ordered[index] <= second:
            index += 1
        out[str(second)] = index
    return out


def timings(values: list[float]) -> Timings:
    ordered = sorted(int(v * 1e6) for v in values)
    return {"p50_s": round(percentile(ordered, 0.5) / 1e6, 3), "p99_s": round(percentile(ordered, 0.99) / 1e6, 3),
            "max_s": round(ordered[-1] / 1e6, 3) if ordered else 0.0}


# --------------------------------------------------------------------------------------------
# coordinator
# --------------------------------------------------------------------------------------------

class Storm:
    def __init__(self, config: StormConfig) -> None:
        self.config = config
        self.ctx = multiprocessing.get_context("fork")
        self.n_workers = config.worker_count()
        self.shared: SynchronizedArray[int] = self.ctx.Array("q", self.n_workers * W_COUNTERS, lock=False)
        self.progress: SynchronizedArray[int] = self.ctx.Array("q", 3, lock=False)
        self.servers = Servers()
        self.pipes: list[Pipe] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.recorder_pipe: Pipe | None = None
        self.recorder: multiprocessing.process.BaseProcess | None = None
        self.run_id = f"st{random.randrange(16**6):06x}"
        self.specs: list[WorkerSpec] = []
        self.redis_version = "Redis ?"
        self.steady_memory = 0

    def log(self, text: str) -> None:
        if not self.config.quiet:
            print(text, flush=True)

    def counter(self, which: int) -> int:
        return sum(self.shared[w * W_COUNTERS + which] for w in range(self.n_workers))

    def start_workers(self) -> None:
        config = self.config
        per = math.ceil(config.clients / self.n_workers)
        if per > MAX_SOCKETS_PER_WORKER:
            raise SystemExit(f"storm.py: more than {MAX_SOCKETS_PER_WORKER} clients per worker; raise --workers")
        ips = source_addresses(config.source_ips or max(2, math.ceil(config.clients / SOCKETS_PER_SOURCE_ADDRESS)),
                               random.randrange(1, 255))
        targets = tuple(("127.0.0.1", port) for port in self.servers.ports)
        for w in range(self.n_workers):
            first = w * per
            spec = WorkerSpec(w, first, max(0, min(per, config.clients - first)), targets, ips, self.run_id,
                              config.handshake_timeout_s, config.concurrency, config.storm_timeout_s)
            parent, child = self.ctx.Pipe()
            proc = self.ctx.Process(target=worker_main, daemon=True, args=(
                spec, child, self.shared, SECRET, max(1.0, config.connect_rate / self.n_workers),
                max(1, 1000 // self.n_workers)))
            proc.start()
            self.specs.append(spec)
            self.pipes.append(parent)
            self.procs.append(proc)

    def start_recorder(self) -> None:
        parent, child = self.ctx.Pipe()
        users = [f"{self.run_id}-{i}" for i in range(self.config.clients)]
        self.recorder = self.ctx.Process(target=recorder_main, daemon=True, args=(
            self.servers.redis_port, users, self.config.record_rate, child, self.progress))
        self.recorder.start()
        self.recorder_pipe = parent

    def stop_recorder(self) -> tuple[int, int, int, str, list[int]]:
        assert self.recorder_pipe is not None
        self.recorder_pipe.send(("stop",))
        if not self.recorder_pipe.poll(30):
            raise RuntimeError("the recorder did not stop")
        _, sent, seqs, errors, first_error, last = self.recorder_pipe.recv()
        return int(sent), int(seqs), int(errors), str(first_error), list(last)

    def loadgen_group(self) -> ProcessGroup:
        procs = [*self.procs, self.recorder]
        return ProcessGroup([p.pid for p in procs if p is not None and p.pid is not None], include_children=False)

    def connect_phase(self) -> tuple[int, float]:
        config = self.config
        timeout = 30.0 + 0.2 * config.clients / config.connect_rate
        started = time.monotonic()
        for pipe in self.pipes:
            pipe.send(("connect", timeout))
        limit = config.clients / config.connect_rate + timeout + config.handshake_timeout_s + 30
        replies: list[int] = []
        pending = list(self.pipes)
        next_line = started + 1.0
        while pending and time.monotonic() - started < limit:
            for pipe in list(pending):
                if pipe.poll(0):
                    replies.append(int(pipe.recv()[1]))
                    pending.remove(pipe)
            time.sleep(0.05)
            if time.monotonic() >= next_line:
                next_line += 1.0
                self.log(f"[connect] {time.monotonic() - started:5.1f}s connected={self.counter(W_CONNECTED)}"
                         f"/{config.clients} failed_attempts={self.counter(W_FAILED_ATTEMPTS)}")
        if pending:
            raise RuntimeError("the connect phase did not finish in time")
        return sum(replies), time.monotonic() - started

    def run(self) -> StormReport:
        config = self.config
        history_size = config.effective_history_size()
        self.log(f"[setup] {config.clients} clients, {self.n_workers} workers, recording {config.record_rate:.0f}/s "
                 f"({config.per_user_rate():.3f}/s per user), HISTORY_SIZE={history_size} "
                 f"(a client away for up to {config.storm_timeout_s:.0f} s misses at most "
                 f"{config.required_history()})")
        self.servers.start(history_size)
        try:
            return self.scenario(history_size)
        finally:
            self.stop_helpers()
            self.servers.stop()

    def scenario(self, history_size: int) -> StormReport:
        config = self.config
        servers = self.servers
        assert servers.redis_proc is not None
        rclient = servers.redis()
        redis_pid = servers.redis_proc.pid
        gw_pids = servers.gateway_pids()
        self.start_workers()
        connected, connect_s = self.connect_phase()
        self.log(f"[connect] {connected}/{config.clients} connected in {connect_s:.1f} s")

        # Steady state: recording only, every client connected.
        self.start_recorder()
        time.sleep(min(STEADY_SETTLE_S, config.warm_s))
        steady_redis0, steady_gw0 = redis_snapshot(rclient, redis_pid), gateway_snapshot(gw_pids)
        self.steady_memory = steady_redis0.used_memory
        time.sleep(max(0.0, config.warm_s - STEADY_SETTLE_S))

        # The drop, at one wall-clock instant for every worker.
        t_drop = time.time() + 0.5
        for pipe in self.pipes:
            pipe.send(("storm", t_drop, config.offline_s, config.jitter_s))
        time.sleep(max(0.0, t_drop - time.time()))
        storm_redis0, storm_gw0 = redis_snapshot(rclient, redis_pid), gateway_snapshot(gw_pids)
        loadgen0 = CpuWindow(self.loadgen_group())
        sent_at_drop = self.progress[R_SENT]
        redis_steady = redis_cost(steady_redis0, storm_redis0)
        gateway_steady = gateway_cost(steady_gw0, storm_gw0)
        drops = self.ask_wait("dropped", 10 + config.offline_s)
        drop_spread_ms = 1000 * (max(last for _, last in drops) - min(first for first, _ in drops))

        # Until every client that was connected has reconnected and holds its replay.
        started = time.monotonic()
        next_line = started + 1.0
        while time.monotonic() - started < config.storm_timeout_s + 5:
            if self.counter(W_CAUGHT_UP) >= connected:
                break
            time.sleep(0.02)
            if time.monotonic() >= next_line:
                next_line += 1.0
                self.log(f"[storm] {time.monotonic() - started:5.1f}s reconnected={self.counter(W_RECONNECTED)}"
                         f"/{connected} caught_up={self.counter(W_CAUGHT_UP)} open={self.counter(W_OPEN)} "
                         f"failed_attempts={self.counter(W_FAILED_ATTEMPTS)} recorded={self.progress[R_SENT]}")
        storm_redis1, storm_gw1 = redis_snapshot(rclient, redis_pid), gateway_snapshot(gw_pids)
        loadgen_cpu, _ = loadgen0.stop()
        sent_at_recovery = self.progress[R_SENT]
        self.log(f"[storm] done after {time.monotonic() - started:.1f} s: reconnected="
                 f"{self.counter(W_RECONNECTED)}/{connected} caught_up={self.counter(W_CAUGHT_UP)}")
        after_connections = [int(http_json(port, "/stats").get("totalConnections", -1)) for port in servers.ports]

        time.sleep(config.after_s)
        sent, seqs, errors, first_error, last = self.stop_recorder()
        self.log(f"[record] {sent} sent, {seqs} recorded, {errors} refused{': ' + first_error if errors else ''}")
        replies = []
        for spec, pipe in zip(self.specs, self.pipes, strict=True):
            pipe.send(("verify", last[spec.first_user:spec.first_user + spec.count], config.quiesce_timeout_s))
        for pipe in self.pipes:
            if not pipe.poll(config.quiesce_timeout_s + 60):
                raise RuntimeError("a worker did not finish verifying")
            replies.append(pipe.recv()[1])
        end_redis = redis_snapshot(rclient, redis_pid)
        self.redis_version = f"Redis {rclient.info('server')['redis_version']}"
        rclient.close()
        return self.report(connected, connect_s, history_size, drop_spread_ms, replies, sent, seqs, errors,
                           first_error, sent_at_recovery - sent_at_drop, (storm_redis0, storm_redis1, end_redis),
                           redis_steady, gateway_steady, gateway_cost(storm_gw0, storm_gw1), loadgen_cpu,
                           after_connections)

    def ask_wait(self, expected: str, timeout: float) -> list[tuple[float, float]]:
        replies: list[tuple[float, float]] = []
        deadline = time.monotonic() + timeout
        for pipe in self.pipes:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"a worker did not answer {expected} in time")
            kind, value = pipe.recv()
            assert kind == expected, kind
            replies.append((float(value[0]), float(value[1])))
        return replies

    def report(self, connected: int, connect_s: float, history_size: int, drop_spread_ms: float,
               replies: list[dict[str, Any]], sent: int, seqs: int, errors: int, first_error: str,
               during_storm: int, memory: tuple[RedisSnapshot, RedisSnapshot, RedisSnapshot],
               redis_steady: RedisCost, gateway_steady: GatewayCost, gateway_storm: GatewayCost,
               loadgen_cpu: float, after_connections: list[int]) -> StormReport:
        config = self.config
        verification = cast(dict[str, Any], {})
        reconnect: list[float] = []
        caught: list[float] = []
        attempts: dict[str, int] = {}
        replayed = 0
        for reply in replies:
            for key, value in reply["verification"].items():
                if isinstance(value, dict):
                    merged = verification.setdefault(key, {})
                    for k, v in value.items():
                        merged[k] = merged.get(k, 0) + v
                elif isinstance(value, list):
                    verification.setdefault(key, []).extend(value)
                else:
                    verification[key] = verification.get(key, 0) + value
            reconnect += reply["reconnect"]
            caught += reply["caught_up"]
            for k, v in reply["attempts"].items():
                attempts[k] = attempts.get(k, 0) + v
            replayed += int(reply["replayed"])
        verification["samples"] = verification.get("samples", [])[:10]
        checked = cast(Verification, verification)
        before, after, end = memory
        redis_storm = redis_cost(before, after)
        n = len(reconnect) or 1  # no client reconnected: the figures are totals, not per client
        window = redis_storm["seconds"]
        per_client = {
            "redis_commands": round((redis_storm["commands"] - redis_steady["commands_per_s"] * window) / n, 1),
            "redis_cpu_us": round(1e6 * (redis_storm["cpu_s"] - redis_steady["cpu_pct"] / 100 * window) / n, 1),
            "gateway_cpu_ms": round(1e3 * (gateway_storm["cpu_s"] - gateway_steady["cpu_pct"] / 100
                                           * gateway_storm["seconds"]) / n, 3)}
        log_problems = self.servers.log_problems()
        ok = (checked["clients"] == connected == config.clients and checked["exact"] == connected
              and checked["not_recovered"] == 0 and checked["not_reconnected"] == 0 and checked["not_caught_up"] == 0
              and checked["epoch_changed"] == 0 and checked["unexpected_closes"] == 0 and errors == 0)
        return {
            "clients": config.clients, "connected": connected, "workers": self.n_workers,
            "record_rate": config.record_rate, "per_user_rate": round(config.per_user_rate(), 4),
            "history_size": history_size, "history_needed": config.required_history(),
            "concurrency": config.concurrency, "offline_s": config.offline_s,
            "jitter_s": config.jitter_s, "handshake_timeout_s": config.handshake_timeout_s,
            "connect_s": round(connect_s, 2),
            "drop_spread_ms": round(drop_spread_ms, 1),
            "recovery_s": round(max(caught), 3) if caught else 0.0,
            "all_reconnected_s": round(max(reconnect), 3) if reconnect else 0.0,
            "reconnect": timings(reconnect), "caught_up": timings(caught), "caught_up_by_s": by_second(caught),
            "attempts": dict(sorted(attempts.items(), key=lambda kv: int(kv[0]))), "replayed": replayed,
            "recorded_total": seqs, "recorded_during_storm": during_storm, "record_errors": errors,
            "first_record_error": first_error, "verification": checked,
            "redis_steady": redis_steady, "redis_storm": redis_storm, "per_client": per_client,
            "redis_memory_mb": {"steady_start": round(self.steady_memory / 2**20, 2),
                                "before_drop": round(before.used_memory / 2**20, 2),
                                "after_recovery": round(after.used_memory / 2**20, 2),
                                "end": round(end.used_memory / 2**20, 2)},
            "redis_keys": {"before_drop": before.keys, "after_recovery": after.keys, "end": end.keys},
            "gateway_steady": gateway_steady, "gateway_storm": gateway_storm,
            "loadgen_storm_cpu_s": round(loadgen_cpu, 3), "gateway_connections_after": after_connections,
            "gateway_log_problems": log_problems, "redis_version": self.redis_version, "ok": ok and sent == seqs}

    def stop_helpers(self) -> None:
        for pipe in [*self.pipes, *([self.recorder_pipe] if self.recorder_pipe is not None else [])]:
            with contextlib.suppress(OSError):
                pipe.send(("stop",))
        for proc in [*self.procs, *([self.recorder] if self.recorder is not None else [])]:
            proc.join(15)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------

def top_calls(cost: RedisCost, count: int = 8) -> str:
    return ", ".join(f"{name} {calls}" for name, calls in list(cost["calls"].items())[:count])


def summary(r: StormReport) -> str:
    v, rs, rq, gs, gq = r["verification"], r["redis_storm"], r["redis_steady"], r["gateway_storm"], r["gateway_steady"]
    mem = r["redis_memory_mb"]
    lines = [
        f"Reconnect storm: {r['connected']}/{r['clients']} clients on 2 gateway instances, recording "
        f"{r['record_rate']:.0f} msg/s ({r['per_user_rate']}/s per user, HISTORY_SIZE={r['history_size']}); "
        f"all dropped at once (spread {r['drop_spread_ms']} ms), resumed on the other instance"
        + (f" after {r['offline_s']} s offline" if r["offline_s"] else "")
        + (f", first attempts spread over {r['jitter_s']} s" if r["jitter_s"] else ", all at once")
        + (f", at most {r['concurrency']} handshakes in flight per worker" if r["concurrency"] else "")
        + f"; an attempt is abandoned after {r['handshake_timeout_s']} s and retried after 0.25 s doubling to 4 s "
        "(full jitter)",
        "",
        "| storm | value |",
        "| --- | --- |",
        f"| recovery (drop -> every client reconnected and caught up) | {r['recovery_s']} s |",
        f"| drop -> `connected` on the other instance | p50 {r['reconnect']['p50_s']} s, p99 "
        f"{r['reconnect']['p99_s']} s, max {r['reconnect']['max_s']} s |",
        f"| drop -> replay delivered (caught up) | p50 {r['caught_up']['p50_s']} s, p99 {r['caught_up']['p99_s']} s, "
        f"max {r['caught_up']['max_s']} s |",
        "| clients caught up, by seconds after the drop | "
        + ", ".join(f"{s} s: {n}" for s, n in r["caught_up_by_s"].items() if int(s) % 5 == 0 or n == r["connected"])
        + " |",
        f"| reconnect attempts per client | {r['attempts']} |",
        f"| messages recorded during the storm / replayed by resumes | {r['recorded_during_storm']} / "
        f"{r['replayed']} |",
        f"| clients with exactly first..last seq | {v['exact']} / {v['clients']} |",
        f"| gaps (clients / missing seqs; clients that did reconnect) | {v['clients_with_gaps']} / "
        f"{v['missing_seqs']}; {v['reconnected_with_gaps']} |",
        f"| duplicates (clients / deliveries) | {v['clients_with_duplicates']} / {v['duplicate_deliveries']} |",
        f"| out of order / unexpected seqs | {v['clients_out_of_order']} / {v['unexpected_seqs']} |",
        f"| resumes / `recovered: true` | {v['resumes']} / {v['resumes'] - v['not_recovered']} "
        f"(epoch changed {v['epoch_changed']}) |",
        f"| not reconnected / not caught up / not quiescent | {v['not_reconnected']} / {v['not_caught_up']} / "
        f"{v['not_quiescent']} |",
        f"| closes by the server / error frames | {v['close_codes'] or 'none'} / {v['error_codes'] or 'none'} |",
        f"| failed attempts by cause | {v['connect_errors'] or 'none'} |",
        "",
        "| cost | steady recording (per s) | storm window (total) | storm window (per s) |",
        "| --- | ---: | ---: | ---: |",
        f"| window | {rq['seconds']} s | {rs['seconds']} s | |",
        f"| redis-server CPU | {rq['cpu_pct']}% | {rs['cpu_s']} s | {rs['cpu_pct']}% |",
        f"| Redis commands | {rq['commands_per_s']:.0f}/s | {rs['commands']} | {rs['commands_per_s']:.0f}/s |",
        f"| Redis network in / out | {rq['net_in_mb'] / max(rq['seconds'], 1e-9):.2f} / "
        f"{rq['net_out_mb'] / max(rq['seconds'], 1e-9):.2f} MB/s | {rs['net_in_mb']} / {rs['net_out_mb']} MB | |",
        f"| gateway CPU (2 instances) | {gq['cpu_pct']}% | {gs['cpu_s']} s ({gs['per_instance_cpu_s']}) | "
        f"{gs['cpu_pct']}% |",
        f"| loadgen CPU (workers + recorder) | | {r['loadgen_storm_cpu_s']} s | |",
        "",
        f"Per reconnected client, above the steady rate: {r['per_client']['redis_commands']} Redis commands, "
        f"{r['per_client']['redis_cpu_us']} us of redis-server CPU, {r['per_client']['gateway_cpu_ms']} ms of gateway "
        "CPU (a disconnect on one instance plus a resume on the other). Redis counts the commands run inside "
        "functions and scripts in its totals.",
        "",
        f"Redis calls in the storm window: {top_calls(rs)}",
        "Redis calls per second, steady: " + ", ".join(
            f"{name} {calls / max(rq['seconds'], 1e-9):.0f}" for name, calls in list(rq["calls"].items())[:6]),
        f"Redis used_memory: {mem['steady_start']} MB at the start of the steady window "
        f"({rq['seconds']} s earlier), {mem['before_drop']} MB before the drop, {mem['after_recovery']} MB after "
        "recovery, "
        f"{mem['end']} MB at the end; keys {r['redis_keys']['before_drop']} -> {r['redis_keys']['after_recovery']}",
        f"Connections per instance after recovery: {r['gateway_connections_after']}",
    ]
    if v["samples"]:
        lines += ["", "Problems (first ones):", *(f"- {s}" for s in v["samples"])]
    if r["gateway_log_problems"]:
        lines += ["", "Gateway log (WARNING and above, first lines):", *(f"- {s}" for s in r["gateway_log_problems"])]
    if r["record_errors"]:
        lines += ["", f"Recording refused {r['record_errors']} times: {r['first_record_error']}"]
    lines += ["", "RESULT: " + ("ok" if r["ok"] else "FAILED")]
    return "\n".join(lines)


def machine_line(r: StormReport) -> str:
    from scripts.bench import calibrate  # lazily: only the doc needs it

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    return (f"Machine: {os.cpu_count()} cores ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GiB, "
            f"load average {os.getloadavg()[0]:.1f} at the end; Python {sys.version.split()[0]}, "
            f"{r['redis_version']}; calibration (`bench.calibrate`, lower is faster) {calibrate():.0f} ms; "
            f"{datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}.")


def doc_section(r: StormReport, argv: Sequence[str]) -> str:
    return "\n".join([
        f"### Results: `storm` (generated by `python scripts/storm.py {' '.join(argv)}`)",
        "",
        machine_line(r),
        "",
        "Method: the script starts its own redis-server and two gateway processes (`PROCESSES=1` each, "
        "`HEARTBEAT_INTERVAL=30`, `LOG_LEVEL=WARNING`), connects every client (one user each) to instance "
        "`i % 2`, records `ride_status` for all users round-robin with `FCALL storm_publish` at a steady rate, "
        "then resets every client socket at one instant (RST, no close frame) and reconnects each at once "
        "to the other instance with `since`/`epoch` (a failed attempt retries after 0.25 s doubling to 4 s, "
        "full jitter) while recording continues; after recovery it records a few more seconds, stops, waits "
        "until every client holds its user's last seq and compares what each client received over both "
        "connections with first..last. \"Caught up\" = the client holds the seq its `connected` announced "
        "(the replay is delivered). Redis and gateway costs are taken from the drop to the moment every "
        "client had caught up (polled every 20 ms), next to the steady recording-only window before the drop.",
        "",
        summary(r),
        "",
    ])


def write_doc(r: StormReport, argv: Sequence[str]) -> None:
    """Replace only the `storm` block of docs/BENCHMARKS.md (read right before writing: other sections
    and other writers' edits are kept), or append it."""
    start, end = "<!-- bench:storm:start -->", "<!-- bench:storm:end -->"
    block = f"{start}\n{doc_section(r, argv)}\n{end}"
    doc = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    doc = pattern.sub(lambda _m: block, doc) if pattern.search(doc) else doc.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(doc)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    d = StormConfig()
    parser = argparse.ArgumentParser(
        prog="storm.py", description="Reconnect storm against two gateway instances on a private Redis: drop every "
                                     "client at once, resume all on the other instance with since/epoch while "
                                     "messages keep being recorded, and check every client's seqs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-c", "--clients", type=int, default=d.clients, help="clients, one user each")
    parser.add_argument("--rate", type=float, default=d.record_rate, help="recorded messages per second, in total")
    parser.add_argument("--connect-rate", type=float, default=d.connect_rate, help="initial connections per second")
    parser.add_argument("--warm", type=float, default=d.warm_s, help="seconds of recording before the drop")
    parser.add_argument("--after", type=float, default=d.after_s, help="seconds of recording after recovery")
    parser.add_argument("--storm-timeout", type=float, default=d.storm_timeout_s,
                        help="seconds a client keeps trying to reconnect")
    parser.add_argument("--quiesce-timeout", type=float, default=d.quiesce_timeout_s,
                        help="seconds to wait for the last recorded messages to arrive")
    parser.add_argument("--handshake-timeout", type=float, default=d.handshake_timeout_s,
                        help="seconds per reconnect attempt")
    parser.add_argument("--concurrency", type=int, default=d.concurrency,
                        help="reconnect handshakes in flight per worker (0: all at once)")
    parser.add_argument("--offline", type=float, default=d.offline_s,
                        help="seconds the clients stay away after the drop")
    parser.add_argument("--jitter", type=float, default=d.jitter_s,
                        help="spread each client's first reconnect attempt uniformly over this many seconds")
    parser.add_argument("--workers", type=int, default=d.workers, help="client processes (0: one per 5,000, >= 2)")
    parser.add_argument("--source-ips", type=int, default=d.source_ips, help="source addresses (0: one per 5,000)")
    parser.add_argument("--history-size", type=int, default=d.history_size,
                        help="HISTORY_SIZE of the gateways (0: computed, at least 100)")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="write the report as JSON here")
    parser.add_argument("--write-doc", action="store_true",
                        help="write the `storm` section of docs/BENCHMARKS.md (other sections are kept)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser.parse_args(argv)


def run(config: StormConfig) -> StormReport:
    raise_file_limit()
    report = Storm(config).run()
    if config.json_out:
        path = Path(config.json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    config = StormConfig(clients=args.clients, record_rate=args.rate, connect_rate=args.connect_rate, warm_s=args.warm,
                         after_s=args.after, storm_timeout_s=args.storm_timeout,
                         quiesce_timeout_s=args.quiesce_timeout, handshake_timeout_s=args.handshake_timeout,
                         concurrency=args.concurrency, offline_s=args.offline, jitter_s=args.jitter,
                         workers=args.workers,
                         source_ips=args.source_ips, history_size=args.history_size, json_out=args.json,
                         quiet=args.quiet)
    report = run(config)
    print(summary(report))
    print(f"\nJSON report: {config.json_out}")
    if args.write_doc:
        write_doc(report, argv)
        print("wrote the `storm` section of docs/BENCHMARKS.md")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
