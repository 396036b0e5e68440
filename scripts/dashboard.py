"""The on-call dashboard, defined once: the Grafana dashboard (conf/grafana/gateway-dashboard.json), the
graphite-web render URLs (docs/dashboard/README.md) and, with `make dashboard`, the same graphs
rendered to PNG by graphite-web from a short scripted load.

`make dashboard` (`python -m scripts.dashboard`) starts the metrics stack of scripts/metrics_stack.py
(the Etsy StatsD daemon, carbon-cache, graphite-web), a redis-server of its own and two gateway
instances on free loopback ports, runs about 35 s of load against them (clients of the four user
types answering heartbeats, drivers streaming locations, services recording messages with the Redis
function and publishing driver locations, a few bad requests, a subscriber reconnect, clients that
stop reading or stop answering heartbeats, closes and replacements), then renders every panel with
graphite-web's render API into docs/dashboard/<panel>.png. Every process it starts is stopped by pid.

`python -m scripts.dashboard --definitions-only` rewrites the Grafana JSON and the render-URL page
without running anything (tests/test_metrics_catalogue.py checks that they are up to date).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import redis.asyncio as aredis
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from scripts.loadgen import free_port, publish_function
from scripts.metrics_stack import MetricsStack, missing_tools

ROOT = Path(__file__).resolve().parent.parent
GRAFANA_JSON = ROOT / "conf" / "grafana" / "gateway-dashboard.json"
DOCS_DIR = ROOT / "docs" / "dashboard"
USER_TYPES = ("driver", "rider", "restaurant", "delivery_partner")
P = "$prefix"  # the Grafana variable (STATSD_PREFIX, `gateway` by default)


@dataclass(frozen=True)
class Panel:
    id: str
    title: str
    targets: tuple[str, ...]
    unit: str
    description: str


PANELS: tuple[Panel, ...] = (
    Panel("connections_by_type", "Connections by user type (cluster)",
          (f"groupByNode(stats.gauges.{P}.instance.*.connections.active.{{{','.join(USER_TYPES)}}}, -1, 'sumSeries')",),
          "short", "Open connections per user type, summed over the instances' gauges."),
    Panel("connections_by_instance", "Connections by instance",
          (f"aliasByNode(stats.gauges.{P}.instance.*.connections.active.total, -4)",),
          "short", "Open connections on each instance (serverId)."),
    Panel("connects_and_closes", "Connects and closes by reason (per second)",
          (f"alias(stats.counters.{P}.connections.opened.rate, 'opened')",
           f"aliasSub(stats.counters.{P}.connections.closed.*.rate, '.*\\.closed\\.([^.]+)\\.rate', 'closed \\1')",
           f"aliasSub(stats.counters.{P}.connections.rejected.*.rate, '.*\\.rejected\\.([^.]+)\\.rate', "
           f"'refused \\1')"),
          "reqps", "Connections that got `connected`, closes by reason, refused upgrades by close code."),
    Panel("messages_in", "Messages in by type (per second)",
          (f"aliasByNode(stats.counters.{P}.messages.in.*.rate, -2)",),
          "reqps", "Accepted client messages, by type."),
    Panel("messages_out", "Messages out by type (per second)",
          (f"aliasByNode(stats.counters.{P}.messages.out.*.rate, -2)",),
          "reqps", "Frames written to devices, by service message type."),
    Panel("delivery_latency", "Delivery latency p50 / p99 (ms)",
          (f"aliasSub(stats.timers.{P}.delivery_ms.*.median, '.*delivery_ms\\.([^.]+)\\.median', '\\1 p50')",
           f"aliasSub(stats.timers.{P}.delivery_ms.*.upper_99, '.*delivery_ms\\.([^.]+)\\.upper_99', '\\1 p99')"),
          "ms", "From a recorded message's timestamp to its socket write, by type."),
    Panel("errors_by_code", "Errors sent by code (per second)",
          (f"aliasByNode(stats.counters.{P}.errors.*.rate, -2)",),
          "reqps", "`error` frames sent to clients, by code."),
    Panel("redis_health", "Redis: subscriber reconnects, probe failures, errors (per second)",
          (f"alias(stats.counters.{P}.redis.errors.rate, 'Redis errors')",
           f"alias(stats.counters.{P}.redis.probe_failures.rate, 'probe failures')",
           f"alias(stats.counters.{P}.redis.reconnects.rate, 'subscriber reconnects')"),
          "reqps", "Any of these above zero is worth a look; probe failures turn /ready 503."),
    Panel("redis_probe_ms", "Redis self-probe round trip (ms)",
          (f"alias(stats.timers.{P}.redis.probe_ms.median, 'p50')",
           f"alias(stats.timers.{P}.redis.probe_ms.upper_99, 'p99')"),
          "ms", "PUBLISH to the instance's own channel and back through its subscription."),
    Panel("slow_consumers", "Slow consumers (per second)",
          (f"alias(stats.counters.{P}.connections.closed.slow_consumer.rate, 'closed 4503 (not reading)')",
           f"alias(stats.counters.{P}.messages.dropped.coalesced.rate, 'coalesced (superseded)')"),
          "reqps", "Clients closed because they stopped reading; latest-value messages they skipped."),
    Panel("heartbeat_tick", "Heartbeat tick time (ms)",
          (f"alias(stats.timers.{P}.heartbeat.tick_ms.median, 'p50')",
           f"alias(stats.timers.{P}.heartbeat.tick_ms.upper_99, 'p99')",
           f"alias(stats.timers.{P}.heartbeat.tick_ms.upper, 'max')"),
          "ms", "Time the event loop spends in one heartbeat bucket: a rising line means a busy loop."),
)


def concrete(target: str, prefix: str = "gateway") -> str:
    return target.replace(P, prefix)


def render_query(panel: Panel, prefix: str = "gateway", since: str = "-1h") -> str:
    """The panel as a graphite-web URL path, readable: only what a URL cannot carry is escaped."""
    params = [*(("target", concrete(t, prefix)) for t in panel.targets), ("from", since),
              ("title", panel.title), ("width", "900"), ("height", "320")]
    return "/render?" + "&".join(f"{key}={urllib.parse.quote(value, safe=READABLE)}" for key, value in params)


READABLE = "(),.*{}'_-:/"  # braces are globs to curl: `curl -g`


# --- definitions --------------------------------------------------------------------------------

def grafana_dashboard() -> dict[str, Any]:
    datasource = {"type": "graphite", "uid": "${DS_GRAPHITE}"}
    panels = []
    for index, panel in enumerate(PANELS):
        panels.append({
            "id": index + 1,
            "type": "timeseries",
            "title": panel.title,
            "description": panel.description,
            "datasource": datasource,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
            "targets": [{"refId": chr(ord("A") + i), "datasource": datasource, "target": target}
                        for i, target in enumerate(panel.targets)],
            "fieldConfig": {"defaults": {"unit": panel.unit, "min": 0,
                                         "custom": {"lineWidth": 1, "fillOpacity": 10, "spanNulls": True}},
                            "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}},
        })
    return {
        "__inputs": [{"name": "DS_GRAPHITE", "label": "Graphite", "description": "the Graphite that StatsD feeds",
                      "type": "datasource", "pluginId": "graphite", "pluginName": "Graphite"}],
        "__requires": [{"type": "grafana", "id": "grafana", "name": "Grafana", "version": "9.0.0"},
                       {"type": "datasource", "id": "graphite", "name": "Graphite", "version": "1.0.0"},
                       {"type": "panel", "id": "timeseries", "name": "Time series", "version": ""}],
        "title": "tornado-gateway",
        "uid": "tornado-gateway",
        "description": "On-call view of the WebSocket gateway (StatsD -> Graphite). Generated by scripts/dashboard.py.",
        "tags": ["tornado-gateway", "statsd"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 38,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [{
            "name": "prefix", "label": "STATSD_PREFIX", "type": "textbox", "query": "gateway", "hide": 0,
            "description": "the gateways' STATSD_PREFIX",
            "current": {"selected": False, "text": "gateway", "value": "gateway"},
            "options": [{"selected": True, "text": "gateway", "value": "gateway"}],
        }]},
        "panels": panels,
    }


def grafana_json() -> str:
    return json.dumps(grafana_dashboard(), indent=2) + "\n"


def docs_markdown() -> str:
    lines = [
        "# Dashboard",
        "",
        "Generated by `scripts/dashboard.py` (`make dashboard` renders the pictures from a ~35 s scripted load",
        "against two local instances, through the real StatsD daemon, carbon-cache and graphite-web; the",
        "Grafana dashboard with the same panels is [conf/grafana/gateway-dashboard.json]"
        "(../../conf/grafana/gateway-dashboard.json)).",
        "",
        "Each panel's Graphite targets and graphite-web render URL, for `STATSD_PREFIX=gateway` (prepend",
        "your graphite-web's address, e.g. `curl -g -o panel.png 'http://graphite:8080/render?...'`; add",
        "`&format=json` for the numbers, `&from=-24h` for another window). The Grafana panels use the",
        "same targets with `$prefix`.",
        "",
    ]
    for panel in PANELS:
        lines += [f"## {panel.title}", "", panel.description, "", "```", *(concrete(t) for t in panel.targets),
                  "```", "", "```", render_query(panel), "```", "", f"![{panel.title}]({panel.id}.png)", ""]
    return "\n".join(lines)


def write_definitions() -> None:
    GRAFANA_JSON.parent.mkdir(parents=True, exist_ok=True)
    GRAFANA_JSON.write_text(grafana_json())
    DOCS_DIR.mkdir(parents=True, exist_ok=True)
    (DOCS_DIR / "README.md").write_text(docs_markdown())


# --- the scripted load --------------------------------------------------------------------------

SECRET = "dashboard-secret-0123456789-0123456789-abc"


def token(user: str, user_type: str, secret: str = SECRET) -> str:
    return jwt.encode({"sub": user, "userType": user_type, "exp": int(time.time()) + 3600}, secret, algorithm="HS256")


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=workdir)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            if s.recv(16).startswith(b"+PONG"):
                return proc, port
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def start_gateway(workdir: Path, name: str, redis_port: int,
                  stack: MetricsStack) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {**os.environ, "PORT": str(port), "BIND_ADDRESS": "127.0.0.1", "REDIS_URL": f"redis://127.0.0.1:{redis_port}",
           "REDIS_PREFIX": "gateway", "JWT_SECRET": SECRET, "SERVER_ID": name, "STATSD_HOST": "127.0.0.1",
           "STATSD_PORT": str(stack.statsd_port), "STATSD_PREFIX": "gateway", "LOG_LEVEL": "WARNING",
           "HEARTBEAT_INTERVAL": "1", "HEARTBEAT_TIMEOUT": "3", "INSTANCE_TTL": "3", "PROBE_INTERVAL": "0.5",
           "PROBE_TIMEOUT": "1", "MAX_OUTBOUND_BUFFER": "65536", "SOCKET_SNDBUF": "8192",
           "SHUTDOWN_DRAIN_SECONDS": "0.5"}
    with open(workdir / f"{name}.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tornado_gateway"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway {name} exited: {(workdir / f'{name}.log').read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"GET /ready HTTP/1.0\r\n\r\n")
            if b" 200 " in s.recv(100):
                return proc, port
        time.sleep(0.1)
    raise RuntimeError(f"gateway {name} did not become ready")


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class LoadClient:
    """One app: answers heartbeats (until told not to), streams locations if it moves, sends receipts."""

    def __init__(self, port: int, user: str, user_type: str, device: str) -> None:
        self.port, self.user, self.user_type, self.device = port, user, user_type, device
        self.ws: WebSocketClientConnection | None = None
        self.answer_heartbeats = True
        self.closed = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def open(self) -> LoadClient:
        url = (f"ws://127.0.0.1:{self.port}/ws?token={token(self.user, self.user_type)}&userType={self.user_type}"
               f"&deviceId={self.device}&platform={random.choice(('ios', 'android', 'web'))}")
        self.ws = await websocket_connect(HTTPRequest(url, connect_timeout=5, request_timeout=5))
        self.tasks.append(asyncio.ensure_future(self._read()))
        if self.user_type in ("driver", "delivery_partner"):
            self.tasks.append(asyncio.ensure_future(self._move()))
        return self

    def send(self, frame: dict[str, Any]) -> None:
        if self.ws is not None and not self.closed.is_set():
            with contextlib.suppress(Exception):
                self.ws.write_message(json.dumps(frame))

    async def _read(self) -> None:
        assert self.ws is not None
        while True:
            raw = await self.ws.read_message()
            if raw is None:
                break
            frame = json.loads(raw)
            if frame["type"] == "heartbeat" and self.answer_heartbeats:
                self.send({"type": "heartbeat_ack", "payload": {"timestamp": int(time.time() * 1000)}})
            elif frame.get("receipt"):
                self.send({"type": "receipt", "payload": {"messageId": frame["id"]}})
        self.closed.set()

    async def _move(self) -> None:
        n = 0
        while not self.closed.is_set():
            await asyncio.sleep(random.uniform(0.7, 1.3))
            n += 1
            self.send({"type": "location_update", "id": f"{self.device}-{n}",
                       "payload": {"latitude": 12.97 + random.random() / 100, "longitude": 77.59, "timestamp":
                                   int(time.time() * 1000), "speed": 8.5}})
            if n % 10 == 0:
                self.send({"type": "dispatch_response", "id": f"{self.device}-d{n}",
                           "payload": {"requestId": f"r{n}", "action": random.choice(("accept", "reject"))}})

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
        for task in self.tasks:
            task.cancel()


async def stuck_client(port: int, user: str) -> socket.socket:
    """A phone that stopped reading: a tiny receive buffer and no reads after the upgrade."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    request = (f"GET /ws?token={token(user, 'rider')}&userType=rider&deviceId=stuck&platform=android HTTP/1.1\r\n"
               f"Host: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    await loop.sock_sendall(sock, request.encode())
    await asyncio.sleep(0.3)
    return sock


