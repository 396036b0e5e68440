"""Fan-out on a local 3-shard Redis Cluster against one Redis, same machine, same run (issue #11).

One run starts one standalone redis-server (bench.start_redis) and one local Redis Cluster of N primaries
(local_cluster.LocalCluster, default 3, no replicas), both on free ports below 32768, and runs the gateway
(PROCESSES=2, the settings of scripts/bench.py) against each in turn: with REDIS_URL=<the Redis> and
PUBLISH `<prefix>:user:<userId>`, then with REDIS_CLUSTER=true, REDIS_URL=<one node> and SPUBLISH
`<prefix>:user:{<userId>}` sent to the primary of the slot (loadgen.py --redis-cluster). The runs are
interleaved, single first in even repeats and cluster first in odd ones, so that a machine getting busier or
quieter shifts both alike; every figure is a median over repeats, and each ratio the median of the
per-repeat ratios (each pair ran back to back).

The fan-out: `driver_location` (never recorded) to uniformly random connected users, paced steps at
each rate. Measured per step (loadgen.py): delivered msg/s, loss, latency, the gateway's CPU per delivered
message, and Redis CPU of every node (`--redis-cpu info`: each node's own INFO cpu, in microseconds,
because /proc's 10 ms ticks are too coarse for one shard over a few seconds), in total and per shard, with
the share of the messages each shard's primary was sent. "Above idle" subtracts the Redis CPU of the same
run's idle hold (every node's crons, the cluster bus's gossip, the gateway's probes and housekeeping).

Writes the generated section `cluster` of docs/BENCHMARKS.md and docs/capacity/cluster_bench.json (the
figure `redis.cluster_spublish_us_per_delivered_message` that scripts/capacity.py reads, in the shape of
docs/capacity/inputs.json's figures). The machine's shared Redis (127.0.0.1:6379) is never touched; every
process this starts is stopped by its pid.

    python scripts/bench_cluster.py                 # ~7 min: 3 repeats, 2,000-32,000 msg/s, 3,000 users
    python scripts/bench_cluster.py --quick         # ~2 min: 1 repeat, 2 rates, short steps
    python scripts/bench_cluster.py --fcall         # also FCALL <prefix>_publish (recording path) at each rate
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, cast

import psutil
import redis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.bench import (  # noqa: E402 - needs ROOT on sys.path when run as a file
    DOC,
    LATENCY_RULE_MS,
    SECRET,
    BenchRedis,
    RunningServer,
    calibrate,
    history_library,
    machine_description,
    median,
    start_redis,
    start_server,
    stop_redis,
    stop_server_process,
    write_section,
)
from scripts.loadgen import RunReport, StepReport  # noqa: E402
from scripts.local_cluster import LocalCluster  # noqa: E402

Kind = Literal["single", "cluster"]
KINDS: tuple[Kind, ...] = ("single", "cluster")
CAPACITY_JSON = ROOT / "docs" / "capacity" / "cluster_bench.json"
FIGURE = "redis.cluster_spublish_us_per_delivered_message"  # the name scripts/capacity.py reads
SECTION = "cluster"
RAW_DIR = Path(tempfile.gettempdir()) / "tornado-gateway-bench"
CLEAN_DELIVERY = 0.98  # a step is "complete" when >= 98% of its target rate arrived and nothing was lost


@dataclass
class Setup:
    """One Redis side of the comparison: the standalone server or the local cluster."""

    kind: Kind
    single: BenchRedis | None = None
    cluster: LocalCluster | None = None

    @property
    def url(self) -> str:
        if self.cluster is not None:
            return self.cluster.seed_url
        assert self.single is not None
        return self.single.url

    @property
    def pids(self) -> list[int]:
        if self.cluster is not None:
            return self.cluster.pids
        assert self.single is not None and self.single.pid is not None
        return [self.single.pid]

    def clients(self) -> list[redis.Redis]:
        """One plain client per primary (the one Redis, or each primary of the cluster)."""
        if self.cluster is not None:
            return [redis.Redis(host="127.0.0.1", port=node.port, socket_connect_timeout=2)
                    for node in self.cluster.primary_nodes()]
        assert self.single is not None
        return [self.single.client()]


@dataclass
class Plan:
    connections: int
    processes: int
    rates: list[int]
    step_s: float
    hold_s: float
    repeats: int
    primaries: int
    fanout: tuple[str, ...]

    def loadgen_args(self) -> list[str]:
        return ["-c", str(self.connections), "--connect-rate", "2000", "--hold", str(self.hold_s),
                "--fanout", ",".join(self.fanout), "--rates", ",".join(map(str, self.rates)),
                "--step", str(self.step_s), "--redis-cpu", "info"]

    def timeout_s(self) -> float:
        steps = len(self.rates) * len(self.fanout)
        return 120 + self.connections / 2000 + self.hold_s + steps * (self.step_s + 10)


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------

def run_once(setup: Setup, plan: Plan, repeat: int) -> RunReport:
    extra = {"REDIS_CLUSTER": "true"} if setup.kind == "cluster" else {}
    server = start_server("gateway", plan.processes, setup.url, extra)
    json_path = Path(tempfile.mkstemp(prefix="loadgen-cluster-", suffix=".json")[1])
    ok = False
    try:
        command = [sys.executable, str(ROOT / "scripts" / "loadgen.py"), "--url", f"ws://127.0.0.1:{server.port}",
                   "--flavor", "gateway", "--secret", SECRET, "--prefix", server.prefix, "--redis", setup.url,
                   *(["--redis-cluster"] if setup.kind == "cluster" else []),
                   "--redis-pid", ",".join(map(str, setup.pids)), "--server-pid", str(server.proc.pid),
                   "--json", str(json_path), *plan.loadgen_args()]
        print(f"\n=== {setup.kind} (repeat {repeat + 1}/{plan.repeats}, PROCESSES={plan.processes}) ===", flush=True)
        print("$ " + " ".join(command[1:]).replace(str(ROOT) + "/", ""), flush=True)
        subprocess.run(command, check=False, timeout=plan.timeout_s(), cwd=ROOT)
        text = json_path.read_text()
        if not text:
            raise RuntimeError(f"loadgen wrote no report for {setup.kind}; gateway log: {server.log_path}")
        ok = True
        return cast(RunReport, json.loads(text))
    finally:
        stop_server_process(server)
        keep_log(server, setup.kind, repeat, ok)
        cleanup(setup, server.prefix)
        json_path.unlink(missing_ok=True)


def keep_log(server: RunningServer, kind: Kind, repeat: int, ok: bool) -> None:
    """The gateway's log: its warnings and errors are printed (what the gateway said about the cluster);
    kept in RAW_DIR, and its path printed, when the run failed."""
    text = server.log_path.read_text(errors="replace") if server.log_path.exists() else ""
    notable = [line for line in text.splitlines()
               if (" ERROR " in line or " WARNING " in line or "Traceback" in line)
               and "GATEWAY_API_KEY is not set" not in line]
    if notable:
        print(f"[gateway log, {kind}] {len(notable)} warning/error lines, the first: " + " | ".join(notable[:5]))
    if not ok:
        RAW_DIR.mkdir(exist_ok=True)
        kept = RAW_DIR / f"cluster-gateway-{kind}-{repeat}.log"
        kept.write_text(text)
        print(f"[gateway log, {kind}] kept in {kept}")
    server.log_path.unlink(missing_ok=True)


def cleanup(setup: Setup, prefix: str) -> None:
    """Delete the run's keys and function library on every primary (one key per DEL: a cluster node
    refuses multi-key commands across slots)."""
    for client in setup.clients():
        try:
            pipe = client.pipeline(transaction=False)
            for key in client.scan_iter(f"{prefix}:*", count=1000):
                pipe.delete(key)
            pipe.execute()
            with contextlib.suppress(redis.ResponseError):
                client.function_delete(history_library(prefix))
        finally:
            client.close()


def run_all(setups: dict[Kind, Setup], plan: Plan) -> dict[Kind, list[RunReport]]:
    """Interleaved: single, cluster in even repeats, cluster, single in odd ones."""
    runs: dict[Kind, list[RunReport]] = {kind: [] for kind in KINDS}
    for repeat in range(plan.repeats):
        for kind in (KINDS if repeat % 2 == 0 else KINDS[::-1]):
            runs[kind].append(run_once(setups[kind], plan, repeat))
    return runs


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------

def step_of(run: RunReport, kind: str, rate: int) -> StepReport | None:
    return next((s for s in run["steps"] if s["kind"] == kind and s["target_rate"] == rate), None)


def redis_us(step: StepReport) -> float:
    return step["redis_us_per_msg"]


def redis_above_idle_us(step: StepReport, run: RunReport) -> float | None:
    """Redis CPU per delivered message less the Redis CPU the same run's idle hold ran at."""
    idle_pct, window = run["hold"].get("redis_cpu_pct"), step.get("window_s")
    if idle_pct is None or window is None or not step["delivered"]:
        return None
    return 1e6 * (step["redis_cpu_s"] - idle_pct / 100 * window) / step["delivered"]


