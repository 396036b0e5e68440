"""Redis Cluster mode (`REDIS_CLUSTER=true`): where each slot lives, and commands routed to it.

`REDIS_URL` names any one node (its scheme, credentials and TLS options are used for every node);
the gateway asks it for the slot map (`CLUSTER SLOTS`) and keeps one pipelined connection per
primary (resp.PipelinedClient, the same bare hiredis connection as in single mode). A command goes
to the primary of its key's slot. The map is asked again when a node answers MOVED (the slot
moved: resharding, or a failover seen by that node), when a node cannot be reached or answers
READONLY (it died or was demoted), when a subscriber loses a shard channel (bus_redis_cluster.py),
and every few seconds by the housekeeping tick; a change is announced to the listeners (the
subscriber moves the channels of the slots that moved). ASK (a slot being migrated) is answered
with ASKING and the command on the target node, without touching the map.

Why not redis-py's RedisCluster for this: the hot commands ride the pipelined hiredis connection for
the reasons resp.py gives, and the subscriber needs the map itself to place sharded subscriptions.
redis-py's RedisCluster is still what the colder commands (stats, reaping, resync reads) use.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from .redis_endpoint import Address, RedisEndpoint, with_address
from .resp import PipelinedClient, RedisNotRun, RedisReplyError, RedisUnavailable, RespConnection

log = logging.getLogger(__name__)

SLOTS = REDIS_CLUSTER_HASH_SLOTS
REFRESH_REUSE_S = 0.2  # a burst of MOVED replies (a whole pipeline of them) asks the cluster once
RETRY_BUDGET_S = 1.5  # how long one command follows redirections and waits out a failover before failing
RETRY_PAUSE_S = 0.1
MAX_REDIRECTS = 16  # as redis-py: nodes that disagree for a while must not bounce a command forever
# Commands without a key go to any primary; those with numkeys have their first key at 3; the rest at 1.
KEYLESS_COMMANDS = frozenset({"PING", "FUNCTION", "SCRIPT", "ASKING", "CLUSTER", "INFO", "ROLE", "READONLY", "TIME"})
NUMKEYS_COMMANDS = frozenset({"EVALSHA", "EVAL", "FCALL", "FCALL_RO"})  # <cmd> <name> <numkeys> <key> ...
# Commands that must not run twice: after a connection died with them in flight they may have run, so
# they are retried only when they surely did not run (RedisNotRun) or Redis refused them (MOVED, ...).
ONCE_ONLY_COMMANDS = frozenset({"FCALL", "PUBLISH", "SPUBLISH", "XADD"})

SlotsChanged = Callable[[], None]


def routing_key(args: tuple[str | bytes | int, ...]) -> str | bytes | None:
    command = str(args[0]).upper()
    if command in KEYLESS_COMMANDS:
        return None
    position = 1
    if command in NUMKEYS_COMMANDS:
        if len(args) <= 3 or int(args[2]) == 0:
            return None
        position = 3
    if len(args) <= position:
        return None
    key = args[position]
    return key if isinstance(key, str | bytes) else str(key)


def slot_of(key: str | bytes) -> int:
    return key_slot(key.encode() if isinstance(key, str) else key)


class ClusterEndpoint(RedisEndpoint):
    """The cluster's slot map, asked of any known node."""

    require_primary = False

    def __init__(self, url: str, seeds: list[Address] | None = None) -> None:
        super().__init__(url)
        self._seeds = list(seeds or [])
        # REDIS_URL's node and REDIS_CLUSTER_SEEDS, then every node the map named
        self._known: list[Address] = list(dict.fromkeys([RespConnection(url).address, *self._seeds]))
        self._owners: list[Address] = []  # slot -> primary, patched by MOVED replies between reads
        self._read: list[Address] = []  # the map as last read, to tell a change from a patch
        self._primaries: list[Address] = []
        self._refreshed = 0.0
        self._refreshing: asyncio.Future[bool] | None = None
        self._listeners: list[SlotsChanged] = []
        self.version = 0  # bumped on every change of the map

    # --- the map ---------------------------------------------------------------------------

    @property
    def primaries(self) -> list[Address]:
        return list(self._primaries)

    def owner(self, slot: int) -> Address:
        if not self._owners:
            raise RedisUnavailable("the Redis Cluster slot map is not known yet")
        return self._owners[slot]

    def owner_of(self, key: str | bytes) -> Address:
        return self.owner(slot_of(key))

    def owns(self, address: Address, slot: int) -> bool:
        return bool(self._owners) and self._owners[slot] == address

    def on_slots_changed(self, listener: SlotsChanged) -> None:
        self._listeners.append(listener)

    def node_url(self, address: Address) -> str:
        return with_address(self.url, address)

    async def refresh(self, *, force: bool = False) -> bool:
        """Ask the cluster for the slot map; True when it changed. Concurrent callers share one
        question, and an answer is reused for REFRESH_REUSE_S unless `force`."""
        if not force and self._owners and time.monotonic() - self._refreshed < REFRESH_REUSE_S:
            return False
        if self._refreshing is None:
            self._refreshing = asyncio.ensure_future(self._ask())
            self._refreshing.add_done_callback(self._asked)
        return await asyncio.shield(self._refreshing)

    def _asked(self, asking: asyncio.Future[bool]) -> None:
        self._refreshing = None

    async def _ask(self) -> bool:
        errors: list[str] = []
        for address in list(self._known):
            conn = RespConnection(self.node_url(address))
            try:
                await conn.connect(1.0)
                conn.send("CLUSTER", "SLOTS")
                reply = (await asyncio.wait_for(conn.read_replies(), 1.0))[0]
            except (OSError, TimeoutError, ConnectionError) as exc:
                errors.append(f"{address[0]}:{address[1]}: {exc}")
                self._known.remove(address)  # asked last next time: a dead node must not cost every read a timeout
                self._known.append(address)
                continue
            finally:
                conn.close()
            if isinstance(reply, Exception) or not reply:
                errors.append(f"{address[0]}:{address[1]}: {reply or 'no slots assigned'}")
                continue
            self._refreshed = time.monotonic()
            return self._apply(reply, address)
        raise RedisUnavailable(f"no Redis Cluster node answered CLUSTER SLOTS ({'; '.join(errors)})")

    def _apply(self, reply: list[Any], asked: Address) -> bool:
        owners: list[Address] = [("", 0)] * SLOTS
        primaries: list[Address] = []
        known: list[Address] = []
        for start, end, primary, *replicas in reply:
            address = self._address(primary, asked)
            owners[int(start):int(end) + 1] = [address] * (int(end) - int(start) + 1)
            if address not in primaries:
                primaries.append(address)
            known.extend(self._address(node, asked) for node in (primary, *replicas))
        unassigned = owners.count(("", 0))
        if unassigned:
            raise RedisUnavailable(f"the Redis Cluster leaves {unassigned} slots unassigned")
        self._known = list(dict.fromkeys([*known, *self._known]))
        first = not self._read
        unchanged = owners == self._read and owners == self._owners and primaries == self._primaries
        self._read, self._owners, self._primaries = owners, list(owners), primaries
        if unchanged:
            return False
        self.version += 1
        log.info("Redis Cluster slot map %s: %d primaries (%s)", "read" if first else "changed", len(primaries),
                 ", ".join(f"{host}:{port}" for host, port in primaries))
        for listener in self._listeners:
            listener()
        return True

    @staticmethod
    def _address(node: list[Any], asked: Address) -> Address:
        """A node as CLUSTER SLOTS names it; an empty host means "the address you asked me on"."""
        host = node[0].decode() if isinstance(node[0], bytes) else str(node[0])
        return (host or asked[0], int(node[1]))

    def moved(self, slot: int, address: Address) -> None:
        """A MOVED reply: use the new owner for that slot at once (the listeners move its channels);
        the full map follows."""
        if self._owners and self._owners[slot] != address:
            self._owners[slot] = address
            if address not in self._primaries:
                self._primaries.append(address)
            self.version += 1
            for listener in self._listeners:
                listener()

    # --- the endpoint ------------------------------------------------------------------------

    def client(self, **options: Any) -> Any:  # a RedisCluster: Redis's commands, cluster-routed
        """redis-py's RedisCluster for the commands that do not ride the pipelined connections."""
        seeds = [ClusterNode(host, port) for host, port in self._seeds]
        client = RedisCluster.from_url(self.url, startup_nodes=seeds or None, **options)
        self._clients.append(client)
        return client

    async def start(self) -> None:
        """A cluster down at start is an outage like any other: the instance starts, `/ready` says
        503, and the subscriber asks for the map until it gets one."""
        try:
            await self.refresh(force=True)
        except RedisUnavailable as exc:
            log.warning("Redis Cluster slot map not read yet (%s); retrying in the background", exc)


