"""StatsD metrics, aggregated in memory and flushed once a second.

A UDP send per message would cost a syscall on the hot path, so counters are
summed locally, timers are sampled (a uniform sample of at most
`MAX_TIMER_SAMPLES` per name per flush, sent with its sample rate so that
StatsD's counts stay true) and gauges keep their last value; `flush()` sends
them in a few datagrams. No method here blocks or raises: a metrics outage must
never become a gateway outage.

Why not the `statsd` package (pystatsd), which this module used before: its `rate` argument makes it
drop each value itself with probability 1 - rate (`StatsClientBase._prepare`), so a sample already
thinned here in memory cannot be sent with its true rate through it; without the rate, StatsD's
timer counts were too low under load. What remains is writing `name:value|type` lines into UDP
datagrams, a few lines of code.

Naming (README, "Metrics"): counters and timers are cluster-wide names (StatsD
adds up what every instance sends); gauges carry the instance,
`<prefix>.instance.<serverId>.<name>`, because StatsD keeps only the last value
of a gauge: the cluster figure is `sumSeries(...instance.*.<name>)` in Graphite.
Gauges under `cluster.` are the same figure on every instance (read from Redis),
so the last value is the right one and they carry no instance.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import re
import socket
from collections import defaultdict
from collections.abc import Callable

log = logging.getLogger(__name__)

MAX_TIMER_SAMPLES = 200
MAX_DATAGRAM = 512  # bytes: safe anywhere (pystatsd's default); StatsD reads each line of a datagram

# Catalogue (README "Metrics" lists each with its meaning; tests/test_metrics_catalogue.py checks both ways).
CONNECTIONS_OPENED = "connections.opened"
CONNECTIONS_CLOSED = "connections.closed.{reason}"
CONNECTIONS_ACTIVE = "connections.active.{user_type}"
CONNECTIONS_TOTAL = "connections.active.total"
USERS_UNIQUE = "users.unique"
CLUSTER_USERS_UNIQUE = "cluster.users.unique"
CONNECT_REJECTED = "connections.rejected.{code}"
AUTH_FAILURES = "auth.failures"
MESSAGES_IN = "messages.in.{type}"
MESSAGES_OUT = "messages.out.{type}"
MESSAGES_DROPPED = "messages.dropped.{reason}"
ERRORS = "errors.{code}"
BROADCAST_REQUESTS = "broadcast.requests.{status}"
REDIS_PUBLISH_MS = "redis.publish_ms"
REDIS_ERRORS = "redis.errors"
REDIS_RECONNECTS = "redis.reconnects"
HEARTBEAT_TICK_MS = "heartbeat.tick_ms"
HEARTBEATS_SENT = "heartbeats.sent"
MESSAGES_RECORDED = "messages.recorded"
MESSAGES_DUPLICATE = "messages.duplicate"
MESSAGES_REPLAYED = "messages.replayed"
MESSAGES_EXPIRED = "messages.expired"
RESUMES = "resumes.{outcome}"
DELIVERY_MS = "delivery_ms.{type}"
MESSAGES_GAP_FILLED = "messages.gap_filled"
GAPS_UNFILLED = "messages.gaps_unfilled"
PROBE_MS = "redis.probe_ms"
PROBE_FAILURES = "redis.probe_failures"
OUTBOUND_SHED = "outbound.shed"

#: Per-instance gauges: sent as `instance.<serverId>.<name>`.
INSTANCE_GAUGES = frozenset({CONNECTIONS_ACTIVE, CONNECTIONS_TOTAL, USERS_UNIQUE})
#: Cluster-wide gauges: every instance sends the same value (from Redis).
CLUSTER_GAUGES = frozenset({CLUSTER_USERS_UNIQUE})
TIMERS = frozenset({REDIS_PUBLISH_MS, HEARTBEAT_TICK_MS, DELIVERY_MS, PROBE_MS})
INSTANCE_SCOPE = "instance.{server_id}."

_NOT_A_NAME_PART = re.compile(r"[^A-Za-z0-9_-]")


@functools.cache
def per_type(template: str, kind: str) -> str:
    """A per-type name (MESSAGES_OUT, DELIVERY_MS) for a message type. Called for every message
    delivered, where a str.format costs 0.15 us; `kind` is a validated service type, so the cache stays small."""
    return template.format(type=kind)


def instance_node(server_id: str) -> str:
    """The serverId as one Graphite path component: a dot would add a level and break wildcards."""
    return _NOT_A_NAME_PART.sub("_", server_id) or "_"


class _Timer:
    """A uniform sample of one flush's values: Li's Algorithm L (reservoir sampling with skips), so
    that past the first MAX_TIMER_SAMPLES values most calls only count; drawing a random number for
    every value (Algorithm R) cost 0.6 us per call against 0.2 for the old first-200 cap (timeit)."""

    __slots__ = ("count", "samples", "next", "w")

    def __init__(self) -> None:
        self.count = 0  # events this flush; len(samples) of them are kept
        self.samples: list[float] = []
        self.next = 0  # the count at which the next value enters the sample (once it is full)
        self.w = 0.0

    def start_skipping(self, random: Callable[[], float]) -> None:
        self.w = math.exp(math.log(1.0 - random()) / MAX_TIMER_SAMPLES)
        self._skip(random)

    def replace(self, ms: float, random: Callable[[], float]) -> None:
        self.samples[int(random() * MAX_TIMER_SAMPLES)] = ms
        self.w *= math.exp(math.log(1.0 - random()) / MAX_TIMER_SAMPLES)
        self._skip(random)

    def _skip(self, random: Callable[[], float]) -> None:
        w = min(self.w, 1.0 - 1e-12)  # 1.0 - random() may be exactly 1
        self.next = self.count + int(math.log(1.0 - random()) / math.log(1.0 - w)) + 1


class Metrics:
    __slots__ = ("_sock", "_addr", "_prefix", "_gauge_prefix", "_counters", "_gauges", "_timers", "_random")

    def __init__(self, host: str | None, port: int, prefix: str, instance: str = "") -> None:
        self._sock: socket.socket | None = None
        self._addr: tuple[str, int] | tuple[str, int, int, int] | tuple[int, bytes] | None = None
        if host:
            try:
                family, _type, _proto, _name, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
                self._sock = socket.socket(family, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
                self._addr = addr
            except OSError:  # an unresolvable host disables metrics, it must not stop startup
                log.warning("statsd host %s:%s unusable; metrics disabled", host, port)
        self._prefix = f"{prefix}." if prefix else ""
        self._gauge_prefix = self._prefix + (INSTANCE_SCOPE.format(server_id=instance_node(instance))
                                             if instance else "")
        self._counters: defaultdict[str, int] = defaultdict(int)
        self._gauges: dict[str, float] = {}  # kept across flushes: sent every second (StatsD deleteGauges)
        self._timers: dict[str, _Timer] = {}
        self._random = random.random

    def incr(self, name: str, count: int = 1) -> None:
        self._counters[name] += count

    def gauge(self, name: str, value: float) -> None:
        """An instance gauge (INSTANCE_GAUGES) or a cluster-wide one (CLUSTER_GAUGES)."""
        self._gauges[name] = value

    def timing(self, name: str, ms: float) -> None:
        timer = self._timers.get(name)
        if timer is None:
            timer = self._timers[name] = _Timer()
        count = timer.count = timer.count + 1
        if count <= MAX_TIMER_SAMPLES:
            timer.samples.append(ms)
            if count == MAX_TIMER_SAMPLES:
                timer.start_skipping(self._random)
        elif count == timer.next:
            timer.replace(ms, self._random)

    def lines(self) -> list[str]:
        """Everything since the last call, as StatsD lines (and forgets counters and timers)."""
        counters, timers = self._counters, self._timers
        self._counters, self._timers = defaultdict(int), {}
        prefix, lines = self._prefix, []
        for name, count in counters.items():
            lines.append(f"{prefix}{name}:{count}|c")
        for name, value in self._gauges.items():
            path = (prefix if name.startswith("cluster.") else self._gauge_prefix) + name
            if value < 0:  # "-3|g" would be a decrement: set 0 first
                lines.append(f"{path}:0|g")
            lines.append(f"{path}:{int(value) if value == int(value) else value}|g")
        for name, timer in timers.items():
            samples = timer.samples
            # The rate in plain decimals (StatsD reads `@[0-9.]+`), precise enough that the count it derives
            # (the sum of 1/rate over the samples) is the number of events to within 1e-9.
            suffix = "|ms" if len(samples) >= timer.count else f"|ms|@{len(samples) / timer.count:.15f}"
            lines.extend(f"{prefix}{name}:{ms:.3f}{suffix}" for ms in samples)
        return lines

    def flush(self) -> None:
        lines = self.lines()
        if self._sock is None or self._addr is None:
            return
        try:
            batch: list[str] = []
            size = 0
            for line in lines:
                if batch and size + len(line) + 1 > MAX_DATAGRAM:
                    self._send(batch)
                    batch, size = [], 0
                batch.append(line)
                size += len(line) + 1
            if batch:
                self._send(batch)
        except Exception:
            log.debug("statsd flush failed", exc_info=True)

    def _send(self, batch: list[str]) -> None:
        assert self._sock is not None and self._addr is not None
        try:
            self._sock.sendto("\n".join(batch).encode("utf-8", "replace"), self._addr)
        except OSError:  # buffer full, nobody listening (ECONNREFUSED on loopback): a lost datagram, no more
            pass
