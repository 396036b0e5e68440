"""Benchmarks behind docs/BENCHMARKS.md: tornado-gateway next to python-socketio, same harness, same machine.

Why one script: numbers from different days, machines or harnesses are not comparable, so every
run starts both servers itself (fresh Redis prefix each time), drives them with scripts/loadgen.py,
takes medians over repeats, and rewrites its own section of docs/BENCHMARKS.md with the machine
description, the commands and the ratios. Hand-written text outside the generated sections is kept.

    python scripts/bench.py --quick          # ~4 minutes: 3,000 connections, short steps, recording
    python scripts/bench.py                  # full: 20K users on 2 processes, stepped fan-out/upstream
    python scripts/bench.py --hold-100k      # 100,000 connections, PROCESSES=6, 5 minutes
    python scripts/bench.py --baseline 8569bb8   # also an older commit of the gateway, in the same runs
    python scripts/bench.py --quick --servers gateway --baseline 0326ea6 --only recording

Repeats are interleaved (gateway, socketio, gateway, ...) so that a machine getting busier or
quieter during a run shifts every server alike, and a fixed pure-Python workload is timed before
and after ("calibration") so that sections written on different days can be put side by side.

Each run starts its own redis-server (on a free port, no persistence) and stops it at the end:
the machine's shared Redis is never touched, other users of it do not load the one measured, and
Redis's CPU per message can be measured next to the gateway's (recording moves work into Redis,
so a gateway-only figure would flatter it). `--redis URL` uses an existing Redis instead, without
Redis CPU figures.

The `recording` scenario measures what recording a message (PROTOCOL.md 7.1) costs against the
same message unrecorded, side by side in one run: `FCALL <prefix>_publish` against plain PUBLISH
of the same recorded-type message on the same gateway, alternating rate by rate, and
POST /broadcast (recorded) against the same request on the `--baseline` release, which only
published. It writes one more table: delivered msg/s, gateway and Redis CPU per message, and the
recorded/unrecorded ratio against the issue's 1.5x budget.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

import psutil
import redis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.loadgen import RunReport, StepReport, free_port, publish_function, stop_process  # noqa: E402 - needs ROOT on sys.path when run as a file

Server = Literal["gateway", "socketio", "baseline"]
SECRET = "bench-secret-0123456789abcdef-0123456789abcdef"
DOC = ROOT / "docs" / "BENCHMARKS.md"
LATENCY_RULE_MS = 50.0
# One per bench process: two benches running at once (sessions share the machine) must not remove or
# re-point each other's baseline checkout, which one run did to the other mid-run.
BASELINE_DIR = Path(tempfile.gettempdir()) / f"tornado-gateway-bench-baseline-{os.getpid()}"
# Listening ports come from below the kernel's ephemeral range (32768-60999 here), so that no
# outgoing connection of the load generator can hold the port a server is about to bind.
RECORDING_CPU_BUDGET = 1.5  # the issue: each recorded path within 1.5x the CPU of its unrecorded counterpart
RECORDED_TYPE = "ride_status"


@dataclass(frozen=True)
class Scenario:
    """One loadgen invocation per server and repeat."""

    name: str
    connections: int
    processes: int
    loadgen_args: tuple[str, ...]
    servers: tuple[Server, ...]
    timeout_s: float
    # What the baseline runs instead, when it lacks a path (a release before gateway_publish).
    baseline_args: tuple[str, ...] | None = None
    recording: bool = False  # compares recorded with unrecorded paths: gets the recording table

    def args_for(self, kind: Server) -> tuple[str, ...]:
        return self.baseline_args if kind == "baseline" and self.baseline_args is not None else self.loadgen_args


@dataclass
class Outcome:
    scenario: Scenario
    server: Server
    label: str  # how the tables name the server ("baseline (8569bb8)")
    runs: list[RunReport] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# scenarios
# --------------------------------------------------------------------------------------------

def quick_scenarios(servers: tuple[Server, ...]) -> list[Scenario]:
    args = ("--connect-rate", "1500", "--hold", "10", "--fanout", "publish,http", "--rates", "1000,4000",
            "--step", "4", "--upstream", "2000")
    return [Scenario("quick", 3000, 2, args, servers, 240),
            recording_scenario("quick-recording", 3000, servers, ("2000", "8000", "16000"), ("1000", "3000"), 4)]


def full_scenarios(servers: tuple[Server, ...]) -> list[Scenario]:
    fanout = ("--connect-rate", "2000", "--hold", "40", "--fanout", "publish", "--rates", "2000,4000,8000,10000",
              "--step", "10")
    http = ("--connect-rate", "2000", "--hold", "5", "--fanout", "http", "--rates", "1000,2000,3000,4000",
            "--step", "10", "--upstream", "2000,4000,6000,8000")
    return [Scenario("20k-publish", 20000, 2, fanout, servers, 600),
            Scenario("20k-http-upstream", 20000, 2, http, servers, 600),
            recording_scenario("20k-recording", 20000, servers, ("4000", "8000", "16000", "32000"),
                               ("1000", "2000", "3000"), 10)]


def recording_scenario(name: str, connections: int, servers: tuple[Server, ...], rates: Sequence[str],
                       http_rates: Sequence[str], step_s: int) -> Scenario:
    """A recorded type (ride_status) through PUBLISH (live-only) and FCALL (recorded) at the same
    rates, alternating, plus POST /broadcast (recorded by the gateway). The baseline release has no
    gateway_publish, so it runs POST /broadcast only: its broadcast is the unrecorded counterpart.
    Socket.io has no recording at all and is left out."""
    common = ("--connect-rate", "2000", "--hold", "4", "--message-type", RECORDED_TYPE, "--rates", ",".join(rates),
              "--http-rates", ",".join(http_rates), "--step", str(step_s))
    steps = len(rates) * 2 + len(http_rates)
    return Scenario(name, connections, 2, (*common, "--fanout", "publish,fcall,http"),
                    tuple(s for s in servers if s != "socketio"), 300 + steps * (step_s + 5),
                    baseline_args=(*common, "--fanout", "http"), recording=True)


def hold_100k_scenarios(servers: tuple[Server, ...], seconds: float, connections: int,
                        processes: int) -> list[Scenario]:
    args = ("--connect-rate", "1000", "--hold", str(seconds), "--concurrency", "700")
    return [Scenario("hold-100k", connections, processes, args, servers, seconds + connections / 1000 + 300)]


# --------------------------------------------------------------------------------------------
# servers
# --------------------------------------------------------------------------------------------

@dataclass
class BenchRedis:
    """The Redis every server and load generator of one bench run talks to: by default one the
    bench started (`proc`), whose CPU the load generator measures; or an existing one (no `proc`)."""

    url: str
    proc: subprocess.Popen[bytes] | None = None
    workdir: Path | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_connect_timeout=2)


def start_redis() -> BenchRedis:
    """A private redis-server: no persistence (no fork for a save to show up in its CPU), its files
    in a temporary directory. Stopped by `stop_redis`, by its pid."""
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="bench-redis-"))
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(workdir), "--logfile", str(workdir / "redis.log"), "--daemonize", "no"]
    own = BenchRedis(f"redis://127.0.0.1:{port}", subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                                                      stderr=subprocess.DEVNULL), workdir)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert own.proc is not None
        if own.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited: {(workdir / 'redis.log').read_text(errors='replace')[-2000:]}")
        try:
            own.client().ping()
            return own
        except redis.exceptions.ConnectionError:
            time.sleep(0.1)
    stop_redis(own)
    raise RuntimeError("redis-server did not answer PING")


def stop_redis(own: BenchRedis) -> None:
    """Stop the Redis this bench started (only that pid); an existing Redis is left alone."""
    if own.proc is None:
        return
    stop_process(own.proc, 15)
    if own.workdir is not None:
        shutil.rmtree(own.workdir, ignore_errors=True)


@dataclass
class RunningServer:
    kind: Server
    proc: subprocess.Popen[bytes]
    port: int
    prefix: str
    log_path: Path


def start_server(kind: Server, processes: int, redis_url: str,
                 extra_env: dict[str, str] | None = None) -> RunningServer:
    """`extra_env`: settings on top of the bench's (bench_cluster.py: REDIS_CLUSTER=true)."""
    port = free_port()
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "JWT_SECRET": SECRET, "REDIS_URL": redis_url, "REDIS_PREFIX": prefix, "PORT": str(port),
           "BIND_ADDRESS": "127.0.0.1", "STATSD_HOST": "", "HEARTBEAT_INTERVAL": "30", "HEARTBEAT_TIMEOUT": "75",
           "LOG_LEVEL": "WARNING", "PROCESSES": str(processes), "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    command = ([sys.executable, "-m", "tornado_gateway"] if kind != "socketio"
               else [sys.executable, str(ROOT / "scripts" / "socketio_server.py")])
    log_path = Path(tempfile.mkstemp(prefix=f"bench-{kind}-", suffix=".log")[1])
    with open(log_path, "ab") as log:
        # `-m` puts the working directory first on sys.path: the baseline runs its own checkout's code.
        proc = subprocess.Popen(command, env=env, cwd=BASELINE_DIR if kind == "baseline" else ROOT, stdout=log,
                                stderr=subprocess.STDOUT)
    server = RunningServer(kind, proc, port, prefix, log_path)
    try:
        wait_ready(server, processes)
    except RuntimeError:
        stop_server_process(server)  # one that never became ready must not outlive the bench
        raise
    return server


