"""RFC 6455 framing for an upgraded socket, on a plain asyncio transport.

Tornado's WebSocketHandler does the upgrade (routing, Origin, headers, 101,
`open()`); after that the socket is handed to a `FrameProtocol`. Tornado's own
frame loop keeps an IOStream, a WebSocketProtocol13 and a suspended coroutine
with its futures for every open socket (about 9 KB of an idle connection, and
several awaits per frame); this protocol is one slotted object fed by
`data_received`, so an idle connection costs the transport, this object and the
handler. Frames still reach `WebSocketHandler.on_message`, and the close
reaches `on_ws_connection_close`, as they did under Tornado.

What it enforces (close codes as the RFC assigns them): client frames masked,
no reserved bits (no extension is negotiated on this path: with compression on,
Tornado's frame loop is kept), control frames final and at most 125 bytes,
continuation only inside a fragmented message, messages (all fragments) at
most `max_size` bytes (1009, checked from the header so an oversized frame is
never buffered), text valid UTF-8 (1007). While `on_message` returns an
awaitable, reading pauses: frames are handled one at a time, in order.

What the kernel does not take at once waits here, in one bytearray per client (`_pending`), not in
the transport: the transport would keep every frame as a bytes object of its own (thousands of small
allocations per stalled client, which the allocator does not give back once freed), and what sits in
the transport cannot be taken back when the client is closed for not reading. The transport gets the
queue back FLUSH_CHUNK bytes at a time whenever it has drained, so a 4503 drops all but at most
one chunk at once (`drop_queued`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Final, Protocol, cast

from tornado.iostream import IOStream, SSLIOStream, StreamClosedError
from tornado.util import _websocket_mask

log = logging.getLogger(__name__)

FIN: Final = 0x80
OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

PROTOCOL_ERROR: Final = 1002
INVALID_PAYLOAD: Final = 1007
MESSAGE_TOO_BIG: Final = 1009
#: How long a close we started waits for the client's close frame before the socket is dropped.
CLOSE_TIMEOUT_S: Final = 5.0
#: The most of a client's queue handed to the transport at once: what a 4503 cannot take back.
FLUSH_CHUNK: Final = 8 * 1024


class FrameSink(Protocol):
    """The WebSocketHandler the frames are for."""

    def on_message(self, message: str | bytes) -> Awaitable[None] | None: ...

    def on_ping(self, data: bytes) -> None: ...

    def on_pong(self, data: bytes) -> None: ...

    def on_ws_connection_close(self, close_code: int | None = None, close_reason: str | None = None) -> None: ...


def frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, final frame: what a server sends."""
    length = len(payload)
    if length < 126:
        return bytes((FIN | opcode, length)) + payload
    if length < 65536:
        return struct.pack("!BBH", FIN | opcode, 126, length) + payload
    return struct.pack("!BBQ", FIN | opcode, 127, length) + payload


#: Close codes a client may send (RFC 6455 7.4): the rest are reserved or must never be on the wire.
VALID_CLOSE_CODES: Final = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014))


def close_payload(code: int | None, reason: str) -> bytes:
    if code is None:
        return b""
    # At most 123 bytes of reason fit a control frame; never cut inside a UTF-8 sequence.
    return struct.pack("!H", code) + reason.encode("utf-8", "replace")[:123].decode("utf-8", "ignore").encode()


def close_problem(payload: bytes) -> tuple[int, str] | None:
    """Why a client's close frame is itself invalid, if it is."""
    if len(payload) == 1:
        return PROTOCOL_ERROR, "close frame with a 1-byte payload"
    if len(payload) >= 2:
        code = int.from_bytes(payload[:2], "big")
        if code not in VALID_CLOSE_CODES and not 3000 <= code <= 4999:
            return PROTOCOL_ERROR, f"invalid close code {code}"
        try:
            payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            return INVALID_PAYLOAD, "close reason is not valid UTF-8"
    return None


