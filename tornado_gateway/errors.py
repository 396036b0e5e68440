"""Every way a connection can fail, named once.

Clients branch on these values (a browser cannot see why an upgrade failed, so
the close code is its only signal), which is why they are enums rather than
literals scattered across handlers.
"""

from __future__ import annotations

import enum


class CloseCode(enum.IntEnum):
    """WebSocket close codes the gateway uses (RFC 6455 7.4 plus the 4xxx range)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # instance shutting down: reconnect anywhere
    MESSAGE_TOO_BIG = 1009  # sent by ws_protocol.FrameProtocol (or Tornado, with compression on)
    INTERNAL_ERROR = 1011  # a bug: logged with the traceback, never detailed to the client
    TRY_AGAIN_LATER = 1013  # instance full or out of file descriptors
    INVALID_PARAMS = 4400
    AUTH_FAILED = 4401
    HEARTBEAT_TIMEOUT = 4408
    REPLACED = 4409
    RATE_LIMITED = 4429
    SLOW_CONSUMER = 4503  # addition: the client stopped reading and its outbound buffer overflowed


class ErrorCode(enum.StrEnum):
    """The `payload.code` of an `error` frame."""

    INVALID_JSON = "INVALID_JSON"
    INVALID_MESSAGE = "INVALID_MESSAGE"
    UNKNOWN_TYPE = "UNKNOWN_TYPE"
    FORBIDDEN = "FORBIDDEN"
    RATE_LIMITED = "RATE_LIMITED"
    AUTH_FAILED = "AUTH_FAILED"
    INVALID_PARAMS = "INVALID_PARAMS"
    HEARTBEAT_TIMEOUT = "HEARTBEAT_TIMEOUT"
    REPLACED = "REPLACED"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"  # addition: Redis unreachable or instance full; retry later
    SLOW_CONSUMER = "SLOW_CONSUMER"  # addition: precedes close 4503


#: The error frame that precedes each 4xxx close.
CLOSE_ERRORS: dict[CloseCode, ErrorCode] = {
    CloseCode.INVALID_PARAMS: ErrorCode.INVALID_PARAMS,
    CloseCode.AUTH_FAILED: ErrorCode.AUTH_FAILED,
    CloseCode.HEARTBEAT_TIMEOUT: ErrorCode.HEARTBEAT_TIMEOUT,
    CloseCode.REPLACED: ErrorCode.REPLACED,
    CloseCode.RATE_LIMITED: ErrorCode.RATE_LIMITED,
    CloseCode.SLOW_CONSUMER: ErrorCode.SLOW_CONSUMER,
    CloseCode.TRY_AGAIN_LATER: ErrorCode.UNAVAILABLE,
}


class GatewayError(Exception):
    """A client-visible failure: becomes an `error` frame, and a close when `close_code` is set."""

    def __init__(self, code: ErrorCode, message: str, *, close_code: CloseCode | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.close_code = close_code


class ValidationError(GatewayError):
    """A frame or request body that does not fit its message type."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.INVALID_MESSAGE) -> None:
        super().__init__(code, message)


def close_reason_name(code: int | None) -> str:
    """A metric-friendly name for a close code: `replaced`, `heartbeat_timeout`, ... or `client`."""
    try:
        return CloseCode(code).name.lower() if code is not None else "client"
    except ValueError:
        return "client"
