"""The capacity model of issue #11: gateway hosts and Redis shards for N concurrent connections, the first
bottleneck, and what a reconnect storm of all of them costs, computed from measured figures.

Every input is a figure in docs/capacity/inputs.json, each with where and when it was measured (docs/BENCHMARKS.md
sections, scripts/redis_costs.py, the code's defaults); the message mix and the fleet are options with the issue's
defaults. The output is the markdown block docs/CAPACITY.md holds between its markers, so the model is re-run,
not re-argued:

    python scripts/capacity.py                       # print the tables
    python scripts/capacity.py --write-doc           # replace the generated block of docs/CAPACITY.md
    python scripts/capacity.py --location-interval 2 --recorded-share 1 --host-fds 65536   # a what-if

The model, in short (docs/CAPACITY.md explains each step):

- a gateway process costs, per connection and second: its heartbeats (the measured idle CPU), its share of
  connection churn (CPU per connect / connection lifetime), the service messages delivered to it and, for drivers,
  the location updates it sends, each at the CPU per message measured at the per-process rate nearest the one the
  model arrives at (cost per message falls as the rate grows, so below the lowest measured rate the lowest rate's
  figure is used: conservative);
- a host runs PROCESSES = cores (one process per core), and holds as many connections per process as the tightest
  of: CPU at the headroom target, memory (RSS + kernel socket memory + the outbound budget), file descriptors;
- Redis costs what the gateway and the services send per event (per-command CPU from redis_costs.py, the I/O
  included), against one core per shard at the headroom target (a shard's commands run on one thread), with its
  memory and network; three layouts: one Redis (today's default), a Redis Cluster with classic events
  (REDIS_CLUSTER=true: user channels sharded, client events classic PUBLISH, which every node receives over the
  cluster bus), and a Redis Cluster with EVENT_SHARDS (client events sharded too);
- the first bottleneck is the limit with the least headroom (capacity / load, both in connections) in the fleet
  sized for the target;
- a reconnect storm of every connection drains at the pace of its slowest side: the gateways at the storm rate
  measured per process, each Redis shard's share, the shard holding the users set.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
INPUTS = ROOT / "docs" / "capacity" / "inputs.json"
DOC = ROOT / "docs" / "CAPACITY.md"
START, END = "<!-- capacity:start -->", "<!-- capacity:end -->"
CLUSTER_SPUBLISH = "redis.cluster_spublish_us_per_delivered_message"
GIB = 2**30
BEYOND = 1.1  # connections per process more than 10% above the largest run are flagged as extrapolated
RAISED_FDS = 65_536  # the what-if of raising the open-file limit (LimitNOFILE) on the production hosts
RESP_OVERHEAD_BYTES = 60  # per message on a Redis connection: RESP framing and the channel name (assumed)
RECORD_WRAPPER_BYTES = 100  # what the history record adds around a recorded message ({"recorded":{seq,epoch,...}})


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------

class Inputs:
    """docs/capacity/inputs.json: named figures, each with its value and where it comes from."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.figures: dict[str, dict[str, Any]] = doc["figures"]
        self.run: dict[str, Any] = doc.get("redis_costs_run", {})

    @classmethod
    def load(cls, path: Path = INPUTS) -> Inputs:
        return cls(json.loads(path.read_text()))

    def value(self, name: str) -> float:
        value = self.figures[name]["value"]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name}: expected a number, found {value!r}")
        return float(value)

    def optional(self, name: str) -> float | None:
        figure = self.figures.get(name)
        return None if figure is None or figure.get("value") is None else self.value(name)

    def field(self, name: str, key: str) -> float:
        return float(self.figures[name][key])

    def curve(self, name: str) -> list[tuple[float, float]]:
        """(rate per process, gateway us per message without the idle share), by rate."""
        figure = self.figures[name]
        processes, idle = float(figure["processes"]), float(figure["idle_cpu_pct"])
        points = [(float(p["rate"]) / processes, float(p["us_per_msg"]) * (p["cpu_pct"] - idle) / p["cpu_pct"])
                  for p in figure["value"]]
        return sorted(points)

    def with_values(self, **values: float | None) -> Inputs:
        """A copy with some values replaced (keys with `__` for `.`): for tests and what-ifs."""
        doc = {"figures": {k: dict(v) for k, v in self.figures.items()}, "redis_costs_run": self.run}
        for key, value in values.items():
            doc["figures"].setdefault(key.replace("__", "."), {})["value"] = value
        return Inputs(doc)


def at_rate(curve: list[tuple[float, float]], rate: float) -> float:
    """The cost per message at `rate`: linear between measured points, the nearest end outside them."""
    rates = [r for r, _ in curve]
    if rate <= rates[0]:
        return curve[0][1]
    if rate >= rates[-1]:
        return curve[-1][1]
    i = bisect.bisect_right(rates, rate)
    (r0, c0), (r1, c1) = curve[i - 1], curve[i]
    return c0 + (c1 - c0) * (rate - r0) / (r1 - r0)


# --------------------------------------------------------------------------------------------
# assumptions (command-line options)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mix:
    driver_share: float = 0.2  # connections that are drivers sending their location
    location_interval_s: float = 4.0
    service_per_min: float = 1.0  # service messages per user (connection) per minute
    # Of them recorded with FCALL <prefix>_publish (state a reconnect must not lose: ride requests, trip and order
    # status); the rest live with PUBLISH/SPUBLISH (ETAs, positions, nudges). Assumed: half.
    recorded_share: float = 0.5
    heartbeat_s: float = 30.0
    lifetime_min: float = 30.0  # mean connection lifetime: churn = connections / lifetime
    event_subscribers: int = 1  # services subscribed to <prefix>:events:location_update
    service_bytes: int = 300
    event_bytes: int = 350

    @property
    def location_rate(self) -> float:
        """location_update per connection per second."""
        return self.driver_share / self.location_interval_s

    @property
    def service_rate(self) -> float:
        return self.service_per_min / 60.0

    @property
    def churn_rate(self) -> float:
        return 1.0 / (self.lifetime_min * 60.0)