def break_transport_cycle(transport: asyncio.BaseTransport) -> None:
    """asyncio's own selector transports keep a bound method of themselves (`_read_ready_cb`): every one
    of them is a reference cycle, which only the cyclic collector frees, and one frozen alive by the
    gateway's gc.freeze() (memory.py) is never freed at all (with EVENT_LOOP=asyncio, measured: every
    connection that lived past a housekeeping tick left its transport behind). The socket is gone, so
    nothing reads with it again. uvloop's transports have no such attribute (and no __dict__)."""
    state = getattr(transport, "__dict__", None)
    if state is not None and state.get("_read_ready_cb") is not None:
        state["_read_ready_cb"] = None


class FrameProtocol(asyncio.Protocol):
    __slots__ = ("_sink", "_transport", "_buffer", "_max_size", "_fragments", "_fragment_opcode", "_busy",
                 "_sent_close", "_got_close", "_close_timer", "_drain_waiters", "_close_code", "_close_reason",
                 "_pending_pong", "_early", "_pending")

    def __init__(self, sink: FrameSink, max_size: int) -> None:
        self._sink: FrameSink | None = sink
        self._transport: asyncio.Transport | None = None
        # Received and not yet handled: part of a frame, or frames held while a message waits for Redis.
        # A bytearray whenever it holds something, so that appending to it is not quadratic.
        self._buffer: bytes | bytearray = b""
        self._max_size = max_size
        self._fragments: bytearray | None = None
        self._fragment_opcode = OP_TEXT
        self._busy = False  # on_message's awaitable is running: later frames wait
        self._sent_close = False
        self._got_close = False
        self._close_timer: asyncio.TimerHandle | None = None
        self._drain_waiters: list[Callable[[], None]] | None = None
        self._close_code: int | None = None
        self._close_reason: str | None = None
        self._pending_pong: bytes | None = None
        # What the connection writes (a close included) before connection_made: the socket is being
        # handed over; it is written first, in order.
        self._early: list[bytes] | None = []
        # Frames the socket could not take yet, in order (see the module's docstring); None when empty.
        self._pending: bytearray | None = None

    def received_before(self, data: bytes) -> None:
        """Bytes the client sent right behind the upgrade request, already read by Tornado."""
        if data:
            self._buffer = bytearray(data)

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        # Told when the buffer first holds bytes and when it is empty again: on_drained rides on it.
        transport.set_write_buffer_limits(high=0, low=0)
        early, self._early = self._early, None
        if early:
            transport.writelines(early)
        if self._drain_waiters is not None and transport.get_write_buffer_size() == 0:
            self.resume_writing()  # waiters registered before the socket was ours, and it all went out
        if self._sent_close:  # close() ran before the socket was ours: its frame was in `early`
            self._after_close_frame(transport)
        elif self._buffer:
            self._process()

    def data_received(self, data: bytes) -> None:
        if self._got_close:
            return  # the client closed or broke the protocol: nothing more is read
        if self._buffer:
            self._buffer += data  # a bytearray, unless this is a second chunk while busy
        else:
            self._buffer = data
        if not self._busy:
            self._process()
        elif self._transport is not None:
            self._transport.pause_reading()  # a message waits for Redis: the client waits too

    def eof_received(self) -> bool | None:
        self._arm_abort()  # the client half-closed: close our side too, flushing at most CLOSE_TIMEOUT_S
        return None

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        """The transport's buffer is empty: hand it the next part of the queue, or tell the waiters."""
        if self._pending is not None and self._hand_over(FLUSH_CHUNK):
            return  # more is on its way to the socket: waiters wait for the next drain
        waiters, self._drain_waiters = self._drain_waiters, None
        for callback in waiters or ():
            callback()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self._sent_close = self._got_close = True
        self._buffer, self._early, self._fragments, self._pending = b"", None, None, None
        self.resume_writing()  # "drained" waiters learn the socket is gone
        transport, self._transport = self._transport, None  # the protocol <-> transport cycle
        if transport is not None:
            break_transport_cycle(transport)
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.on_ws_connection_close(self._close_code, self._close_reason)

    # --- the connection's Transport (see connection.py) ----------------------------------------

    def write_frame(self, data: str | bytes) -> bool:
        if self._sent_close:
            return False
        return self._emit(frame(OP_TEXT, data.encode() if isinstance(data, str) else data))

    def _emit(self, data: bytes) -> bool:
        """Write; queue behind what the socket has not taken yet, or until connection_made while the
        socket is being handed over."""
        transport = self._transport
        if transport is None:
            if self._early is None:
                return False
            self._early.append(data)
            return True
        if transport.is_closing():
            return False
        pending = self._pending
        if pending is not None:
            pending += data
        elif transport.get_write_buffer_size():  # the kernel refused bytes already: the client is behind
            self._pending = bytearray(data)
        else:
            transport.write(data)
        return True

    def _hand_over(self, limit: int) -> bool:
        """Move the queue into the transport, at most `limit` bytes per write, for as long as the socket
        takes it at once; True while anything is still waiting (queued or in the transport)."""
        transport = self._transport
        if transport is None or transport.is_closing():
            self._pending = None
            return False
        while (pending := self._pending) is not None and not transport.get_write_buffer_size():
            if len(pending) <= limit:
                self._pending = None
                transport.write(pending)  # ours no more: the transport may keep a view of it
            else:
                with memoryview(pending) as view:
                    chunk = bytes(view[:limit])
                del pending[:limit]  # O(1) at the front of a bytearray
                transport.write(chunk)
        return self._pending is not None or transport.get_write_buffer_size() > 0

    def _hand_over_all(self, transport: asyncio.Transport) -> None:
        """Everything queued goes to the transport now: it is about to close (or half-close), and it
        flushes its own buffer first."""
        pending, self._pending = self._pending, None
        if pending is not None:
            transport.write(pending)

    def drop_queued(self) -> int:
        """The client is being closed for not reading: what waits for it will never be read, so it
        goes now. The transport keeps at most one FLUSH_CHUNK (or one frame) ahead of the close frame."""
        pending, self._pending = self._pending, None
        return len(pending) if pending is not None else 0

    def close_transport(self, code: int, reason: str) -> None:
        self.close(code, reason)

    def close(self, code: int | None = None, reason: str = "") -> None:
        """Start the closing handshake (or finish it, if the client started it)."""
        if not self._sent_close:
            self._sent_close = True
            self._emit(frame(OP_CLOSE, close_payload(code, reason)))
        if self._transport is not None:  # otherwise connection_made finishes the close
            self._after_close_frame(self._transport)

    def _after_close_frame(self, transport: asyncio.Transport) -> None:
        if self._got_close:
            self._hand_over_all(transport)  # the close frame is in the queue if anything was waiting
            transport.close()  # flushes what is queued, then closes
        self._arm_abort()  # a client that neither answers nor reads is dropped after CLOSE_TIMEOUT_S

    def _arm_abort(self) -> None:
        if self._close_timer is None and self._transport is not None:
            self._close_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT_S, self.abort)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def is_closing(self) -> bool:
        return self._sent_close or (self._transport is not None and self._transport.is_closing())

    def buffered_bytes(self) -> int:
        transport = self._transport
        if transport is None:
            return sum(map(len, self._early)) if self._early else 0
        pending = self._pending
        return transport.get_write_buffer_size() + (len(pending) if pending is not None else 0)

    def on_drained(self, callback: Callable[[], None]) -> None:
        transport = self._transport
        if transport is None:
            if self._early is None:  # lost during the hand-over
                callback()
                return
        elif transport.is_closing() or (self._pending is None and transport.get_write_buffer_size() == 0):
            callback()
            return
        if self._drain_waiters is None:
            self._drain_waiters = [callback]
        else:
            self._drain_waiters.append(callback)

    # --- parsing ------------------------------------------------------------------------------

    def _process(self) -> None:
        """Handle every whole frame in the buffer, stopping early while a message is in progress."""
        buf = self._buffer
        end = len(buf)
        pos = 0
        while not self._busy and not self._got_close:
            if end - pos < 2:
                break
            first, second = buf[pos], buf[pos + 1]
            opcode = first & 0x0F
            length = second & 0x7F
            header = 2
            if length == 126:
                if end - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 4], "big")
                header = 4
            elif length == 127:
                if end - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 10], "big")
                header = 10
            problem = self._header_problem(first, second, opcode, length)
            if problem is not None:
                self._buffer = b""
                self._fail(*problem)
                return
            start = pos + header + 4
            if end - start < length:
                break
            payload = _websocket_mask(bytes(buf[pos + header:start]), bytes(buf[start:start + length]))
            pos = start + length
            self._frame(opcode, bool(first & FIN), payload)
        if self._got_close:
            self._buffer = b""
        elif pos == 0:
            if end and not isinstance(buf, bytearray):
                self._buffer = bytearray(buf)
        elif pos < end:
            self._buffer = bytearray(buf[pos:])
        else:
            self._buffer = b""
        if self._busy and self._buffer and self._transport is not None:
            self._transport.pause_reading()

    def _header_problem(self, first: int, second: int, opcode: int, length: int) -> tuple[int, str] | None:
        if first & 0x70:
            return PROTOCOL_ERROR, "reserved bits set: no extension was negotiated"
        if not second & 0x80:
            return PROTOCOL_ERROR, "client frames must be masked"
        if opcode & 0x8:
            if length > 125 or not first & FIN:
                return PROTOCOL_ERROR, "control frames are final and at most 125 bytes"
        elif length + (len(self._fragments) if self._fragments is not None else 0) > self._max_size:
            return MESSAGE_TOO_BIG, "message too big"
        return None

    def _frame(self, opcode: int, final: bool, payload: bytes) -> None:
        if opcode & 0x8:
            self._control(opcode, payload)
            return
        if opcode == OP_CONTINUATION:
            fragments = self._fragments
            if fragments is None:
                self._fail(PROTOCOL_ERROR, "continuation frame outside a fragmented message")
                return
            fragments += payload
            if not final:
                return
            opcode, payload, self._fragments = self._fragment_opcode, bytes(fragments), None
        elif opcode in (OP_TEXT, OP_BINARY):
            if self._fragments is not None:
                self._fail(PROTOCOL_ERROR, "a new message inside a fragmented one")
                return
            if not final:
                self._fragments, self._fragment_opcode = bytearray(payload), opcode
                return
        else:
            self._fail(PROTOCOL_ERROR, f"unknown opcode {opcode}")
            return
        self._message(opcode, payload)

    def _message(self, opcode: int, payload: bytes) -> None:
        sink = self._sink
        if sink is None or self._sent_close:
            return  # we are closing: what the client still sends is not read
        if opcode == OP_TEXT:
            try:
                message: str | bytes = payload.decode("utf-8")
            except UnicodeDecodeError:
                self._fail(INVALID_PAYLOAD, "text frame is not valid UTF-8")
                return
        else:
            message = payload
        pending = sink.on_message(message)
        if pending is not None:
            self._busy = True
            asyncio.ensure_future(pending).add_done_callback(self._message_done)

    def _message_done(self, done: asyncio.Future[None]) -> None:
        self._busy = False
        if not done.cancelled() and done.exception() is not None:
            log.error("on_message failed", exc_info=done.exception())
        transport = self._transport
        if transport is None or self._got_close:
            return
        if self._buffer:
            self._process()
        if not self._busy and not transport.is_closing():
            transport.resume_reading()

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_CLOSE:
            problem = close_problem(payload)
            if problem is not None:
                self._fail(*problem)
                return
            self._got_close = True
            code = int.from_bytes(payload[:2], "big") if payload else None
            self._close_code, self._close_reason = code, payload[2:].decode("utf-8") if payload else ""
            self.close(code)  # echo the client's code (RFC 6455 5.5.1), then close the socket
        elif opcode == OP_PING:
            self._pong(payload)
            if self._sink is not None:
                self._sink.on_ping(payload)  # a sign of life, as under Tornado's frame loop
        elif opcode == OP_PONG:
            if self._sink is not None:
                self._sink.on_pong(payload)
        else:
            self._fail(PROTOCOL_ERROR, f"unknown opcode {opcode}")

    def _pong(self, payload: bytes) -> None:
        """At most one pong waits in a congested buffer (RFC 6455 5.5.3): a ping flood cannot grow it."""
        if self._sent_close or self._transport is None:
            return
        if self.buffered_bytes() == 0:
            self._transport.write(frame(OP_PONG, payload))
            return
        if self._pending_pong is None:
            self.on_drained(self._send_pending_pong)
        self._pending_pong = payload

    def _send_pending_pong(self) -> None:
        payload, self._pending_pong = self._pending_pong, None
        if payload is not None:
            self._pong(payload)

    def _fail(self, code: int, reason: str) -> None:
        """Close frame, then a half-close. Closing the socket outright while unread client bytes are
        still queued makes the kernel send a reset, which can destroy the close frame in flight; so
        what the client still sends is read and discarded until it closes (or CLOSE_TIMEOUT_S)."""
        log.debug("closing WebSocket with %d: %s", code, reason)
        self._got_close = True
        self._close_code, self._close_reason = code, reason
        if not self._sent_close:
            self._sent_close = True
            self._emit(frame(OP_CLOSE, close_payload(code, reason)))
        transport = self._transport
        if transport is None:
            return
        self._hand_over_all(transport)  # the close frame goes out behind everything queued, then the half-close
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()
        self._arm_abort()