def total_us(step: StepReport) -> float:
    return step["gateway_us_per_msg"] + step["redis_us_per_msg"]


@dataclass
class Shard:
    """One shard over one step: CPU % of its nodes, their share of all Redis CPU, its share of the messages."""

    cpu_pct: float
    cpu_share: float
    sent_share: float


def shards(step: StepReport) -> list[Shard]:
    by_shard: dict[int, Shard] = {}
    for node in step.get("redis_nodes", []):
        shard = by_shard.setdefault(node["shard"], Shard(0.0, 0.0, 0.0))
        shard.cpu_pct += node["cpu_pct"]
        shard.cpu_share += node["cpu_share"]
        shard.sent_share += node["sent_share"]
    return [by_shard[i] for i in sorted(by_shard)]


@dataclass
class Cell:
    """One (path, rate) of one Redis side: its step in each repeat."""

    kind: Kind
    path: str
    rate: int
    pairs: list[tuple[StepReport, RunReport]]

    def med(self, pick: Callable[[StepReport], float]) -> float:
        return median([pick(s) for s, _ in self.pairs])

    def med_above_idle(self) -> float | None:
        values = [v for s, r in self.pairs if (v := redis_above_idle_us(s, r)) is not None]
        return median(values) if values else None

    def med_shards(self) -> list[Shard]:
        per_repeat = [shards(s) for s, _ in self.pairs]
        count = max((len(p) for p in per_repeat), default=0)
        return [Shard(median([p[i].cpu_pct for p in per_repeat if len(p) > i]),
                      median([p[i].cpu_share for p in per_repeat if len(p) > i]),
                      median([p[i].sent_share for p in per_repeat if len(p) > i])) for i in range(count)]

    def complete(self) -> bool:
        """Everything sent was delivered within the step and its drain (medians): the CPU per delivered
        message is then the CPU per message sent."""
        return (self.med(lambda s: s["lost"]) == 0
                and self.med(lambda s: s["delivered_per_s"]) >= CLEAN_DELIVERY * self.rate)

    def clean(self) -> bool:
        """Complete, and p99 under bench.py's latency rule."""
        return self.complete() and self.med(lambda s: s["p99_ms"]) < LATENCY_RULE_MS


