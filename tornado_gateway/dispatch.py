"""One table from client message type to its schema, its allowed roles and its command.

Every inbound frame goes through `handle_frame`, which is also the one place
where failures become `error` frames: expected ones with their contract code,
unexpected ones logged with a traceback and reported to the client only as
`INTERNAL` (no details leak).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

from . import commands
from . import metrics as m
from .bus import BusUnavailable
from .commands import CommandContext
from .config import Settings
from .connection import Connection
from .errors import ErrorCode, GatewayError
from .messages import (
    DISPATCH_RESPONSE_SCHEMA,
    HEARTBEAT_ACK_SCHEMA,
    LOCATION_UPDATE_SCHEMA,
    RECEIPT_SCHEMA,
    TOKEN_REFRESH_SCHEMA,
    USER_TYPES,
    Schema,
    UserType,
    client_ref,
    decode_client_frame,
    dumps,
    envelope,
    validate_payload,
)
from .metrics import Metrics

log = logging.getLogger(__name__)

Handler = Callable[[CommandContext, Connection, dict[str, Any], str | None], Awaitable[None] | None]

MOVING: Final[frozenset[UserType]] = frozenset({"driver", "delivery_partner"})
EVERYONE: Final[frozenset[UserType]] = frozenset(USER_TYPES)


@dataclasses.dataclass(frozen=True, slots=True)
class Command:
    schema: Schema
    roles: frozenset[UserType]
    handler: Handler
    forbidden_message: str = ""


COMMANDS: Final[dict[str, Command]] = {
    "heartbeat_ack": Command(HEARTBEAT_ACK_SCHEMA, EVERYONE, commands.heartbeat_ack),
    "location_update": Command(LOCATION_UPDATE_SCHEMA, MOVING, commands.location_update,
                               "location_update is for drivers and delivery partners"),
    "dispatch_response": Command(DISPATCH_RESPONSE_SCHEMA, MOVING, commands.dispatch_response,
                                 "dispatch_response is for drivers and delivery partners"),
    "token_refresh": Command(TOKEN_REFRESH_SCHEMA, EVERYONE, commands.token_refresh),
    "receipt": Command(RECEIPT_SCHEMA, EVERYONE, commands.receipt),
}


class DispatchContext(CommandContext, Protocol):
    @property
    def metrics(self) -> Metrics: ...

    @property
    def settings(self) -> Settings: ...

    def close_abusive(self, conn: Connection) -> None: ...


def admit(ctx: DispatchContext, conn: Connection) -> bool:
    """The per-connection token bucket; a client that keeps flooding is closed with 4429."""
    limiter = conn.limiter
    if limiter is None:
        return True
    settings, now = ctx.settings, time.monotonic()
    if limiter.allow(settings.rate_limit_per_s, settings.rate_limit_burst, now):
        return True
    if limiter.strike(now, settings.rate_limit_close_after):
        ctx.close_abusive(conn)
    else:
        reply_error(ctx, conn, ErrorCode.RATE_LIMITED,
                    f"more than {settings.rate_limit_per_s:g} messages/s: this one was dropped", None)
    return False


def handle_frame(ctx: DispatchContext, conn: Connection, frame: str | bytes) -> Awaitable[None] | None:
    """Validate and run one frame. Returns an awaitable only when the command waits for Redis; the
    caller (Tornado) then holds the connection's next frame until it is done, which keeps acks in order."""
    if not admit(ctx, conn):
        return None
    ref: str | None = None
    try:
        message = decode_client_frame(frame)
        ref = message.get("id")
        command = COMMANDS.get(message["type"])
        if command is None:
            raise GatewayError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {message['type'][:64]!r}")
        if conn.identity.user_type not in command.roles:
            raise GatewayError(ErrorCode.FORBIDDEN, command.forbidden_message)
        payload = validate_payload(command.schema, message["payload"])
        ctx.metrics.incr(m.MESSAGES_IN.format(type=message["type"]))
        pending = command.handler(ctx, conn, payload, ref)
    except GatewayError as exc:
        if ref is None and exc.code in (ErrorCode.INVALID_MESSAGE, ErrorCode.INVALID_JSON):
            ref = client_ref(frame)
        reply_error(ctx, conn, exc.code, exc.message, ref)
        return None
    except Exception:
        log.exception("command failed on %s", conn.connection_id)
        reply_error(ctx, conn, ErrorCode.INTERNAL, "internal error", ref)
        return None
    if pending is not None:
        return finish_command(ctx, conn, pending, ref)
    acknowledge(ctx, conn, ref)
    return None


async def finish_command(ctx: DispatchContext, conn: Connection, pending: Awaitable[None], ref: str | None) -> None:
    try:
        await pending
    except BusUnavailable:
        reply_error(ctx, conn, ErrorCode.UNAVAILABLE, "Redis is unavailable: not delivered, retry later", ref)
        return
    except Exception:
        log.exception("command failed on %s", conn.connection_id)
        reply_error(ctx, conn, ErrorCode.INTERNAL, "internal error", ref)
        return
    acknowledge(ctx, conn, ref)


def acknowledge(ctx: DispatchContext, conn: Connection, ref: str | None) -> None:
    if ref is not None:
        conn.send(dumps(envelope("ack", {"id": ref}, ctx.ids.next())))


def reply_error(ctx: DispatchContext, conn: Connection, code: ErrorCode, message: str, ref: str | None) -> None:
    ctx.metrics.incr(m.ERRORS.format(code=code.value))
    conn.send_error(ctx.ids, code, message, ref)
