"""The client message handlers ("commands"). Each gets validated input and does one thing.

A command that needs no I/O returns None and is finished; one that hands something to Redis
returns the awaitable, so the common frames (heartbeat acks) never cost a coroutine or a task.

They reach the rest of the gateway only through `CommandContext`, so the
table in `dispatch` and these functions never import the Gateway itself.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Protocol

from .auth import TokenVerifier, check_subject, check_user_type
from .bus import Bus
from .connection import Connection
from .errors import ErrorCode, GatewayError
from .messages import IdGenerator, InboundEvent, dumps, now_ms


class CommandContext(Protocol):
    @property
    def bus(self) -> Bus: ...

    @property
    def verifier(self) -> TokenVerifier: ...

    def refresh_token(self, conn: Connection, expires_at: float) -> None: ...

    @property
    def ids(self) -> IdGenerator: ...

    @property
    def server_id(self) -> str: ...


def inbound_event(ctx: CommandContext, conn: Connection, kind: str, payload: dict[str, Any],
                  ref: str | None) -> str:
    """The JSON that services read from Redis for a client event (contract section 4)."""
    ident = conn.identity
    event: InboundEvent = {
        "type": kind, "userId": ident.user_id, "userType": ident.user_type, "deviceId": ident.device_id,
        "serverId": ctx.server_id, "connectionId": conn.connection_id, "receivedAt": now_ms(),
        "id": ref or ctx.ids.next(), "payload": payload}
    return dumps(event)


def heartbeat_ack(ctx: CommandContext, conn: Connection, payload: dict[str, Any], ref: str | None) -> None:
    """Liveness only: the frame itself already refreshed `last_seen`."""


def location_update(ctx: CommandContext, conn: Connection, payload: dict[str, Any],
                    ref: str | None) -> Awaitable[None]:
    return ctx.bus.publish_event("location_update", inbound_event(ctx, conn, "location_update", payload, ref),
                                 conn.identity.user_id)


def dispatch_response(ctx: CommandContext, conn: Connection, payload: dict[str, Any],
                      ref: str | None) -> Awaitable[None]:
    return ctx.bus.append_event("dispatch_response", inbound_event(ctx, conn, "dispatch_response", payload, ref),
                                conn.identity.user_id)


def receipt(ctx: CommandContext, conn: Connection, payload: dict[str, Any], ref: str | None) -> Awaitable[None]:
    """The app saw a message sent with `"receipt": true` (PROTOCOL.md 7.5): Dispatch reads the stream
    to re-offer a ride whose request never reached a phone."""
    return ctx.bus.append_event("receipt", inbound_event(ctx, conn, "receipt", payload, ref), conn.identity.user_id)


def token_refresh(ctx: CommandContext, conn: Connection, payload: dict[str, Any], ref: str | None) -> None:
    """Keeps the connection authorised past its token's exp; the new token must be for the same user."""
    claims = ctx.verifier.claims(payload["token"])
    if check_subject(claims) != conn.identity.user_id:
        raise GatewayError(ErrorCode.AUTH_FAILED, "token_refresh token is for another user")
    check_user_type(claims, conn.identity.user_type)
    ctx.refresh_token(conn, float(claims["exp"]))