@dataclass(frozen=True)
class Host:
    name: str
    cores: int
    processes: int
    memory_gib: float
    fds: int


@dataclass(frozen=True)
class Fleet:
    headroom: float = 0.6  # CPU (gateway cores, Redis shard threads) and network use at most this share
    memory_headroom: float = 0.8  # of a gateway host's memory
    redis_memory_gib: float = 8.0  # dataset memory allowed per shard (primary)
    nic_gbit: float = 10.0  # per host and per Redis node, each direction
    replicas: int = 1  # per shard: more nodes, and a cluster-bus copy of every SPUBLISH to each
    gateway_cpu_scale: float = 1.0  # multiplies every gateway CPU figure (0.5: a host twice as fast as the bench's)


@dataclass(frozen=True)
class Assumptions:
    targets: tuple[int, ...] = (1_000_000, 10_000_000)
    mix: Mix = Mix()
    fleet: Fleet = Fleet()
    # 20,000 open files per process: the limit every figure was measured under (this machine's), so a process
    # holds at most 19,488 connections, near the 16,667 (hold-100k) and 19,400 (mass-stall soak) actually run.
    host: Host = Host("production host", 16, 16, 32.0, 20_000)


# --------------------------------------------------------------------------------------------
# the gateway
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Limit:
    """One limit of the fleet: how many connections it allows against how many it carries."""

    name: str
    tier: str  # "gateway host", "Redis shard" or "Redis" (a whole layout: one node, or every node)
    capacity: float  # connections it allows (per host, per shard or in total, as `load`)
    load: float  # connections it carries in the plan

    @property
    def headroom(self) -> float:
        return self.capacity / self.load if self.load > 0 else math.inf


@dataclass(frozen=True)
class ProcessCost:
    """us of gateway CPU per connection per second, by cause, at `connections` per process."""

    connections: int
    heartbeats: float
    churn: float
    deliveries: float
    upstream: float
    delivery_us: float  # per message, at the process's rate
    upstream_us: float

    @property
    def total(self) -> float:
        return self.heartbeats + self.churn + self.deliveries + self.upstream


class Gateway:
    def __init__(self, inputs: Inputs, a: Assumptions) -> None:
        self.inputs, self.mix, self.fleet = inputs, a.mix, a.fleet
        idle = inputs.figures["gateway.idle_cpu"]
        self.idle_us_per_conn_s = float(idle["value"]) / 100 * 1e6 / float(idle["connections"])
        self.idle_heartbeat_s = float(idle["heartbeat_s"])
        self.delivery = inputs.curve("gateway.fanout_publish")
        self.upstream = inputs.curve("gateway.upstream_location")
        factor = inputs.value("gateway.recorded_delivery_factor")
        self.delivery_factor = 1 + a.mix.recorded_share * (factor - 1)

    def cost(self, n: int) -> ProcessCost:
        m, scale = self.mix, self.fleet.gateway_cpu_scale
        delivery_us = at_rate(self.delivery, n * m.service_rate) * self.delivery_factor * scale
        upstream_us = at_rate(self.upstream, n * m.location_rate) * scale
        return ProcessCost(
            connections=n,
            heartbeats=self.idle_us_per_conn_s * self.idle_heartbeat_s / m.heartbeat_s * scale,
            churn=m.churn_rate * self.inputs.value("gateway.cpu_per_connect_ms") * 1000 * scale,
            deliveries=m.service_rate * delivery_us, upstream=m.location_rate * upstream_us,
            delivery_us=delivery_us, upstream_us=upstream_us)

    def cpu_limit(self, budget_us: float) -> int:
        """The most connections one process holds within `budget_us` of CPU per second (CPU grows with n)."""
        low, high = 0, 100_000_000
        while low < high:
            mid = (low + high + 1) // 2
            if mid * self.cost(mid).total <= budget_us:
                low = mid
            else:
                high = mid - 1
        return low

    def per_connection_bytes(self) -> float:
        i = self.inputs
        return (i.value("gateway.rss_per_connection_kb") + i.value("host.kernel_memory_per_socket_kb")
                + i.value("gateway.outbound_budget_per_connection_kb")) * 1024

    def host_capacity(self, host: Host) -> HostCapacity:
        i, f = self.inputs, self.fleet
        budget_us = f.headroom * min(1.0, host.cores / host.processes) * 1e6
        processes_resident = host.processes + (1 if host.processes > 1 else 0)  # the supervisor
        memory = host.memory_gib * GIB * f.memory_headroom - processes_resident * i.value(
            "gateway.process_baseline_mb") * 2**20
        limits = {
            "gateway CPU": self.cpu_limit(budget_us),
            "gateway memory": max(0, int(memory / (host.processes * self.per_connection_bytes()))),
            "file descriptors": max(0, host.fds - int(i.value("gateway.fds_reserved"))),
        }
        return HostCapacity(host, {k: v * host.processes for k, v in limits.items()})


@dataclass(frozen=True)
class HostCapacity:
    host: Host
    limits: dict[str, int]  # connections per host allowed by each limit

    @property
    def binding(self) -> str:
        return min(self.limits, key=lambda k: self.limits[k])

    @property
    def connections(self) -> int:
        return self.limits[self.binding]

    @property
    def per_process(self) -> int:
        return self.connections // self.host.processes


# --------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------

SINGLE, CLUSTER, EVENTS_SHARDED = "single", "cluster", "events-sharded"
EVENT_NOTES = {False: "one channel, `<prefix>:events:location_update`", True: "spread over many channels"}
LAYOUT_NAMES = {
    SINGLE: "one Redis",
    CLUSTER: "Redis Cluster, classic events",
    EVENTS_SHARDED: "Redis Cluster, EVENT_SHARDS",
}
LAYOUT_LEGEND = [
    "- **one Redis**: today's default deployment, every command on one Redis thread.",
    "- **Redis Cluster, classic events** (`REDIS_CLUSTER=true`, README \"Redis Cluster\"): user channels and the "
    "history function's publish are sharded (`SPUBLISH`/`SSUBSCRIBE`), so they grow with the shards; client events "
    "stay classic `PUBLISH gateway:events:<type>`, which a cluster sends to every node over its bus; the users set is "
    "one key on one shard.",
    "- **Redis Cluster, EVENT_SHARDS**: the same with `EVENT_SHARDS=N`: the location updates spread over N sharded "
    "channels (`SPUBLISH gateway:events:location_update:{n}`), which removes the broadcast.",
]


