"""Recorded publishing for Python services (PROTOCOL.md 7.1): a typed wrapper over `FCALL <prefix>_record`.

A plain `PUBLISH gateway:user:{userId}` is live-only: a message sent while a phone switches
networks reaches no one. Recording through the gateway's Redis function gives the message a
per-user seq and keeps it in the user's history, so a reconnecting client gets it replayed::

    from redis.asyncio import Redis
    from tornado_gateway.publisher import Publisher, PublishRefused

    publisher = Publisher(Redis.from_url("redis://redis:6379"))
    result = await publisher.publish("u1", "ride_request", {"requestId": "r1", "pickup": "MG Road"},
                                     message_id="ride-r1-offer-1", expires_at_ms=now_ms + 30_000, receipt=True)
    result.seq, result.duplicate  # (7, False); retrying with the same message_id gives (7, True)

Services in other languages call the same function (it returns the seq, 0 for the live-only
types `driver_location` and `eta_update`)::

    redis-cli FCALL gateway_publish 1 u1 '{"type":"ride_request","payload":{"requestId":"r1"},"id":"ride-r1-offer-1"}'

Behind Redis Sentinel, build it from the same settings the gateway takes (REDIS_SENTINELS,
REDIS_SENTINEL_MASTER)::

    publisher = Publisher.for_sentinels("10.0.0.5:26379,10.0.0.6:26379,10.0.0.7:26379", "gateway-redis")

On a Redis Cluster (the gateway's REDIS_CLUSTER), give any one node; redis-py's cluster client
finds the rest, sends each call to the primary of the user's slot and follows MOVED/ASK and
failovers::

    publisher = Publisher.for_cluster("redis://10.0.0.5:6379")

A Sentinel publisher follows a failover: redis-py asks the sentinels on every new connection and drops one
that answers READONLY (the old primary, demoted). A call that fails in the failover raises
redis-py's ConnectionError; retrying it with the same `message_id` is safe (7.3).

The gateway loads the function into Redis at start and after Redis comes back; a service only
calls it. With another REDIS_PREFIX the function is `<prefix>_publish` (characters other than
letters, digits and `_` in the prefix become `_`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import ResponseError

from .config import parse_sentinels
from .history import INVALID_MESSAGE_PREFIX
from .history_redis import FUNCTION_NOT_FOUND
from .messages import dumps
from .redis_keys import Keys


@dataclass(frozen=True, slots=True)
class PublishResult:
    """`seq` 0 means delivered live without recording (latest-value types, or HISTORY_SIZE=0);
    then `epoch` is None. `duplicate`: `message_id` was already recorded, nothing was sent again
    and `seq` is the original one."""

    seq: int
    duplicate: bool
    epoch: str | None
    message_id: str


class PublishRefused(Exception):
    """The gateway's function refused the message (unknown type, missing fields, expired, ...):
    retrying will not help. `reason` says what to fix."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class FunctionNotLoaded(RuntimeError):
    """Redis has no gateway function under this prefix (no gateway has started against it yet,
    Redis restarted empty and no gateway has reconnected yet, or the prefix is wrong)."""


