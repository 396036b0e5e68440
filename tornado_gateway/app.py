"""make_app(): the whole URL table in one place."""

from __future__ import annotations

import logging

from tornado.web import Application, RequestHandler

from . import console, http_api
from .gateway import Gateway
from .ws_handler import GatewaySocket

access_log = logging.getLogger("tornado_gateway.access")


def log_request(handler: RequestHandler) -> None:
    """Tornado's default logs the full URI, which would put `?token=` in the logs; log the path only.

    Successful requests log at DEBUG: at thousands of broadcasts a second an INFO line each would
    cost more than the broadcast, and every WebSocket already gets its own opened/closed lines."""
    status = handler.get_status()
    level = logging.DEBUG if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    request = handler.request
    access_log.log(level, "%d %s %s (%s) %.2fms", status, request.method, request.path, request.remote_ip,
                   1000.0 * request.request_time())


def make_app(gateway: Gateway) -> Application:
    args = {"gateway": gateway}
    # The developer console mints tokens: it exists in --dev only (outside it, /console is a 404).
    dev_only = console.routes(gateway) if gateway.settings.dev else []
    return Application(
        [
            (r"/ws", GatewaySocket, args),
            (r"/broadcast/user/([^/]+)", http_api.BroadcastHandler, args),
            (r"/stats", http_api.StatsHandler, args),
            (r"/stats/cluster", http_api.ClusterStatsHandler, args),
            (r"/health", http_api.HealthHandler, args),
            (r"/ready", http_api.ReadyHandler, args),
            *dev_only,
        ],
        log_function=log_request,
        websocket_max_message_size=gateway.settings.max_message_size,
        compress_response=False,
    )