@dataclass(frozen=True)
class Flow:
    """One kind of Redis work at a target: events per second, us of Redis CPU each, bytes in and out."""

    name: str
    command: str
    rate: float
    us: float
    bytes_in: float  # per event, on the client connection
    bytes_out: float
    publish: str = ""  # "classic": a cluster sends it to every node; "sharded": to the shard's replicas
    spread: bool = True  # spreads over the shards; False: one key or one channel, so one shard carries it
    note: str = ""

    @property
    def cpu(self) -> float:
        """Redis cores."""
        return self.rate * self.us / 1e6


@dataclass(frozen=True)
class Layout:
    """A Redis layout's verdict at a target."""

    key: str
    shards: int | None  # None: no number of shards is enough
    limits: list[Limit]
    why: str

    @property
    def name(self) -> str:
        return LAYOUT_NAMES[self.key]


class Redis:
    def __init__(self, inputs: Inputs, a: Assumptions) -> None:
        self.i, self.mix, self.fleet = inputs, a.mix, a.fleet
        self.cluster_figure = inputs.optional(CLUSTER_SPUBLISH)
        self.header = inputs.value("redis.cluster_bus_header_bytes")

    def r(self, name: str) -> float:
        return self.i.value(f"redis.{name}_us")

    def event_publish_us(self) -> float:
        s = self.mix.event_subscribers
        if s <= 0:
            return self.r("publish_0sub")
        per_subscriber = max(0.0, (self.r("publish_event_4sub") - self.r("publish_event_1sub")) / 3)
        return self.r("publish_event_1sub") + (s - 1) * per_subscriber

    def connect_us(self) -> float:
        return self.r("subscribe") + self.r("register") + self.r("fcall_position")

    def disconnect_us(self) -> float:
        return self.r("unsubscribe") + self.r("unregister")

    def reconnect_us(self) -> float:
        """A resume on another instance: SUBSCRIBE, register, FCALL_RO since there; UNSUBSCRIBE, unregister here."""
        return self.r("subscribe") + self.r("register") + self.r("fcall_ro_since") + self.disconnect_us()

    def users_set_us(self) -> float:
        """One SADD or SREM of the `<prefix>:users` set (per connect, per disconnect)."""
        return (self.r("sadd_users") + self.r("srem_users")) / 2

    def flows(self, n: int, processes: int, layout: str, shards: int = 1) -> list[Flow]:
        m = self.mix
        cluster = layout != SINGLE
        wire_service = m.service_bytes + RESP_OVERHEAD_BYTES
        wire_event = m.event_bytes + RESP_OVERHEAD_BYTES
        live_us, live_note = self.r("publish_user_1sub"), "PUBLISH, 1 subscriber"
        if cluster:
            if self.cluster_figure is not None:
                live_us, live_note = self.cluster_figure, f"`{CLUSTER_SPUBLISH}` (3-shard cluster)"
            else:
                live_note = f"`{CLUSTER_SPUBLISH}` not measured yet: the one-Redis PUBLISH figure"
        user_publish = "sharded" if cluster else "classic"
        service = n * m.service_rate
        hk, probe = self.i.value("gateway.housekeeping_s"), self.i.value("gateway.probe_interval_s")
        record_us = self.r("fcall_publish_cluster" if cluster else "fcall_publish")
        flows = [
            Flow("service messages, recorded", "FCALL <prefix>_publish", service * m.recorded_share,
                 record_us, wire_service, wire_service + RECORD_WRAPPER_BYTES, user_publish),
            Flow("service messages, live", "SPUBLISH" if cluster else "PUBLISH", service * (1 - m.recorded_share),
                 live_us, wire_service, wire_service, user_publish, note=live_note),
            Flow("location updates (drivers)", f"{'SPUBLISH' if layout == EVENTS_SHARDED else 'PUBLISH'}, "
                 f"{m.event_subscribers} subscriber(s)", n * m.location_rate, self.event_publish_us(), wire_event,
                 wire_event * m.event_subscribers, "sharded" if layout == EVENTS_SHARDED else "classic",
                 spread=layout == EVENTS_SHARDED,
                 note=EVENT_NOTES[layout == EVENTS_SHARDED]),
            # The byte counts of the connects and of what follows are rough (a presence entry is ~150 B); they
            # are small either way.
            Flow("connects (churn)", "SUBSCRIBE + EVALSHA register + FCALL position", n * m.churn_rate,
                 self.connect_us(), 400, 150),
            Flow("disconnects (churn)", "UNSUBSCRIBE + EVALSHA unregister", n * m.churn_rate,
                 self.disconnect_us(), 250, 100),
            Flow("instance keys", "HSET + PEXPIRE per process", processes / hk, self.r("instance_heartbeat"), 300, 20),
            Flow("self-probes", "PUBLISH to the own control channel" + (", per primary" if cluster else ""),
                 processes * shards / probe, self.r("publish_user_1sub"), 80, 80, user_publish),
        ]
        if cluster:  # the presence script cannot touch it in another slot: a SADD/SREM of its own, on one shard
            flows.append(Flow("`<prefix>:users` set (one key)", "SADD per connect, SREM per disconnect",
                              2 * n * m.churn_rate, self.users_set_us(), 60, 10, spread=False))
        return flows

    def memory_bytes(self, n: int) -> float:
        m, i = self.mix, self.i
        per_user = i.value("redis.memory_presence_bytes") + i.value("redis.memory_subscription_bytes")
        recorded_rate = m.service_rate * m.recorded_share
        if recorded_rate > 0:
            kept = min(i.value("gateway.history_size"), max(1.0, recorded_rate * i.value("gateway.history_ttl_s")))
            per_user += i.value("redis.memory_history_first_bytes") + (kept - 1) * i.value(
                "redis.memory_history_record_bytes")
        return n * per_user

    def events_channel(self, n: int) -> Limit:
        """Today's one `<prefix>:events:location_update` channel: one thread (one node) delivers all of it."""
        flow = next(x for x in self.flows(n, 1, SINGLE) if x.name.startswith("location"))
        net = self.fleet.nic_gbit * 1e9 / 8 * self.fleet.headroom
        capacity = min(n * self.fleet.headroom / flow.cpu, n * net / (flow.rate * max(flow.bytes_in, flow.bytes_out)))
        return Limit("location events on one channel (the thread and NIC that deliver them)", "Redis", capacity, n)

    def single(self, n: int, processes: int) -> Layout:
        f = self.fleet
        budget, net, memory = f.headroom, f.nic_gbit * 1e9 / 8 * f.headroom, f.redis_memory_gib * GIB
        flows = self.flows(n, processes, SINGLE)
        cpu = sum(x.cpu for x in flows)
        traffic = max(sum(x.rate * x.bytes_in for x in flows), sum(x.rate * x.bytes_out for x in flows))
        limits = [Limit("Redis CPU (one thread)", "Redis", n * budget / cpu, n),
                  Limit("Redis memory", "Redis", n * memory / self.memory_bytes(n), n),
                  Limit("Redis network", "Redis", n * net / traffic, n)]
        ok = all(x.headroom >= 1 for x in limits)
        return Layout(SINGLE, 1 if ok else None, limits, f"needs {cpu:.2f} cores of Redis CPU against {budget:.2f}, "
                                                         f"{self.memory_bytes(n) / GIB:.1f} GiB against "
                                                         f"{f.redis_memory_gib:g}")

    def cluster(self, n: int, processes: int, layout: str) -> Layout:
        """Shards: the fewest whose even share, plus what every node pays for the classic PUBLISHes (received over
        the cluster bus), plus what lands on one shard (one key, one channel), fits the headroom."""
        f = self.fleet
        budget, net, memory = f.headroom, f.nic_gbit * 1e9 / 8 * f.headroom, f.redis_memory_gib * GIB

        def load(k: int) -> tuple[list[Flow], float, float, float, float, float]:
            flows = self.flows(n, processes, layout, k)
            classic = [x for x in flows if x.publish == "classic"]
            floor = sum(x.rate for x in classic) * self.r("publish_0sub") / 1e6  # every node, at least
            bus_in = sum(x.rate * (self.header + x.bytes_in) for x in classic)
            spread = sum(x.cpu for x in flows if x.spread)
            hot = sum(x.cpu for x in flows if not x.spread and x.publish != "classic")  # the users set
            copies = sum(x.rate * f.replicas * (self.header + x.bytes_in) for x in flows if x.publish == "sharded")
            traffic = max(sum(x.rate * x.bytes_in for x in flows if x.spread),
                          sum(x.rate * x.bytes_out for x in flows if x.spread) + copies)
            return flows, floor, bus_in, spread, hot, traffic

        _, floor, bus_in, spread, hot, _ = load(1)
        limits = []
        if floor > 0:
            limits += [
                Limit("Redis CPU per node: the classic PUBLISH broadcast alone (every node receives every location "
                      "update)", "Redis", n * budget / floor, n),
                Limit("Redis network per node: the cluster-bus copy of every classic PUBLISH alone", "Redis",
                      n * net / bus_in, n),
                self.events_channel(n)]
        shards: int | None = None
        if floor + hot < budget and bus_in < net:
            k = max(1, math.ceil(spread / (budget - floor - hot)), math.ceil(self.memory_bytes(n) / memory))
            for _ in range(4):  # the self-probes grow with the shards: settle
                _, floor, bus_in, spread, hot, traffic = load(k)
                k = max(k, math.ceil(spread / (budget - floor - hot)), math.ceil(traffic / (net - bus_in)))
            shards = k
            _, floor, bus_in, spread, hot, traffic = load(k)
            per = n / k
            limits += [
                Limit("Redis CPU per shard", "Redis shard", per * budget / (spread / k + floor + hot), per),
                Limit("Redis memory per shard", "Redis shard", per * memory / (self.memory_bytes(n) / k), per),
                Limit("Redis network per shard", "Redis shard", per * net / (traffic / k + bus_in), per),
            ]
        flows = self.flows(n, processes, layout, shards or 1)
        cpu = sum(x.cpu for x in flows)
        why = f"{cpu:.2f} cores of Redis CPU in all, {self.memory_bytes(n) / GIB:.1f} GiB"
        if floor > 0:
            why += (f"; the classic PUBLISH of the location updates costs every node at least {floor:.2f} cores and "
                    f"{bus_in * 8 / 1e9:.1f} Gbit/s in")
        return Layout(layout, shards, limits, why)

    def layouts(self, n: int, processes: int) -> list[Layout]:
        return [self.single(n, processes), self.cluster(n, processes, CLUSTER),
                self.cluster(n, processes, EVENTS_SHARDED)]


