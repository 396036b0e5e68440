"""The `/ws` WebSocketHandler: thin glue between Tornado and the gateway.

It also is the connection's `Transport`. Frames are written with the
protocol's `_write_frame` rather than `write_message`, because the latter
wraps every send in a new asyncio Task just to translate an exception we do
not need; at tens of thousands of messages a second that Task is most of the
cost of a send.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClosedError, WebSocketHandler, WebSocketProtocol13

from . import metrics as m
from .auth import parse_connect_params
from .connection import Connection
from .dispatch import handle_frame
from .errors import CLOSE_ERRORS, CloseCode, GatewayError
from .gateway import Gateway
from .messages import dumps, envelope, error_payload

log = logging.getLogger(__name__)

TEXT_OPCODE = 0x1


class GatewaySocket(WebSocketHandler):
    gateway: Gateway
    conn: Connection | None

    def initialize(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.conn = None

    def check_origin(self, origin: str) -> bool:
        return True

    def get_compression_options(self) -> dict[str, Any] | None:
        return None

    async def open(self, *args: str, **kwargs: str) -> None:
        gateway = self.gateway
        if gateway.draining:
            self.close(int(CloseCode.GOING_AWAY), "server shutting down")
            return
        try:
            query = {k: [v.decode("utf-8", "replace") for v in vs] for k, vs in self.request.query_arguments.items()}
            params = parse_connect_params(query, self.request.headers.get("Authorization"))
            identity = gateway.verifier.identity(params)
        except GatewayError as exc:
            self._refuse(exc)
            return
        self.conn = await gateway.connect(identity, self, self.request.remote_ip or "")

    def _refuse(self, exc: GatewayError) -> None:
        gateway = self.gateway
        code = exc.close_code or CloseCode.INVALID_PARAMS
        gateway.metrics.incr(m.CONNECT_REJECTED.format(code=int(code)))
        if code == CloseCode.AUTH_FAILED:
            gateway.metrics.incr(m.AUTH_FAILURES)
        log.info("refused connection from %s: %s (%s)", self.request.remote_ip, exc.message, int(code))
        error = CLOSE_ERRORS.get(code, exc.code)
        self.write_frame(dumps(envelope("error", error_payload(error, exc.message), gateway.ids.next())))
        self.close(int(code), exc.message[:120])

    async def on_message(self, message: str | bytes) -> None:
        conn = self.conn
        if conn is None or conn.closed:
            return
        conn.touch()
        await handle_frame(self.gateway, conn, message)

    def on_close(self) -> None:
        if self.conn is not None:
            self.gateway.disconnect(self.conn, self.close_code, self.close_reason or "")

    # --- Transport ----------------------------------------------------------------------------

    def write_frame(self, data: str | bytes) -> bool:
        protocol = self.ws_connection
        if protocol is None or protocol.is_closing():
            return False
        if isinstance(data, str):
            data = data.encode()
        try:
            if isinstance(protocol, WebSocketProtocol13) and protocol._compressor is None:
                protocol._message_bytes_out += len(data)
                protocol._write_frame(True, TEXT_OPCODE, data)
            else:
                self.write_message(data)
        except (StreamClosedError, WebSocketClosedError):
            return False
        return True

    def close_transport(self, code: int, reason: str) -> None:
        self.close(code, reason)

    def buffered_bytes(self) -> int:
        protocol = self.ws_connection
        if protocol is None:
            return 0
        stream = cast(WebSocketProtocol13, protocol).stream
        return int(getattr(stream, "_write_buffer_size", 0))
