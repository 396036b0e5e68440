"""Where Redis is: every address the gateway connects to is resolved here, and nowhere else.

Single mode: `REDIS_URL` as it is. Sentinel mode (`REDIS_SENTINELS` + `REDIS_SENTINEL_MASTER`):
`REDIS_URL` still gives the scheme, credentials, db and TLS options of the data nodes, but its
host:port is replaced by the primary the sentinels name at that moment (redis-py's `Sentinel` does
the asking). The three kinds of connection follow a failover each in its own way, all fed from here:

- the pipelined client (resp.PipelinedClient) and the subscriber (bus_redis.RedisBus) ask
  `primary_url()` on every reconnect, check with ROLE that the node is a primary, and treat a
  READONLY reply as "reconnect and ask again";
- redis-py's client (stats, reaping, resync reads) is `Sentinel.master_for`, which asks on every
  new connection and drops one that answers READONLY;
- a `+switch-master` announced by any sentinel moves all of them at once (`on_primary_moved`),
  instead of waiting for the next error or the self-probe.

Why one module: the Redis Cluster mode of issue #11 needs a map from user to shard here too, and
the rest of the gateway should go on asking "where do I send this" without knowing the topology.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from collections.abc import Callable, Coroutine
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

from .backoff import Backoff
from .config import Settings, parse_addresses, parse_sentinels
from .resp import RespConnection

log = logging.getLogger(__name__)

SWITCH_CHANNEL = "+switch-master"
LOOKUP_REUSE_S = 0.1  # a burst of reconnects (every pending command of a dead link) asks the sentinels once
SENTINEL_TIMEOUT_S = 1.0  # per sentinel: a dead one must not hold a reconnect for long

Address = tuple[str, int]
MovedCallback = Callable[[Address], None]


class RedisEndpoint:
    """Single-Redis mode: the one URL, which never moves."""

    require_primary = False

    def __init__(self, url: str) -> None:
        self.url = url
        self._moved: list[MovedCallback] = []
        self._clients: list[Any] = []  # Redis (or RedisCluster) clients, closed by stop()

    async def primary_url(self) -> str:
        return self.url

    def client(self, **options: Any) -> Redis:
        """redis-py's client for the commands that do not ride the pipelined connection."""
        client = Redis.from_url(self.url, **options)
        self._clients.append(client)
        return client

    def on_primary_moved(self, *callbacks: MovedCallback) -> None:
        self._moved.extend(callbacks)

    async def start(self) -> None:
        """Nothing to watch."""

    async def stop(self) -> None:
        await self._close_clients()

    async def _close_clients(self) -> None:
        clients, self._clients = self._clients, []
        await asyncio.gather(*(client.aclose() for client in clients), return_exceptions=True)


