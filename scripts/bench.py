"""Benchmarks behind docs/BENCHMARKS.md: tornado-gateway next to python-socketio, same harness, same machine.

Why one script: numbers from different days, machines or harnesses are not comparable, so every
run starts both servers itself (fresh Redis prefix each time), drives them with scripts/loadgen.py,
takes medians over repeats, and rewrites its own section of docs/BENCHMARKS.md with the machine
description, the commands and the ratios. Hand-written text outside the generated sections is kept.

    python scripts/bench.py --quick          # ~2 minutes: 3,000 connections, short steps
    python scripts/bench.py                  # full: 20K users on 2 processes, stepped fan-out/upstream
    python scripts/bench.py --hold-100k      # 100,000 connections, PROCESSES=6, 5 minutes
    python scripts/bench.py --baseline 8569bb8   # also an older commit of the gateway, in the same runs

Repeats are interleaved (gateway, socketio, gateway, ...) so that a machine getting busier or
quieter during a run shifts every server alike, and a fixed pure-Python workload is timed before
and after ("calibration") so that sections written on different days can be put side by side.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
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

from scripts.loadgen import RunReport, StepReport  # noqa: E402 - needs ROOT on sys.path when run as a file

Server = Literal["gateway", "socketio", "baseline"]
SECRET = "bench-secret-0123456789abcdef-0123456789abcdef"
REDIS_URL = "redis://127.0.0.1:6379"
DOC = ROOT / "docs" / "BENCHMARKS.md"
LATENCY_RULE_MS = 50.0
BASELINE_DIR = Path(tempfile.gettempdir()) / "tornado-gateway-bench-baseline"


@dataclass(frozen=True)
class Scenario:
    """One loadgen invocation per server and repeat."""

    name: str
    connections: int
    processes: int
    loadgen_args: tuple[str, ...]
    servers: tuple[Server, ...]
    timeout_s: float


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
    return [Scenario("quick", 3000, 2, args, servers, 240)]


def full_scenarios(servers: tuple[Server, ...]) -> list[Scenario]:
    fanout = ("--connect-rate", "2000", "--hold", "40", "--fanout", "publish", "--rates", "2000,4000,8000,10000",
              "--step", "10")
    http = ("--connect-rate", "2000", "--hold", "5", "--fanout", "http", "--rates", "1000,2000,3000,4000",
            "--step", "10", "--upstream", "2000,4000,6000,8000")
    return [Scenario("20k-publish", 20000, 2, fanout, servers, 600),
            Scenario("20k-http-upstream", 20000, 2, http, servers, 600)]


def hold_100k_scenarios(servers: tuple[Server, ...], seconds: float, connections: int,
                        processes: int) -> list[Scenario]:
    args = ("--connect-rate", "1000", "--hold", str(seconds), "--concurrency", "700")
    return [Scenario("hold-100k", connections, processes, args, servers, seconds + connections / 1000 + 300)]


# --------------------------------------------------------------------------------------------
# servers
# --------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningServer:
    kind: Server
    proc: subprocess.Popen[bytes]
    port: int
    prefix: str
    log_path: Path


def start_server(kind: Server, processes: int) -> RunningServer:
    port = free_port()
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "JWT_SECRET": SECRET, "REDIS_URL": REDIS_URL, "REDIS_PREFIX": prefix, "PORT": str(port),
           "BIND_ADDRESS": "127.0.0.1", "STATSD_HOST": "", "HEARTBEAT_INTERVAL": "30", "HEARTBEAT_TIMEOUT": "75",
           "LOG_LEVEL": "WARNING", "PROCESSES": str(processes), "PYTHONUNBUFFERED": "1"}
    command = ([sys.executable, "-m", "tornado_gateway"] if kind != "socketio"
               else [sys.executable, str(ROOT / "scripts" / "socketio_server.py")])
    log_path = Path(tempfile.mkstemp(prefix=f"bench-{kind}-", suffix=".log")[1])
    with open(log_path, "ab") as log:
        # `-m` puts the working directory first on sys.path: the baseline runs its own checkout's code.
        proc = subprocess.Popen(command, env=env, cwd=BASELINE_DIR if kind == "baseline" else ROOT, stdout=log,
                                stderr=subprocess.STDOUT)
    server = RunningServer(kind, proc, port, prefix, log_path)
    wait_ready(server, processes)
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


def stop_server(server: RunningServer) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(60)
        except subprocess.TimeoutExpired:
            for child in psutil.Process(server.proc.pid).children(recursive=True):
                child.kill()
            server.proc.kill()
            server.proc.wait(10)
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{server.prefix}:*", count=1000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start:start + 1000])
    client.close()
    server.log_path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------

def flavor(kind: Server) -> str:
    return "socketio" if kind == "socketio" else "gateway"


def loadgen_command(scenario: Scenario, server: RunningServer, json_path: Path) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "loadgen.py"), "--url", f"ws://127.0.0.1:{server.port}",
            "--flavor", flavor(server.kind), "--secret", SECRET, "--prefix", server.prefix, "--redis", REDIS_URL,
            "--server-pid", str(server.proc.pid), "-c", str(scenario.connections), "--json", str(json_path),
            *scenario.loadgen_args]


def run_once(scenario: Scenario, kind: Server) -> RunReport:
    server = start_server(kind, scenario.processes)
    json_path = Path(tempfile.mkstemp(prefix="loadgen-", suffix=".json")[1])
    try:
        command = loadgen_command(scenario, server, json_path)
        print(f"\n=== {scenario.name} / {kind} (PROCESSES={scenario.processes}) ===", flush=True)
        print("$ " + " ".join(command[1:]).replace(str(ROOT) + "/", ""), flush=True)
        subprocess.run(command, check=False, timeout=scenario.timeout_s, cwd=ROOT)
        text = json_path.read_text()
        if not text:
            raise RuntimeError(f"loadgen wrote no report for {scenario.name}/{kind}")
        return cast(RunReport, json.loads(text))
    finally:
        stop_server(server)
        json_path.unlink(missing_ok=True)


def run_all(scenarios: list[Scenario], repeats: int, labels: dict[Server, str]) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for scenario in scenarios:
        by_kind = {kind: Outcome(scenario, kind, labels.get(kind, kind)) for kind in scenario.servers}
        for _ in range(repeats):
            for kind, outcome in by_kind.items():
                outcome.runs.append(run_once(scenario, kind))
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

def machine_description(calibration: tuple[float, float]) -> str:
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
        f"- Redis: {redis.Redis.from_url(REDIS_URL).info('server').get('redis_version', '?')} on 127.0.0.1:6379 "
        "(the same box)",
        f"- calibration (`bench.calibrate`, a fixed pure-Python workload; lower is a faster machine): "
        f"{calibration[0]:.0f} ms before the runs, {calibration[1]:.0f} ms after",
    ])


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
            "server us/msg | server CPU % | loadgen CPU % | publisher CPU % |",
            "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for o in outcomes:
        for kind, rate in step_keys(o.runs):
            s = median_step(o.runs, kind, rate)
            if s is None:
                continue
            rows.append(f"| {o.scenario.name} | {kind} | {rate} | {o.label} | {s['delivered_per_s']:.0f} | "
                        f"{s['lost']:.0f} | {s['p50_ms']} | {s['p99_ms']} | {s['max_ms']} | "
                        f"{s['gateway_us_per_msg']} | {s['gateway_cpu_pct']} | {s['loadgen_cpu_pct']} | "
                        f"{s['driver_cpu_pct']} |")
    return rows


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
    for kind in ("publish", "http", "upstream"):
        ga, gs = best_rate(g, kind, None)
        oa, os_ = best_rate(o, kind, None)
        if gs is None and os_ is None:
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


def section(mode: str, outcomes: list[Outcome], repeats: int, argv: Sequence[str],
            calibration: tuple[float, float]) -> str:
    parts = [
        f"### Results: `{mode}` (generated by `python scripts/bench.py {' '.join(argv)}`, "
        f"median of {repeats} run(s) per server)",
        "",
        machine_description(calibration),
        "",
        "Loadgen commands (the bench starts each server with a fresh `REDIS_PREFIX`, `HEARTBEAT_INTERVAL=30`, "
        "`HEARTBEAT_TIMEOUT=75`, `LOG_LEVEL=WARNING`; socket.io uses Engine.IO ping 25 s / timeout 30 s):",
        "",
        "```",
        *sorted({f"loadgen.py -c {o.scenario.connections} --flavor {flavor(o.server)} "
                 f"{' '.join(o.scenario.loadgen_args)}  # PROCESSES={o.scenario.processes}" for o in outcomes}),
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
    mode.add_argument("--quick", action="store_true", help="3,000 connections, short steps (~2 minutes)")
    mode.add_argument("--hold-100k", action="store_true", help="the 100,000-connection hold (gateway only by default)")
    parser.add_argument("--repeats", type=int, default=0, help="runs per server (default: 3 full, 1 quick/100k)")
    parser.add_argument("--servers", default="", help="comma list of gateway,socketio (default: both; 100k: gateway)")
    parser.add_argument("--baseline", default="", metavar="REF",
                        help="also run this git commit of the gateway (a temporary worktree), in the same runs")
    parser.add_argument("--hold-seconds", type=float, default=300.0, help="--hold-100k: seconds to hold")
    parser.add_argument("--connections", type=int, default=100_000, help="--hold-100k: connections")
    parser.add_argument("--processes", type=int, default=6, help="--hold-100k: PROCESSES of the server")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of editing the doc")
    return parser.parse_args(argv)


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
    before = calibrate()
    try:
        outcomes = run_all(scenarios, repeats, labels)
    finally:
        if args.baseline:
            remove_baseline()
    text = section(mode, outcomes, repeats, argv, (before, calibrate()))
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
