"""The client message handlers ("commands"). Each gets validated input and does one thing.

They reach the rest of the gateway only through `CommandContext`, so the
table in `dispatch` and these functions never import the Gateway itself.
"""

from __future__ import annotations

from typing import Any, Protocol

from .bus import Bus
from .connection import Connection
from .messages import IdGenerator, InboundEvent, dumps, now_ms


class CommandContext(Protocol):
    @property
    def bus(self) -> Bus: ...

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


async def heartbeat_ack(ctx: CommandContext, conn: Connection, payload: dict[str, Any], ref: str | None) -> None:
    """Liveness only: the frame itself already refreshed `last_seen`."""


async def location_update(ctx: CommandContext, conn: Connection, payload: dict[str, Any], ref: str | None) -> None:
    await ctx.bus.publish_event("location_update", inbound_event(ctx, conn, "location_update", payload, ref))


async def dispatch_response(ctx: CommandContext, conn: Connection, payload: dict[str, Any],
                            ref: str | None) -> None:
    await ctx.bus.append_dispatch_response(inbound_event(ctx, conn, "dispatch_response", payload, ref))
