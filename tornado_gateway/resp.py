"""Bare Redis connections for the two hot paths: the pub/sub listener and pipelined commands.

redis-py's asyncio client checks a connection out of a pool, wraps every
command in retry and encoding machinery, and its connection consumes
subscribe confirmations as "push responses". The gateway's hottest Redis
traffic (PUBLISH per client event, the presence scripts per connection, the
subscriber stream) needs none of that, so it runs on one hiredis-parsed
connection each. Everything else (stats, reaping, resync) uses redis.asyncio.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import inspect
import ssl
import time
from collections.abc import Mapping
from typing import Any, Protocol, cast

import hiredis
from redis.asyncio.connection import RedisSSLContext, SSLConnection, parse_url
from redis.exceptions import RedisError

COMMAND_TIMEOUT_S = 5.0
WATCHDOG_INTERVAL_S = 1.0


def pack(args: tuple[str | bytes | int, ...]) -> bytes:
    return bytes(hiredis.pack_command(cast(Any, args)))  # its stub types a 1-tuple


def redis_tls_options(url_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """`RedisSSLContext`'s arguments for a rediss:// URL, meaning what they mean to redis.asyncio, which opens
    the gateway's other connections with the same URL: one source of truth, so the two cannot disagree.

    Defaults come from `SSLConnection`'s signature (in redis-py 8: verify the certificate and the hostname),
    not from `RedisSSLContext`'s, which verify nothing; the URL's `ssl_*` values, as `parse_url` converted them,
    override them; `RedisSSLContext` maps `ssl_cert_reqs=none|optional|required` and loads the files."""
    parameters = inspect.signature(SSLConnection.__init__).parameters.values()
    options = {p.name: p.default for p in parameters if p.name.startswith("ssl_")}
    options.update((name, value) for name, value in url_kwargs.items() if name.startswith("ssl_"))
    return {name.removeprefix("ssl_"): value for name, value in options.items()}


def redis_tls_context(options: Mapping[str, Any]) -> ssl.SSLContext:
    """Built once per connection, when it opens, never per command: certificates rotated on disk are used
    from the next reconnect on, as redis-py's pool connections use them. Any failure, a missing file as much
    as a bad `ssl_cert_reqs`, is a ConnectionError, so the callers log it and retry as for an unreachable
    Redis (/ready stays 503) instead of losing the listener task to an exception they do not expect."""
    try:
        return RedisSSLContext(**options).get()
    except (OSError, RedisError, TypeError, ValueError) as exc:
        raise ConnectionError(f"TLS options of the Redis URL: {exc}") from None


class RedisUnavailable(ConnectionError):
    """No connection to Redis, or it did not answer in time."""


class RedisNotRun(RedisUnavailable):
    """The command did not run (no connection: it never left; or a demoted node refused it with
    READONLY), so sending it again cannot run it twice."""


class PrimarySource(Protocol):
    """Where the primary is now (redis_endpoint.py): a fixed REDIS_URL, or what the sentinels say.

    Asked on every (re)connect, never per command. `require_primary`: check with ROLE that the node
    connected to is a primary, since a node a sentinel named a moment ago may have been demoted."""

    require_primary: bool

    async def primary_url(self) -> str: ...


class Commands(Protocol):
    """What the gateway sends commands through: a PipelinedClient, or redis_cluster.ClusterClient
    (one PipelinedClient per primary, each command routed by its key)."""

    async def call(self, *args: str | bytes | int) -> Any: ...

    async def evalsha(self, sha: str, keys: list[str], args: list[str | int]) -> Any: ...

    def script(self, source: str) -> str: ...

    async def nodes(self) -> list[PipelinedClient]:
        """A client per primary, for what every primary must hold (the history functions)."""

    def primary_moved(self, address: tuple[str, int]) -> None: ...

    async def close(self) -> None: ...


class FixedPrimary:
    """REDIS_URL as it is: single-Redis mode."""

    require_primary = False

    def __init__(self, url: str) -> None:
        self.url = url

    async def primary_url(self) -> str:
        return self.url


def source_of(url: str | PrimarySource) -> PrimarySource:
    return FixedPrimary(url) if isinstance(url, str) else url


def is_readonly(error: object) -> bool:
    """The node took a write as a replica: it was demoted (a failover). Every such error starts with
    READONLY, for plain commands, scripts and functions alike."""
    return str(error).startswith("READONLY")


class RedisReplyError(Exception):
    """Redis answered with an error (-ERR ...)."""


class RespConnection:
    """A bare RESP connection parsed by hiredis.

    Commands are queued in order and written once per event-loop iteration: a connect storm's
    SUBSCRIBEs and presence scripts leave in one syscall instead of one each."""

    __slots__ = ("_host", "_port", "_username", "_password", "_ssl", "_unix_path", "_db", "_reader", "_writer",
                 "_parser", "_outbox")

    def __init__(self, url: str) -> None:
        kwargs = parse_url(url)
        self._host = str(kwargs.get("host", "localhost"))
        self._port = int(kwargs.get("port", 6379))
        self._username = kwargs.get("username")
        self._password = kwargs.get("password")
        tls = kwargs.get("connection_class") is SSLConnection
        self._ssl: dict[str, Any] | None = redis_tls_options(kwargs) if tls else None
        self._unix_path = kwargs.get("path")
        self._db = int(kwargs.get("db") or 0)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._parser = hiredis.Reader()
        self._outbox: list[bytes] = []

    @property
    def address(self) -> tuple[str, int]:
        return self._host, self._port

    async def connect(self, timeout_s: float = 2.0, *, require_primary: bool = False) -> None:
        """Open, authenticate, select the db; with `require_primary`, refuse a node that is not a primary."""
        if self._unix_path:
            opening = asyncio.open_unix_connection(self._unix_path)
        else:
            tls = redis_tls_context(self._ssl) if self._ssl is not None else None
            # the hostname verified is the URL's host, as for redis-py (an IP is matched against IP SANs)
            opening = asyncio.open_connection(self._host, self._port, ssl=tls,
                                              server_hostname=self._host if tls else None)
        self._reader, self._writer = await asyncio.wait_for(opening, timeout_s)
        if self._password:
            auth = ("AUTH", self._username, self._password) if self._username else ("AUTH", self._password)
            await self._handshake(timeout_s, *[a for a in auth if a is not None])
        if self._db:  # the db of REDIS_URL, as redis-py selects it for the other connections
            await self._handshake(timeout_s, "SELECT", self._db)
        if require_primary:
            await self._check_primary(timeout_s)

    async def _check_primary(self, timeout_s: float) -> None:
        """What the Sentinel client guidelines ask for: the sentinels' answer may be a moment old, and a
        subscriber on a demoted node would receive nothing (replicas accept SUBSCRIBE all the same)."""
        role = await self._handshake(timeout_s, "ROLE")
        if not role or role[0] != b"master":
            raise ConnectionError(f"{self._host}:{self._port} is not the primary (role {role[0] if role else None!r})")

    async def _handshake(self, timeout_s: float, *command: str | int) -> Any:
        self.send(*command)
        reply = (await asyncio.wait_for(self.read_replies(), timeout_s))[0]
        if isinstance(reply, Exception):
            raise ConnectionError(f"Redis refused {command[0]}: {reply}")
        return reply

    def send(self, *args: str | bytes | int) -> None:
        if self._writer is None or self._writer.is_closing():
            raise ConnectionError("Redis connection is closed")
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append(pack(args))

    def _flush(self) -> None:
        data, self._outbox = b"".join(self._outbox), []
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(data)  # a failed write surfaces as a read error on this connection

    async def read_replies(self) -> list[Any]:
        """Every complete reply available after one socket read (at least one)."""
        assert self._reader is not None
        replies: list[Any] = []
        while not replies:
            data = await self._reader.read(65536)
            if not data:
                raise ConnectionError("Redis closed the connection")
            self._parser.feed(data)
            reply = self._parser.gets()
            while reply is not False:
                replies.append(reply)
                reply = self._parser.gets()
        return replies

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class _Link:
    """One connection and the commands in flight on it (they fail together if it dies)."""

    __slots__ = ("conn", "pending", "waiting_since", "watchdog")

    def __init__(self, conn: RespConnection) -> None:
        self.conn = conn
        self.pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        # When the oldest command still pending started waiting: sent into an idle link, or the last
        # reply (Redis answers in order, so nothing pending has waited longer than this).
        self.waiting_since = 0.0
        self.watchdog: asyncio.TimerHandle | None = None


class PipelinedClient:
    """One connection shared by every caller, pipelined: commands issued in the same event-loop
    iteration leave in one write, and replies (which Redis sends in order) resolve their futures.

    A dead connection fails every command in flight on it with RedisUnavailable at once and is
    replaced on the next call, so an outage costs callers a fast error, not a hang. A silent one is
    found by a watchdog that looks once a second at how long commands have waited for a reply, rather than by a timeout
    per command (`asyncio.wait_for` costs a timer, a task and a future for every PUBLISH).
    """

    def __init__(self, url: str | PrimarySource) -> None:
        self._source = source_of(url)
        self._link: _Link | None = None
        self._connecting: asyncio.Lock | None = None
        self._readers: set[asyncio.Task[None]] = set()
        self._scripts: dict[str, str] = {}  # sha -> source, for NOSCRIPT after a Redis restart

    async def call(self, *args: str | bytes | int) -> Any:
        link = self._link or await self._connect()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        try:
            link.conn.send(*args)
        except ConnectionError as exc:
            self._fail(link, RedisUnavailable(str(exc)))
            raise RedisNotRun(str(exc)) from None
        if not link.pending:
            link.waiting_since = time.monotonic()
        link.pending.append(future)
        reply = await future
        if isinstance(reply, Exception):
            if is_readonly(reply):
                raise self._demoted(link, reply) from None
            raise RedisReplyError(str(reply))
        return reply

    def _demoted(self, link: _Link, reply: Exception) -> RedisUnavailable:
        """A write answered READONLY: this node is a replica now. The connection is dropped so that
        the next command asks where the primary is; the caller gets RedisUnavailable (retry)."""
        error = RedisNotRun(f"the Redis node was demoted: {reply}")
        if self._link is link:
            self._fail(link, error)
        return error

    def primary_moved(self, address: tuple[str, int]) -> None:
        """The sentinels announced a new primary: leave the old one now rather than at the next error."""
        link = self._link
        if link is not None and link.conn.address != address:
            self._fail(link, RedisUnavailable("the Redis primary moved"))

    async def nodes(self) -> list[PipelinedClient]:
        return [self]

    def script(self, source: str) -> str:
        sha = hashlib.sha1(source.encode()).hexdigest()
        self._scripts[sha] = source
        return sha

    async def evalsha(self, sha: str, keys: list[str], args: list[str | int]) -> Any:
        try:
            return await self.call("EVALSHA", sha, len(keys), *keys, *args)
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self.call("SCRIPT", "LOAD", self._scripts[sha])
        return await self.call("EVALSHA", sha, len(keys), *keys, *args)

    async def close(self) -> None:
        if self._link is not None:
            self._fail(self._link, RedisUnavailable("client closed"))
        for reader in list(self._readers):
            reader.cancel()

    async def _connect(self) -> _Link:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._link is not None:
                return self._link
            conn: RespConnection | None = None
            try:
                conn = RespConnection(await self._source.primary_url())
                await conn.connect(require_primary=self._source.require_primary)
            except (OSError, TimeoutError, ConnectionError) as exc:
                if conn is not None:
                    conn.close()  # refused by AUTH, SELECT or ROLE: the socket is open
                raise RedisNotRun(str(exc) or type(exc).__name__) from None
            link = self._link = _Link(conn)
            self._watch(link)
            reader = asyncio.create_task(self._read(link), name="redis-pipeline-reader")
            self._readers.add(reader)
            reader.add_done_callback(self._readers.discard)
            return link

    def _watch(self, link: _Link) -> None:
        if self._link is not link:
            return
        if link.pending and time.monotonic() - link.waiting_since > COMMAND_TIMEOUT_S:
            self._fail(link, RedisUnavailable(f"Redis did not answer within {COMMAND_TIMEOUT_S:.0f} s"))
            return
        link.watchdog = asyncio.get_running_loop().call_later(WATCHDOG_INTERVAL_S, self._watch, link)

    async def _read(self, link: _Link) -> None:
        try:
            while True:
                replies = await link.conn.read_replies()
                link.waiting_since = time.monotonic()
                for reply in replies:
                    future = link.pending.popleft()
                    if not future.done():
                        future.set_result(reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any read failure ends this connection
            self._fail(link, RedisUnavailable(str(exc) or type(exc).__name__))

    def _fail(self, link: _Link, error: Exception) -> None:
        if self._link is link:
            self._link = None
        link.conn.close()
        if link.watchdog is not None:
            link.watchdog.cancel()
            link.watchdog = None
        pending, link.pending = link.pending, collections.deque()
        for future in pending:
            if not future.done():
                future.set_exception(error)
