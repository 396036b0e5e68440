"""Cross-instance delivery on a Redis Cluster: sharded pub/sub, one subscriber connection per shard.

A user's channel `gateway:user:{u1}` lives in the slot of `u1` (redis_keys.py); SPUBLISH sends a
message only to the primary of that slot, which passes it only to the clients that SSUBSCRIBEd
there. Classic PUBLISH, in a cluster, is copied to every node over the cluster bus: with sharded
pub/sub the cost of a message stays on one shard, so adding shards adds capacity.

Each primary gets a `ShardBus`: bus_redis.RedisBus's listener (reconnect with backoff, PING-confirmed
readiness, the self-probe) speaking SSUBSCRIBE, holding the channels of the slots that primary
serves. The probe of a shard travels on a channel of that shard's own (`gateway:probe:{n}:<serverId>`,
`n` picked so its slot is one the shard serves), so every shard connection is probed.

`ClusterBus` places channels. When the slot map changes (a failover, a resharding: redis_cluster.py
finds out from MOVED replies, unreachable nodes, lost subscriptions and a periodic check), every
channel whose slot now has another primary is subscribed there, shards without slots are closed,
and, once the moved subscriptions are confirmed, the gateway is told as after a reconnect: it
reads back what was recorded meanwhile (PROTOCOL.md 7.4) and rewrites its presence. Redis itself
drops sharded subscriptions of slots a node stops serving (it sends `sunsubscribe`): such a channel
is placed again at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from typing import Any

from . import metrics as m
from .bus import BusListener
from .bus_redis import PROBE_HEAD, Probe, RedisBus, RedisPublishing
from .metrics import Metrics
from .redis_cluster import ClusterClient, ClusterEndpoint, slot_of
from .redis_endpoint import Address
from .redis_keys import Keys
from .resp import RedisUnavailable, RespConnection

log = logging.getLogger(__name__)

MAP_CHECK_S = 5.0  # the slot map is asked again this often (a reshard moves slots without any error)
MAP_RETRY_S = 0.5  # ... and this often while it is unknown or a shard is not ready
PROBE_TAG_TRIES = 100_000
LOST: Address = ("", 0)  # the home of a channel Redis unsubscribed us from: to be placed again


class ShardSource:
    """Where a shard's subscriber connects: its primary, as long as the map says it is one."""

    require_primary = False

    def __init__(self, endpoint: ClusterEndpoint, address: Address) -> None:
        self._endpoint = endpoint
        self.address = address

    async def primary_url(self) -> str:
        await self._endpoint.refresh()
        if self.address not in self._endpoint.primaries:
            raise ConnectionError(f"{self.address[0]}:{self.address[1]} serves no slot any more")
        return self._endpoint.node_url(self.address)


