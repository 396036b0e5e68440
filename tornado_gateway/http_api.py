"""The HTTP side: broadcast for services, stats, health and readiness.

Errors are JSON (`{"error": CODE, "message": ...}`) and never carry a
traceback. The API key is compared in constant time and never logged.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
from typing import Any

import ujson
from tornado.web import RequestHandler

from . import metrics as m
from .auth import bearer_token
from .bus import BusUnavailable
from .errors import ErrorCode, ValidationError
from .forwarded import ClientAddress, resolve_client
from .gateway import Gateway
from .messages import MAX_ID_LENGTH, dumps
from .presence import sum_cluster

log = logging.getLogger(__name__)


def is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class ApiHandler(RequestHandler):
    gateway: Gateway
    client: ClientAddress

    def initialize(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def prepare(self) -> None:
        self.client = resolve_client(self.request, self.gateway.proxies)

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")

    def send_json(self, status: int, body: Any) -> None:
        self.set_status(status)
        self.finish(dumps(body))

    def send_error_json(self, status: int, code: str, message: str) -> None:
        self.send_json(status, {"error": code, "message": message})

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # Tornado's default page would include a traceback in debug mode; never send internals.
        self.finish(dumps({"error": "INTERNAL" if status_code >= 500 else "HTTP_ERROR",
                           "message": self._reason}))


class BroadcastHandler(ApiHandler):
    async def post(self, user_id: str) -> None:
        gateway = self.gateway
        status = await self._broadcast(user_id)
        gateway.metrics.incr(m.BROADCAST_REQUESTS.format(status=status))

    async def _broadcast(self, user_id: str) -> int:
        if not self._authorised():
            return self.get_status()
        if len(self.request.body) > self.gateway.settings.max_message_size:
            self.send_error_json(413, "TOO_LARGE",
                                 f"body is larger than MAX_MESSAGE_SIZE ({self.gateway.settings.max_message_size})")
            return 413
        if not 0 < len(user_id) <= MAX_ID_LENGTH:
            self.send_error_json(400, ErrorCode.INVALID_PARAMS, f"userId must be 1..{MAX_ID_LENGTH} characters")
            return 400
        try:
            body = ujson.loads(self.request.body)
        except (ValueError, OverflowError, RecursionError):
            self.send_error_json(400, ErrorCode.INVALID_JSON, "body is not valid JSON")
            return 400
        try:
            result = await self.gateway.broadcast(user_id, body, self.request.body)
        except ValidationError as exc:
            self.send_error_json(400, exc.code, exc.message)
            return 400
        except BusUnavailable as exc:
            log.warning("broadcast to %s failed: %s", user_id, exc)
            self.send_error_json(503, ErrorCode.UNAVAILABLE, "Redis is unavailable; retry later")
            return 503
        reply: dict[str, object] = {"messageId": result.message_id, "devices": result.devices}
        if result.seq is not None:
            reply["seq"] = result.seq
        if result.duplicate:
            reply["duplicate"] = True
        if result.degraded:
            reply["degraded"] = True
        self.send_json(202, reply)
        return 202

    def _authorised(self) -> bool:
        refusal = broadcast_refusal(self.gateway.settings.gateway_api_key, self.client,
                                    self.request.headers.get("Authorization"))
        if refusal is None:
            return True
        self.send_error_json(*refusal)
        return False


def broadcast_refusal(api_key: str | None, client: ClientAddress,
                      authorization: str | None) -> tuple[int, str, str] | None:
    """None when the caller may broadcast, else (status, code, message).

    Without a key only loopback callers may broadcast; a request that came through a proxy (it has
    forwarding headers) counts as loopback only when a trusted proxy says its client is loopback, so
    a proxy on the same host cannot open the API to the world."""
    if not api_key:  # config.py never makes "" a key; an empty key must not match an empty header anyway
        if is_loopback(client.ip) and (client.trusted or not client.proxied):
            return None
        return 403, "FORBIDDEN", "GATEWAY_API_KEY is not set: broadcast is for loopback callers, not through a proxy"
    supplied = bearer_token(authorization) or ""
    if hmac.compare_digest(supplied.encode(), api_key.encode()):
        return None
    return 401, ErrorCode.AUTH_FAILED, "missing or wrong API key"


class StatsHandler(ApiHandler):
    def get(self) -> None:
        self.send_json(200, self.gateway.stats())


class ClusterStatsHandler(ApiHandler):
    async def get(self) -> None:
        try:
            own = self.gateway.stats()
            # Our own figures fresh, the others' as of their last refresh; no Redis write per request.
            # Distinct users come from the presence users set (one SCARD), not from the instances' sums.
            presence = self.gateway.presence
            listed, unique_users = await asyncio.gather(presence.cluster(), presence.unique_users())
            others = [s for s in listed if s["serverId"] != own["serverId"]]
            servers = sorted([own, *others], key=lambda s: s["serverId"])
        except Exception as exc:  # noqa: BLE001 - report, do not crash, when Redis is down
            log.warning("cluster stats unavailable: %s", exc)
            self.send_error_json(503, ErrorCode.UNAVAILABLE, "Redis is unavailable")
            return
        self.send_json(200, sum_cluster(servers, unique_users))


class HealthHandler(ApiHandler):
    def get(self) -> None:
        self.send_json(200, {"status": "ok", "serverId": self.gateway.server_id})


class ReadyHandler(ApiHandler):
    def get(self) -> None:
        gateway = self.gateway
        ready = gateway.bus.ready and not gateway.draining
        bus = "embedded" if gateway.bus.embedded else ("connected" if gateway.bus.ready else "unavailable")
        self.send_json(200 if ready else 503, {"ready": ready, "serverId": gateway.server_id, "redis": bus,
                                               "draining": gateway.draining})