def cell(runs: list[RunReport], kind: Kind, path: str, rate: int) -> Cell:
    return Cell(kind, path, rate, [(s, r) for r in runs if (s := step_of(r, path, rate)) is not None])


def paired_ratio(runs: dict[Kind, list[RunReport]], path: str, rate: int,
                 pick: Callable[[StepReport, RunReport], float | None]) -> float | None:
    """Median over repeats of cluster / single, each pair from the same repeat (run back to back)."""
    ratios = []
    for single_run, cluster_run in zip(runs["single"], runs["cluster"], strict=False):
        a, b = step_of(single_run, path, rate), step_of(cluster_run, path, rate)
        if a is None or b is None:
            continue
        x, y = pick(a, single_run), pick(b, cluster_run)
        if x is not None and y is not None and x > 0:
            ratios.append(y / x)
    return median(ratios) if ratios else None


# --------------------------------------------------------------------------------------------
# markdown
# --------------------------------------------------------------------------------------------

def path_label(kind: Kind, path: str) -> str:
    if path == "publish":
        return "PUBLISH, one Redis" if kind == "single" else "SPUBLISH, cluster"
    return "FCALL, one Redis" if kind == "single" else "FCALL, cluster"


def shares(values: Sequence[float], percent: bool = True) -> str:
    return " / ".join(f"{100 * v:.0f}" if percent else f"{v:.1f}" for v in values) or "-"


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def step_rows(runs: dict[Kind, list[RunReport]], plan: Plan) -> list[str]:
    rows = ["| path | target/s | delivered msg/s | lost | p50 ms | p99 ms | gateway us/msg | gateway CPU % | "
            "Redis us/msg (all nodes) | Redis us/msg above idle | Redis CPU % (sum) | per shard: CPU % | "
            "per shard: share of Redis CPU % | per shard: share of messages % | loadgen CPU % | publisher CPU % |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
            "| ---: |"]
    for rate in plan.rates:
        for path in plan.fanout:
            for kind in KINDS:
                c = cell(runs[kind], kind, path, rate)
                if not c.pairs:
                    continue
                sh = c.med_shards() if kind == "cluster" else []
                rows.append(
                    f"| {path_label(kind, path)} | {rate} | {c.med(lambda s: s['delivered_per_s']):.0f} | "
                    f"{c.med(lambda s: s['lost']):.0f} | {c.med(lambda s: s['p50_ms']):.2f} | "
                    f"{c.med(lambda s: s['p99_ms']):.2f} | {c.med(lambda s: s['gateway_us_per_msg']):.1f} | "
                    f"{c.med(lambda s: s['gateway_cpu_pct']):.1f} | {c.med(redis_us):.2f} | "
                    f"{fmt(c.med_above_idle(), 2)} | {c.med(lambda s: s['redis_cpu_pct']):.1f} | "
                    f"{shares([x.cpu_pct for x in sh], percent=False)} | {shares([x.cpu_share for x in sh])} | "
                    f"{shares([x.sent_share for x in sh])} | {c.med(lambda s: s['loadgen_cpu_pct']):.1f} | "
                    f"{c.med(lambda s: s['driver_cpu_pct']):.1f} |")
    return rows


