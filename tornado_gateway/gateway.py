"""The instance: owns the hub, presence, bus, heartbeats and metrics, and runs the connection lifecycle.

Handlers (WebSocket and HTTP) get this object through `initialize()` and call
its methods; nothing else holds mutable state. Registration order matters and
is kept in one place here: local hub first (so a message can be delivered the
moment the subscription is live, and an older local connection of the same
device is replaced at once), then the Redis subscription, then presence (which
names an older connection on another instance, asked to close over the control
channel), then `connected`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import resource
import secrets
import time
from collections.abc import Awaitable, Collection
from typing import Any, Final, TypedDict

import ujson
from tornado.ioloop import PeriodicCallback

from . import metrics as m
from .auth import Identity, Resume, TokenVerifier
from .backoff import Backoff
from .bus import Bus, BusUnavailable
from .catchup import CatchUp
from .config import LOG_FIELDS, Settings
from .connection import Connection, Transport
from .errors import CloseCode, ErrorCode, GatewayError, ValidationError, close_reason_name
from .flow import FlowControl, Shed, coalesce_key, default_budget
from .forwarded import TrustedProxies
from .heartbeat import HeartbeatScheduler
from .history import LATEST_VALUE_TYPES, History, Record, RecordResult, decode_record
from .hub import Hub
from .limits import ConnectLimiter, MessageLimiter
from .memory import Allocator, Reclaimer
from .messages import (
    ConnectedPayload,
    IdGenerator,
    dumps,
    envelope,
    expires_at_of,
    now_ms,
    passed,
    service_frame,
    validate_service_message,
)
from .metrics import Metrics
from .presence import DeviceLimitReached, Presence, Registration, ServerStats, uptime_s

log = logging.getLogger(__name__)

METRICS_FLUSH_MS = 1000.0
RESYNC_MIN_GAP_S = 1.0
RESYNC_LOG_EVERY = 15  # attempts between two warnings while Redis keeps failing
RECORD_HEAD: Final = b'{"recorded"'  # history.record_bytes: a recorded message on a user channel
REPLAY_BUDGET: Final = 512 * 1024  # bytes of replay queued at once when MAX_OUTBOUND_BUFFER is off
FD_RESERVE = 512  # descriptors kept for Redis, logs and sockets between accept() and refusal


def file_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


class ControlMessage(TypedDict):
    """Sent on `gateway:control:{serverId}`: close one device's connection there (replacement)."""

    op: str
    userId: str
    deviceId: str
    connectionId: str


@dataclasses.dataclass(frozen=True, slots=True)
class Opening:
    """What `connected` reports about the user's history, and the replay that follows it."""

    epoch: str | None = None
    seq: int = 0
    recovered: bool = False
    replay: list[bytes] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True, slots=True)
class BroadcastResult:
    message_id: str
    devices: int
    degraded: bool  # Redis was down: delivered to this instance's devices only
    seq: int | None = None  # recorded (PROTOCOL.md 7.1)
    duplicate: bool = False  # the producer id was already recorded: nothing sent again (7.3)