class Load:
    def __init__(self, ports: list[int], redis_port: int) -> None:
        self.ports = ports
        self.redis = aredis.Redis(host="127.0.0.1", port=redis_port)
        self.function = publish_function("gateway")
        self.clients: list[LoadClient] = []
        self.opened = 0
        self.http = AsyncHTTPClient()

    def users(self, user_type: str) -> list[LoadClient]:
        return [c for c in self.clients if c.user_type == user_type and not c.closed.is_set()]

    async def connect(self, count: int, over_s: float) -> None:
        mix = ("driver", "driver", "rider", "rider", "rider", "restaurant", "delivery_partner")  # roughly a city's
        for _ in range(count):
            self.opened += 1
            user_type = random.choice(mix)
            client = LoadClient(self.ports[self.opened % 2], f"{user_type}-{self.opened}", user_type,
                                f"dev-{self.opened}")
            with contextlib.suppress(Exception):
                self.clients.append(await client.open())
            await asyncio.sleep(over_s / count)

    async def services(self, until: float) -> None:
        """Ride, Food and Dispatch: recorded messages through the Redis function, locations by PUBLISH."""
        n = 0
        while time.monotonic() < until:
            n += 1
            batch: list[tuple[str, str, dict[str, Any], bool]] = []
            for client in random.sample(self.users("driver"), min(3, len(self.users("driver")))):
                batch.append((client.user, "ride_request", {"requestId": f"r{n}", "pickup": "MG Road"}, True))
            for client in random.sample(self.users("rider"), min(4, len(self.users("rider")))):
                batch.append((client.user, "ride_status", {"rideId": f"t{n}", "status": "driver_arriving"}, False))
            for client in random.sample(self.users("restaurant"), min(2, len(self.users("restaurant")))):
                batch.append((client.user, "order_status", {"orderId": f"o{n}", "status": "placed"}, False))
            for client in random.sample(self.users("delivery_partner"), min(2, len(self.users("delivery_partner")))):
                batch.append((client.user, "notification", {"title": "New order", "body": f"o{n}"}, False))
            for user, kind, payload, receipt in batch:
                message = {"type": kind, "payload": payload, **({"receipt": True} if receipt else {})}
                with contextlib.suppress(Exception):
                    await self.redis.fcall(self.function, 1, user, json.dumps(message))
            for client in random.sample(self.users("rider"), min(8, len(self.users("rider")))):
                location = {"type": "driver_location",
                            "payload": {"driverId": "d1", "latitude": 12.9, "longitude": 77.6, "rideId": f"t{n}"}}
                await self.redis.publish(f"gateway:user:{client.user}", json.dumps(location))
            if n % 5 == 0 and self.users("rider"):
                await self.broadcast(random.choice(self.users("rider")).user,
                                     {"type": "eta_update", "payload": {"rideId": f"t{n}", "etaSeconds": 240}})
            await asyncio.sleep(0.2)

    async def broadcast(self, user: str, body: dict[str, Any]) -> None:
        with contextlib.suppress(HTTPClientError, OSError):
            await self.http.fetch(f"http://127.0.0.1:{random.choice(self.ports)}/broadcast/user/{user}", method="POST",
                                  body=json.dumps(body))

    async def mistakes(self, until: float) -> None:
        while time.monotonic() < until:
            await asyncio.sleep(1.0)
            riders, restaurants = self.users("rider"), self.users("restaurant")
            if riders:
                random.choice(riders).send({"type": "location_update", "payload": {"latitude": 1, "longitude": 2,
                                                                                    "timestamp": 3}})
            if restaurants:
                random.choice(restaurants).send({"type": "order_accept", "payload": {}})
            if riders and random.random() < 0.5:
                random.choice(riders).send({"type": "receipt", "payload": {}})

    async def refused(self, count: int) -> None:
        for i in range(count):
            url = (f"ws://127.0.0.1:{self.ports[i % 2]}/ws?token={token('x', 'rider', 'wrong-secret-' + 'x' * 30)}"
                   "&userType=rider&deviceId=d&platform=ios")
            with contextlib.suppress(Exception):
                ws = await websocket_connect(url)
                await ws.read_message()
                ws.close()

    async def subscriber_reconnects(self) -> None:
        """What a Redis failover or a NAT timeout does to the instances' pub/sub connections."""
        await self.redis.client_kill_filter(_type="pubsub")

    async def slow_consumers(self, count: int) -> list[socket.socket]:
        stuck = [await stuck_client(self.ports[i % 2], f"stuck-{i}") for i in range(count)]
        body = "x" * 4000
        for _ in range(40):
            for i in range(count):
                message = {"type": "notification", "payload": {"title": "promo", "body": body}}
                with contextlib.suppress(Exception):
                    await self.redis.fcall(self.function, 1, f"stuck-{i}", json.dumps(message))
            await asyncio.sleep(0.05)
        return stuck

    async def run(self) -> None:
        start = time.monotonic()
        end = start + 34
        await self.connect(120, over_s=6)
        background = [asyncio.ensure_future(self.services(end - 2)), asyncio.ensure_future(self.mistakes(end - 4))]
        await asyncio.sleep(start + 10 - time.monotonic())
        for _ in range(3):  # a flapping link: a probe may find the subscription gone (probe failures)
            await self.subscriber_reconnects()
            await asyncio.sleep(0.8)
        stuck = await self.slow_consumers(4)
        await self.refused(6)
        await asyncio.sleep(max(0.0, start + 18 - time.monotonic()))
        for client in self.users("rider")[:10]:  # phones that went to sleep: closed with 4408
            client.answer_heartbeats = False
        await asyncio.sleep(4)
        for client in self.users("driver")[:8]:  # apps relaunched on the same device: the old socket gets 4409
            replacement = LoadClient(random.choice(self.ports), client.user, client.user_type, client.device)
            with contextlib.suppress(Exception):
                self.clients.append(await replacement.open())
        await asyncio.sleep(2)
        for client in [c for c in self.clients if not c.closed.is_set()][::3]:  # users leaving
            client.close()
        await self.connect(20, over_s=3)  # and new ones coming
        await asyncio.gather(*background)
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        for client in self.clients:
            client.close()
        for sock in stuck:
            sock.close()
        await self.redis.aclose()