class ClusterClient:
    """resp.PipelinedClient's interface over the cluster: one PipelinedClient per primary, each
    command sent to the primary of its key's slot, redirections and failovers followed within
    RETRY_BUDGET_S (then RedisUnavailable, as for an unreachable single Redis)."""

    def __init__(self, endpoint: ClusterEndpoint) -> None:
        self._endpoint = endpoint
        self._nodes: dict[Address, PipelinedClient] = {}
        self._scripts: list[str] = []
        self._background: set[asyncio.Future[None]] = set()

    def node(self, address: Address) -> PipelinedClient:
        client = self._nodes.get(address)
        if client is None:
            client = self._nodes[address] = PipelinedClient(self._endpoint.node_url(address))
            for source in self._scripts:
                client.script(source)
        return client

    async def nodes(self) -> list[PipelinedClient]:
        """One client per primary of the current map: for what every primary must hold (the functions)."""
        await self._endpoint.refresh()
        return [self.node(address) for address in self._endpoint.primaries]

    def script(self, source: str) -> str:
        self._scripts.append(source)
        for client in self._nodes.values():
            client.script(source)
        return hashlib.sha1(source.encode()).hexdigest()

    async def call(self, *args: str | bytes | int) -> Any:
        key = routing_key(args)
        once = str(args[0]).upper() in ONCE_ONLY_COMMANDS
        return await self._routed(key, lambda client: client.call(*args), once=once)

    async def evalsha(self, sha: str, keys: list[str], args: list[str | int]) -> Any:
        return await self._routed(keys[0] if keys else None, lambda client: client.evalsha(sha, keys, args))

    async def _routed(self, key: str | bytes | None, send: Callable[[PipelinedClient], Awaitable[Any]], *,
                      once: bool = False) -> Any:
        deadline = time.monotonic() + RETRY_BUDGET_S
        slot = slot_of(key) if key is not None else None
        asking: Address | None = None
        for _redirect in range(MAX_REDIRECTS):
            if not self._endpoint.primaries:
                await self._endpoint.refresh()
            address = asking or (self._endpoint.owner(slot) if slot is not None else self._endpoint.primaries[0])
            client = self.node(address)
            try:
                if asking is not None:
                    asking = None
                    _, reply = await asyncio.gather(client.call("ASKING"), send(client))
                    return reply
                return await send(client)
            except RedisReplyError as exc:
                text = str(exc)
                if text.startswith("MOVED "):
                    slot = self._follow_moved(text)
                    continue  # the map is right for that slot now: no pause
                if text.startswith("ASK "):
                    asking = self._target(text)
                    continue
                if not text.startswith(("TRYAGAIN", "CLUSTERDOWN")):
                    raise
                error: Exception = exc
            except RedisUnavailable as exc:  # a dead or demoted node: the map must be asked again
                if once and not isinstance(exc, RedisNotRun):
                    self._refresh_soon()
                    raise  # it may have run before the connection died: the caller decides (a producer id dedupes)
                error = exc
            if time.monotonic() >= deadline:
                raise RedisUnavailable(f"Redis Cluster: {error}") from None
            await asyncio.sleep(RETRY_PAUSE_S)
            await self._refresh_quietly()
        raise RedisUnavailable(f"Redis Cluster: more than {MAX_REDIRECTS} redirections (the nodes disagree)")

    def _follow_moved(self, text: str) -> int:
        slot = int(text.split(" ", 2)[1])
        self._endpoint.moved(slot, self._target(text))
        self._refresh_soon()
        return slot

    def _refresh_soon(self) -> None:
        refreshing = asyncio.ensure_future(self._refresh_quietly())
        self._background.add(refreshing)
        refreshing.add_done_callback(self._background.discard)

    @staticmethod
    def _target(text: str) -> Address:
        """`MOVED|ASK <slot> <host>:<port>`."""
        host, _, port = text.split(" ", 2)[2].rpartition(":")
        return (host.strip("[]"), int(port))

    async def _refresh_quietly(self) -> None:
        try:
            await self._endpoint.refresh()
        except RedisUnavailable as exc:
            log.debug("Redis Cluster map not refreshed: %s", exc)

    def primary_moved(self, address: Address) -> None:
        """Sentinel's hook; a cluster announces moves through MOVED and the slot map instead."""

    async def close(self) -> None:
        await asyncio.gather(*(client.close() for client in self._nodes.values()))