# --------------------------------------------------------------------------------------------
# the plan for one target
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    target: int
    host: HostCapacity
    hosts: int
    hosts_exact: float  # target / connections per host
    per_process: float  # connections per process in the plan (spread evenly)
    cost: ProcessCost  # at that load
    layouts: list[Layout]
    lb_addresses: int  # L7 proxy source addresses needed per gateway host

    def limits(self, layout: Layout) -> list[Limit]:
        per_host = self.target / self.hosts
        gateway = [Limit(name, "gateway host", allowed, per_host) for name, allowed in self.host.limits.items()]
        return gateway + layout.limits

    def bottleneck(self, layout: Layout) -> Limit:
        """The limit with the least headroom in this layout's fleet."""
        return min(self.limits(layout), key=lambda limit: limit.headroom)

    @property
    def chosen(self) -> Layout:
        """The Redis of the plan: the first layout that carries the target, in the order one Redis, the cluster as
        the gateway runs it, the cluster with sharded client events (the last if none does)."""
        return next((x for x in self.layouts if x.shards is not None), self.layouts[-1])

    @property
    def first_bottleneck(self) -> Limit:
        return self.bottleneck(self.chosen)


def plan(target: int, inputs: Inputs, a: Assumptions) -> Plan:
    gateway, redis = Gateway(inputs, a), Redis(inputs, a)
    capacity = gateway.host_capacity(a.host)
    hosts = max(1, math.ceil(target / capacity.connections))
    per_process = target / (hosts * a.host.processes)
    return Plan(target, capacity, hosts, target / capacity.connections, per_process,
                gateway.cost(round(per_process)), redis.layouts(target, hosts * a.host.processes),
                math.ceil(target / hosts / inputs.value("host.ephemeral_ports")))


