"""Cross-instance delivery over Redis pub/sub, with one listener coroutine per instance.

Each instance SUBSCRIBEs to `gateway:user:{userId}` only while it holds a
device of that user, so a message travels only to the instances that need
it. Subscriptions live on one dedicated connection read by one coroutine that
hands each message to the gateway with a plain call (no task per message).
The set of wanted channels is the source of truth: after any failure the
listener reconnects with capped exponential backoff plus jitter and
subscribes to all of them again.

The connection counts as live (`ready`, what `/ready` reports) only once Redis has answered a
PING sent after those SUBSCRIBEs: Redis answers in order, so every channel is subscribed by then,
and that is when the gateway may read back what was recorded meanwhile (PROTOCOL.md 7.4). A
self-probe, a message this instance publishes to its own control channel every PROBE_INTERVAL,
catches a connection that is open but no longer receives (a proxy or NAT that dropped it
silently): a probe not back within PROBE_TIMEOUT replaces the connection.

Behind Sentinel (redis_endpoint.py) every reconnect asks where the primary is and checks with ROLE
that the node is one: after a failover the old primary, once back as a replica, still accepts
SUBSCRIBE and would deliver nothing. A `+switch-master` from the sentinels closes the connection
at once and cuts the backoff short; the self-probe stays the backstop (its PUBLISH goes to the new
primary, where nobody listens for it, so Redis counts no receiver).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass

import redis.exceptions

from . import metrics as m
from .backoff import Backoff
from .bus import BusListener, BusUnavailable
from .metrics import Metrics
from .redis_keys import Keys
from .resp import Commands, PrimarySource, RedisReplyError, RedisUnavailable, RespConnection, source_of

log = logging.getLogger(__name__)

SUBSCRIBE_CHUNK = 1000
SUBSCRIBE_TIMEOUT_S = 5.0
SILENCE_S = 10.0  # no reply at all for this long (PINGs go out every housekeeping tick): reconnect
PROBE_HEAD = b'{"op":"probe"'
REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError, RedisUnavailable,
                RedisReplyError)


@dataclass(frozen=True, slots=True)
class Probe:
    interval_s: float = 2.0  # 0: no probe
    timeout_s: float = 5.0


class RedisPublishing:
    """What both buses send: user messages and control on PUBLISH_COMMAND (SPUBLISH in a cluster,
    bus_redis_cluster.py), client events always on classic PUBLISH (services SUBSCRIBE to them on
    any node) and the streams."""

    PUBLISH_COMMAND = "PUBLISH"

    def __init__(self, commands: Commands, keys: Keys, metrics: Metrics, stream_maxlen: int) -> None:
        self._commands = commands
        self._keys = keys
        self._metrics = metrics
        self._stream_maxlen = stream_maxlen

    @property
    def commands(self) -> Commands:
        return self._commands

    @property
    def keys(self) -> Keys:
        return self._keys

    @property
    def metrics(self) -> Metrics:
        return self._metrics

    async def publish_user(self, user_id: str, data: str) -> None:
        await self._publish(self.PUBLISH_COMMAND, self._keys.user_channel(user_id), data)

    async def publish_event(self, kind: str, data: str, sender: str) -> None:
        await self._publish("PUBLISH", self._keys.events(kind), data)

    def _event_channel(self, kind: str, sender: str) -> tuple[str, str]:
        """(command, channel) of a client event: classic `gateway:events:<kind>` (bus_redis_cluster.py
        may shard them)."""
        return "PUBLISH", self._keys.events(kind)

    async def send_control(self, server_id: str, data: str) -> None:
        await self._publish(self.PUBLISH_COMMAND, self._keys.control(server_id), data)

    async def _publish(self, command: str, channel: str, data: str) -> None:
        started = time.perf_counter()
        try:
            await self._commands.call(command, channel, data)
        except REDIS_ERRORS as exc:
            self._metrics.incr(m.REDIS_ERRORS)
            raise BusUnavailable(str(exc)) from None
        self._metrics.timing(m.REDIS_PUBLISH_MS, (time.perf_counter() - started) * 1000.0)

    async def append_event(self, kind: str, data: str, sender: str) -> None:
        started = time.perf_counter()
        try:
            # Both go out in the same write; the ack waits for the stream entry, as the contract says.
            added = self._commands.call("XADD", self._keys.stream(kind), "MAXLEN", "~", self._stream_maxlen,
                                        "*", "data", data)
            published = self._commands.call(*self._event_channel(kind, sender), data)
            await asyncio.gather(added, published)
        except REDIS_ERRORS as exc:
            self._metrics.incr(m.REDIS_ERRORS)
            raise BusUnavailable(str(exc)) from None
        self._metrics.timing(m.REDIS_PUBLISH_MS, (time.perf_counter() - started) * 1000.0)


class RedisBus(RedisPublishing):
    embedded = False
    SUBSCRIBE_COMMAND = "SUBSCRIBE"
    UNSUBSCRIBE_COMMAND = "UNSUBSCRIBE"

    def __init__(self, commands: Commands, url: str | PrimarySource, keys: Keys, server_id: str,
                 metrics: Metrics, *, stream_maxlen: int, probe: Probe | None = None) -> None:
        super().__init__(commands, keys, metrics, stream_maxlen)
        self._source = source_of(url)
        self._wake = asyncio.Event()  # set when the primary moved: no backoff before connecting to it
        self._control_channel = keys.control(server_id)
        self._control_channel_b = self._control_channel.encode()
        self._user_prefix_b = keys.user_channel_prefix.encode()
        self._wanted: set[str] = set()
        self._pending: dict[bytes, deque[asyncio.Future[None]]] = {}
        self._conn: RespConnection | None = None
        self._listener: BusListener | None = None
        self._task: asyncio.Task[None] | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._probe = probe or Probe()
        self._probe_sent = 0  # number of the last probe published
        self._probe_back: asyncio.Future[None] | None = None
        self._ready = False
        self._announce = False  # the next PONG confirms the resubscription after a reconnect
        self._stopping = False
        self._last_reply = time.monotonic()
        self._first_connect = asyncio.Event()

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self, listener: BusListener) -> None:
        self._listener = listener
        self._task = asyncio.create_task(self._run(), name="redis-bus-listener")
        if self._probe.interval_s > 0:
            self._probe_task = asyncio.create_task(self._probe_forever(), name="redis-bus-probe")
        try:
            await asyncio.wait_for(self._first_connect.wait(), timeout=5.0)
        except TimeoutError:
            log.warning("Redis pub/sub not connected yet; retrying in the background")

    async def stop(self) -> None:
        await self.stop_listening()
        await self._commands.close()

    async def stop_listening(self) -> None:
        self._stopping = True
        for task in (self._probe_task, self._task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    # --- subscriptions ------------------------------------------------------------------------

    async def subscribe_user(self, user_id: str) -> None:
        await self.subscribe_channel(self._keys.user_channel(user_id))

    async def subscribe_channel(self, channel: str) -> None:
        await self.confirmed(self.request_channel(channel))

    def request_channel(self, channel: str) -> asyncio.Future[None] | None:
        """Want the channel and send the SUBSCRIBE now; the future resolves on Redis's confirmation
        (None: no connection, subscribed on reconnect)."""
        self._wanted.add(channel)
        conn = self._conn
        if conn is None:
            return None
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(channel.encode(), deque()).append(waiter)
        try:
            conn.send(self.SUBSCRIBE_COMMAND, channel)
        except REDIS_ERRORS:
            return None  # the listener sees the failure too and resubscribes everything
        return waiter

    async def confirmed(self, waiter: asyncio.Future[None] | None) -> None:
        if waiter is not None:
            await self._confirmation(waiter)

    async def subscription_ready(self, user_id: str) -> None:
        """Wait for a SUBSCRIBE another device of the user triggered and that Redis has not confirmed."""
        await self.channel_ready(self._keys.user_channel(user_id))

    async def channel_ready(self, channel: str) -> None:
        waiters = self._pending.get(channel.encode())
        if waiters:
            await self._confirmation(waiters[-1])

    @staticmethod
    async def _confirmation(waiter: asyncio.Future[None]) -> None:
        """A Redis that stops answering must not hold a connect for long: past the timeout the client
        is told `connected` and its channel is subscribed again when the listener reconnects."""
        try:
            await asyncio.wait_for(asyncio.shield(waiter), SUBSCRIBE_TIMEOUT_S)
        except TimeoutError:
            log.warning("Redis did not confirm a SUBSCRIBE within %.0f s", SUBSCRIBE_TIMEOUT_S)

    def unsubscribe_user(self, user_id: str) -> None:
        self.unsubscribe_channel(self._keys.user_channel(user_id))

    def unsubscribe_channel(self, channel: str) -> None:
        self._wanted.discard(channel)
        conn = self._conn
        if conn is not None:
            self._send_quietly(conn, self.UNSUBSCRIBE_COMMAND, channel)

    @staticmethod
    def _send_quietly(conn: RespConnection, *args: str) -> None:
        try:
            conn.send(*args)
        except REDIS_ERRORS:
            pass  # the listener reconnects and resubscribes from _wanted

    async def ping(self) -> None:
        """Called from the housekeeping timer: a subscriber connection that answers nothing, not
        even a PING, is a dead one (also one that never confirmed its resubscription)."""
        conn = self._conn
        if conn is None:
            return
        if time.monotonic() - self._last_reply > SILENCE_S:
            log.warning("Redis pub/sub connection silent for %.0f s; reconnecting", SILENCE_S)
            conn.close()
            return
        self._send_quietly(conn, "PING")

    def primary_moved(self, address: tuple[str, int]) -> None:
        """The sentinels announced a new primary: drop a subscription elsewhere and reconnect now."""
        conn = self._conn
        if conn is not None and conn.address != address:
            log.warning("Redis primary moved to %s:%d; moving the pub/sub connection", *address)
            self._ready = False
            conn.close()
        self._wake.set()

    # --- the self-probe (PROTOCOL.md 7.4) --------------------------------------------------------

    async def _probe_forever(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self._probe.interval_s)
            conn = self._conn
            if conn is not None and self._ready:
                await self._probe_once(conn)

    async def _probe_once(self, conn: RespConnection) -> None:
        """Publish a probe to this instance's own control channel and wait for it to come back
        through the subscription. The wait starts once Redis has taken the PUBLISH: a slow or
        failing command connection is not the subscription's fault (its own watchdog deals with
        it). Redis counting no receiver at all means the subscription is gone."""
        self._probe_sent += 1
        back = self._probe_back = asyncio.get_running_loop().create_future()
        started = time.perf_counter()
        try:
            receivers = await self._commands.call(self.PUBLISH_COMMAND, self._control_channel, self._probe_message())
            if receivers == 0:
                self._probe_failed(conn, "Redis delivered the self-probe to nobody")
                return
            await asyncio.wait_for(back, self._probe.timeout_s)
        except TimeoutError:
            self._probe_failed(conn, f"self-probe not back within {self._probe.timeout_s:.1f} s")
        except REDIS_ERRORS:
            return
        else:
            self._metrics.timing(m.PROBE_MS, (time.perf_counter() - started) * 1000.0)
        finally:
            self._probe_back = None

    def _probe_message(self) -> str:
        return f'{{"op":"probe","n":{self._probe_sent}}}'

    def _probe_failed(self, conn: RespConnection, why: str) -> None:
        self._metrics.incr(m.PROBE_FAILURES)
        if conn is not self._conn:
            return  # already replaced
        log.warning("%s: the subscription is silent; replacing the pub/sub connection", why)
        self._ready = False
        conn.close()

    def _probe_arrived(self, data: bytes) -> None:
        back = self._probe_back
        if back is not None and not back.done() and data == self._probe_message().encode():
            back.set_result(None)

    # --- the listener -------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = Backoff()
        connected_before = False
        while not self._stopping:
            conn: RespConnection | None = None
            delay = backoff.next_delay()
            self._wake.clear()
            try:
                conn = RespConnection(await self._source.primary_url())
                await conn.connect(require_primary=self._source.require_primary)
                self._conn = conn
                self._subscribe_all(conn)
                conn.send("PING")  # its PONG says every SUBSCRIBE above is in effect
                self._announce = connected_before
                self._last_reply = time.monotonic()
                backoff.reset()
                connected_before = True
                await self._read_forever(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means: reconnect
                if not self._stopping:
                    log.warning("Redis pub/sub unavailable (%s); retrying in %.2f s", exc, delay)
                    self._metrics.incr(m.REDIS_ERRORS)
            finally:
                self._ready = False
                self._conn = None
                self._release_pending()
                if conn is not None:
                    conn.close()
            if not self._stopping:
                await self._pause(delay)

    async def _pause(self, delay: float) -> None:
        """The backoff delay, cut short when the sentinels announce a new primary."""
        try:
            await asyncio.wait_for(self._wake.wait(), delay)
        except TimeoutError:
            pass

    def _subscribe_all(self, conn: RespConnection) -> None:
        channels = [self._control_channel, *self._wanted]
        for start in range(0, len(channels), SUBSCRIBE_CHUNK):
            conn.send("SUBSCRIBE", *channels[start:start + SUBSCRIBE_CHUNK])

    async def _read_forever(self, conn: RespConnection) -> None:
        listener = self._listener
        assert listener is not None
        prefix, prefix_len, control = self._user_prefix_b, len(self._user_prefix_b), self._control_channel_b
        while True:
            replies = await conn.read_replies()
            self._last_reply = time.monotonic()
            for reply in replies:
                if isinstance(reply, Exception):
                    log.warning("Redis pub/sub error reply: %s", reply)
                    continue
                kind = reply[0]
                if kind == b"message":
                    channel = reply[1]
                    if channel.startswith(prefix):
                        listener.on_user_message(channel[prefix_len:].decode(), reply[2])
                    elif channel == control:
                        if reply[2].startswith(PROBE_HEAD):
                            self._probe_arrived(reply[2])
                        else:
                            listener.on_control(reply[2])
                elif kind == b"subscribe":
                    self._confirm(reply[1])
                elif kind == b"pong" and not self._ready:
                    self._subscribed()

    def _subscribed(self) -> None:
        self._ready = True
        self._first_connect.set()
        if self._announce:
            self._announce = False
            log.info("Redis pub/sub reconnected; %d channels resubscribed", len(self._wanted) + 1)
            self._metrics.incr(m.REDIS_RECONNECTS)
            assert self._listener is not None
            self._listener.on_bus_reconnected()

    def _confirm(self, channel: bytes) -> None:
        waiters = self._pending.get(channel)
        if waiters:
            waiter = waiters.popleft()
            if not waiters:
                del self._pending[channel]
            if not waiter.done():
                waiter.set_result(None)

    def _release_pending(self) -> None:
        """Nobody waits on a dead connection: those channels are resubscribed on reconnect."""
        for waiters in self._pending.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        self._pending.clear()
