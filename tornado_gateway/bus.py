"""Cross-instance delivery: the interface, and the embedded bus for a single instance.

The gateway publishes to a user's channel without knowing where the user is;
each instance subscribes to the channels of the users it holds (see
`bus_redis`). `BusListener` is how the bus hands messages back: plain
callbacks, no task per message.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

log = logging.getLogger(__name__)


class BusUnavailable(Exception):
    """Redis could not take the message; the caller tells its client to retry."""


class BusListener(Protocol):
    def on_user_message(self, user_id: str, data: bytes) -> None: ...

    def on_control(self, data: bytes) -> None: ...

    def on_bus_reconnected(self) -> None:
        """Subscriptions are live again after an outage: re-register what Redis may have lost."""


class Bus(Protocol):
    embedded: bool  # True for the in-process bus (no Redis)

    @property
    def ready(self) -> bool:
        """Connected and subscribed: what /ready reports."""

    async def start(self, listener: BusListener) -> None: ...

    async def stop(self) -> None: ...

    async def subscribe_user(self, user_id: str) -> None:
        """Returns once messages for the user will reach this instance (or Redis is down: then on reconnect)."""

    async def subscription_ready(self, user_id: str) -> None:
        """Returns once an already requested subscription for the user is live."""

    def unsubscribe_user(self, user_id: str) -> None: ...

    async def publish_user(self, user_id: str, data: str) -> None: ...

    async def publish_event(self, kind: str, data: str, sender: str) -> None:
        """To the kind's channel; `sender`, the userId the event came from, picks the channel's
        partition when events are sharded (EVENT_SHARDS, Redis Cluster), so one user's events keep
        their order."""

    async def append_event(self, kind: str, data: str, sender: str) -> None:
        """XADD to the kind's stream `gateway:stream:{kind}` (capped), then PUBLISH to its channel: the
        events a service must not miss (dispatch responses, receipts) go to both."""

    async def send_control(self, server_id: str, data: str) -> None: ...

    async def ping(self) -> None:
        """Check the subscriber connection is alive; a dead one is reconnected."""


class MemoryBus:
    """`REDIS_URL=memory://`: one instance, delivery in-process; client events are counted and dropped."""

    embedded = True

    def __init__(self) -> None:
        self._listener: BusListener | None = None
        self._users: set[str] = set()
        self.events_dropped = 0

    @property
    def ready(self) -> bool:
        return self._listener is not None

    async def start(self, listener: BusListener) -> None:
        self._listener = listener

    async def stop(self) -> None:
        self._listener = None

    async def subscribe_user(self, user_id: str) -> None:
        self._users.add(user_id)

    async def subscription_ready(self, user_id: str) -> None:
        return None

    def unsubscribe_user(self, user_id: str) -> None:
        self._users.discard(user_id)

    async def publish_user(self, user_id: str, data: str) -> None:
        self.deliver(user_id, data.encode())

    def deliver(self, user_id: str, data: bytes) -> None:
        """Next loop iteration, like a message coming back from Redis (MemoryHistory publishes here)."""
        if self._listener is not None and user_id in self._users:
            asyncio.get_running_loop().call_soon(self._listener.on_user_message, user_id, data)

    async def publish_event(self, kind: str, data: str, sender: str) -> None:
        self.events_dropped += 1
        log.debug("memory bus: %s event not forwarded (no Redis)", kind)

    async def append_event(self, kind: str, data: str, sender: str) -> None:
        await self.publish_event(kind, data, sender)

    async def send_control(self, server_id: str, data: str) -> None:
        return None

    async def ping(self) -> None:
        return None