# --------------------------------------------------------------------------------------------
# the reconnect storm
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Storm:
    target: int
    processes: int
    shards: int
    commands: float  # Redis commands per reconnect, scripts' included
    redis_us: float
    redis_us_sum: float  # the per-command figures summed
    redis_us_storm: float  # measured in the storm
    gateway_ms: float
    rate_per_process: float  # measured: clients / recovery / processes
    timeout_s: float
    users_set_us: float  # cluster: the SADD + SREM of `<prefix>:users` per reconnect, on one shard (0: one Redis)

    @property
    def per_process(self) -> float:
        return self.target / self.processes

    @property
    def drain_measured_s(self) -> float:
        return self.per_process / self.rate_per_process

    @property
    def drain_gateway_cpu_s(self) -> float:
        return self.per_process * self.gateway_ms / 1000

    @property
    def drain_redis_cpu_s(self) -> float:
        return self.target / self.shards * self.redis_us / 1e6

    @property
    def users_shard_s(self) -> float:
        return self.target * self.users_set_us / 1e6

    @property
    def drain_s(self) -> float:
        """The slowest side: the gateways at the measured storm rate, each shard's share, the users-set shard."""
        return max(self.drain_measured_s, self.drain_redis_cpu_s, self.users_shard_s)

    @property
    def limited_by(self) -> str:
        sides = {"the gateways": self.drain_measured_s, "Redis, each shard's share": self.drain_redis_cpu_s,
                 "the users-set shard": self.users_shard_s}
        return max(sides, key=lambda k: sides[k])


def storm(p: Plan, inputs: Inputs, a: Assumptions) -> Storm:
    i = inputs
    measured = i.value("storm.redis_us_per_reconnect")
    redis = Redis(inputs, a)
    summed = redis.reconnect_us()
    cluster = p.chosen.key != SINGLE
    return Storm(p.target, p.hosts * a.host.processes, p.chosen.shards or 1,
                 i.value("storm.redis_commands_per_reconnect"), max(measured, summed), summed, measured,
                 i.value("storm.gateway_ms_per_reconnect") * a.fleet.gateway_cpu_scale,
                 i.value("storm.clients") / i.value("storm.recovery_s") / i.value("storm.processes"),
                 i.value("storm.handshake_timeout_s"), 2 * redis.users_set_us() if cluster else 0.0)


# --------------------------------------------------------------------------------------------
# markdown
# --------------------------------------------------------------------------------------------

def n(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def plural(count: int, word: str) -> str:
    return f"{count:,} {word}" + ("" if count == 1 else "s")


def short(value: int) -> str:
    return f"{value // 1_000_000}M" if value % 1_000_000 == 0 else f"{value:,}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> list[str]:
    align = ["---:" if k in right else "---" for k in range(len(header))]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |",
            *("| " + " | ".join(row) + " |" for row in rows)]


def headroom_text(limit: Limit) -> str:
    return "none" if limit.capacity <= 0 else ("-" if math.isinf(limit.headroom) else f"{limit.headroom:.2f}x")


def inputs_section(i: Inputs) -> list[str]:
    rows = []
    for name, f in i.figures.items():
        value = f.get("value")
        if isinstance(value, list):
            shown = ", ".join(f"{p['rate']:,}/s: {p['us_per_msg']} us" for p in value)
        elif value is None:
            shown = "(not yet measured)"
        else:
            shown = f"{value:,}" if isinstance(value, int | float) else str(value)
        rows.append([f"`{name}`", shown, str(f.get("unit", "")), f"{f.get('kind', '')}, {f.get('measured', '')}",
                     str(f.get("source", ""))])
    return table(["figure", "value", "unit", "kind, when", "where"], rows)


def assumptions_section(a: Assumptions, i: Inputs) -> list[str]:
    m, f, h = a.mix, a.fleet, a.host
    return table(["assumption (option)", "value"], [
        ["targets (`--targets`)", ", ".join(short(t) for t in a.targets) + " concurrent connections, one per user"],
        ["drivers sending locations (`--driver-share`, `--location-interval`)",
         f"{m.driver_share:.0%} of connections, one `location_update` every {m.location_interval_s:g} s "
         f"= {m.location_rate:.3f}/s per connection"],
        ["service messages (`--service-per-min`, `--recorded-share`)",
         f"{m.service_per_min:g} per user per minute, {m.recorded_share:.0%} of them recorded "
         f"(`FCALL <prefix>_publish`), the rest live (`PUBLISH`)"],
        ["heartbeats (`--heartbeat`)", f"every {m.heartbeat_s:g} s (the idle CPU was measured at "
                                       f"{i.field('gateway.idle_cpu', 'heartbeat_s'):g} s and is scaled)"],
        ["connection lifetime (`--lifetime-min`)", f"{m.lifetime_min:g} min on average: "
                                                   f"{m.churn_rate * 1e6:,.0f} connects per second per million"],
        ["subscribers of the location events (`--event-subscribers`)", f"{m.event_subscribers}"],
        ["message sizes (`--service-bytes`, `--event-bytes`)",
         f"{m.service_bytes} B per service message, {m.event_bytes} B per location event, "
         f"+{RESP_OVERHEAD_BYTES} B of RESP and channel name each"],
        ["gateway host (`--host-cores`, `--host-memory-gib`, `--host-fds`, `--processes-per-core`)",
         f"{h.cores} cores, {h.memory_gib:g} GiB, {h.fds:,} open files per process, PROCESSES={h.processes}"],
        ["headroom (`--headroom`, `--memory-headroom`)",
         f"CPU and network at most {f.headroom:.0%} (gateway cores, each Redis shard's thread, NICs); "
         f"gateway host memory at most {f.memory_headroom:.0%}"],
        ["Redis shard (`--redis-memory-gib`, `--nic-gbit`, `--replicas`)",
         f"one primary thread, {f.redis_memory_gib:g} GiB of dataset, {f.nic_gbit:g} Gbit/s each way, "
         f"{f.replicas} replica(s): their cluster-bus copies of SPUBLISH count in the network, the replication "
         "stream's CPU is not modelled"],
        ["gateway CPU scale (`--gateway-cpu-scale`)", f"{f.gateway_cpu_scale:g} x the measured figures"],
    ])