class ShardBus(RedisBus):
    """One primary's sharded subscriptions. Messages go straight to the gateway's listener."""

    SUBSCRIBE_COMMAND = "SSUBSCRIBE"
    UNSUBSCRIBE_COMMAND = "SUNSUBSCRIBE"
    PUBLISH_COMMAND = "SPUBLISH"

    def __init__(self, owner: ClusterBus, address: Address, probe: Probe, *, announce_first: bool) -> None:
        super().__init__(owner.commands, ShardSource(owner.endpoint, address), owner.keys, owner.server_id,
                         owner.metrics, stream_maxlen=0, probe=probe)
        self.address = address
        self._owner = owner
        self._announce_first = announce_first  # a shard that appeared later (failover, reshard) took over channels
        self._unsubscribing: dict[bytes, int] = {}  # SUNSUBSCRIBEs sent whose reply has not come back

    def unsubscribe_channel(self, channel: str) -> None:
        """Its `sunsubscribe` reply is ours, not Redis dropping the slot: counted so that it is told apart."""
        self._wanted.discard(channel)
        conn = self._conn
        if conn is not None:
            name = channel.encode()
            self._unsubscribing[name] = self._unsubscribing.get(name, 0) + 1
            self._send_quietly(conn, self.UNSUBSCRIBE_COMMAND, channel)

    async def connected(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self._first_connect.wait(), timeout_s)
        except TimeoutError:
            pass

    def _subscribed(self) -> None:
        """Every ready but the first of a shard there from the start: the gateway reads back what was
        recorded for its users while their channels were not subscribed here."""
        if self._announce_first:
            self._announce_first = False
            self._announce = True
        super()._subscribed()

    @property
    def channels(self) -> set[str]:
        return set(self._wanted)

    def _subscribe_all(self, conn: RespConnection) -> None:
        """One SSUBSCRIBE per channel: channels of one command must share a slot."""
        self._control_channel = self._probe_channel()
        self._control_channel_b = self._control_channel.encode()
        self._unsubscribing.clear()  # a new connection: nothing of ours in flight
        for channel in (self._control_channel, *self._wanted):
            conn.send("SSUBSCRIBE", channel)

    def _probe_channel(self) -> str:
        endpoint = self._owner.endpoint
        for n in range(PROBE_TAG_TRIES):
            if endpoint.owns(self.address, slot_of(str(n))):
                return self._owner.keys.probe(self._owner.server_id, str(n))
        raise ConnectionError(f"{self.address[0]}:{self.address[1]} serves no slot")

    async def _read_forever(self, conn: RespConnection) -> None:
        listener = self._listener
        assert listener is not None
        routes, control = self._owner.routes, self._owner.control_channel_b
        while True:
            replies = await conn.read_replies()
            self._last_reply = time.monotonic()
            for reply in replies:
                if isinstance(reply, Exception):
                    self._error_reply(reply)
                    continue
                kind = reply[0]
                if kind == b"smessage":
                    user_id = routes.get(reply[1])
                    if user_id is not None:
                        listener.on_user_message(user_id, reply[2])
                    elif reply[1] == self._control_channel_b:
                        if reply[2].startswith(PROBE_HEAD):
                            self._probe_arrived(reply[2])
                    elif reply[1] == control:
                        listener.on_control(reply[2])
                elif kind == b"ssubscribe":
                    self._confirm(reply[1])
                elif kind == b"sunsubscribe":
                    self._unsubscribed(reply[1])
                elif kind == b"pong" and not self._ready:
                    self._subscribed()

    def _error_reply(self, reply: Exception) -> None:
        """A MOVED answer to SSUBSCRIBE: the map this shard was given is already old. Nobody waits
        for the confirmations any longer (the channels are placed again)."""
        log.warning("Redis Cluster pub/sub error reply from %s:%d: %s", *self.address, reply)
        if str(reply).startswith("MOVED"):
            self._release_pending()
            self._owner.replace_lost()

    def _unsubscribed(self, channel: bytes) -> None:
        """The reply to one of our SUNSUBSCRIBEs, or Redis dropping a subscription we still want
        (its slot left this node)."""
        ours = self._unsubscribing.get(channel, 0)
        if ours:
            if ours == 1:
                del self._unsubscribing[channel]
            else:
                self._unsubscribing[channel] = ours - 1
            return
        name = channel.decode()
        if name in self._wanted or channel == self._control_channel_b:
            self._wanted.discard(name)
            self._owner.lost(name)