def render_all(stack: MetricsStack, since: int, until: int) -> list[Path]:
    DOCS_DIR.mkdir(parents=True, exist_ok=True)
    written = []
    for panel in PANELS:
        path = DOCS_DIR / f"{panel.id}.png"
        stack.render_png(path, [concrete(t) for t in panel.targets], title=panel.title, since=str(since),
                         until=str(until), extra={"yMin": "0"})
        written.append(path)
    return written


def run_dashboard() -> list[Path]:
    missing = missing_tools(graphite_web=True)
    if missing:
        raise SystemExit(f"make dashboard needs: {', '.join(missing)} (.ci/run installs them from Debian)")
    with MetricsStack(graphite_web=True) as stack:
        redis_proc: subprocess.Popen[bytes] | None = None
        gateways: list[subprocess.Popen[bytes]] = []
        try:
            redis_proc, redis_port = start_redis(stack.dir)
            ports = []
            for name in ("gw-a", "gw-b"):
                proc, port = start_gateway(stack.dir, name, redis_port, stack)
                gateways.append(proc)
                ports.append(port)
            since = int(time.time()) - 3
            print(f"load: 2 instances, ~35 s (StatsD on :{stack.statsd_port}, graphite-web on :{stack.web_port})")
            asyncio.run(Load(ports, redis_port).run())
            time.sleep(1.5)
            for proc in gateways:  # a graceful stop: their gauges end at 0
                stop_process(proc)
            time.sleep(3.0)  # the last StatsD flush and carbon's write
            written = render_all(stack, since, int(time.time()))
        finally:
            for proc in gateways:
                stop_process(proc)
            stop_process(redis_proc)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--definitions-only", action="store_true",
                        help="write the Grafana JSON and docs/dashboard/README.md, run nothing")
    args = parser.parse_args(argv)
    write_definitions()
    print(f"wrote {GRAFANA_JSON.relative_to(ROOT)} and {(DOCS_DIR / 'README.md').relative_to(ROOT)}")
    if args.definitions_only:
        return 0
    for path in run_dashboard():
        print(f"rendered {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