def process_section(plans: list[Plan]) -> list[str]:
    rows = []
    for p in plans:
        c = p.cost
        rows.append([short(p.target), n(p.per_process), f"{c.heartbeats:.2f}", f"{c.churn:.2f}",
                     f"{c.deliveries:.2f} ({c.delivery_us:.1f} us each)",
                     f"{c.upstream:.2f} ({c.upstream_us:.1f} us each)",
                     f"{c.total:.2f}", f"{c.total * p.per_process / 1e4:.0f}%"])
    return table(["target", "connections per process", "heartbeats", "churn", "service messages",
                  "location updates", "total us/s per connection", "CPU of the process"], rows,
                 right=(1, 2, 3, 6, 7))


def host_section(hosts: list[HostCapacity], measured_max: float) -> list[str]:
    names = list(hosts[0].limits)
    rows = [[f"connections per host allowed by {name}", *(n(h.limits[name]) for h in hosts)] for name in names]
    rows.append(["**connections per host** (the tightest)", *(f"**{n(h.connections)}** ({h.binding})" for h in hosts)])
    rows.append(["connections per process", *(n(h.per_process) + ("" if h.per_process <= measured_max * BEYOND
                                                                 else " (beyond the measured "
                                                                 f"{n(measured_max)})") for h in hosts)])
    return table(["", *(f"{h.host.name}: {h.host.cores} cores, {h.host.memory_gib:g} GiB, {h.host.fds:,} fds, "
                        f"PROCESSES={h.host.processes}" for h in hosts)], rows, right=tuple(range(1, len(hosts) + 1)))


def redis_section(p: Plan, redis: Redis, processes: int) -> list[str]:
    """The work of the cluster as the gateway runs it (the one-Redis figures differ only where noted)."""
    layout = next(x for x in p.layouts if x.key == CLUSTER)
    rows = []
    for x in redis.flows(p.target, processes, CLUSTER, layout.shards or 1):
        where = {"classic": "every node receives it", "sharded": "its shard (+ a copy to each replica)"}.get(
            x.publish, "its shard" if x.spread else "one shard")
        rows.append([x.name, x.command, n(x.rate), f"{x.us:.2f}", f"{x.cpu:.3f}",
                     f"{x.rate * (x.bytes_in + x.bytes_out) / 1e6:.1f}", where + (f"; {x.note}" if x.note else "")])
    return table(["Redis work", "command", "per second", "us each", "Redis cores", "MB/s in+out (clients)",
                  "where in a cluster"], rows, right=(2, 3, 4, 5))


def plan_section(plans: list[Plan], a: Assumptions) -> list[str]:
    rows = []
    for p in plans:
        cells = []
        for layout in p.layouts:
            if layout.key == SINGLE:
                cells.append(("**enough**: " if layout.shards else "not enough: ") + layout.why)
            elif layout.shards is None:
                cells.append(f"no number of shards is enough: {layout.why}")
            else:
                nodes = layout.shards * (1 + a.fleet.replicas)
                cells.append(f"**{plural(layout.shards, 'shard')}** ({nodes} nodes with replicas): {layout.why}")
        first = p.first_bottleneck
        rows.append([short(p.target), f"**{p.hosts}** ({p.hosts_exact:.2f})", *cells,
                     f"{first.name} ({headroom_text(first)}) in: {p.chosen.name}"])
    names = [x.name for x in plans[0].layouts]
    return table(["target", "gateway hosts (exact)", *names, "first bottleneck of the first layout that carries it"],
                 rows)


def headroom_section(p: Plan) -> list[str]:
    rows = []
    for layout in p.layouts:
        first = p.bottleneck(layout)
        rows.append([layout.name, first.name, headroom_text(first),
                     "; ".join(f"{x.name} {headroom_text(x)}" for x in p.limits(layout) if x.name != first.name)])
    return table(["Redis layout", "first bottleneck", "its headroom", "the other limits' headroom"], rows)