class Gateway:
    def __init__(self, settings: Settings, presence: Presence, bus: Bus, metrics: Metrics,
                 history: History | None = None) -> None:
        self.settings = settings
        self.server_id = settings.server_id
        self.presence = presence
        self.bus = bus
        self.history = history if settings.history_size > 0 else None  # PROTOCOL.md 7; None: v1 behaviour
        self.metrics = metrics
        self.hub = Hub()
        # Ids carry this run's own token: a restarted process that keeps its SERVER_ID (a PROCESSES child)
        # must not reuse the connection and message ids of its previous run.
        self.ids = IdGenerator(f"{settings.server_id}.{secrets.token_hex(4)}")
        self.verifier = TokenVerifier(settings)
        self.started_at = time.time()
        self.draining = False
        self.heartbeats = HeartbeatScheduler(
            settings.heartbeat_interval_s, settings.heartbeat_timeout_s, self.ids,
            on_stale=self._close_stale, on_expired=self._token_expired, on_tick=self._heartbeat_ticked)
        self.connect_limiter = ConnectLimiter(settings.connect_rate_per_ip, settings.connect_burst_per_ip)
        self.proxies = TrustedProxies.parse(settings.trusted_proxies, settings.forwarded_header)
        self.max_connections = settings.max_connections or max(100, file_limit() - FD_RESERVE)
        self.outbound_budget = settings.outbound_budget or default_budget(self.max_connections)
        self.flow = FlowControl(settings.max_outbound_buffer, on_slow=self._close_slow,
                                on_coalesced=lambda: metrics.incr(m.MESSAGES_DROPPED.format(reason="coalesced")),
                                budget=self.outbound_budget, on_shed=self._shed)
        self.reclaimer = Reclaimer(Allocator.load())
        self._timers: list[PeriodicCallback] = []
        self._published = False  # the server key was written once (so a missing key means it was lost)
        self._background: set[asyncio.Task[Any]] = set()
        # Connections between admit() and their first presence write (value: first of its user here).
        self._connecting: dict[Connection, bool] = {}
        # Open connections whose presence write failed: the resync loop writes them (and checks the device cap).
        self._unregistered: set[Connection] = set()
        self._resync_task: asyncio.Task[None] | None = None
        self._resync_again = False
        self._reconnects = 0  # subscriber reconnects so far
        self._catching_up: asyncio.Task[None] | None = None
        self.catchup = CatchUp(self.history, self._cursors, self._deliver_filled, metrics,
                               give_up_after_s=settings.history_ttl_s) if self.history is not None else None

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        await self.bus.start(self)
        self.heartbeats.start()
        housekeeping_ms = min(self.settings.instance_ttl_s / 3.0, 5.0) * 1000.0
        self._timers = [PeriodicCallback(self._housekeeping, housekeeping_ms),
                        PeriodicCallback(self.flush_metrics, METRICS_FLUSH_MS)]
        for timer in self._timers:
            timer.start()
        await self._housekeeping()  # the first collect-and-freeze (memory.Reclaimer)
        self.request_resync()  # entries a previous run of this serverId left behind are removed

    async def drain(self) -> None:
        """SIGTERM: close every client with 1001, spread over the drain window, then deregister."""
        self.draining = True
        self.heartbeats.stop()
        connections = list(self.hub)
        log.info("draining %d connections over %.1f s", len(connections), self.settings.shutdown_drain_s)
        window_s = self.settings.shutdown_drain_s
        batches = max(1, min(len(connections), int(window_s * 20)))
        for index in range(batches):
            for conn in connections[index::batches]:
                conn.close(self.ids, CloseCode.GOING_AWAY, "server shutting down")
            if window_s > 0 and index < batches - 1:
                await asyncio.sleep(window_s / batches)
        await asyncio.sleep(0.05)  # let the close frames reach the sockets
        for timer in self._timers:  # kept running until now: a long drain must not look like a death
            timer.stop()
        await self._stop_resync()  # a pass still writing would put back what remove_server removes
        if self._catching_up is not None:
            self._catching_up.cancel()
        if self.catchup is not None:
            await self.catchup.stop()
        try:
            await self.presence.remove_server(connections)
        except Exception:
            log.warning("could not deregister from Redis; peers will reap this instance", exc_info=True)
        await self.bus.stop()
        self.flush_metrics()  # the last gauges say 0 connections: the instance's lines end at 0

    # --- connections --------------------------------------------------------------------------

    def admission_refusal(self, remote_ip: str) -> GatewayError | None:
        """Checks made before the token is even parsed: draining, instance full, upgrade rate per IP."""
        if self.draining:
            return GatewayError(ErrorCode.UNAVAILABLE, "server shutting down", close_code=CloseCode.GOING_AWAY)
        if len(self.hub) >= self.max_connections:
            return GatewayError(ErrorCode.UNAVAILABLE, "instance is full; reconnect later",
                                close_code=CloseCode.TRY_AGAIN_LATER)
        if not self.connect_limiter.allow(remote_ip, time.monotonic()):
            return GatewayError(ErrorCode.RATE_LIMITED, "too many connection attempts from this address",
                                close_code=CloseCode.RATE_LIMITED)
        return None

    def admit(self, identity: Identity, transport: Transport, remote_ip: str) -> Connection:
        """The connection exists locally from here on, so that a socket lost during `establish` is
        reported to it (the handler holds it) instead of leaving a registration behind."""
        limiter = MessageLimiter(self.settings.rate_limit_burst, time.monotonic()) \
            if self.settings.rate_limit_per_s > 0 else None
        conn = Connection(self.ids.next(), identity, transport, remote_ip, limiter, self.flow)
        added = self.hub.add(conn)
        self.heartbeats.add(conn)
        self._connecting[conn] = added.first_for_user
        if added.replaced is not None:
            self._replace(added.replaced)
        return conn

    async def establish(self, conn: Connection, resume: Resume | None = None) -> None:
        """Subscribe, register, read the history position (and a replay), then `connected`; a
        connection closed on the way registers nothing more."""
        identity = conn.identity
        opening = Opening()
        reconnects_before = self._reconnects
        if resume is not None:  # live recorded messages the client already handled are not sent again
            conn.epoch, conn.last_seq = resume.epoch, resume.since
        try:
            if self._connecting.get(conn):
                await self.bus.subscribe_user(identity.user_id)
            else:
                await self.bus.subscription_ready(identity.user_id)  # no `connected` before messages can arrive
            if not conn.closed:
                await self._register_presence(conn)
            if not conn.closed and self.history is not None:
                opening = await self._history_opening(conn, resume)
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                log.exception("connecting %s failed", conn.connection_id)
            self.close_on_internal_error(conn)
            raise
        finally:
            self._connecting.pop(conn, None)
        if conn.closed:
            return
        payload: ConnectedPayload = {
            "connectionId": conn.connection_id, "serverId": self.server_id, "userId": identity.user_id,
            "userType": identity.user_type, "deviceId": identity.device_id, "platform": identity.platform,
            "heartbeatInterval": int(self.settings.heartbeat_interval_s * 1000)}
        if opening.epoch is not None:
            payload["epoch"], payload["seq"] = opening.epoch, opening.seq
        if resume is not None:
            payload["recovered"] = opening.recovered
            self.metrics.incr(m.RESUMES.format(outcome="recovered" if opening.recovered else "not_recovered"))
        conn.write_first(dumps(envelope("connected", payload, self.ids.next())))
        await self._replay(conn, opening.replay)
        conn.release_held(opening.epoch, opening.seq)  # a replay covers all up to seq (expired ones skipped)
        if opening.epoch is None:
            conn.epoch = None  # its resume position was never confirmed: no gap fill from it
        if self.catchup is not None and self._reconnects != reconnects_before:
            self.catchup.fill(identity.user_id)  # the catch-up after that reconnect passed this device by
        self.metrics.incr(m.CONNECTIONS_OPENED)
        log.info("opened %s user=%s type=%s device=%s platform=%s server=%s ip=%s", conn.connection_id,
                 identity.user_id, identity.user_type, identity.device_id, identity.platform, self.server_id,
                 conn.remote_ip, extra={LOG_FIELDS: {
                     "event": "opened", "connection": conn.connection_id, "user": identity.user_id,
                     "type": identity.user_type, "device": identity.device_id, "platform": identity.platform,
                     "server": self.server_id, "ip": conn.remote_ip}})

    async def _history_opening(self, conn: Connection, resume: Resume | None) -> Opening:
        """Read after the subscription is live: whatever is recorded later arrives live (held until
        `connected`), whatever before is in the position or the replay; `release_held` drops the overlap."""
        assert self.history is not None
        user_id = conn.identity.user_id
        try:
            if resume is not None:
                replay = await self.history.since(user_id, resume.epoch, resume.since)
                if replay.epoch:
                    return Opening(replay.epoch, replay.seq, replay.recoverable, self._replay_frames(replay.records))
            position = await self.history.position(user_id)
        except BusUnavailable as exc:
            log.warning("history unavailable for %s (%s): connected without a position", conn.connection_id, exc)
            return Opening()
        return Opening(position.epoch, position.seq)

    def _replay_frames(self, records: list[bytes]) -> list[bytes]:
        frames = []
        for data in records:
            record = decode_record(data)
            prepared = self._record_frame(record) if record is not None else None
            if prepared is not None:
                frames.append(prepared[0])
        return frames

    async def _replay(self, conn: Connection, frames: list[bytes]) -> None:
        """Write the replay ahead of live messages, paced by the socket: a replay larger than
        MAX_OUTBOUND_BUFFER waits for the client to read rather than closing it as slow."""
        budget = self.settings.max_outbound_buffer // 2 or REPLAY_BUDGET
        for frame in frames:
            if conn.closed:
                break
            if conn.transport.buffered_bytes() + len(frame) > budget and not await self._drained(conn):
                self.flow.shed(conn)
                break
            conn.write_first(frame)
        if frames:
            self.metrics.incr(m.MESSAGES_REPLAYED, len(frames))

    async def _drained(self, conn: Connection) -> bool:
        """Whether the client read what was queued within the heartbeat timeout."""
        drained: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def resolve() -> None:
            if not drained.done():
                drained.set_result(None)

        conn.transport.on_drained(resolve)
        try:
            await asyncio.wait_for(drained, self.settings.heartbeat_timeout_s)
        except TimeoutError:
            return False
        return not conn.closed

    async def _register_presence(self, conn: Connection) -> None:
        try:
            registration = await self.presence.register(conn, max_devices=self.settings.max_devices_per_user)
        except DeviceLimitReached as exc:
            self._drop(conn, CloseCode.RATE_LIMITED, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - written by the resync loop, retried until it is
            log.warning("presence write for %s failed (%s); retrying in the background", conn.connection_id, exc)
            if not conn.closed:  # a closed one has nothing to write (and is no longer in the hub)
                self._unregistered.add(conn)
            self.request_resync()
            return
        await self._settle(conn, registration)
        if conn.closed:
            # Closed while we awaited Redis: its own removal may have reached Redis before the entry.
            await self._unregister_presence(conn, last_local=not self.hub.has_user(conn.identity.user_id))

    async def _settle(self, conn: Connection, registration: Registration) -> None:
        """Act on what a presence write found: a newer connection of the device keeps it (this one
        goes), or an older one elsewhere is told to close."""
        if registration.over_limit:
            self._drop(conn, CloseCode.RATE_LIMITED, str(DeviceLimitReached(self.settings.max_devices_per_user)))
            return
        if registration.superseded:
            newer = registration.superseded_by
            log.info("%s: a newer connection of the device (%s) keeps it", conn.connection_id,
                     f"{newer['connectionId']} on {newer['serverId']}" if newer is not None else "unreadable entry")
            self._replace(conn)
            return
        previous = registration.displaced
        if previous is None or previous["serverId"] == self.server_id:
            return  # a local predecessor was replaced by the hub already; or a ghost of an earlier run
        control: ControlMessage = {"op": "close", "userId": conn.identity.user_id,
                                   "deviceId": conn.identity.device_id, "connectionId": previous["connectionId"]}
        try:
            await self.bus.send_control(previous["serverId"], dumps(control))
        except BusUnavailable:
            log.warning("could not ask %s to close a replaced connection", previous["serverId"])

    def _replace(self, old: Connection) -> None:
        self._drop(old, CloseCode.REPLACED, "replaced by a new connection from the same device")

    def disconnect(self, conn: Connection, code: int | None, reason: str) -> None:
        """Called once the socket is closed, whoever closed it."""
        conn.mark_closed(code, reason)
        self._release(conn)

    def _drop(self, conn: Connection, code: CloseCode, message: str) -> None:
        """Server-initiated close: clean up now rather than when the client acknowledges (or never)."""
        conn.close(self.ids, code, message)
        self._release(conn)

    def _release(self, conn: Connection) -> None:
        """Local and Redis cleanup, exactly once per connection."""
        if conn.bucket < 0:
            return  # already released (the heartbeat bucket is the registration marker)
        last_local = self._forget(conn)
        if not self.draining:  # drain() removes this instance's entries in one sweep
            self._spawn(self._unregister_presence(conn, last_local=last_local))

    def _forget(self, conn: Connection) -> bool:
        """Local cleanup; returns whether the user has no device left here. Only `_release` calls it."""
        self.heartbeats.remove(conn)
        self._unregistered.discard(conn)
        if conn.expiry_timer is not None:
            conn.expiry_timer.cancel()
            conn.expiry_timer = None
        last_local = self.hub.remove(conn)
        if last_local:
            self.bus.unsubscribe_user(conn.identity.user_id)
        self.metrics.incr(m.CONNECTIONS_CLOSED.format(reason=close_reason_name(conn.close_code)))
        ident = conn.identity
        after = time.time() - conn.opened_at
        log.info("closed %s user=%s type=%s device=%s server=%s code=%s reason=%s after=%.1fs",
                 conn.connection_id, ident.user_id, ident.user_type, ident.device_id, self.server_id,
                 conn.close_code, conn.close_reason or "-", after, extra={LOG_FIELDS: {
                     "event": "closed", "connection": conn.connection_id, "user": ident.user_id,
                     "type": ident.user_type, "device": ident.device_id, "server": self.server_id,
                     "code": conn.close_code, "reason": conn.close_reason or "-", "after": round(after, 1)}})
        return last_local

    async def _unregister_presence(self, conn: Connection, *, last_local: bool) -> None:
        try:
            await self.presence.unregister(conn, last_local=last_local)
        except Exception as exc:  # noqa: BLE001 - the resync loop prunes what this instance no longer holds
            log.warning("could not remove presence of %s (%s); retrying in the background", conn.connection_id, exc)
            self.request_resync()

    def _close_stale(self, conn: Connection) -> None:
        self._drop(conn, CloseCode.HEARTBEAT_TIMEOUT, "no frame within the heartbeat timeout")

    def _close_slow(self, conn: Connection, by_budget: bool = False) -> None:
        """4503. What waited for the client is already gone (flow.FlowControl dropped it); a client shed
        for the instance's budget is reported once per shedding (`_shed`), not one line each."""
        if by_budget:
            self._drop(conn, CloseCode.SLOW_CONSUMER, "the instance's outbound budget is full and this client "
                                                      "held the most: it is not reading")
            return
        log.warning("closing %s: outbound buffer over %d bytes (client not reading)", conn.connection_id,
                    self.settings.max_outbound_buffer)
        self._drop(conn, CloseCode.SLOW_CONSUMER, "outbound buffer overflow: the client is not reading")

    def _shed(self, shed: Shed) -> None:
        self.metrics.incr(m.OUTBOUND_SHED, shed.clients)
        log.warning("outbound budget reached (%.1f of %.1f MB queued for slow clients): closed the %d clients "
                    "holding the most with 4503, %.1f MB given back", shed.queued_before / 1e6, shed.budget / 1e6,
                    shed.clients, shed.freed_bytes / 1e6)

    # --- token lifetime -----------------------------------------------------------------------

    def _token_expired(self, conn: Connection) -> None:
        """The token's exp passed: warn once, then close with 4401 after the grace unless refreshed."""
        if conn.expiry_timer is not None or conn.closed:
            return
        grace_s = self.settings.token_expiry_grace_s
        conn.send_error(self.ids, ErrorCode.AUTH_FAILED,
                        f"token expired: send token_refresh with a new token within {grace_s:g} s")
        expired_at = conn.identity.expires_at
        conn.expiry_timer = asyncio.get_running_loop().call_later(grace_s, self._expire, conn, expired_at)

    def _expire(self, conn: Connection, expired_at: float) -> None:
        conn.expiry_timer = None
        if not conn.closed and conn.identity.expires_at == expired_at:
            self._drop(conn, CloseCode.AUTH_FAILED, "token expired")

    def close_on_internal_error(self, conn: Connection) -> None:
        self._drop(conn, CloseCode.INTERNAL_ERROR, "internal error")

    def close_abusive(self, conn: Connection) -> None:
        log.warning("closing %s: kept exceeding the message rate limit", conn.connection_id)
        self._drop(conn, CloseCode.RATE_LIMITED, "kept exceeding the message rate limit")

    def refresh_token(self, conn: Connection, expires_at: float) -> None:
        """A valid token_refresh for the same user: extend the connection's authorisation."""
        conn.identity = dataclasses.replace(conn.identity, expires_at=expires_at)
        if conn.expiry_timer is not None:
            conn.expiry_timer.cancel()
            conn.expiry_timer = None

    # --- delivery (BusListener) ---------------------------------------------------------------

    def on_user_message(self, user_id: str, data: bytes) -> None:
        devices = self.hub.devices(user_id)
        if not devices:
            return
        if data.startswith(RECORD_HEAD):
            self._deliver_record(user_id, devices.values(), data)
            return
        prepared = self.prepare_outbound(data)
        if prepared is None:
            return
        frame, kind, key = prepared
        deliver = self.flow.deliver
        for conn in list(devices.values()):
            deliver(conn, frame, key)
        self.metrics.incr(m.per_type(m.MESSAGES_OUT, kind), len(devices))

    def _deliver_record(self, user_id: str, devices: Collection[Connection], data: bytes, *,
                        filled: bool = False) -> None:
        """A recorded message: to each device that has not had it yet (a replay or a gap fill may
        have brought it); one that shows a device missed earlier ones waits for a gap fill."""
        catchup = self.catchup
        if not filled and catchup is not None and catchup.holding(user_id, data):
            return
        record = decode_record(data)
        if record is None:
            self._undeliverable("not a record")
            return
        epoch, seq = record.epoch, record.seq
        if not filled and catchup is not None:
            for conn in devices:  # a loop, not any(): this runs for every recorded message
                if conn.misses(epoch, seq):
                    catchup.fill(user_id, data)
                    return
        prepared = self._record_frame(record)
        if prepared is None or passed(record.expires_at):
            if prepared is not None:
                self.metrics.incr(m.MESSAGES_EXPIRED)
            for conn in devices:  # passed over, not missed: no gap fill for it later
                if conn.opening is None:
                    conn.take_record(epoch, seq)
            return
        frame, kind = prepared
        deliver, sent = self.flow.deliver, 0
        for conn in list(devices):
            if conn.opening is not None:
                conn.hold_record(epoch, seq, frame)
            elif conn.take_record(epoch, seq):
                deliver(conn, frame, None)
            else:
                continue
            sent += 1
        if sent:
            self.metrics.incr(m.per_type(m.MESSAGES_OUT, kind), sent)
            self.metrics.timing(m.per_type(m.DELIVERY_MS, kind), now_ms() - record.timestamp)

    def _record_frame(self, record: Record) -> tuple[bytes, str] | None:
        if record.frame is not None and record.kind is not None:
            return record.frame, record.kind
        message = record.message or {}  # never None here: decode_record sets frame or message
        try:
            kind, payload, _ref, _stamp = validate_service_message(message)
            return service_frame(kind, payload, record.id, record.timestamp, message, record.expires_at,
                                 record.seq), kind
        except (ValueError, OverflowError, ValidationError) as exc:
            self._undeliverable(str(exc))
            return None

    def _undeliverable(self, reason: str) -> None:
        self.metrics.incr(m.MESSAGES_DROPPED.format(reason="invalid"))
        log.warning("dropped an undeliverable recorded message: %s", reason)

    def prepare_outbound(self, data: bytes) -> tuple[bytes, str, str | None] | None:
        """Check a service message once per user (not per device); add id/timestamp only if missing."""
        try:
            message = ujson.loads(data)
            kind, payload, ref, stamp = validate_service_message(message)
            expires_at = expires_at_of(message)
            if passed(expires_at):
                self.metrics.incr(m.MESSAGES_EXPIRED)
                return None
            # Re-encoded even when id and timestamp are there: ujson accepts NaN, Infinity and lone
            # surrogates, which dumps() refuses and browsers cannot parse.
            frame = service_frame(kind, payload, ref or self.ids.next(), now_ms() if stamp is None else stamp,
                                  message, expires_at)
            return frame, kind, coalesce_key(kind, payload)
        except (ValueError, OverflowError, RecursionError, ValidationError) as exc:  # UnicodeError is a ValueError
            self.metrics.incr(m.MESSAGES_DROPPED.format(reason="invalid"))
            log.warning("dropped an undeliverable message from Redis: %s", exc)
            return None

    def on_control(self, data: bytes) -> None:
        try:
            control = ujson.loads(data)
            conn = self.hub.get(control["connectionId"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed control message")
            return
        if (control.get("op") == "close" and conn is not None and conn.identity.device_id == control.get("deviceId")
                and conn.identity.user_id == control.get("userId", conn.identity.user_id)):  # older releases: no userId
            self._replace(conn)

    def on_bus_reconnected(self) -> None:
        self._reconnects += 1
        self.request_resync()
        if self.catchup is not None:  # what was recorded while this instance was not subscribed
            if self._catching_up is not None:
                self._catching_up.cancel()  # a pass from before this reconnect may have read too early
            self._catching_up = asyncio.ensure_future(self.catchup.catch_up(self.hub.users()))

    def _cursors(self, user_id: str) -> list[tuple[str, int]]:
        """Where the user's connected devices stand in the history: the furthest-behind position
        in each epoch they are in (more than one when numbering began again for some of them)."""
        lowest: dict[str, int] = {}
        for conn in (self.hub.devices(user_id) or {}).values():
            if conn.epoch is not None and conn.opening is None and not conn.closed:
                lowest[conn.epoch] = min(conn.last_seq, lowest.get(conn.epoch, conn.last_seq))
        return list(lowest.items())

    def _deliver_filled(self, user_id: str, data: bytes) -> None:
        devices = self.hub.devices(user_id)
        if devices:
            self._deliver_record(user_id, devices.values(), data, filled=True)

    def request_resync(self) -> None:
        """Make Redis match this instance again, retrying until it does: after Redis came back
        (possibly empty, possibly from a snapshot with stale entries), a failed write or removal,
        and at start (entries a previous run of this serverId left behind)."""
        if self._resync_task is not None and not self._resync_task.done():
            self._resync_again = True  # what changed meanwhile is covered by one more pass
            return
        self._resync_task = asyncio.ensure_future(self._resync_until_done())
        self._resync_task.add_done_callback(self._resync_finished)

    def _resync_finished(self, task: asyncio.Task[None]) -> None:
        if self._resync_task is task:
            self._resync_task = None

    async def _stop_resync(self) -> None:
        task = self._resync_task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _resync_until_done(self) -> None:
        backoff = Backoff(base_s=0.1, cap_s=2.0)
        attempt = 0
        while not self.draining:
            self._resync_again = False
            attempt += 1
            try:
                await self._resync()
            except Exception as exc:  # noqa: BLE001 - Redis is failing: try again, quietly
                if attempt == 1 or attempt % RESYNC_LOG_EVERY == 0:
                    log.warning("presence resync attempt %d failed: %s; retrying", attempt, exc)
                await asyncio.sleep(backoff.next_delay())
                continue
            if not self._resync_again:
                return
            backoff.reset()
            await asyncio.sleep(RESYNC_MIN_GAP_S)  # failures during a pass must not chain passes back to back

    async def _resync(self) -> None:
        if self.history is not None:
            await self.history.load()  # Redis may have come back empty: services' FCALLs need the function
        started_us = time.time_ns() // 1000
        unregistered = self._unregistered
        held = list(self.hub)
        rewrite = [(conn, self.settings.max_devices_per_user if conn in unregistered else 0)
                   for conn in held if conn not in self._connecting]  # those register themselves
        settled = await self.presence.resync(held, rewrite, started_us)
        for conn, registration in settled:
            unregistered.discard(conn)
            await self._settle(conn, registration)
        await self.presence.publish_server(self.stats())
        closed = [conn for conn, _cap in rewrite if conn.closed]  # their removal may have preceded our write
        await asyncio.gather(*(self.presence.unregister(conn, last_local=not self.hub.has_user(conn.identity.user_id))
                               for conn in closed))
        log.info("presence resynced: %d connections", len(rewrite))

    async def broadcast(self, user_id: str, message: object, raw: bytes | None = None) -> BroadcastResult:
        """The broadcast API: validate, count the user's devices in the cluster registry, publish
        (recorded, from the producer's own bytes `raw`, unless recording is off or the type is a
        latest-value one).

        While Redis is down, devices of the user on this instance still get the message (degraded)."""
        kind, payload, ref, stamp = validate_service_message(message)
        assert isinstance(message, dict)  # validate_service_message refuses anything else
        expires_at = expires_at_of(message)
        if passed(expires_at):
            raise ValidationError("expiresAt has already passed")
        message_id = ref or self.ids.next()
        try:
            frame = service_frame(kind, payload, message_id, now_ms() if stamp is None else stamp, message, expires_at)
        except (OverflowError, UnicodeEncodeError):
            raise ValidationError("payload contains NaN, Infinity, a huge number or invalid UTF-8") from None
        if self.history is not None and raw is not None and kind not in LATEST_VALUE_TYPES:
            return await self._send(user_id, self.history.record(user_id, raw), frame, message_id)
        return await self._send(user_id, self.bus.publish_user(user_id, frame.decode()), frame, message_id)

    async def _send(self, user_id: str, sending: Awaitable[RecordResult | None], frame: bytes,
                    message_id: str) -> BroadcastResult:
        """Count and send in one round trip (both ride the same pipelined write); when Redis failed,
        the user's devices on this instance still get `frame` (live, unrecorded)."""
        counted: int | BaseException
        sent: RecordResult | BaseException | None
        counted, sent = await asyncio.gather(self.presence.device_count(user_id), sending, return_exceptions=True)
        local = self.hub.devices(user_id)
        if isinstance(sent, BusUnavailable):
            if not local:
                raise sent
            self.on_user_message(user_id, frame)
            return BroadcastResult(message_id, len(local), degraded=True)
        if isinstance(sent, BaseException):
            raise sent
        devices = counted if isinstance(counted, int) else len(local or ())
        if isinstance(sent, RecordResult):
            self.metrics.incr(m.MESSAGES_DUPLICATE if sent.duplicate else m.MESSAGES_RECORDED)
            return BroadcastResult(sent.message_id, devices, degraded=False, seq=sent.seq, duplicate=sent.duplicate)
        return BroadcastResult(message_id, devices, degraded=False)

    # --- stats and housekeeping ---------------------------------------------------------------

    def stats(self) -> ServerStats:
        return {"serverId": self.server_id, "totalConnections": len(self.hub),
                "uniqueUsers": self.hub.unique_users, "byUserType": self.hub.by_user_type(),
                "uptime": uptime_s(self.started_at)}

    def flush_metrics(self) -> None:
        """Once a second: this instance's gauges (sent every flush, so a StatsD with `deleteGauges`
        drops an instance's lines within a flush of its death), then everything aggregated."""
        gauge, hub = self.metrics.gauge, self.hub
        gauge(m.CONNECTIONS_TOTAL, len(hub))
        gauge(m.USERS_UNIQUE, hub.unique_users)
        for user_type, count in hub.by_user_type().items():
            gauge(m.CONNECTIONS_ACTIVE.format(user_type=user_type), count)
        self.metrics.flush()

    async def _housekeeping(self) -> None:
        self.reclaimer.tick(self.flow.queued_bytes)
        self.connect_limiter.prune(time.monotonic())
        stats = self.stats()
        try:
            await self.bus.ping()
            key_was_there = await self.presence.publish_server(stats)
            if not key_was_there and self._published:
                log.warning("this instance's server key was gone from Redis; writing its presence again")
                self.request_resync()
            self._published = True
            await self.presence.reap_dead_servers()
            await self.presence.sweep_users()
            self.metrics.gauge(m.CLUSTER_USERS_UNIQUE, await self.presence.unique_users())
        except Exception as exc:  # noqa: BLE001 - Redis down: /ready says so, retried next tick
            log.warning("housekeeping skipped: %s", exc)

    def _heartbeat_ticked(self, sent: int, elapsed_ms: float) -> None:
        self.metrics.incr(m.HEARTBEATS_SENT, sent)
        self.metrics.timing(m.HEARTBEAT_TICK_MS, elapsed_ms)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
