"""The `/ws` WebSocketHandler: thin glue between Tornado and the gateway.

It does the upgrade and passes every message to `dispatch`. After `open()` the
socket is normally handed to ws_protocol.FrameProtocol, which becomes the
connection's `Transport`; until then (and for good with compression on) the
handler is the Transport itself. On that path frames are written with the
protocol's `_write_frame` rather than `write_message`, because the latter
wraps every send in a new asyncio Task just to translate an exception we do
not need.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Final, cast

from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClosedError, WebSocketHandler, WebSocketProtocol, WebSocketProtocol13

from . import metrics as m
from .auth import SUBPROTOCOL, parse_connect_params
from .connection import Connection
from .dispatch import handle_frame
from .errors import CLOSE_ERRORS, CloseCode, GatewayError
from .forwarded import resolve_client
from .gateway import Gateway
from .messages import dumps, envelope, error_payload
from .ws_protocol import FrameProtocol, hand_over

log = logging.getLogger(__name__)

TEXT_OPCODE = 0x1
#: WebSocketHandler attributes that only the upgrade request uses (Tornado 6.4-6.6).
UPGRADE_ONLY_ATTRIBUTES: Final = frozenset({"request", "application", "_headers", "_transforms", "_write_buffer",
                                            "path_args", "path_kwargs", "open_args", "open_kwargs", "ui"})


class DetachedReadLoop(WebSocketProtocol13):
    """Tornado runs the frame loop at the bottom of the upgrade request's coroutines, so the request
    handler's get(), its _execute() task and their locals stay suspended for the socket's lifetime.
    Running the loop as a task of its own lets them finish: about 2 KB less per idle connection."""

    _frame_task: asyncio.Task[None] | None = None

    async def _receive_frame_loop(self) -> None:
        cast(GatewaySocket, self.handler).shed_upgrade_state()
        self._frame_task = asyncio.ensure_future(self._run_frames())

    async def _run_frames(self) -> None:
        try:
            await super()._receive_frame_loop()
        except asyncio.CancelledError:
            self._abort()
        except ValueError:  # a malformed frame, as WebSocketProtocol13.accept_connection handles it
            log.debug("malformed WebSocket frame", exc_info=True)
            self._abort()


class HandOver(DetachedReadLoop):
    """After `open()`, the socket leaves Tornado's frame loop for a `FrameProtocol` (ws_protocol.py).
    Kept on Tornado's loop: a connection being refused (its close handshake is under way) and any
    socket `hand_over` cannot take (TLS). A handler whose connection is already closed (replaced
    or drained during `open()`) stays too: its close handshake is under way on Tornado's stream."""

    async def _receive_frame_loop(self) -> None:
        handler = cast(GatewaySocket, self.handler)
        conn = handler.conn
        if self.is_closing() or conn is None or conn.closed or not await hand_over(self.stream, handler.adopt):
            await super()._receive_frame_loop()


