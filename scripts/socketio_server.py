"""The comparison server: the same gateway semantics built the common way, python-socketio + AsyncRedisManager.

Why it exists: the benchmark numbers of tornado-gateway only mean something next to the usual
alternative, measured by the same harness on the same machine. It keeps the contract that
matters for load: clients connect with the same query parameters and JWT, each connection joins
a room named after its userId, services reach a user through the Redis manager (a PUBLISH on one
channel that every server process reads) or `POST /broadcast/user/{id}`, drivers' `location_update`
events are validated and published to `<prefix>:events:location_update`, and liveness is
Engine.IO's ping (interval 25 s, timeout 30 s). It does not keep a presence registry or rate
limits, so it does less work per connection than the gateway.

Run: `JWT_SECRET=... REDIS_PREFIX=... PORT=4020 PROCESSES=2 python scripts/socketio_server.py`
(PROCESSES=N starts N children on one port with SO_REUSEPORT, like the gateway's supervisor).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import resource
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import jwt
import socketio  # type: ignore[import-untyped]  # no stubs; pyproject.toml is not ours to change
from aiohttp import web
from redis.asyncio import Redis

log = logging.getLogger("socketio_server")

USER_TYPES = ("driver", "rider", "restaurant", "delivery_partner")
SERVICE_TYPES = ("ride_request", "ride_status", "driver_location", "eta_update", "notification", "order_status")
LOCATION_FIELDS = ("latitude", "longitude", "heading", "speed", "accuracy", "timestamp", "isAvailable", "tripId")


@dataclass(frozen=True)
class Settings:
    port: int
    bind: str
    redis_url: str
    prefix: str
    secret: str
    processes: int
    server_id: str


def load_settings() -> Settings:
    secret = os.environ.get("JWT_SECRET", "")
    if not secret:
        raise SystemExit("socketio_server.py: JWT_SECRET is required")
    return Settings(port=int(os.environ.get("PORT", "4020")), bind=os.environ.get("BIND_ADDRESS", "127.0.0.1"),
                    redis_url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"),
                    prefix=os.environ.get("REDIS_PREFIX", "gateway"), secret=secret,
                    processes=int(os.environ.get("PROCESSES", "1")),
                    server_id=os.environ.get("SERVER_ID", uuid.uuid4().hex[:12]))


def identity(environ: dict[str, Any], secret: str) -> tuple[str, str] | None:
    """(userId, deviceId) when the query parameters and token are valid, as the gateway checks them."""
    query = parse_qs(environ.get("QUERY_STRING", ""))
    token = query.get("token", [""])[0]
    user_type = query.get("userType", [""])[0]
    device = query.get("deviceId", [""])[0]
    if user_type not in USER_TYPES or not device or query.get("platform", [""])[0] not in ("ios", "android", "web"):
        return None
    try:
        claims = jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["sub", "exp"]})
    except jwt.InvalidTokenError:
        return None
    if claims.get("userType") != user_type:
        return None
    return str(claims["sub"]), device


def location_payload(data: Any) -> dict[str, Any] | None:
    """The gateway's location_update rule: finite latitude/longitude in range, known fields only."""
    if not isinstance(data, dict):
        return None
    lat, lon = data.get("latitude"), data.get("longitude")
    if not (isinstance(lat, (int, float)) and isinstance(lon, (int, float))) or isinstance(lat, bool) \
            or isinstance(lon, bool) or not (math.isfinite(lat) and math.isfinite(lon)):
        return None
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        return None
    return {k: data[k] for k in LOCATION_FIELDS if k in data}


class SocketIoGateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = Redis.from_url(settings.redis_url)
        manager = socketio.AsyncRedisManager(settings.redis_url, channel=f"{settings.prefix}:socketio")
        self.sio = socketio.AsyncServer(async_mode="aiohttp", client_manager=manager, ping_interval=25,
                                        ping_timeout=30, cors_allowed_origins="*", logger=False,
                                        engineio_logger=False)
        self.users: dict[str, tuple[str, str]] = {}
        self.sio.on("connect", self.on_connect)
        self.sio.on("disconnect", self.on_disconnect)
        self.sio.on("location_update", self.on_location)

    async def on_connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> bool:
        who = identity(environ, self.settings.secret)
        if who is None:
            return False
        self.users[sid] = who
        await self.sio.enter_room(sid, who[0])
        return True

    async def on_disconnect(self, sid: str, *args: Any) -> None:
        self.users.pop(sid, None)

    async def on_location(self, sid: str, data: Any) -> None:
        who = self.users.get(sid)
        payload = location_payload(data)
        if who is None or payload is None:
            return
        event = {"type": "location_update", "userId": who[0], "userType": "driver", "deviceId": who[1],
                 "serverId": self.settings.server_id, "receivedAt": int(time.time() * 1000),
                 "id": uuid.uuid4().hex, "payload": payload}
        await self.redis.publish(f"{self.settings.prefix}:events:location_update", json.dumps(event))

    async def broadcast(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
            kind, payload = body["type"], body["payload"]
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": "INVALID_MESSAGE"}, status=400)
        if kind not in SERVICE_TYPES:
            return web.json_response({"error": "UNKNOWN_TYPE"}, status=400)
        await self.sio.emit(kind, payload, room=request.match_info["user_id"])
        return web.json_response({"messageId": uuid.uuid4().hex}, status=202)

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"serverId": self.settings.server_id, "totalConnections": len(self.users)})

    def app(self) -> web.Application:
        application = web.Application()
        self.sio.attach(application)
        application.router.add_post("/broadcast/user/{user_id}", self.broadcast)
        application.router.add_get("/stats", self.stats)
        return application


async def serve(settings: Settings) -> None:
    gateway = SocketIoGateway(settings)
    runner = web.AppRunner(gateway.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.bind, settings.port, reuse_port=True, backlog=4096)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await runner.cleanup()
    await gateway.redis.aclose()


def supervise(settings: Settings) -> int:
    """PROCESSES=N: N children on one port; SIGTERM is forwarded and the parent waits for them."""
    children = []
    for index in range(settings.processes):
        env = {**os.environ, "PROCESSES": "1", "SERVER_ID": f"{settings.server_id}-{index}"}
        children.append(subprocess.Popen([sys.executable, __file__], env=env))

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        child.wait()
    return 0


def main() -> int:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "WARNING"))
    settings = load_settings()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if settings.processes > 1:
        return supervise(settings)
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