async def hand_over(stream: IOStream, adopt: Callable[[], FrameProtocol]) -> bool:
    """Move an upgraded socket from its Tornado IOStream to the `FrameProtocol` that `adopt` makes.

    False (and the stream left to Tornado) when it cannot be done: TLS, or a stream already
    closed. Otherwise the protocol owns the connection from the moment `adopt` returns: what the
    gateway writes meanwhile queues in it, behind whatever Tornado still had to flush, and a
    socket lost during the hand-over reaches the handler as the protocol's connection_lost.
    """
    if isinstance(stream, SSLIOStream) or stream.closed() or stream.socket is None:
        return False
    stream.set_close_callback(None)  # Tornado's WebSocket protocol is done with this stream
    protocol = adopt()
    try:
        if stream.writing():
            # Resolves once the 101 and `connected` reached the socket; a client that does not read
            # even those is given up on.
            await asyncio.wait_for(stream.write(b""), CLOSE_TIMEOUT_S)
        sock = stream.socket
        if stream.closed() or sock is None:
            raise StreamClosedError()
        protocol.received_before(bytes(stream._read_buffer[:stream._read_buffer_size]))
        stream.io_loop.remove_handler(sock.fileno())
        adopted = socket.socket(fileno=sock.detach())
        stream.close()  # the IOStream's socket object no longer owns the descriptor: nothing is closed
    except Exception as exc:
        if not isinstance(exc, (StreamClosedError, TimeoutError)):
            log.warning("could not hand an upgraded socket over", exc_info=True)
        stream.close()
        protocol.connection_lost(None)
        return True
    try:
        await asyncio.get_running_loop().connect_accepted_socket(lambda: protocol, adopted)
    except Exception:
        log.warning("could not adopt an upgraded socket", exc_info=True)
        adopted.close()
        protocol.connection_lost(None)
    return True