def http_ok(port: int, path: str) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            return b" 200 " in s.recv(100)
    except OSError:
        return False


def wait_ready(server: RunningServer, processes: int) -> None:
    """Every child listening (SO_REUSEPORT spreads connections, so a half-started set skews the run)."""
    path = "/stats" if server.kind == "socketio" else "/ready"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.kind} exited:\n{server.log_path.read_text(errors='replace')}")
        children = psutil.Process(server.proc.pid).children() if processes > 1 else []
        if len(children) >= (processes if processes > 1 else 0) and all(http_ok(server.port, path) for _ in range(20)):
            time.sleep(2.0)  # the last child to bind may still be loading
            return
        time.sleep(0.2)
    raise RuntimeError(f"{server.kind} did not become ready")


def stop_server_process(server: RunningServer) -> None:
    """SIGTERM to the server this bench started; it and its children are killed by pid if they linger."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(60)
        except subprocess.TimeoutExpired:
            for child in psutil.Process(server.proc.pid).children(recursive=True):
                child.kill()
            server.proc.kill()
            server.proc.wait(10)


def stop_server(server: RunningServer, bench_redis: BenchRedis) -> None:
    stop_server_process(server)
    client = bench_redis.client()
    keys = list(client.scan_iter(f"{server.prefix}:*", count=1000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start:start + 1000])
    with contextlib.suppress(redis.ResponseError):  # the history library outlives the keys; older releases have none
        client.function_delete(history_library(server.prefix))
    client.close()
    server.log_path.unlink(missing_ok=True)


def history_library(prefix: str) -> str:
    """The gateway's Redis function library for `prefix` (redis_keys.Keys.history_library)."""
    return publish_function(prefix).removesuffix("_publish") + "_history"


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------