class ClusterBus(RedisPublishing):
    """The gateway's Bus on a Redis Cluster."""

    embedded = False
    PUBLISH_COMMAND = "SPUBLISH"

    def __init__(self, commands: ClusterClient, endpoint: ClusterEndpoint, keys: Keys, server_id: str,
                 metrics: Metrics, *, stream_maxlen: int, probe: Probe | None = None, event_shards: int = 0) -> None:
        super().__init__(commands, keys, metrics, stream_maxlen)
        self.event_shards = event_shards
        self.endpoint = endpoint
        self.server_id = server_id
        self._probe = probe or Probe()
        self.control_channel = keys.control(server_id)
        self.control_channel_b = self.control_channel.encode()
        self.routes: dict[bytes, str] = {}  # user channel -> userId, read by every shard's listener
        self._home: dict[str, Address | None] = {self.control_channel: None}  # channel -> shard it is on
        self._shards: dict[Address, ShardBus] = {}
        self._listener: BusListener | None = None
        self._placing = asyncio.Lock()
        self._place_again = False
        self._tasks: set[asyncio.Future[Any]] = set()
        self._maintainer: asyncio.Task[None] | None = None
        self._stopping = False
        self._started = False
        endpoint.on_slots_changed(self._slots_changed)

    @property
    def ready(self) -> bool:
        """Every primary's subscriber is live and every channel placed on one."""
        primaries = self.endpoint.primaries
        shards_live = all(address in self._shards and self._shards[address].ready for address in primaries)
        return bool(primaries) and shards_live and not self._unplaced()

    def _unplaced(self) -> bool:
        return any(home is None or home == LOST for home in self._home.values())

    async def start(self, listener: BusListener) -> None:
        self._listener = listener
        try:
            await self.endpoint.refresh()
            await self._place(announce=False)
        except RedisUnavailable as exc:
            log.warning("Redis Cluster not reachable yet (%s); retrying in the background", exc)
        await asyncio.gather(*(shard.connected(5.0) for shard in self._shards.values()))
        self._started = True
        self._maintainer = asyncio.create_task(self._maintain(), name="redis-cluster-map")

    async def stop(self) -> None:
        self._stopping = True
        if self._maintainer is not None:
            self._maintainer.cancel()
            await asyncio.gather(self._maintainer, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(shard.stop_listening() for shard in self._shards.values()))
        await self.commands.close()

    # --- subscriptions ------------------------------------------------------------------------

    async def subscribe_user(self, user_id: str) -> None:
        channel = self.keys.user_channel(user_id)
        self.routes[channel.encode()] = user_id
        shard = self._shard_for(channel)
        if shard is None:
            self._home[channel] = None  # placed when the map is known
            return
        self._home[channel] = shard.address
        await shard.subscribe_channel(channel)

    async def subscription_ready(self, user_id: str) -> None:
        channel = self.keys.user_channel(user_id)
        address = self._home.get(channel)
        if address is not None and address in self._shards:
            await self._shards[address].channel_ready(channel)

    def unsubscribe_user(self, user_id: str) -> None:
        channel = self.keys.user_channel(user_id)
        self.routes.pop(channel.encode(), None)
        address = self._home.pop(channel, None)
        if address is not None and address in self._shards:
            self._shards[address].unsubscribe_channel(channel)

    def _shard_for(self, channel: str) -> ShardBus | None:
        try:
            address = self.endpoint.owner_of(channel)
        except RedisUnavailable:
            return None
        return self._shards.get(address) or self._add_shard(address)

    def _add_shard(self, address: Address) -> ShardBus:
        shard = self._shards[address] = ShardBus(self, address, self._probe, announce_first=self._started)
        self._spawn(shard.start(self._shard_listener()))
        return shard

    def _shard_listener(self) -> BusListener:
        assert self._listener is not None
        return self._listener

    # --- placing channels on the shards the map names -------------------------------------------

    def _slots_changed(self) -> None:
        if not self._stopping and self._listener is not None:
            self._spawn(self._place_quietly(announce=True))

    def lost(self, channel: str) -> None:
        """Redis dropped one of our subscriptions: place it again (wherever the map now says), and
        count it as moved (what was published meanwhile is read back)."""
        if channel in self._home:
            self._home[channel] = LOST
        self.replace_lost()

    def replace_lost(self) -> None:
        self._spawn(self._refresh_and_place())

    async def _refresh_and_place(self) -> None:
        try:
            await self.endpoint.refresh(force=True)
        except RedisUnavailable as exc:
            log.warning("Redis Cluster map not refreshed: %s", exc)
        await self._place_quietly(announce=True)

    async def _place_quietly(self, *, announce: bool) -> None:
        try:
            await self._place(announce=announce)
        except RedisUnavailable as exc:
            log.warning("Redis Cluster channels not placed yet: %s", exc)

    async def _place(self, *, announce: bool) -> None:
        """Subscribe every wanted channel on the primary of its slot; close shards with no slots.
        One pass at a time; a change during a pass is covered by one more pass."""
        if self._placing.locked():
            self._place_again = True
            return
        async with self._placing:
            while True:
                self._place_again = False
                moved = await self._place_once()
                if moved and announce and self._listener is not None:
                    log.warning("Redis Cluster: %d channels moved to their slots' new primaries", moved)
                    self.metrics.incr(m.REDIS_RECONNECTS)
                    self._listener.on_bus_reconnected()  # read back what was recorded while they moved
                if not self._place_again:
                    return
                announce = True  # what changed meanwhile is a move like any other

    async def _place_once(self) -> int:
        primaries = set(self.endpoint.primaries)
        if not primaries:
            raise RedisUnavailable("the slot map is not known")
        for address in primaries - self._shards.keys():
            self._add_shard(address)
        waits = []
        moved = 0
        for channel, home in list(self._home.items()):
            owner = self.endpoint.owner_of(channel)
            if home == owner:
                continue
            if home is not None:
                moved += 1
                if home != LOST and home in self._shards:
                    self._shards[home].unsubscribe_channel(channel)
            self._home[channel] = owner
            shard = self._shards[owner]
            waits.append(shard.confirmed(shard.request_channel(channel)))  # requested now, in this order
        await asyncio.gather(*waits)
        self._close_shards_without_slots()
        return moved

    def _close_shards_without_slots(self) -> None:
        """Against the map as it is now (it may have changed while confirmations were awaited); a
        channel still homed on a closed shard is placed again by the next pass."""
        primaries = set(self.endpoint.primaries)
        for address in self._shards.keys() - primaries:
            shard = self._shards.pop(address)
            log.warning("Redis Cluster: %s:%d serves no slot any more; closing its subscriber", *address)
            self._spawn(shard.stop_listening())
            for channel, home in self._home.items():
                if home == address:
                    self._home[channel] = LOST
                    self._place_again = True

    async def _maintain(self) -> None:
        """The periodic check of the map (a resharding or an added shard raises no error here)."""
        while not self._stopping:
            await asyncio.sleep(MAP_CHECK_S if self.ready else MAP_RETRY_S)
            try:
                await self.endpoint.refresh(force=True)  # a change calls _slots_changed
                if not self.ready:
                    await self._place(announce=True)
            except RedisUnavailable as exc:
                log.debug("Redis Cluster map check failed: %s", exc)

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- client events ---------------------------------------------------------------------------

    async def publish_event(self, kind: str, data: str, sender: str) -> None:
        await self._publish(*self._event_channel(kind, sender), data)

    def _event_channel(self, kind: str, sender: str) -> tuple[str, str]:
        """Classic `gateway:events:<kind>` (copied to every node), or with EVENT_SHARDS one of N
        sharded channels picked by the sender, so that events cost one shard each and one user's
        stay in order."""
        if not self.event_shards:
            return "PUBLISH", self.keys.events(kind)
        return "SPUBLISH", self.keys.event_partition(kind, zlib.crc32(sender.encode()) % self.event_shards)

    # --- the rest of the Bus -------------------------------------------------------------------

    async def ping(self) -> None:
        await asyncio.gather(*(shard.ping() for shard in list(self._shards.values())))

    def primary_moved(self, address: Address) -> None:
        """Sentinel's hook; unused in a cluster."""
