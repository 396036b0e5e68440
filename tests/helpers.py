"""Real processes, real sockets: a gateway process, a WebSocket client, a private redis-server.

Everything here talks over loopback; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPResponse
from tornado.websocket import WebSocketClientConnection, websocket_connect

from scripts.loadgen import free_port

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-0123456789-0123456789-abcdef"
SHARED_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")


def make_token(sub: str = "u1", user_type: str = "driver", *, secret: str = SECRET, ttl_s: float = 3600,
               algorithm: str = "HS256", **claims: Any) -> str:
    now = int(time.time())
    body: dict[str, Any] = {"sub": sub, "userType": user_type, "iat": now, "exp": now + int(ttl_s)}
    body.update(claims)
    for key in [k for k, v in body.items() if v is None]:
        del body[key]
    return jwt.encode(body, secret, algorithm=algorithm)


def unique(prefix: str = "u") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class RedisServer:
    """A redis-server owned by one test, so the test may stop and restart it."""

    def __init__(self, *, persistent: bool = False, snapshots: bool = False) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        # Persistent: an append-only file synced on every write, so a restart brings back what was there.
        # Snapshots: RDB only, written when the test says SAVE; a restart brings back the last one.
        self.data_dir = tempfile.mkdtemp(prefix="redis-test-") if persistent or snapshots else None
        self.aof = persistent

    def start(self) -> None:
        storage = ["--save", "", "--appendonly", "no"]
        if self.data_dir:
            storage = ["--dir", self.data_dir, "--save", ""]
            storage += ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", *storage],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url, socket_connect_timeout=0.2).ping():
                    return
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def remove_data(self) -> None:
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


class GatewayProcess:
    """`python -m tornado_gateway` with its own port and environment; its log goes to a file."""

    def __init__(self, redis_url: str, prefix: str, env: Mapping[str, str] | None = None,
                 args: list[str] | None = None) -> None:
        self.port = free_port()
        self.redis_url = redis_url
        self.prefix = prefix
        self.server_id = unique("gw")
        self.log_path = Path(tempfile.mkstemp(prefix="gateway-", suffix=".log")[1])
        self.env = {
            **os.environ,
            "PORT": str(self.port), "BIND_ADDRESS": "127.0.0.1", "REDIS_URL": redis_url, "REDIS_PREFIX": prefix,
            "JWT_SECRET": SECRET, "SERVER_ID": self.server_id, "STATSD_HOST": "", "LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.args = args or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait_ready: bool = True, wait: bool = True) -> GatewayProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen([sys.executable, "-m", "tornado_gateway", *self.args], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        log.close()
        if not wait:
            return self
        return self.wait_started(wait_ready=wait_ready)

    def wait_started(self, *, wait_ready: bool = True) -> GatewayProcess:
        """Block until `/ready` (or `/health`) answers 200: for processes started with wait=False, so
        that several start side by side (`start_all`)."""
        assert self.proc is not None
        path = "/ready" if wait_ready else "/health"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
                    if b" 200 " in s.recv(100):
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"gateway did not become ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 15) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        with contextlib.suppress(OSError):
            self.log_path.unlink()

    def ws_url(self, **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"ws://127.0.0.1:{self.port}/ws?{query}"

    async def connect(self, user_id: str | None = None, user_type: str = "driver", device_id: str = "d1",
                      platform: str = "ios", token: str | None = None, headers: Mapping[str, str] | None = None,
                      expect_connected: bool = True) -> Client:
        user_id = user_id or unique()
        params = {"userType": user_type, "deviceId": device_id, "platform": platform}
        if token is None:
            token = make_token(user_id, user_type)
        if token:
            params["token"] = token
        client = await Client.open(self.ws_url(**params), headers=headers)
        client.user_id = user_id
        if expect_connected:
            connected = await client.recv("connected")
            client.connection_id = connected["payload"]["connectionId"]
        return client

    async def ready(self) -> bool:
        try:
            return (await self.http("GET", "/ready"))[0] == 200
        except OSError:  # not listening yet
            return False

    async def until_ready(self, timeout: float = 15.0) -> GatewayProcess:
        """For a gateway started with wait=False whose way to Redis runs in the test's own loop (a
        proxy): a synchronous wait for it would keep that loop from relaying anything."""
        await eventually(self.ready, timeout=timeout)
        return self

    async def http(self, method: str, path: str, body: Any = None, headers: Mapping[str, str] | None = None,
                   raw: bytes | None = None) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        try:
            response: HTTPResponse = await AsyncHTTPClient().fetch(
                self.base + path, method=method, body=data, headers=dict(headers or {}), raise_error=True,
                allow_nonstandard_methods=True)
        except HTTPClientError as exc:
            assert exc.response is not None
            response = exc.response
        text = response.body.decode() if response.body else ""
        try:
            return response.code, json.loads(text) if text else None
        except ValueError:
            return response.code, text


def start_all(*gateways: GatewayProcess) -> list[GatewayProcess]:
    """Start the processes side by side and wait until each is ready (what one start() does, in parallel)."""
    for gateway in gateways:
        gateway.start(wait=False)
    return [gateway.wait_started() for gateway in gateways]


async def read_within(ws: WebSocketClientConnection, timeout: float) -> str | bytes | None:
    """The next message (None once closed), or TimeoutError after `timeout` seconds.

    Not asyncio.wait_for: on Python 3.11 it swallows a cancellation that arrives while the message it
    waits for is already there (it returns the message instead, python/cpython#86296, fixed in 3.12),
    so a reader task cancelled by a test's teardown could keep reading until the gateway closed its
    socket: a heartbeat timeout 4408 about 90 s later. asyncio.timeout() lets the cancellation through."""
    async with asyncio.timeout(timeout):
        return await ws.read_message()


class Client:
    """A WebSocket client that keeps every frame it received, so tests can wait for a type."""

    def __init__(self, ws: WebSocketClientConnection) -> None:
        self.ws = ws
        self.user_id = ""
        self.connection_id = ""
        self.frames: list[dict[str, Any]] = []

    @classmethod
    async def open(cls, url: str, headers: Mapping[str, str] | None = None) -> Client:
        from tornado.httpclient import HTTPRequest

        request = HTTPRequest(url, headers=dict(headers or {}), connect_timeout=5, request_timeout=5)
        ws = await websocket_connect(request, max_message_size=10 * 1024 * 1024)
        return cls(ws)

    async def recv(self, kind: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
        """The next frame (of `kind`, skipping heartbeats unless asked for); fails on close or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {kind or 'frame'} within {timeout}s; got {self.frames[-5:]}")
            raw = await read_within(self.ws, remaining)
            if raw is None:
                raise ConnectionError(f"closed {self.ws.close_code} {self.ws.close_reason} waiting for {kind}")
            frame = json.loads(raw)
            self.frames.append(frame)
            if kind is None and frame["type"] == "heartbeat":
                continue
            if kind is None or frame["type"] == kind:
                return frame

    async def closed(self, timeout: float = 5.0) -> tuple[int | None, list[dict[str, Any]]]:
        """Read until the server closes; returns the close code and the frames seen meanwhile."""
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            raw = await read_within(self.ws, max(0.01, deadline - time.monotonic()))
            if raw is None:
                return self.ws.close_code, seen
            seen.append(json.loads(raw))

    async def no_frame(self, kind: str, within: float) -> bool:
        """True when no frame of `kind` arrives within `within` seconds."""
        try:
            await self.recv(kind, timeout=within)
        except TimeoutError:
            return True
        return False

    def send(self, frame: Any) -> None:
        self.ws.write_message(frame if isinstance(frame, (str, bytes)) else json.dumps(frame),
                              binary=isinstance(frame, bytes))

    async def request(self, frame: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """Send a frame with an id and return the ack or error that refers to it."""
        ref = frame.setdefault("id", unique("m"))
        self.send(frame)
        while True:
            reply = await self.recv(timeout=timeout)
            if reply["type"] == "ack" and reply["payload"]["id"] == ref:
                return reply
            if reply["type"] == "error" and reply["payload"].get("ref") == ref:
                return reply

    def close(self) -> None:
        self.ws.close()


async def received_metrics(sock: socket.socket, wanted: set[str], timeout: float = 5.0) -> set[str]:
    """Metric names seen on the socket until all `wanted` ones arrived (or the timeout)."""
    seen: set[str] = set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not wanted <= seen and loop.time() < deadline:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            await asyncio.sleep(0.05)
            continue
        for line in data.decode().splitlines():
            seen.add(line.split(":")[0])
    return seen


async def eventually(check: Any, timeout: float = 5.0, interval: float = 0.05) -> Any:
    """Poll `check` (sync or async) until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value {last!r})")


class RawSocketClient:
    """A WebSocket client on a plain socket with a tiny receive buffer that can stop reading at will.

    Tornado's own client keeps reading into memory; a real stuck phone does not, so slow-consumer
    tests use this to make the gateway's writes back up for real.
    """

    def __init__(self, port: int, token: str, user_type: str, device_id: str, rcvbuf: int = 4096,
                 early: bytes = b"", extensions: str = "", *, source: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        """`source`: the local address to connect from (a client behind a proxy with its own address);
        `headers`: more request headers (forged forwarding headers, say)."""
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(5)
        if source is not None:
            self.sock.bind((source, 0))
        self.sock.connect(("127.0.0.1", port))
        key = "dGhlIHNhbXBsZSBub25jZQ=="
        path = f"/ws?token={token}&userType={user_type}&deviceId={device_id}&platform=android"
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                           + (f"Sec-WebSocket-Extensions: {extensions}\r\n" if extensions else "")
                           + extra + "\r\n").encode() + early)
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            response += chunk
        if b" 101 " not in response.split(b"\r\n")[0]:
            raise ConnectionError(response.decode(errors="replace"))
        self.response_headers = response.decode(errors="replace")
        self.last_first_byte = 0

    def send_frame(self, opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True, rsv: int = 0) -> None:
        self.sock.sendall(client_frame(opcode, payload, fin=fin, masked=masked, rsv=rsv))

    def read_json(self) -> dict[str, Any]:
        """The next text frame, decoded; skips heartbeats."""
        while True:
            opcode, payload = self.read_frame()
            assert opcode == 1, f"expected a text frame, got opcode {opcode}: {payload[:80]!r}"
            message: dict[str, Any] = json.loads(payload)
            if message["type"] != "heartbeat":
                return message

    def read_close(self) -> int | None:
        """Read until the server's close frame; the server must then close the socket (within 5 s)."""
        while True:
            opcode, payload = self.read_frame()
            if opcode == 8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                try:
                    rest = self.sock.recv(1)
                except ConnectionResetError:
                    rest = b""
                assert rest == b"", f"the server sent {rest!r} after its close frame"
                return code

    def read_frame(self) -> tuple[int, bytes]:
        """(opcode, payload) of the next server frame (servers never mask)."""
        head = self._exact(2)
        length = head[1] & 0x7F
        if length == 126:
            length = int.from_bytes(self._exact(2), "big")
        elif length == 127:
            length = int.from_bytes(self._exact(8), "big")
        self.last_first_byte = head[0]
        return head[0] & 0x0F, self._exact(length)

    def _exact(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True, rsv: int = 0) -> bytes:
    """One client frame as RFC 6455 lays it out (masked with a fixed key unless told otherwise)."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    length = len(payload)
    if length < 126:
        head = bytes((first, (0x80 if masked else 0) | length))
    elif length < 65536:
        head = bytes((first, (0x80 if masked else 0) | 126)) + length.to_bytes(2, "big")
    else:
        head = bytes((first, (0x80 if masked else 0) | 127)) + length.to_bytes(8, "big")
    if not masked:
        return head + payload
    key = b"\x37\xfa\x21\x3d"
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def module_gateway(env: dict[str, str] | None = None) -> Callable[[str, str], Iterator[GatewayProcess]]:
    """A module-scoped fixture: one gateway with `env`, shared by a module's tests (unique user ids)."""

    def fixture(redis_url: str, prefix: str) -> Iterator[GatewayProcess]:
        process = GatewayProcess(redis_url, prefix, env).start()
        yield process
        process.stop()

    return pytest.fixture(scope="module")(fixture)


class Sink:
    """The handler side of a FrameProtocol, for tests that drive ws_protocol without a gateway:
    ignores frames and remembers the close code."""

    def __init__(self) -> None:
        self.closed: int | None = None

    def on_message(self, message: str | bytes) -> None:
        return None

    def on_ping(self, data: bytes) -> None:
        return None

    def on_pong(self, data: bytes) -> None:
        return None

    def on_ws_connection_close(self, close_code: int | None = None, close_reason: str | None = None) -> None:
        self.closed = close_code