def flavor(kind: Server) -> str:
    return "socketio" if kind == "socketio" else "gateway"


def loadgen_command(scenario: Scenario, server: RunningServer, json_path: Path,
                    bench_redis: BenchRedis) -> list[str]:
    measured = ("--redis-pid", str(bench_redis.pid)) if bench_redis.pid is not None else ()
    return [sys.executable, str(ROOT / "scripts" / "loadgen.py"), "--url", f"ws://127.0.0.1:{server.port}",
            "--flavor", flavor(server.kind), "--secret", SECRET, "--prefix", server.prefix,
            "--redis", bench_redis.url, *measured, "--server-pid", str(server.proc.pid),
            "-c", str(scenario.connections), "--json", str(json_path), *scenario.args_for(server.kind)]


def run_once(scenario: Scenario, kind: Server, bench_redis: BenchRedis) -> RunReport:
    server = start_server(kind, scenario.processes, bench_redis.url)
    json_path = Path(tempfile.mkstemp(prefix="loadgen-", suffix=".json")[1])
    try:
        command = loadgen_command(scenario, server, json_path, bench_redis)
        print(f"\n=== {scenario.name} / {kind} (PROCESSES={scenario.processes}) ===", flush=True)
        print("$ " + " ".join(command[1:]).replace(str(ROOT) + "/", ""), flush=True)
        subprocess.run(command, check=False, timeout=scenario.timeout_s, cwd=ROOT)
        text = json_path.read_text()
        if not text:
            raise RuntimeError(f"loadgen wrote no report for {scenario.name}/{kind}")
        return cast(RunReport, json.loads(text))
    finally:
        stop_server(server, bench_redis)
        json_path.unlink(missing_ok=True)


def run_all(scenarios: list[Scenario], repeats: int, labels: dict[Server, str],
            bench_redis: BenchRedis) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for scenario in scenarios:
        by_kind = {kind: Outcome(scenario, kind, labels.get(kind, kind)) for kind in scenario.servers}
        for _ in range(repeats):
            for kind, outcome in by_kind.items():
                outcome.runs.append(run_once(scenario, kind, bench_redis))
        outcomes.extend(by_kind.values())
    return outcomes


def calibrate(rounds: int = 5) -> float:
    """Milliseconds for a fixed pure-Python workload (JSON, dicts, arithmetic), median of `rounds`:
    how fast this machine was during the run. Figures from sections written at different times
    compare only after dividing by it."""
    document = {"type": "driver_location", "payload": {"driverId": "d-1", "lat": 12.97, "lng": 77.59,
                                                       "heading": 90, "speed": 8.5}}
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        total = 0
        for n in range(20_000):
            total += len(json.loads(json.dumps(document))["payload"]) + n * n % 7
        times.append((time.perf_counter() - started) * 1000.0)
    return median(times)


def make_baseline(ref: str) -> str:
    """A detached checkout of `ref` next to this one; returns its short commit id."""
    remove_baseline()
    subprocess.run(["git", "worktree", "add", "--detach", "--force", str(BASELINE_DIR), ref], cwd=ROOT, check=True,
                   capture_output=True)
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BASELINE_DIR, capture_output=True, text=True,
                          check=True).stdout.strip()