def ratio_rows(runs: dict[Kind, list[RunReport]], plan: Plan) -> list[str]:
    rows = ["| path | target/s | delivered msg/s | p99 ms | gateway us/msg | Redis us/msg (all nodes) | "
            "Redis us/msg above idle | gateway+Redis us/msg |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for rate in plan.rates:
        for path in plan.fanout:
            def r(pick: Callable[[StepReport, RunReport], float | None], p: str = path, rt: int = rate) -> str:
                return ratio_text(paired_ratio(runs, p, rt, pick))
            rows.append(f"| {'SPUBLISH / PUBLISH' if path == 'publish' else 'FCALL cluster / FCALL'} | {rate} | "
                        f"{r(lambda s, _r: s['delivered_per_s'])} | {r(lambda s, _r: s['p99_ms'])} | "
                        f"{r(lambda s, _r: s['gateway_us_per_msg'])} | {r(lambda s, _r: redis_us(s))} | "
                        f"{r(redis_above_idle_us)} | {r(lambda s, _r: total_us(s))} |")
    return rows


def summary_rows(runs: dict[Kind, list[RunReport]], plan: Plan) -> list[str]:
    rows = ["| Redis | connected | gateway ms/conn | gateway idle CPU % | Redis idle CPU % (sum over nodes) | "
            "still connected | server closes |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for kind in KINDS:
        r = runs[kind]

        def m(pick: Callable[[RunReport], float], rs: list[RunReport] = r) -> float:
            return median([pick(x) for x in rs])
        rows.append(f"| {'one Redis' if kind == 'single' else f'cluster, {plan.primaries} primaries'} | "
                    f"{m(lambda x: x['connect']['connected']):.0f}/{plan.connections} | "
                    f"{m(lambda x: x['connect']['gateway_ms_per_conn']):.3f} | "
                    f"{m(lambda x: x['hold']['gateway_cpu_pct']):.2f} | "
                    f"{m(lambda x: x['hold'].get('redis_cpu_pct', 0.0)):.2f} | "
                    f"{m(lambda x: x['final_connected']):.0f} | "
                    f"{'; '.join(json.dumps(x['close_codes']) for x in r)} |")
    return rows


@dataclass
class Fit:
    """Redis CPU above idle against the delivered rate, least squares over the completely delivered steps of
    one repeat (medians over repeats): what one more message costs, and what sending at all costs."""

    marginal_us: float  # slope: Redis CPU per additional message
    fixed_pct: float  # intercept: % of one core while the publisher sends, whatever the rate
    rates: list[int]


def fit(runs: dict[Kind, list[RunReport]], kind: Kind, path: str, plan: Plan) -> Fit | None:
    """cpu_above_idle = fixed x step_s + marginal x delivered, divided by the step's seconds. The fixed part
    is the publisher's pacing: each of its connections (one per primary) wakes its node every 2 ms, and
    what a wake costs (a read, the replies, the writes to the subscribers) does not depend on how many
    commands it carries."""
    rates = [rate for rate in plan.rates if cell(runs[kind], kind, path, rate).complete()]
    slopes, intercepts = [], []
    for run in runs[kind]:
        points = []
        idle = run["hold"].get("redis_cpu_pct")
        for rate in rates:
            step = step_of(run, path, rate)
            if step is None or idle is None or step.get("window_s") is None or not step["seconds"]:
                continue
            cpu = step["redis_cpu_s"] - idle / 100 * step.get("window_s", 0.0)
            points.append((step["delivered"] / step["seconds"], cpu / step["seconds"]))
        if len(points) < 2:
            continue
        mx, my = sum(x for x, _ in points) / len(points), sum(y for _, y in points) / len(points)
        sxx = sum((x - mx) ** 2 for x, _ in points)
        if sxx <= 0:
            continue
        slope = sum((x - mx) * (y - my) for x, y in points) / sxx
        slopes.append(slope)
        intercepts.append(my - slope * mx)
    if not slopes:
        return None
    return Fit(1e6 * median(slopes), 100 * median(intercepts), rates)


@dataclass
class Bundle:
    """Everything the section and the JSON are rendered from, saved next to the raw runs, so that
    `--from-raw` renders them again (say, after a change to the tables) without running again."""

    argv: list[str]
    plan: Plan
    runs: dict[Kind, list[RunReport]]
    calibration: tuple[float, float]
    machine: str  # bench.machine_description of the run
    cluster: str  # LocalCluster.describe()
    node_timeout_ms: int
    date: str
    redis_version: str
    load_average: tuple[list[float], list[float]]  # before and after the runs

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> Bundle:
        doc = json.loads(path.read_text())
        plan = doc["plan"]
        plan["fanout"] = tuple(plan["fanout"])
        return cls(doc["argv"], Plan(**plan), doc["runs"], tuple(doc["calibration"]), doc["machine"],
                   doc["cluster"], doc["node_timeout_ms"], doc["date"], doc["redis_version"],
                   tuple(doc["load_average"]))

    @property
    def command(self) -> str:
        return " ".join(["python scripts/bench_cluster.py", *self.argv])


def fit_rows(b: Bundle) -> list[str]:
    rows = ["| path | rates fitted (complete) | marginal Redis us per message | fixed Redis CPU % while sending |",
            "| --- | --- | ---: | ---: |"]
    for path in b.plan.fanout:
        for kind in KINDS:
            f = fit(b.runs, kind, path, b.plan)
            if f is not None:
                rows.append(f"| {path_label(kind, path)} | {', '.join(map(str, f.rates))} | {f.marginal_us:.2f} | "
                            f"{f.fixed_pct:.2f} |")
    return rows


def section(b: Bundle, figure: dict[str, Any]) -> str:
    plan = b.plan
    args = " ".join(plan.loadgen_args())
    value = figure.get("value")
    return "\n".join([
        f"### Results: `{SECTION}` (generated by `{b.command}`, medians of {plan.repeats} interleaved run(s) "
        "per Redis side)",
        "",
        b.machine,
        f"- Redis Cluster: {plan.primaries} primaries, no replicas, started by the bench for this run "
        f"(scripts/local_cluster.py, no persistence, `cluster-node-timeout` {b.node_timeout_ms} ms), "
        f"the same box:\n\n```\n{b.cluster}\n```\n",
        f"- load average (1, 5, 15 min): {b.load_average[0]} before the runs, {b.load_average[1]} after",
        "",
        f"What runs: the gateway with `PROCESSES={plan.processes}` and the settings of `bench.py` (fresh "
        "`REDIS_PREFIX`, `HEARTBEAT_INTERVAL=30`, `LOG_LEVEL=WARNING`), once with `REDIS_URL` = the one Redis "
        "(the publisher sends `PUBLISH <prefix>:user:<userId>`) and once with `REDIS_CLUSTER=true`, `REDIS_URL` = "
        "one node (the publisher sends `SPUBLISH <prefix>:user:{<userId>}` to the primary of the slot, on one "
        "pipelined connection per primary, each written every 2 ms). Single first in even repeats, cluster "
        f"first in odd ones. `driver_location` to uniformly random users of the {plan.connections} connected "
        "(one driver each). Redis CPU is every node's own `INFO cpu` (microseconds); \"above idle\" subtracts "
        "the Redis CPU of the same run's idle hold (crons, cluster-bus gossip, the gateway's probes: one per "
        "shard and process every 2 s, and its slot-map check). A step is complete when nothing was lost and "
        f">= {100 * CLEAN_DELIVERY:.0f}% of its rate arrived within the step and a 3 s drain.",
        "",
        "```",
        f"loadgen.py {args} --redis <Redis> --redis-pid <its pid>  # one Redis",
        f"loadgen.py {args} --redis <one node> --redis-cluster --redis-pid <every node's pid>  # cluster",
        "```",
        "",
        "#### Connections and idle",
        "",
        *summary_rows(b.runs, plan),
        "",
        "#### Fan-out steps (medians; per shard: shard 0 / 1 / 2, in slot order)",
        "",
        *step_rows(b.runs, plan),
        "",
        "#### Cluster / one Redis (median of the per-repeat ratios; above 1: the cluster costs more, or "
        "delivers more)",
        "",
        *ratio_rows(b.runs, plan),
        "",
        "#### Redis CPU against the rate (least squares over the complete steps of each repeat, medians)",
        "",
        "The fixed part is what the publisher's pacing costs Redis whatever the rate: each of its connections "
        "(one per primary) wakes its node every 2 ms, and a wake costs a read, the replies and the writes to "
        "the subscribers however many commands it carries. The marginal part is what one more message costs.",
        "",
        *fit_rows(b),
        "",
        f"`{FIGURE}` written to docs/capacity/cluster_bench.json: {fmt(value, 2)} us ({figure.get('how', '')})",
        "",
    ])


# --------------------------------------------------------------------------------------------
# docs/capacity/cluster_bench.json
# --------------------------------------------------------------------------------------------

def by_rate(runs: dict[Kind, list[RunReport]], kind: Kind, path: str, plan: Plan) -> list[dict[str, Any]]:
    out = []
    for rate in plan.rates:
        c = cell(runs[kind], kind, path, rate)
        if not c.pairs:
            continue
        above = c.med_above_idle()
        entry: dict[str, Any] = {
            "rate": rate, "delivered_per_s": round(c.med(lambda s: s["delivered_per_s"]), 1),
            "lost": c.med(lambda s: s["lost"]), "p99_ms": round(c.med(lambda s: s["p99_ms"]), 2),
            "complete": c.complete(), "p99_under_50ms": c.clean(),
            "redis_us_per_msg": round(c.med(redis_us), 3),
            "redis_us_per_msg_above_idle": None if above is None else round(above, 3),
            "redis_cpu_pct": round(c.med(lambda s: s["redis_cpu_pct"]), 2),
            "gateway_us_per_msg": round(c.med(lambda s: s["gateway_us_per_msg"]), 1),
            "gateway_cpu_pct": round(c.med(lambda s: s["gateway_cpu_pct"]), 1)}
        if kind == "cluster":
            entry["shards"] = [{"shard": i, "cpu_pct": round(x.cpu_pct, 2), "cpu_share": round(x.cpu_share, 4),
                                "message_share": round(x.sent_share, 4)} for i, x in enumerate(c.med_shards())]
        out.append(entry)
    return out


def fit_json(f: Fit | None) -> dict[str, Any] | None:
    return None if f is None else {"marginal_us_per_msg": round(f.marginal_us, 3),
                                   "fixed_cpu_pct_while_sending": round(f.fixed_pct, 3), "rates": f.rates}


def capacity_figure(b: Bundle) -> dict[str, Any]:
    """The cluster's SPUBLISH figure: Redis CPU (all shards) per delivered message above idle, at the highest
    rate both sides delivered completely, with every rate and the fit beside it."""
    plan, runs = b.plan, b.runs
    rates = by_rate(runs, "cluster", "publish", plan)
    single = {e["rate"]: e for e in by_rate(runs, "single", "publish", plan)}
    chosen = next((e for e in reversed(rates) if e["complete"] and single.get(e["rate"], {}).get("complete")), None)
    value = None if chosen is None else chosen["redis_us_per_msg_above_idle"]
    ratio = None if chosen is None else paired_ratio(runs, "publish", chosen["rate"], redis_above_idle_us)
    cluster_fit, single_fit = fit(runs, "cluster", "publish", plan), fit(runs, "single", "publish", plan)
    how = "no rate was delivered completely by both sides"
    if chosen is not None:
        how = (f"at {chosen['rate']} msg/s in total (~{chosen['rate'] // plan.primaries} per shard), the highest "
               f"rate both sides delivered completely; {plan.connections} users, gateway PROCESSES={plan.processes}: "
               f"Redis CPU of every node over the step (INFO cpu) less the idle hold's, / delivered; medians of "
               f"{plan.repeats}. One Redis, same runs: {single[chosen['rate']]['redis_us_per_msg_above_idle']} us "
               f"(cluster/one Redis {ratio_text(ratio)}). The publisher writes each connection every 2 ms, so "
               f"this includes a fixed cost per write that shrinks per message as the rate grows (by_rate, fit): "
               f"a per-command figure from deep pipelines (redis_costs.py) is better multiplied by "
               f"cluster_over_single than replaced by this")
    return {
        "value": value,
        "unit": f"us of redis-server CPU (all shards) per message delivered through SPUBLISH on a "
                f"{plan.primaries}-shard Redis Cluster",
        "kind": "measured" if value is not None else "pending",
        "measured": b.date[:10],
        "source": f"docs/BENCHMARKS.md, generated section `{SECTION}` ({b.command})",
        "how": how,
        "at_rate": None if chosen is None else chosen["rate"],
        "shards": plan.primaries,
        "single_redis_same_run_us": None if chosen is None else single[chosen["rate"]]["redis_us_per_msg_above_idle"],
        "cluster_over_single": None if ratio is None else round(ratio, 3),
        "fit": {"cluster_spublish": fit_json(cluster_fit), "single_publish": fit_json(single_fit)},
        "by_rate": rates,
    }


def write_capacity_json(b: Bundle, figure: dict[str, Any]) -> None:
    plan, runs = b.plan, b.runs
    single_us = figure.get("single_redis_same_run_us")
    doc: dict[str, Any] = {
        "about": "Written by scripts/bench_cluster.py (issue #11): fan-out on a local Redis Cluster against one "
                 "Redis, same machine, same run. `figures` has the shape of docs/capacity/inputs.json's "
                 f"(value, unit, kind, measured, source, how); `{FIGURE}` is the one scripts/capacity.py reads. "
                 "`runs` has every rate of both sides, medians over repeats.",
        "figures": {
            FIGURE: figure,
            "redis.single_publish_us_per_delivered_message_same_run": {
                "value": single_us,
                "unit": "us of redis-server CPU per message delivered through PUBLISH on one Redis, in the same "
                        "runs and at the same rate as the cluster figure (for comparison; the model's one-Redis "
                        "figure is redis.publish_user_1sub_us from redis_costs.py)",
                "kind": "measured" if single_us is not None else "pending",
                "measured": b.date[:10], "source": figure["source"], "how": "as the cluster figure"},
        },
        "run": {
            "date": b.date, "command": b.command,
            "connections": plan.connections, "gateway_processes": plan.processes, "shards": plan.primaries,
            "replicas": 0, "repeats": plan.repeats, "step_s": plan.step_s, "rates": plan.rates,
            "message_type": "driver_location", "redis": b.redis_version, "redis_cpu_source": "INFO cpu",
            "calibration_ms": [round(b.calibration[0], 1), round(b.calibration[1], 1)],
            "load_average": {"before": b.load_average[0], "after": b.load_average[1]},
        },
        "runs": {"single_publish": by_rate(runs, "single", "publish", plan),
                 "cluster_spublish": figure["by_rate"],
                 **({"single_fcall": by_rate(runs, "single", "fcall", plan),
                     "cluster_fcall": by_rate(runs, "cluster", "fcall", plan)} if "fcall" in plan.fanout else {})},
    }
    CAPACITY_JSON.parent.mkdir(parents=True, exist_ok=True)
    CAPACITY_JSON.write_text(json.dumps(doc, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_cluster.py",
                                     description="Fan-out on a local Redis Cluster (SPUBLISH) against one Redis "
                                                 "(PUBLISH), same machine, same run; writes the `cluster` section of "
                                                 "docs/BENCHMARKS.md and docs/capacity/cluster_bench.json.")
    parser.add_argument("--quick", action="store_true", help="1 repeat, 2,000 and 16,000 msg/s, 4 s steps")
    parser.add_argument("--repeats", type=int, default=0, help="runs per Redis side (default 3; --quick 1)")
    parser.add_argument("--rates", default="", help="comma list of msg/s (default 2000,8000,16000,32000)")
    parser.add_argument("--connections", type=int, default=3000, help="users (one driver each)")
    parser.add_argument("--step", type=float, default=0.0, help="seconds per step (default 8; --quick 4)")
    parser.add_argument("--hold", type=float, default=8.0, help="seconds of idle hold (its Redis CPU is the idle)")
    parser.add_argument("--processes", type=int, default=2, help="PROCESSES of the gateway")
    parser.add_argument("--primaries", type=int, default=3, help="shards of the local cluster")
    parser.add_argument("--fcall", action="store_true", help="also FCALL <prefix>_publish at each rate")
    parser.add_argument("--no-write", action="store_true", help="print the section; write neither file")
    parser.add_argument("--from-raw", default="", metavar="BUNDLE",
                        help=f"render from a saved run ({RAW_DIR}/cluster-bundle.json) instead of running")
    return parser.parse_args(argv)


def run_bench(argv: list[str], plan: Plan) -> Bundle:
    load_before = [round(x, 2) for x in psutil.getloadavg()]
    single = start_redis()
    cluster: LocalCluster | None = None
    try:
        cluster = LocalCluster(primaries=plan.primaries).start()
        setups: dict[Kind, Setup] = {"single": Setup("single", single=single),
                                     "cluster": Setup("cluster", cluster=cluster)}
        print(f"one Redis: {single.url} (pid {single.pid}); cluster up in {cluster.startup_s:.1f} s:\n"
              f"{cluster.describe()}", flush=True)
        before = calibrate()
        started = time.monotonic()
        runs = run_all(setups, plan)
        calibration = (before, calibrate())
        print(f"\nruns took {time.monotonic() - started:.0f} s")
        client = single.client()
        try:
            version = str(client.info("server").get("redis_version", "?"))
        finally:
            client.close()
        return Bundle(argv, plan, runs, calibration, machine_description(calibration, single), cluster.describe(),
                      cluster.node_timeout_ms, datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                      version, (load_before, [round(x, 2) for x in psutil.getloadavg()]))
    finally:
        if cluster is not None:
            cluster.stop()
        stop_redis(single)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.from_raw:
        bundle = Bundle.load(Path(args.from_raw))
    else:
        default_rates = "2000,16000" if args.quick else "2000,8000,16000,32000"
        plan = Plan(connections=args.connections, processes=args.processes,
                    rates=[int(r) for r in (args.rates or default_rates).split(",") if r.strip()],
                    step_s=args.step or (4.0 if args.quick else 8.0), hold_s=args.hold,
                    repeats=args.repeats or (1 if args.quick else 3), primaries=args.primaries,
                    fanout=("publish", "fcall") if args.fcall else ("publish",))
        bundle = run_bench([a for a in argv if a != "--no-write"], plan)
        RAW_DIR.mkdir(exist_ok=True)
        bundle.save(RAW_DIR / "cluster-bundle.json")
        print(f"saved the runs in {RAW_DIR / 'cluster-bundle.json'} (--from-raw renders them again)")
    figure = capacity_figure(bundle)
    text = section(bundle, figure)
    if args.no_write:
        print(text)
        return 0
    write_section(SECTION, text)
    write_capacity_json(bundle, figure)
    print(f"\nwrote the `{SECTION}` section of {DOC.relative_to(ROOT)} and {CAPACITY_JSON.relative_to(ROOT)}\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