class GatewaySocket(WebSocketHandler):
    gateway: Gateway
    conn: Connection | None

    def initialize(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.conn = None

    def adopt(self) -> FrameProtocol:
        """From here on the connection writes straight to the frame protocol, and Tornado's
        WebSocketProtocol13 (with its IOStream) is let go."""
        frames = FrameProtocol(self, self.gateway.settings.max_message_size)
        if self.conn is not None:
            self.conn.transport = frames
        self.ws_connection = None
        self._release_request_state()
        return frames

    def prepare(self) -> None:
        resolve_client(self.request, self.gateway.proxies)

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        """Browsers fail a handshake whose response selects none of the offered subprotocols; the
        token entry (`bearer.<JWT>`) is never the one echoed back."""
        return SUBPROTOCOL if SUBPROTOCOL in subprotocols else None

    def _subprotocols(self) -> list[str]:
        offered = self.request.headers.get("Sec-WebSocket-Protocol")
        return [entry.strip() for entry in offered.split(",")] if offered else []

    def check_origin(self, origin: str) -> bool:
        """Browsers send Origin; apps usually do not (then this is not called). Unset list: any origin."""
        allowed = self.gateway.settings.allowed_origins
        return not allowed or origin in allowed

    def get_websocket_protocol(self) -> WebSocketProtocol | None:
        protocol = super().get_websocket_protocol()
        if type(protocol) is WebSocketProtocol13:
            return HandOver(self, False, protocol.params) if protocol._compression_options is None \
                else DetachedReadLoop(self, False, protocol.params)
        return protocol

    def get_compression_options(self) -> dict[str, Any] | None:
        # permessage-deflate keeps a zlib context per connection (tens of KB): off unless asked for.
        return {} if self.gateway.settings.compression else None

    async def open(self, *args: str, **kwargs: str) -> None:
        gateway = self.gateway
        refusal = gateway.admission_refusal(self.request.remote_ip or "")
        if refusal is not None:
            self._refuse(refusal)
            return
        try:
            query = {k: [v.decode("utf-8", "replace") for v in vs] for k, vs in self.request.query_arguments.items()}
            params = parse_connect_params(query, self.request.headers.get("Authorization"), self._subprotocols())
            identity = gateway.verifier.identity(params)
        except GatewayError as exc:
            self._refuse(exc)
            return
        if gateway.settings.socket_sndbuf:
            self._cap_kernel_send_buffer(gateway.settings.socket_sndbuf)
        self.conn = gateway.admit(identity, self, self.request.remote_ip or "")
        # Tornado reads nothing from the socket until open() returns, so a client that gives up while its
        # connection waits for Redis would go unnoticed: that connection would then register, and replace
        # the device's newer connection elsewhere. A close callback makes the stream watch for the hang-up
        # (what the client sends meanwhile stays buffered for the frame loop).
        stream = cast(WebSocketProtocol13, self.ws_connection).stream
        stream.set_close_callback(self.on_connection_close)
        try:
            await gateway.establish(self.conn, params.resume)
        finally:
            stream.set_close_callback(None)  # from here the frame loop reports the close, with its code

    def shed_upgrade_state(self) -> None:
        """On Tornado's frame loop (compression on, or a socket hand_over could not take), drop what
        the upgrade request left behind (headers, parsed query, template helpers): about 2 KB per
        connection that an open WebSocket never reads again."""
        # Cleared in place: Tornado's suspended get() frame still references these very objects.
        request = self.request
        request.headers.clear()
        request.query_arguments.clear()
        request.arguments.clear()
        request.body_arguments.clear()
        request.uri = request.path = request.query = ""
        self._headers.clear()
        self.ui = None  # type: ignore[assignment]

    def _release_request_state(self) -> None:
        """Once the frames go to a FrameProtocol the handler only dispatches them and reports the close,
        so the request (with its HTTP connection objects, the spent IOStream and Tornado's finished
        request-loop task) and the response machinery go: about 5 KB per socket. The attribute table
        is rebuilt rather than trimmed, because a dict never shrinks."""
        self.__dict__ = {k: v for k, v in self.__dict__.items() if k not in UPGRADE_ONLY_ATTRIBUTES}

    def _cap_kernel_send_buffer(self, size: int) -> None:
        """Bound what the kernel holds for a client that stopped reading (it autotunes up to MBs)."""
        stream = cast(WebSocketProtocol13, self.ws_connection).stream
        sock = getattr(stream, "socket", None)
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)

    def _refuse(self, exc: GatewayError) -> None:
        gateway = self.gateway
        code = exc.close_code or CloseCode.INVALID_PARAMS
        gateway.metrics.incr(m.CONNECT_REJECTED.format(code=int(code)))
        if code == CloseCode.AUTH_FAILED:
            gateway.metrics.incr(m.AUTH_FAILURES)
        log.info("refused connection from %s: %s (%s)", self.request.remote_ip, exc.message, int(code))
        error = CLOSE_ERRORS.get(code)
        if error is not None:
            self.write_frame(dumps(envelope("error", error_payload(error, exc.message), gateway.ids.next())))
        self.close(int(code), exc.message[:120])

    def on_message(self, message: str | bytes) -> Awaitable[None] | None:
        """Synchronous unless the command waits for Redis: Tornado wraps every awaitable it gets in
        a Task, which a heartbeat_ack does not need."""
        conn = self.conn
        if conn is None or conn.closed:
            return None
        conn.touch()
        try:
            return handle_frame(self.gateway, conn, message)
        except Exception:
            # handle_frame answers every expected failure itself; anything here is a bug: log it,
            # close with 1011, tell the client nothing more.
            log.exception("unexpected failure handling a frame on %s", conn.connection_id)
            self.gateway.close_on_internal_error(conn)
            return None

    def on_ping(self, data: bytes) -> None:
        """Any frame is a sign of life (contract section 3): apps on OkHttp's pingInterval or
        URLSessionWebSocketTask keep their connection alive with protocol pings alone."""
        if self.conn is not None:
            self.conn.touch()

    on_pong = on_ping

    def on_close(self) -> None:
        conn, self.conn = self.conn, None  # break the handler <-> connection cycle: refcounting frees both
        if conn is not None:
            self.gateway.disconnect(conn, self.close_code, self.close_reason or "")

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
        # IOStream keeps unsent bytes in `_write_buffer` (private, but the only measure Tornado has).
        buffer = getattr(cast(WebSocketProtocol13, protocol).stream, "_write_buffer", None)
        return len(buffer) if buffer is not None else 0

    def drop_queued(self) -> int:
        """Tornado's IOStream cannot give back part of its write buffer: a client closed for not reading
        loses its socket at once (no close frame, it would sit behind what it does not read anyway)."""
        size = self.buffered_bytes()
        protocol = self.ws_connection
        if size and protocol is not None:
            cast(WebSocketProtocol13, protocol).stream.close()
        return size

    def on_drained(self, callback: Callable[[], None]) -> None:
        protocol = self.ws_connection
        try:
            if protocol is None:
                raise StreamClosedError()
            # An empty write resolves once everything queued before it has been flushed.
            drained = cast(WebSocketProtocol13, protocol).stream.write(b"")
        except StreamClosedError:
            callback()
            return
        drained.add_done_callback(lambda _future: callback())