def storm_section(storms: list[Storm]) -> list[str]:
    def row(label: str, f: Callable[[Storm], str]) -> list[str]:
        return [label, *(f(s) for s in storms)]

    header = ["reconnect storm: every connection dropped and resumed at once", *(short(s.target) for s in storms)]
    return table(header, [
        row("gateway processes / Redis shards (the plan's layout)", lambda s: f"{s.processes:,} / {s.shards}"),
        row("Redis calls per reconnect with resume: 5 sent on one Redis (SUBSCRIBE, EVALSHA register, FCALL_RO "
            "since on the new instance; UNSUBSCRIBE, EVALSHA unregister on the old one), 4 more in a cluster (SADD "
            "and SREM of the instance's and of the users set)",
            lambda s: f"{s.commands:g} with those run inside the scripts (measured, one Redis)"),
        row("Redis calls in all", lambda s: n(s.commands * s.target)),
        row("Redis CPU per reconnect", lambda s: f"{s.redis_us:.1f} us (storm {s.redis_us_storm:g}; "
                                                 f"per-command sum {s.redis_us_sum:.1f}; the larger)"),
        row("Redis CPU in all", lambda s: f"{s.redis_us * s.target / 1e6:,.0f} s"),
        row("gateway CPU in all", lambda s: f"{s.gateway_ms * s.target / 1000:,.0f} s"),
        row("connections per process to take back", lambda s: n(s.per_process)),
        row(f"the gateways, at the measured storm rate ({storms[0].rate_per_process:,.0f}/s per process)",
            lambda s: f"{s.drain_measured_s:,.0f} s (every process at 100% of a core: {s.drain_gateway_cpu_s:,.0f} s)"),
        row("Redis, each shard's share at 100% of its core", lambda s: f"{s.drain_redis_cpu_s:,.0f} s"),
        row("in a cluster, the shard holding `<prefix>:users` (a SADD and a SREM per reconnect, which every register "
            "and unregister awaits), at 100% of its core",
            lambda s: f"{s.users_shard_s:,.0f} s" if s.users_set_us else "- (one Redis)"),
        row("**time to drain** (the slowest of the three)", lambda s: f"**{s.drain_s:,.0f} s** ({s.limited_by})"),
        row(f"against the clients' {storms[0].timeout_s:g} s attempt timeout",
            lambda s: ("within it" if s.drain_s <= s.timeout_s else
                       f"{s.drain_s / s.timeout_s:.1f}x longer: without admission control, clients must spread their "
                       f"first reconnect over >= {math.ceil(s.drain_s):,} s")),
        row("per Redis shard while draining", lambda s: f"{s.commands * s.target / s.drain_s / s.shards:,.0f} "
                                                         "commands/s"),
    ])


def variant(a: Assumptions, mix: dict[str, Any] | None = None, fleet: dict[str, Any] | None = None) -> Assumptions:
    return dataclasses.replace(a, mix=dataclasses.replace(a.mix, **(mix or {})),
                               fleet=dataclasses.replace(a.fleet, **(fleet or {})))


def sensitivity_section(inputs: Inputs, a: Assumptions) -> list[str]:
    variants = [
        ("as above", a),
        ("locations every 2 s (twice the rate)", variant(a, {"location_interval_s": a.mix.location_interval_s / 2})),
        ("every service message live (none recorded)", variant(a, {"recorded_share": 0.0})),
        ("every service message recorded", variant(a, {"recorded_share": 1.0})),
        ("4 service messages per user per minute", variant(a, {"service_per_min": a.mix.service_per_min * 4})),
        ("connections live 5 min (6x the churn)", variant(a, {"lifetime_min": 5.0})),
        ("gateway CPU figures x0.5 (a quiet hour on this machine)", variant(a, fleet={"gateway_cpu_scale": 0.5})),
        ("4 subscribers of the location events", variant(a, {"event_subscribers": 4})),
        (f"open files raised to {RAISED_FDS:,} per process (beyond the measured connections per process)",
         dataclasses.replace(a, host=dataclasses.replace(a.host, fds=RAISED_FDS))),
    ]
    rows = []
    for label, v in variants:
        cells = [label]
        for target in a.targets:
            p = plan(target, inputs, v)
            first, chosen = p.first_bottleneck, p.chosen
            redis = ("one Redis" if chosen.key == SINGLE else
                     f"{plural(chosen.shards, 'shard')}{'' if chosen.key == CLUSTER else ' (EVENT_SHARDS)'}"
                     if chosen.shards else "no layout carries it")
            cells.append(f"{plural(p.hosts, 'host')}, {redis}; {first.name} ({headroom_text(first)})")
        rows.append(cells)
    return table(["what if", *(f"{short(t)}: gateway hosts, Redis; first bottleneck" for t in a.targets)], rows)


def report(inputs: Inputs, a: Assumptions, argv: Sequence[str] = ()) -> str:
    plans = [plan(t, inputs, a) for t in a.targets]
    gateway = Gateway(inputs, a)
    this = dataclasses.replace(a.host, name="this machine", cores=2, processes=2, memory_gib=24.0,
                               fds=int(inputs.value("host.fds_per_process")))
    this6 = dataclasses.replace(this, name="this machine as in the 100K hold", processes=6)
    raised = dataclasses.replace(a.host, name=f"{a.host.name}, open files raised", fds=RAISED_FDS)
    hosts = [gateway.host_capacity(h) for h in (this, this6, a.host, raised)]
    measured_max = inputs.value("gateway.max_connections_measured_per_process")
    redis = Redis(inputs, a)
    notes = []
    if redis.cluster_figure is None:
        notes.append(f"- `{CLUSTER_SPUBLISH}` is not in the inputs yet: the sharded layout prices live messages "
                     f"at the one-Redis PUBLISH figure (`redis.publish_user_1sub_us`, "
                     f"{inputs.value('redis.publish_user_1sub_us'):.2f} us).")
    else:
        notes.append(f"- Live messages in the sharded layout cost `{CLUSTER_SPUBLISH}` = "
                     f"{redis.cluster_figure:.2f} us each, measured on a 3-shard Redis Cluster.")
    for p in plans:
        if p.per_process > measured_max * BEYOND:
            notes.append(f"- {short(p.target)}: {n(p.per_process)} connections per process is beyond the "
                         f"{n(measured_max)} run in one process: the per-connection figures are extrapolated.")
    command = " ".join(["python scripts/capacity.py", *argv]).strip()
    run = inputs.run
    parts = [
        f"Generated by `{command}` from `docs/capacity/inputs.json` (Redis figures of "
        f"{run.get('date', 'no run')}, {run.get('machine', '')}, Redis {run.get('redis', '?')}, "
        f"calibration {run.get('calibration_ms', '?')} ms). Do not edit by hand: change the inputs or the "
        "options and run it again.",
        "",
        "### Answer",
        "",
        *plan_section(plans, a),
        "",
        *LAYOUT_LEGEND,
        *notes,
        "",
        "### First bottleneck, and every limit's headroom in the fleet sized for the target",
        "",
        "Headroom = connections the limit allows / connections it carries (1.00x: at the target's CPU, memory "
        "or network share exactly; below 1: over it).",
        "",
        *(line for p in plans for line in [f"**{short(p.target)}** ({p.hosts} gateway hosts):", "",
                                           *headroom_section(p), ""]),
        "### Gateway hosts",
        "",
        *host_section(hosts, measured_max),
        "",
        "L7 proxy in front (as conf/nginx.conf): each proxy address can hold "
        f"{n(inputs.value('host.ephemeral_ports'))} connections to one gateway address:port (its ephemeral ports); "
        + "; ".join(f"{short(p.target)} needs {p.lb_addresses} proxy source addresses (or gateway listen "
                    f"addresses) per gateway host" for p in plans) + ". An L4 pass-through balancer has no such limit.",
        "",
        "### Gateway CPU per connection (us per second), in the plan",
        "",
        *process_section(plans),
        "",
        "### Redis work",
        "",
        *(line for p in plans for line in [f"**{short(p.target)}**:", "",
                                           *redis_section(p, redis, p.hosts * a.host.processes), "",
                                           f"Redis memory: {redis.memory_bytes(p.target) / GIB:,.1f} GiB "
                                           "(presence, subscriptions, histories).", ""]),
        "### Reconnect storm",
        "",
        *storm_section([storm(p, inputs, a) for p in plans]),
        "",
        "### Sensitivity",
        "",
        *sensitivity_section(inputs, a),
        "",
        "### Inputs",
        "",
        *inputs_section(inputs),
        "",
        "### Assumptions",
        "",
        *assumptions_section(a, inputs),
    ]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(parts)).rstrip("\n") + "\n"