class SentinelEndpoint(RedisEndpoint):
    """The primary of `master` as the sentinels see it, followed through failovers."""

    require_primary = True

    def __init__(self, url: str, sentinels: list[Address], master: str, *, password: str | None = None) -> None:
        super().__init__(url)
        self.master = master
        self._parts = urllib.parse.urlsplit(url)
        options = parse_url(url)
        self._tls = options.get("connection_class") is SSLConnection
        self._tls_options = {k: v for k, v in options.items() if k.startswith("ssl_")}
        self._node_options = {k: v for k, v in options.items() if k not in ("host", "port", "connection_class")}
        if self._tls:
            self._node_options["ssl"] = True
        self._sentinels = sentinels
        self._password = password
        self._sentinel = Sentinel(sentinels, sentinel_kwargs=self.sentinel_options())  # type: ignore[no-untyped-call]
        self._known: Address | None = None  # the primary last named (by a lookup or a +switch-master)
        self._lookup: tuple[float, Address | ConnectionError] | None = None
        self._asking: asyncio.Future[Address] | None = None
        self._watchers: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Future[None]] = set()

    def sentinel_options(self) -> dict[str, Any]:
        """How to reach the sentinels: their own password; TLS (with REDIS_URL's options) when REDIS_URL
        is rediss://, since a deployment encrypts either all of its Redis traffic or none of it."""
        options: dict[str, Any] = {"socket_connect_timeout": SENTINEL_TIMEOUT_S, "socket_timeout": SENTINEL_TIMEOUT_S}
        if self._password:
            options["password"] = self._password
        if self._tls:
            options.update(ssl=True, **self._tls_options)
        return options

    # --- where the primary is -------------------------------------------------------------------

    async def primary_url(self) -> str:
        """REDIS_URL with the primary's host:port. Raises ConnectionError while no sentinel names a
        primary that is up (between a crash and the promotion): callers retry as for a Redis outage."""
        return with_address(self.url, await self.primary())

    async def primary(self) -> Address:
        """Ask the sentinels; concurrent callers share one question, and an answer (or a failure) is
        reused for LOOKUP_REUSE_S."""
        lookup = self._lookup
        if lookup is not None and time.monotonic() - lookup[0] < LOOKUP_REUSE_S:
            return self._answer(lookup[1])
        if self._asking is None:
            self._asking = asyncio.ensure_future(self._ask())
            self._asking.add_done_callback(self._asked)
        return await asyncio.shield(self._asking)

    @staticmethod
    def _answer(result: Address | ConnectionError) -> Address:
        if isinstance(result, ConnectionError):
            raise ConnectionError(str(result))
        return result

    def _asked(self, asking: asyncio.Future[Address]) -> None:
        self._asking = None
        if asking.cancelled():
            return
        error = asking.exception()
        if error is None:
            self._lookup = (time.monotonic(), asking.result())
        elif isinstance(error, ConnectionError):
            self._lookup = (time.monotonic(), error)

    async def _ask(self) -> Address:
        try:
            host, port = await self._sentinel.discover_master(self.master)
        except (RedisError, OSError) as exc:  # MasterNotFoundError is a redis ConnectionError
            raise ConnectionError(f"no primary for {self.master!r} from the sentinels: {exc}") from None
        address = (str(host), int(port))
        if address != self._known:
            log.info("Redis primary of %r is %s:%d (from the sentinels)", self.master, *address)
            self._known = address
        return address

    def client(self, **options: Any) -> Redis:
        """redis-py's Sentinel-managed client: it asks the sentinels on each new connection and drops
        a connection that answers READONLY. Closed pools are disconnected again on a switch."""
        client: Redis = self._sentinel.master_for(self.master, **{**self._node_options, **options})
        self._clients.append(client)
        return client

    # --- following +switch-master -----------------------------------------------------------

    async def start(self) -> None:
        """Listen for `+switch-master` on every sentinel: any one of them may be the one still up."""
        self._watchers = [asyncio.create_task(self._watch(address), name=f"sentinel-watch-{address[1]}")
                          for address in self._sentinels]

    async def stop(self) -> None:
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        self._watchers = []
        await self._close_clients()
        await self._sentinel.aclose()

    def sentinel_url(self, address: Address) -> str:
        """A URL for resp.RespConnection to one sentinel: REDIS_URL's scheme and TLS query, the sentinels'
        password."""
        host, port = address
        auth = f":{urllib.parse.quote(self._password, safe='')}@" if self._password else ""
        netloc = f"{auth}[{host}]:{port}" if ":" in host else f"{auth}{host}:{port}"
        return urllib.parse.urlunsplit((self._parts.scheme, netloc, "", self._parts.query if self._tls else "", ""))

    async def _watch(self, address: Address) -> None:
        backoff = Backoff(base_s=0.1, cap_s=2.0)
        while True:
            conn = RespConnection(self.sentinel_url(address))
            try:
                await conn.connect(SENTINEL_TIMEOUT_S)
                conn.send("SUBSCRIBE", SWITCH_CHANNEL)
                backoff.reset()
                await self._read_switches(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a sentinel down is normal; the others still speak
                log.debug("sentinel %s:%d not watched (%s)", *address, exc)
            finally:
                conn.close()
            await asyncio.sleep(backoff.next_delay())

    async def _read_switches(self, conn: RespConnection) -> None:
        while True:
            for reply in await conn.read_replies():
                if isinstance(reply, list) and reply[0] == b"message" and reply[1] == SWITCH_CHANNEL.encode():
                    self._switch_announced(reply[2])

    def _switch_announced(self, data: bytes) -> None:
        """`<master> <old ip> <old port> <new ip> <new port>`, sent by each sentinel: acted on once."""
        fields = data.decode(errors="replace").split()
        if len(fields) != 5 or fields[0] != self.master or not fields[4].isdigit():
            return
        address = (fields[3], int(fields[4]))
        self._lookup = (time.monotonic(), address)
        if address == self._known:
            return
        log.warning("Redis failover: %r moved from %s:%s to %s:%d; reconnecting to the new primary",
                    self.master, fields[1], fields[2], *address)
        self._known = address
        for client in self._clients:
            self._spawn(client.connection_pool.disconnect())
        for callback in self._moved:
            callback(address)


    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def with_address(url: str, address: Address) -> str:
    """`url` (scheme, credentials, db, TLS query) with another node's host:port."""
    parts = urllib.parse.urlsplit(url)
    host, port = address
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    userinfo = parts.netloc.rpartition("@")[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{userinfo}@{netloc}" if userinfo else netloc))


def endpoint_for(settings: Settings) -> RedisEndpoint:
    """The endpoint the settings describe (config.validate has checked them)."""
    if settings.redis_cluster:
        from .redis_cluster import ClusterEndpoint  # imports this module
        return ClusterEndpoint(settings.redis_url, parse_addresses(settings.redis_cluster_seeds, "REDIS_CLUSTER_SEEDS"))
    if not settings.redis_sentinels:
        return RedisEndpoint(settings.redis_url)
    return SentinelEndpoint(settings.redis_url, parse_sentinels(settings.redis_sentinels),
                            settings.redis_sentinel_master, password=settings.redis_sentinel_password)