def remove_baseline() -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(BASELINE_DIR)], cwd=ROOT, capture_output=True,
                   check=False)


# --------------------------------------------------------------------------------------------
# medians
# --------------------------------------------------------------------------------------------

def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def med(runs: list[RunReport], pick: Callable[[RunReport], float]) -> float:
    return median([pick(r) for r in runs])


def step_keys(runs: list[RunReport]) -> list[tuple[str, int]]:
    seen: list[tuple[str, int]] = []
    for run in runs:
        for step in run["steps"]:
            key = (step["kind"], step["target_rate"])
            if key not in seen:
                seen.append(key)
    return seen


def median_step(runs: list[RunReport], kind: str, rate: int) -> StepReport | None:
    steps = [s for r in runs for s in r["steps"] if s["kind"] == kind and s["target_rate"] == rate]
    if not steps:
        return None
    merged = dict(steps[0])
    for key, value in steps[0].items():
        if isinstance(value, (int, float)):
            merged[key] = round(median([cast(float, s[key]) for s in steps]), 2)  # type: ignore[literal-required]
    return cast(StepReport, merged)


def step_passes(step: StepReport, cpu_budget_us: float | None) -> bool:
    ok = (step["lost"] == 0 and step["p99_ms"] < LATENCY_RULE_MS
          and step["delivered_per_s"] >= 0.98 * step["target_rate"])
    return ok and (cpu_budget_us is None or step["gateway_us_per_msg"] <= cpu_budget_us)


# --------------------------------------------------------------------------------------------
# markdown
# --------------------------------------------------------------------------------------------

