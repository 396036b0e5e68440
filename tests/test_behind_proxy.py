"""Behind a real nginx (Debian's), running the documented conf/nginx.conf in front of two instances.

Clients connect through nginx, stay connected past nginx's read timeout thanks to heartbeats, are
counted by their own address by the per-IP limit; a broadcast through nginx without a key is refused;
forged forwarding headers change nothing when no proxy is trusted; nginx's access log holds no token;
browsers can keep the token out of the URL with the `bearer.<JWT>` subprotocol."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from scripts.loadgen import free_port
from tests.helpers import ROOT, Client, GatewayProcess, RawSocketClient, make_token, unique

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (.ci/run installs Debian's nginx)")

HEARTBEAT_S = 1.0
READ_TIMEOUT_S = 3  # the documented rule: longer than HEARTBEAT_INTERVAL
GATEWAY_ENV = {"HEARTBEAT_INTERVAL": str(HEARTBEAT_S), "HEARTBEAT_TIMEOUT": "10", "TRUSTED_PROXIES": "127.0.0.1",
               "CONNECT_RATE_PER_IP": "0.01", "CONNECT_BURST_PER_IP": "20"}
BURST = 20  # per address and instance; the other tests connect from 127.0.0.1, well within it


class Nginx:
    """conf/nginx.conf with this test's ports and paths, run in the foreground and stopped by pid."""

    def __init__(self, upstreams: list[int], read_timeout: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="nginx-"))
        self.port = free_port()
        self.access_log = self.dir / "access.log"
        conf = render(ROOT / "conf" / "nginx.conf", {
            "pid": f"pid {self.dir / 'nginx.pid'};",
            "error_log": f"error_log {self.dir / 'error.log'} warn;",
            "access_log": f"access_log {self.access_log} gateway;",
            "listen": f"listen 127.0.0.1:{self.port};",
            "read_timeout": f"proxy_read_timeout {read_timeout};",
        }, upstreams=[f"server 127.0.0.1:{port};" for port in upstreams])
        (self.dir / "nginx.conf").write_text(conf)
        assert NGINX is not None
        self.proc = subprocess.Popen([NGINX, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"),
                                      "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    error = self.proc.stderr.read() if self.proc.stderr else b""
                    raise RuntimeError(f"nginx did not start: {error!r}") from None
                time.sleep(0.05)

    def ws_url(self, **params: str) -> str:
        return f"ws://127.0.0.1:{self.port}/ws?" + "&".join(f"{k}={v}" for k, v in params.items())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


def render(path: Path, lines: dict[str, str], upstreams: list[str]) -> str:
    """Replace each line marked `# test: <name>` (the upstream lines by the test's own)."""
    out: list[str] = []
    for line in path.read_text().splitlines():
        marker = re.search(r"#\s*test:\s*(\w+)\s*$", line)
        if marker is None:
            out.append(line)
        elif marker.group(1) == "upstream":
            out.extend(upstreams)
            upstreams = []
        else:
            out.append(lines[marker.group(1)])
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def gateways(redis_url: str, prefix: str) -> Iterator[list[GatewayProcess]]:
    started = [GatewayProcess(redis_url, prefix, GATEWAY_ENV).start() for _ in range(2)]
    yield started
    for gateway in started:
        gateway.stop()


@pytest.fixture(scope="module")
def nginx(gateways: list[GatewayProcess]) -> Iterator[Nginx]:
    proxy = Nginx([g.port for g in gateways], f"{READ_TIMEOUT_S}s")
    yield proxy
    proxy.stop()


def connect_params(user: str, device: str = "d1", *, token: bool = True) -> dict[str, str]:
    params = {"userType": "driver", "deviceId": device, "platform": "web"}
    if token:
        params["token"] = make_token(user, "driver")
    return params


def upgrade_from(source: str, port: int, user: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """One WebSocket upgrade from a given local address; the first frame the server sends."""
    client = RawSocketClient(port, make_token(user, "driver"), "driver", unique("dev"), source=source, headers=headers)
    try:
        return client.read_json()
    finally:
        client.close()


async def test_clients_through_nginx_reach_both_instances_and_get_broadcasts(
        nginx: Nginx, gateways: list[GatewayProcess]) -> None:
    users = [unique("lb") for _ in range(6)]
    clients = [await Client.open(nginx.ws_url(**connect_params(user))) for user in users]
    servers = {(await client.recv("connected"))["payload"]["serverId"] for client in clients}
    assert servers == {g.server_id for g in gateways}
    for user, client in zip(users, clients, strict=True):
        assert (await gateways[0].http("POST", f"/broadcast/user/{user}",
                                       {"type": "notification", "payload": {"title": "t", "body": user}}))[0] == 202
        assert (await client.recv("notification"))["payload"]["body"] == user


async def test_heartbeats_keep_sockets_open_past_the_proxy_read_timeout(nginx: Nginx,
                                                                       gateways: list[GatewayProcess]) -> None:
    user = unique("lb")
    client = await Client.open(nginx.ws_url(**connect_params(user)))
    await client.recv("connected")
    await asyncio.sleep(READ_TIMEOUT_S * 2 + 1)  # idle but for the gateway's heartbeats
    await client.recv("heartbeat", timeout=HEARTBEAT_S * 3)
    assert (await gateways[1].http("POST", f"/broadcast/user/{user}",
                                   {"type": "notification", "payload": {"title": "t", "body": "late"}}))[0] == 202
    assert (await client.recv("notification"))["payload"]["body"] == "late"


async def test_a_read_timeout_shorter_than_the_heartbeat_interval_cuts_sockets(
        gateways: list[GatewayProcess]) -> None:
    short = Nginx([g.port for g in gateways], f"{int(HEARTBEAT_S * 500)}ms")
    try:
        client = await Client.open(short.ws_url(**connect_params(unique("lb"))))
        await client.recv("connected")
        code, _ = await client.closed(timeout=HEARTBEAT_S * 4)
        assert code in (None, 1006)  # nginx drops the TCP connection: no close frame
    finally:
        short.stop()


async def test_the_per_ip_limit_counts_each_client_address_behind_the_proxy(
        nginx: Nginx, gateways: list[GatewayProcess]) -> None:
    user = unique("lb")
    attempts = BURST * 2 + 10
    frames = [await asyncio.to_thread(upgrade_from, "127.0.0.2", nginx.port, user) for _ in range(attempts)]
    refused = [f for f in frames if f["type"] == "error" and f["payload"]["code"] == "RATE_LIMITED"]
    assert len(refused) >= attempts - BURST * 2  # the burst on each of the two instances, then refused
    other = await asyncio.to_thread(upgrade_from, "127.0.0.3", nginx.port, user)
    assert other["type"] == "connected"  # another address has its own allowance
    assert any("refused connection from 127.0.0.2" in g.log() for g in gateways)


async def test_without_trusted_proxies_forged_forwarding_headers_change_nothing(redis_url: str, prefix: str) -> None:
    gateway = GatewayProcess(redis_url, prefix, {**GATEWAY_ENV, "TRUSTED_PROXIES": "",
                                                 "CONNECT_BURST_PER_IP": "2"}).start()
    try:
        user = unique("lb")
        frames = [await asyncio.to_thread(upgrade_from, "127.0.0.4", gateway.port, user,
                                          {"X-Forwarded-For": f"203.0.113.{n}"}) for n in range(4)]
        assert [f["type"] for f in frames] == ["connected", "connected", "error", "error"]
        assert "203.0.113" not in gateway.log()
        status, _ = await gateway.http("POST", f"/broadcast/user/{user}",
                                       {"type": "notification", "payload": {"title": "t", "body": "b"}},
                                       headers={"X-Forwarded-For": "127.0.0.1"})
        assert status == 403  # a loopback caller with forwarding headers is treated as a proxy
    finally:
        gateway.stop()


def host_address() -> str | None:
    """This host's own non-loopback IPv4 address: a client that is not on loopback, for a proxy that is."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return str(address.address)
    return None


def post_from(source: str, port: int, path: str, body: dict[str, Any],
              headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)) as sock:
        sock.sendall(f"POST {path} HTTP/1.0\r\nHost: gateway\r\nContent-Length: {len(data)}\r\n{extra}\r\n".encode()
                     + data)
        response = b""
        while chunk := sock.recv(4096):
            response += chunk
    head, _, payload = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


async def test_broadcast_through_the_proxy_without_a_key_is_refused(nginx: Nginx,
                                                                   gateways: list[GatewayProcess]) -> None:
    source = host_address()
    if source is None:
        pytest.skip("this host has no non-loopback IPv4 address to act as a remote client")
    body = {"type": "notification", "payload": {"title": "t", "body": "b"}}
    assert (await gateways[0].http("POST", f"/broadcast/user/{unique('lb')}", body))[0] == 202  # direct
    status, reply = await asyncio.to_thread(post_from, source, nginx.port, f"/broadcast/user/{unique('lb')}", body)
    assert (status, reply["error"]) == (403, "FORBIDDEN")


async def test_broadcast_from_the_proxy_host_through_the_proxy_is_refused(nginx: Nginx) -> None:
    body = {"type": "notification", "payload": {"title": "t", "body": "b"}}
    status, _ = await asyncio.to_thread(post_from, "127.0.0.1", nginx.port, f"/broadcast/user/{unique('lb')}", body)
    assert status == 403  # the chain names only the trusted proxy's own address: no client is vouched for


@pytest.mark.parametrize("forged", ["Forwarded: for=127.0.0.1", "Forwarded: for=unknown", "Forwarded: proto=https",
                                    "X-Real-IP: 127.0.0.1", "X-Forwarded-For: 127.0.0.1"])
async def test_forged_forwarding_headers_through_the_proxy_cannot_open_broadcast(nginx: Nginx, forged: str) -> None:
    source = host_address()
    if source is None:
        pytest.skip("this host has no non-loopback IPv4 address to act as a remote client")
    name, value = forged.split(": ", 1)
    body = {"type": "notification", "payload": {"title": "t", "body": "b"}}
    status, reply = await asyncio.to_thread(post_from, source, nginx.port, f"/broadcast/user/{unique('lb')}", body,
                                            {name: value})
    assert (status, reply["error"]) == (403, "FORBIDDEN")


async def test_a_forged_forwarded_header_does_not_escape_the_per_ip_limit(nginx: Nginx) -> None:
    user = unique("lb")
    attempts = BURST * 2 + 10
    frames = [await asyncio.to_thread(upgrade_from, "127.0.0.6", nginx.port, user,
                                      {"Forwarded": f"for=198.18.0.{n}"}) for n in range(attempts)]
    refused = [f for f in frames if f["type"] == "error" and f["payload"]["code"] == "RATE_LIMITED"]
    assert len(refused) >= attempts - BURST * 2


async def test_the_token_can_travel_as_a_subprotocol_and_stays_out_of_the_access_log(nginx: Nginx) -> None:
    user = unique("lb")
    token = make_token(user, "driver")
    request = HTTPRequest(nginx.ws_url(**connect_params(user, token=False)), connect_timeout=5, request_timeout=5)
    ws = await websocket_connect(request, subprotocols=["tornado-gateway", f"bearer.{token}"])
    client = Client(ws)
    assert (await client.recv("connected"))["payload"]["userId"] == user
    assert ws.selected_subprotocol == "tornado-gateway"
    with_query = await Client.open(nginx.ws_url(**connect_params(unique("lb"))))
    await with_query.recv("connected")
    client.close()
    with_query.close()
    await asyncio.sleep(0.3)  # nginx writes the line when the connection ends
    log = nginx.access_log.read_text()
    assert "/ws " in log and "101" in log
    assert "token=" not in log and token not in log and "eyJ" not in log


def test_each_instance_says_its_broadcast_rule_at_start(gateways: list[GatewayProcess]) -> None:
    for gateway in gateways:
        assert "broadcast rule: GATEWAY_API_KEY is not set" in gateway.log()
        assert "refused unless a trusted proxy forwards it for a loopback client (trusted proxies: 127.0.0.1)" \
            in gateway.log()