class Publisher:
    def __init__(self, redis: Redis | RedisCluster, prefix: str = "gateway") -> None:
        self._redis = redis
        self._function = Keys(prefix).function("record")

    @classmethod
    def for_cluster(cls, url: str, prefix: str = "gateway", **connection: Any) -> Publisher:
        """A publisher on a Redis Cluster: `url` names any node (as the gateway's REDIS_URL with
        REDIS_CLUSTER=true); the call is routed by its key, the userId, which is the slot of all
        the user's keys and channel (docs/PROTOCOL.md, "Redis Cluster"). Socket timeouts default
        to 1 s (connect) and 2 s: without them a call to a shard whose primary just died can wait
        indefinitely instead of failing over with the cluster (measured: redis-py then resumed
        2.6 s after the kill, the cluster's own failover time)."""
        options = {"socket_connect_timeout": 1.0, "socket_timeout": 2.0, **connection}
        return cls(RedisCluster.from_url(url, **options), prefix)

    @classmethod
    def for_sentinels(cls, sentinels: str, master: str, prefix: str = "gateway", *,
                      sentinel_password: str | None = None, **connection: Any) -> Publisher:
        """A publisher on the primary the sentinels name: `sentinels` as in REDIS_SENTINELS (`host:port,...`),
        `master` as in REDIS_SENTINEL_MASTER; `connection` holds the data nodes' options (password, ssl, ...)."""
        addresses = parse_sentinels(tuple(a for a in sentinels.split(",") if a.strip()))
        sentinel_options: dict[str, Any] = {"socket_connect_timeout": 1.0, "socket_timeout": 1.0}
        if sentinel_password:
            sentinel_options["password"] = sentinel_password
        sentinel = Sentinel(addresses, sentinel_kwargs=sentinel_options)  # type: ignore[no-untyped-call]
        return cls(sentinel.master_for(master, **connection), prefix)

    async def publish(self, user_id: str, type: str, payload: dict[str, Any], *, message_id: str | None = None,
                      expires_at_ms: int | None = None, receipt: bool = False) -> PublishResult:
        """Record and deliver one message to every device of `user_id`.

        Give a `message_id` to retry safely (7.3); `expires_at_ms` (ms since the epoch) keeps a
        lapsed offer from being delivered or replayed; `receipt=True` asks the app to confirm
        it saw the message (7.5). Raises PublishRefused, FunctionNotLoaded, or redis-py's errors
        when Redis is unreachable (then retrying with the same `message_id` is safe)."""
        body = self._encode(type, payload, message_id, expires_at_ms, receipt)
        try:
            seq, duplicate, epoch, recorded_id = await self._call(user_id, body)
        except ResponseError as exc:
            raise self._explain(exc) from None
        return PublishResult(seq=int(seq), duplicate=bool(duplicate), epoch=None if epoch is None else _text(epoch),
                             message_id=_text(recorded_id))

    async def aclose(self) -> None:
        """Close the Redis client (and its connections to every node)."""
        await self._redis.aclose()

    async def _call(self, user_id: str, body: str) -> Any:
        """On a cluster the node is named from the userId: redis-py 8 finds an FCALL's key by asking
        its seed node (COMMAND GETKEYS), so once the seed died every call failed and the slot map
        was never read again (tests/test_redis_cluster.py kills the seed)."""
        if not isinstance(self._redis, RedisCluster):
            return await self._redis.fcall(self._function, 1, user_id, body)
        await self._redis.initialize()
        return await self._redis.execute_command("FCALL", self._function, 1, user_id, body,
                                                 target_nodes=self._redis.get_node_from_key(user_id))

    @staticmethod
    def _encode(kind: str, payload: dict[str, Any], message_id: str | None, expires_at_ms: int | None,
                receipt: bool) -> str:
        message: dict[str, Any] = {"type": kind, "payload": payload}
        if message_id is not None:
            message["id"] = message_id
        if expires_at_ms is not None:
            message["expiresAt"] = expires_at_ms
        if receipt:
            message["receipt"] = True
        try:
            return dumps(message)
        except (TypeError, ValueError, OverflowError) as exc:
            raise PublishRefused(f"the message cannot be encoded as JSON: {exc}") from None

    def _explain(self, exc: ResponseError) -> Exception:
        text = str(exc)
        if text.startswith(INVALID_MESSAGE_PREFIX):
            return PublishRefused(text.removeprefix(INVALID_MESSAGE_PREFIX))
        if FUNCTION_NOT_FOUND in text:
            return FunctionNotLoaded(f"Redis has no function {self._function}: start a gateway instance first: it "
                                     "loads the function (or check that the prefix matches the gateway's REDIS_PREFIX)")
        return exc


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