def machine_description(calibration: tuple[float, float], bench_redis: BenchRedis) -> str:
    def sh(*command: str) -> str:
        try:
            return subprocess.run(command, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return "\n".join([
        f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- `nproc`: {sh('nproc')} ({cpu})",
        f"- `free -g`:\n\n```\n{sh('free', '-g')}\n```\n",
        f"- python: {platform.python_version()} ({sys.executable.replace(str(ROOT) + '/', '')}); "
        f"open files per process: {sh('sh', '-c', 'ulimit -Hn')}; kernel {platform.release()}",
        f"- Redis: {redis_description(bench_redis)}",
        f"- calibration (`bench.calibrate`, a fixed pure-Python workload; lower is a faster machine): "
        f"{calibration[0]:.0f} ms before the runs, {calibration[1]:.0f} ms after",
    ])


def redis_description(bench_redis: BenchRedis) -> str:
    client = bench_redis.client()
    try:
        version = client.info("server").get("redis_version", "?")
    finally:
        client.close()
    where = bench_redis.url.removeprefix("redis://")
    if bench_redis.proc is None:
        return f"{version} at {where} (the same box; its CPU is not measured)"
    return (f"{version} on {where}, started by the bench for this run (no persistence), the same box; "
            "its CPU is measured per step")


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def summary_rows(outcomes: list[Outcome]) -> list[str]:
    rows = ["| scenario | server | connected | conn/s | server ms/conn | RSS KB/conn | idle CPU % | "
            "heartbeats/s | still connected | server closes | loadgen idle CPU % |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for o in outcomes:
        runs = o.runs
        rows.append(
            f"| {o.scenario.name} | {o.label} (P={o.scenario.processes}) | "
            f"{med(runs, lambda r: r['connect']['connected']):.0f}/{o.scenario.connections} | "
            f"{med(runs, lambda r: r['connect']['rate_per_s']):.0f} | "
            f"{med(runs, lambda r: r['connect']['gateway_ms_per_conn']):.3f} | "
            f"{med(runs, lambda r: r['hold']['rss_per_conn_kb']):.1f} | "
            f"{med(runs, lambda r: r['hold']['gateway_cpu_pct']):.1f} | "
            f"{med(runs, lambda r: r['hold']['heartbeats_per_s']):.0f} | "
            f"{med(runs, lambda r: r['final_connected']):.0f} | "
            f"{'; '.join(json.dumps(r['close_codes']) for r in runs)} | "
            f"{med(runs, lambda r: r['hold']['loadgen_cpu_pct']):.1f} |")
    return rows


def step_rows(outcomes: list[Outcome]) -> list[str]:
    rows = ["| scenario | step | target/s | server | delivered/s | lost | p50 ms | p99 ms | max ms | "
            "server us/msg | server CPU % | Redis us/msg | loadgen CPU % | publisher CPU % |",
            "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for o in outcomes:
        for kind, rate in step_keys(o.runs):
            s = median_step(o.runs, kind, rate)
            if s is None:
                continue
            rows.append(f"| {o.scenario.name} | {kind} | {rate} | {o.label} | {s['delivered_per_s']:.0f} | "
                        f"{s['lost']:.0f} | {s['p50_ms']} | {s['p99_ms']} | {s['max_ms']} | "
                        f"{s['gateway_us_per_msg']} | {s['gateway_cpu_pct']} | {redis_us(s)} | "
                        f"{s['loadgen_cpu_pct']} | {s['driver_cpu_pct']} |")
    return rows


def redis_us(step: StepReport) -> str:
    """Redis CPU per message, or "-" when the run could not measure it (reports of older loadgens, or
    a Redis the bench did not start)."""
    return f"{step['redis_us_per_msg']}" if step.get("redis_cpu_s") else "-"


def best_rate(o: Outcome, kind: str, cpu_budget_us: float | None) -> tuple[int, StepReport | None]:
    """The highest step rate meeting the rule (zero loss, p99 < 50 ms, optional CPU budget)."""
    best, best_step = 0, None
    for k, rate in step_keys(o.runs):
        s = median_step(o.runs, k, rate)
        if k == kind and s is not None and step_passes(s, cpu_budget_us) and rate > best:
            best, best_step = rate, s
    return best, best_step


def ratio_rows(outcomes: list[Outcome]) -> list[str]:
    """tornado-gateway against each other server of the same scenario; ratio > 1 favours the gateway."""
    rows = ["| scenario | metric | tornado-gateway | compared with | its value | ratio |",
            "| --- | --- | ---: | --- | ---: | ---: |"]
    by_name: dict[str, dict[Server, Outcome]] = {}
    for o in outcomes:
        by_name.setdefault(o.scenario.name, {})[o.server] = o
    for name, group in by_name.items():
        g = group.get("gateway")
        if g is None:
            continue
        for other in (group.get("baseline"), group.get("socketio")):
            if other is not None:
                rows.extend(comparison_rows(name, g, other))
    return rows


def comparison_rows(name: str, g: Outcome, o: Outcome) -> list[str]:
    rows = []
    metrics: list[tuple[str, Callable[[RunReport], float]]] = [
        ("RSS KB/conn (lower is better)", lambda r: r["hold"]["rss_per_conn_kb"]),
        ("idle CPU % (lower is better)", lambda r: r["hold"]["gateway_cpu_pct"]),
        ("server ms per new connection (lower is better)", lambda r: r["connect"]["gateway_ms_per_conn"]),
    ]
    for label, pick in metrics:
        a, b = med(g.runs, pick), med(o.runs, pick)
        rows.append(f"| {name} | {label} | {a:.2f} | {o.label} | {b:.2f} | {ratio(b, a)} |")
    for kind in ("publish", "fcall", "http", "upstream"):
        ga, gs = best_rate(g, kind, None)
        oa, os_ = best_rate(o, kind, None)
        if (gs is None and os_ is None) or not has_steps(o, kind) or not has_steps(g, kind):
            continue
        rows.append(f"| {name} | best {kind} step with zero loss and p99 < 50 ms (msg/s, higher is better) | {ga} | "
                    f"{o.label} | {oa} | {ratio(ga, oa)} |")
        for (k2, rate) in step_keys(g.runs):
            gstep, ostep = median_step(g.runs, k2, rate), median_step(o.runs, k2, rate)
            if k2 == kind and gstep is not None and ostep is not None:
                theirs = (f"{ostep['gateway_us_per_msg']}", ratio(ostep['gateway_us_per_msg'],
                                                                  gstep['gateway_us_per_msg']))
                if not ostep["delivered_per_s"]:
                    theirs = ("nothing delivered", "-")
                rows.append(f"| {name} | {kind} {rate}/s: server us per message | {gstep['gateway_us_per_msg']} | "
                            f"{o.label} | {theirs[0]} | {theirs[1]} |")
    return rows


def has_steps(o: Outcome, kind: str) -> bool:
    return any(k == kind for k, _ in step_keys(o.runs))


def verdict(met: bool) -> str:
    return "yes" if met else "NO"


def target_rows(outcomes: list[Outcome]) -> list[str]:
    rows = ["| # | target | measured (tornado-gateway, medians) | met? |", "| --- | --- | --- | --- |"]
    gateway = {o.scenario.name: o for o in outcomes if o.server == "gateway"}
    hold = gateway.get("hold-100k")
    if hold is not None:
        r = hold.runs
        final = med(r, lambda x: x["final_connected"])
        rss_mb = med(r, lambda x: x["gateway_rss_end_mb"])
        timeouts = sum(x["close_codes"].get("4408", 0) for x in r)
        closes = sum(sum(x["close_codes"].values()) for x in r)
        ok = final >= hold.scenario.connections and closes == 0 and rss_mb <= 1200
        rows.append(f"| 1 | {hold.scenario.connections} held {med(r, lambda x: x['hold']['seconds']):.0f} s, "
                    f"P={hold.scenario.processes}: all connected, no 4408, RSS <= 1.2 GB | still connected "
                    f"{final:.0f}, server closes {closes} (4408: {timeouts}), total RSS {rss_mb:.0f} MB | "
                    f"{verdict(ok)} |")
        kb = med(r, lambda x: x["hold"]["rss_per_conn_kb"])
        rows.append(f"| 2 | <= 10 KB RSS per idle connection | {kb:.1f} KB (100K hold) | "
                    f"{verdict(kb <= 10)} |")
        cpu = med(r, lambda x: x["hold"]["gateway_cpu_pct"])
        rows.append(f"| 3 | 100K idle with 30 s heartbeats <= 50% of one core | {cpu:.1f}% | "
                    f"{verdict(cpu <= 50)} |")
    publish = gateway.get("20k-publish")
    if publish is not None:
        s = median_step(publish.runs, "publish", 8000)
        if s is not None:
            ok = step_passes(s, 60.0)
            rows.append(f"| 4a | PUBLISH fan-out 20K users, P=2: >= 8,000 msg/s, p99 < 50 ms, 0 loss, <= 60 us/msg | "
                        f"{s['delivered_per_s']:.0f}/s, p99 {s['p99_ms']} ms, lost {s['lost']:.0f}, "
                        f"{s['gateway_us_per_msg']} us/msg | {verdict(ok)} |")
        kb = med(publish.runs, lambda x: x["hold"]["rss_per_conn_kb"])
        if hold is None:
            rows.append(f"| 2 | <= 10 KB RSS per idle connection | {kb:.1f} KB (20K) | {verdict(kb <= 10)} |")
        ms = med(publish.runs, lambda x: x["connect"]["gateway_ms_per_conn"])
        rows.append(f"| 5 | <= 0.5 ms server CPU per new connection | {ms:.3f} ms (20K at 2,000/s) | "
                    f"{verdict(ms <= 0.5)} |")
    http = gateway.get("20k-http-upstream")
    if http is not None:
        s = median_step(http.runs, "http", 3000)
        if s is not None:
            ok = step_passes(s, None)
            rows.append(f"| 4b | POST /broadcast >= 3,000 req/s, p99 < 50 ms, 0 loss | {s['delivered_per_s']:.0f}/s, "
                        f"p99 {s['p99_ms']} ms, lost {s['lost']:.0f}, {s['gateway_us_per_msg']} us/msg | "
                        f"{verdict(ok)} |")
        s = median_step(http.runs, "upstream", 6000)
        if s is not None:
            ok = step_passes(s, 80.0)
            rows.append(f"| 6 | upstream 20K drivers >= 6,000/s reach events, 0 loss, p99 < 50 ms, <= 80 us | "
                        f"{s['delivered_per_s']:.0f}/s, p99 {s['p99_ms']} ms, lost {s['lost']:.0f}, "
                        f"{s['gateway_us_per_msg']} us/update | {verdict(ok)} |")
    return rows


# --------------------------------------------------------------------------------------------
# recording: recorded paths against their unrecorded counterparts
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PathRuns:
    """One fan-out path at one rate: its step in each repeat, in repeat order (None where missing)."""

    label: str
    steps: list[StepReport | None]

    def present(self) -> list[StepReport]:
        return [s for s in self.steps if s is not None]

    def median(self, pick: Callable[[StepReport], float]) -> float:
        return median([pick(s) for s in self.present()])


def path_runs(o: Outcome, kind: str, rate: int, label: str) -> PathRuns:
    return PathRuns(label, [next((s for s in r["steps"] if s["kind"] == kind and s["target_rate"] == rate), None)
                            for r in o.runs])


def total_us(step: StepReport) -> float:
    """Gateway + Redis CPU per delivered message: recording moves work from the gateway into Redis
    (the Lua function), so only the sum says what a recorded message costs the platform."""
    return step["gateway_us_per_msg"] + step.get("redis_us_per_msg", 0.0)


def paired_ratio(recorded: PathRuns, unrecorded: PathRuns, pick: Callable[[StepReport], float]) -> float | None:
    """Median over repeats of recorded / unrecorded, each pair from the same repeat: the two were
    measured seconds apart (publish/fcall in one loadgen run) or in back-to-back runs (gateway and
    baseline), so the machine's drift over the whole bench cancels out of each pair."""
    ratios = [pick(r) / pick(u) for r, u in zip(recorded.steps, unrecorded.steps, strict=True)
              if r is not None and u is not None and pick(u) > 0 and r["delivered"]]
    return median(ratios) if ratios else None


def path_row(path: PathRuns, rate: int, ratios: tuple[float | None, float | None] | None) -> str:
    delivered = path.median(lambda s: s["delivered_per_s"])
    seq_share = path.median(lambda s: 100.0 * s["sequenced"] / s["delivered"] if s["delivered"] else 0.0)
    figures = (f"| {path.label} | {rate} | {delivered:.0f} | {path.median(lambda s: s['lost']):.0f} | "
               f"{path.median(lambda s: s['p99_ms']):.2f} | {seq_share:.0f}% | "
               f"{path.median(lambda s: s['gateway_us_per_msg']):.1f} | "
               f"{path.median(lambda s: s.get('redis_us_per_msg', 0.0)):.1f} | {path.median(total_us):.1f} |")
    if ratios is None:
        return figures + " (unrecorded) | | |"
    both, gateway_only = ratios
    if both is None or gateway_only is None:
        return figures + " - | - | nothing to compare |"
    return figures + (f" {both:.2f}x | {gateway_only:.2f}x | "
                      f"{'yes' if both <= RECORDING_CPU_BUDGET else 'NO'} |")


def pair_rows(unrecorded: PathRuns, recorded: PathRuns, rate: int) -> list[str]:
    ratios = (paired_ratio(recorded, unrecorded, total_us),
              paired_ratio(recorded, unrecorded, lambda s: s["gateway_us_per_msg"]))
    return [path_row(unrecorded, rate, None), path_row(recorded, rate, ratios)]


def recording_rows(outcomes: list[Outcome]) -> list[str]:
    """Each recorded path next to its unrecorded counterpart, rate by rate: FCALL against PUBLISH of
    the same message on the same gateway, POST /broadcast on this gateway against the baseline's."""
    rows = ["| path | target/s | delivered msg/s | lost | p99 ms | with seq | gateway us/msg | Redis us/msg | "
            "gateway+Redis us/msg | recorded / unrecorded (gateway+Redis) | gateway only | "
            f"within {RECORDING_CPU_BUDGET}x |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for scenario in dict.fromkeys(o.scenario for o in outcomes if o.scenario.recording):
        group = {o.server: o for o in outcomes if o.scenario == scenario}
        gateway, baseline = group.get("gateway"), group.get("baseline")
        if gateway is None:
            continue
        for kind, rate in step_keys(gateway.runs):
            if kind == "fcall":
                rows.extend(pair_rows(path_runs(gateway, "publish", rate, f"{scenario.name}: PUBLISH (live-only)"),
                                      path_runs(gateway, "fcall", rate, f"{scenario.name}: FCALL `<prefix>_publish`"),
                                      rate))
            elif kind == "http" and baseline is not None:
                rows.extend(pair_rows(path_runs(baseline, "http", rate, f"{scenario.name}: POST /broadcast, "
                                                                        f"{baseline.label}"),
                                      path_runs(gateway, "http", rate, f"{scenario.name}: POST /broadcast, gateway"),
                                      rate))
    return rows


def recording_section(outcomes: list[Outcome]) -> list[str]:
    if not any(o.scenario.recording for o in outcomes):
        return []
    return [
        f"#### Recording: recorded paths against unrecorded ones ({RECORDED_TYPE}, PROTOCOL.md 7.1)",
        "",
        f"Every message is a `{RECORDED_TYPE}` (a recorded type). PUBLISH and FCALL alternate rate by rate "
        "within each gateway run; POST /broadcast runs on this gateway (recorded) and on the baseline "
        "(published only) in interleaved runs. Figures are medians over repeats; a ratio is the median of "
        "the per-repeat ratios. \"with seq\" is the share of deliveries whose envelope carried `seq` "
        "(recorded). Redis CPU covers everything Redis did in the step window, as the gateway's CPU does "
        f"for the gateway. The budget: each recorded path within {RECORDING_CPU_BUDGET}x the gateway+Redis "
        "CPU per message of its unrecorded counterpart.",
        "",
        *recording_rows(outcomes),
        "",
    ]


def section(mode: str, outcomes: list[Outcome], repeats: int, argv: Sequence[str],
            calibration: tuple[float, float], bench_redis: BenchRedis) -> str:
    parts = [
        f"### Results: `{mode}` (generated by `python scripts/bench.py {' '.join(argv)}`, "
        f"median of {repeats} run(s) per server)",
        "",
        machine_description(calibration, bench_redis),
        "",
        "Loadgen commands (the bench starts each server with a fresh `REDIS_PREFIX`, `HEARTBEAT_INTERVAL=30`, "
        "`HEARTBEAT_TIMEOUT=75`, `LOG_LEVEL=WARNING`; socket.io uses Engine.IO ping 25 s / timeout 30 s):",
        "",
        "```",
        *sorted({f"loadgen.py -c {o.scenario.connections} --flavor {flavor(o.server)} "
                 f"{' '.join(o.scenario.args_for(o.server))}  # PROCESSES={o.scenario.processes}"
                 for o in outcomes}),
        "```",
        "",
        "#### Connections, memory, idle CPU",
        "",
        *summary_rows(outcomes),
        "",
        "#### Fan-out and upstream steps",
        "",
        *step_rows(outcomes),
        "",
        "#### Ratios (each figure of the other server divided by the gateway's, or the gateway's rate by "
        "the other's: above 1 favours the gateway)",
        "",
        *ratio_rows(outcomes),
        "",
        *recording_section(outcomes),
        "#### Targets",
        "",
        *target_rows(outcomes),
        "",
    ]
    return "\n".join(parts)


def write_section(mode: str, text: str) -> None:
    """Replace only this mode's generated block, so hand-written analysis and other modes survive."""
    start, end = f"<!-- bench:{mode}:start -->", f"<!-- bench:{mode}:end -->"
    block = f"{start}\n{text}\n{end}"
    doc = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    doc = pattern.sub(lambda _m: block, doc) if pattern.search(doc) else doc.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(doc)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench.py", description="Run the load scenarios against tornado-gateway and python-socketio and "
                                     "write medians and ratios into docs/BENCHMARKS.md.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="3,000 connections, short steps, and the recording comparison (~4 minutes a repeat)")
    mode.add_argument("--hold-100k", action="store_true", help="the 100,000-connection hold (gateway only by default)")
    parser.add_argument("--repeats", type=int, default=0, help="runs per server (default: 3 full, 1 quick/100k)")
    parser.add_argument("--servers", default="", help="comma list of gateway,socketio (default: both; 100k: gateway)")
    parser.add_argument("--baseline", default="", metavar="REF",
                        help="also run this git commit of the gateway (a temporary worktree), in the same runs")
    parser.add_argument("--hold-seconds", type=float, default=300.0, help="--hold-100k: seconds to hold")
    parser.add_argument("--connections", type=int, default=100_000, help="--hold-100k: connections")
    parser.add_argument("--processes", type=int, default=6, help="--hold-100k: PROCESSES of the server")
    parser.add_argument("--only", default="", metavar="NAMES",
                        help="comma list of scenarios to run, by name or last word (recording: quick-recording or "
                             "20k-recording); the results go to a section of their own, `<mode>-<names>`, so the "
                             "mode's full section is kept")
    parser.add_argument("--redis", default="", metavar="URL",
                        help="use this Redis instead of starting one (its CPU is then not measured)")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of editing the doc")
    return parser.parse_args(argv)


def select(scenarios: list[Scenario], only: str) -> list[Scenario]:
    names = [n for n in only.split(",") if n]
    if not names:
        return scenarios
    chosen = [s for s in scenarios if any(s.name == n or s.name.endswith("-" + n) for n in names)]
    if not chosen:
        raise SystemExit(f"bench.py: --only {only} matches none of {', '.join(s.name for s in scenarios)}")
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    default: tuple[Server, ...] = ("gateway",) if args.hold_100k else ("gateway", "socketio")
    servers = cast(tuple[Server, ...], tuple(s for s in args.servers.split(",") if s) or default)
    labels: dict[Server, str] = {"gateway": "gateway", "socketio": "socketio"}
    if args.baseline:
        labels["baseline"] = f"baseline ({make_baseline(args.baseline)})"
        servers = ("gateway", "baseline", *(s for s in servers if s not in ("gateway", "baseline")))
    if args.quick:
        mode, scenarios, repeats = "quick", quick_scenarios(servers), args.repeats or 1
    elif args.hold_100k:
        mode, repeats = "hold-100k", args.repeats or 1
        scenarios = hold_100k_scenarios(servers, args.hold_seconds, args.connections, args.processes)
    else:
        mode, scenarios, repeats = "full", full_scenarios(servers), args.repeats or 3
    scenarios = select(scenarios, args.only)
    if args.only:
        mode = "-".join([mode, *(n for n in args.only.split(",") if n)])
    bench_redis = BenchRedis(args.redis) if args.redis else start_redis()
    before = calibrate()
    try:
        outcomes = run_all(scenarios, repeats, labels, bench_redis)
        text = section(mode, outcomes, repeats, argv, (before, calibrate()), bench_redis)
    finally:
        stop_redis(bench_redis)
        if args.baseline:
            remove_baseline()
    if args.no_write:
        print(text)
    else:
        write_section(mode, text)
        print(f"\nwrote the `{mode}` section of {DOC.relative_to(ROOT)}")
    for o in outcomes:
        raw = Path(tempfile.gettempdir()) / "tornado-gateway-bench"  # raw runs; the doc holds the medians
        raw.mkdir(exist_ok=True)
        (raw / f"{mode}-{o.scenario.name}-{o.server}.json").write_text(json.dumps(o.runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