def write_doc(text: str, path: Path = DOC) -> None:
    """Replace the generated block between the markers; the hand-written text around it stays."""
    doc = path.read_text() if path.exists() else "# Capacity\n"
    block = f"{START}\n{text}{END}"
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    doc = pattern.sub(lambda _m: block, doc) if pattern.search(doc) else doc.rstrip() + "\n\n" + block + "\n"
    path.write_text(doc)


def generated_block(path: Path = DOC) -> str:
    """The generated text as committed (what `write_doc` put between the markers)."""
    doc = path.read_text()
    start, end = doc.index(START) + len(START) + 1, doc.index(END)
    return doc[start:end]


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    d = Assumptions()
    p = argparse.ArgumentParser(prog="capacity.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Gateway hosts and Redis shards for N connections, from "
                                            "docs/capacity/inputs.json.")
    p.add_argument("--inputs", type=Path, default=INPUTS, help="the measured figures")
    p.add_argument("--targets", default=",".join(str(t) for t in d.targets), help="comma list of connection counts")
    p.add_argument("--driver-share", type=float, default=d.mix.driver_share, help="connections sending locations")
    p.add_argument("--location-interval", type=float, default=d.mix.location_interval_s, help="s between locations")
    p.add_argument("--service-per-min", type=float, default=d.mix.service_per_min,
                   help="service messages per user per minute")
    p.add_argument("--recorded-share", type=float, default=d.mix.recorded_share,
                   help="share of service messages recorded (FCALL <prefix>_publish); the rest live")
    p.add_argument("--heartbeat", type=float, default=d.mix.heartbeat_s, help="HEARTBEAT_INTERVAL, s")
    p.add_argument("--lifetime-min", type=float, default=d.mix.lifetime_min, help="mean connection lifetime, min")
    p.add_argument("--event-subscribers", type=int, default=d.mix.event_subscribers,
                   help="services subscribed to the location events")
    p.add_argument("--service-bytes", type=int, default=d.mix.service_bytes, help="bytes per service message")
    p.add_argument("--event-bytes", type=int, default=d.mix.event_bytes, help="bytes per location event")
    p.add_argument("--host-cores", type=int, default=d.host.cores, help="cores per gateway host")
    p.add_argument("--processes-per-core", type=float, default=1.0, help="PROCESSES = cores x this")
    p.add_argument("--host-memory-gib", type=float, default=d.host.memory_gib, help="memory per gateway host")
    p.add_argument("--host-fds", type=int, default=d.host.fds, help="open files per process on the hosts")
    p.add_argument("--headroom", type=float, default=d.fleet.headroom, help="CPU and network share to plan for")
    p.add_argument("--memory-headroom", type=float, default=d.fleet.memory_headroom,
                   help="gateway host memory share to plan for")
    p.add_argument("--redis-memory-gib", type=float, default=d.fleet.redis_memory_gib,
                   help="dataset memory per Redis shard")
    p.add_argument("--nic-gbit", type=float, default=d.fleet.nic_gbit, help="NIC per Redis node, each direction")
    p.add_argument("--replicas", type=int, default=d.fleet.replicas, help="replicas per Redis shard")
    p.add_argument("--gateway-cpu-scale", type=float, default=d.fleet.gateway_cpu_scale,
                   help="multiplies every measured gateway CPU figure")
    p.add_argument("--write-doc", action="store_true", help="replace the generated block of docs/CAPACITY.md")
    return p.parse_args(argv)


def assumptions(args: argparse.Namespace) -> Assumptions:
    mix = Mix(driver_share=args.driver_share, location_interval_s=args.location_interval,
              service_per_min=args.service_per_min, recorded_share=args.recorded_share, heartbeat_s=args.heartbeat,
              lifetime_min=args.lifetime_min, event_subscribers=args.event_subscribers,
              service_bytes=args.service_bytes, event_bytes=args.event_bytes)
    fleet = Fleet(headroom=args.headroom, memory_headroom=args.memory_headroom,
                  redis_memory_gib=args.redis_memory_gib, nic_gbit=args.nic_gbit, replicas=args.replicas,
                  gateway_cpu_scale=args.gateway_cpu_scale)
    processes = max(1, round(args.host_cores * args.processes_per_core))
    host = Host("production host", args.host_cores, processes, args.host_memory_gib, args.host_fds)
    targets = tuple(int(t.replace("_", "")) for t in args.targets.split(",") if t)
    return Assumptions(targets, mix, fleet, host)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    shown = [x for x in argv if x != "--write-doc"]
    text = report(Inputs.load(args.inputs), assumptions(args), shown)
    if args.write_doc:
        write_doc(text)
        print(f"wrote the generated block of {DOC.relative_to(ROOT)}")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
