"""The Python client SDK: one object that stays connected to the gateway for an app.

    async with GatewayClient("ws://gateway:4010", token_provider, user_type="driver",
                             device_id="pixel-8", platform="android") as client:
        client.on("ride_request", show_offer)            # sync or async; gets the whole message
        await client.send("location_update", {"latitude": 12.97, "longitude": 77.59,
                                              "timestamp": now_ms}, id="loc-1")  # returns on the ack
        async for message in client.messages():          # or iterate instead of callbacks
            ...

Everything a phone on a bad network needs is done here, once, so apps do not each get it wrong
(PROTOCOL.md sections 1-3 and 7, docs/PROTOCOL.md):

- heartbeats are answered, and a socket that stays silent for about two heartbeat intervals is
  taken for dead (a NAT or proxy that forgot it never sends a close) and replaced;
- the close code decides whether and when to reconnect, in one function (`reconnect_delay`);
- recorded messages are resumed with `since`/`epoch`, and the app is told ("resync") when the
  gateway could not fill the gap or the user's history started again;
- receipts are sent once the app has handled a message (at least one handler or `messages()`
  loop took it, and no handler raised), and tokens are refreshed in-band before they expire (a
  provider that has no newer token is asked again every `token_retry_s`, not in a loop).

How `seq` is read (PROTOCOL.md 7.2: within one connection the gateway sends recorded seqs strictly
increasing, each once):

- Each connection has a baseline: the `since` it resumed from when `connected` says
  `recovered: true` (the replay starts at since + 1), else `connected`'s `seq` (0 when absent).
- A recorded message whose seq is not above the last one this connection received (or the
  baseline, for its first) means the user's history started again while connected (it expired
  `HISTORY_TTL` after the last record, or Redis lost it): a "resync" event (reason
  `history_reset`) goes first, then the message is handled as usual, and the position counts on
  from its seq. Recorded envelopes carry no epoch, so the new epoch is not known: the position
  keeps the old epoch string, the next reconnect resumes with it, and the gateway answers
  `recovered: false` (one more "resync", reason `not_recovered`, then the new epoch and seq).
- Duplicates exist only across connections: after a reconnect with `recovered: true`, a replayed
  message whose seq the app already handled (or that was still queued from the connection
  before, handled first since the queue keeps order) is dropped.

One task (the dispatcher) runs every app callback, messages and connection events alike, one at a
time in the order they happened; protocol work (heartbeats, acks, liveness) never waits behind a
slow handler, so an app that takes seconds over one message is not mistaken for a dead socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import random
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, Literal, NamedTuple, NotRequired, Protocol, TypedDict, TypeVar, overload
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import jwt
import ujson
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClientConnection, WebSocketClosedError, WebSocketError, websocket_connect

from .backoff import Backoff
from .errors import CloseCode
from .messages import ConnectedPayload, ErrorPayload, Platform, ServiceType, UserType, dumps, now_ms

log = logging.getLogger(__name__)

T = TypeVar("T")

# --- types the app sees -----------------------------------------------------------------------

State = Literal["disconnected", "connecting", "connected", "closed"]
TokenProvider = Callable[[], Awaitable[str]]


class ServerMessage(TypedDict):
    """A message for the app (a service message): the envelope plus the section 7 fields."""

    type: str
    payload: dict[str, Any]
    id: str
    timestamp: int
    seq: NotRequired[int]  # recorded messages only
    expiresAt: NotRequired[int]
    receipt: NotRequired[bool]


# What apps send (PROTOCOL.md section 4, 7.5; the gateway drops unknown fields and checks the ranges).


class LocationUpdatePayload(TypedDict):
    latitude: float  # -90..90
    longitude: float  # -180..180
    timestamp: float  # ms since the epoch, when the fix was taken
    heading: NotRequired[float]
    speed: NotRequired[float]
    accuracy: NotRequired[float]
    isAvailable: NotRequired[bool]
    tripId: NotRequired[str]


class DispatchResponsePayload(TypedDict):
    requestId: str
    action: Literal["accept", "reject"]
    reason: NotRequired[str]


class ReceiptPayload(TypedDict):
    messageId: str


class TokenRefreshPayload(TypedDict):
    token: str


class HeartbeatAckPayload(TypedDict):
    timestamp: NotRequired[float]


class ConnectingEvent(TypedDict):
    attempt: int  # 1 for the first try since the last `connected` (or since connect())


class DisconnectedEvent(TypedDict):
    code: int | None  # None: no WebSocket was established (refused, unreachable, timed out)
    reason: str
    will_retry: bool
    retry_in_s: float | None  # when will_retry


class ResyncEvent(TypedDict):
    """Recorded messages may have been missed: re-read state from the services.

    `not_recovered`: the gateway answered a resume with `recovered: false`; `epoch` and `seq` are the
    new position (the user's current epoch and seq). `history_reset`: a recorded seq did not go up
    on one connection, so the user's history started again (a new epoch, unknown until the next
    `connected`: `epoch` is None); `seq` is that message's, which is handled right after this event.
    The client's `position` then keeps the old epoch string with the new seq, so the next reconnect
    gets `recovered: false` and another "resync"."""

    reason: Literal["not_recovered", "history_reset"]
    epoch: str | None
    seq: int | None


Handler = Callable[[T], Awaitable[None] | None]
Unsubscribe = Callable[[], None]


class ResumePosition(NamedTuple):
    epoch: str
    seq: int


class ResumeStore(Protocol):
    """Where an app keeps its resume position across restarts of the app itself (the client keeps
    it in memory anyway). `save` is awaited after each handled recorded message: keep it cheap."""

    async def load(self) -> tuple[str, int] | None: ...

    async def save(self, epoch: str, seq: int) -> None: ...


# --- errors -----------------------------------------------------------------------------------


class ClientError(Exception):
    """Base of everything the SDK raises."""


class NotConnected(ClientError):
    """No connection is open (connecting, waiting to reconnect, or closed): nothing was sent."""


class MessageRejected(ClientError):
    """The gateway answered the message with an `error` (FORBIDDEN, INVALID_MESSAGE, UNAVAILABLE...)."""

    def __init__(self, code: str, message: str, ref: str | None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.ref = ref


class AckTimeout(ClientError):
    """No ack within `ack_timeout_s`: the message may or may not have been taken; resend with the same id."""


class ConnectionLost(ClientError):
    """The connection dropped before the ack came: as with AckTimeout, resending with the same id is safe."""


class ConnectionClosed(ClientError):
    """The client stopped for good (closed by the app, or a close code after which it must not
    reconnect: 4400, 4409, or 4401 without a token provider)."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"closed {code}: {reason}")
        self.code = code
        self.reason = reason


# --- reconnect rules (pure) -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    """Capped exponential backoff with full jitter (uniform(0, ceiling)) so a fleet of phones that
    lost one instance does not come back in lockstep."""

    base_s: float = 0.5
    cap_s: float = 30.0
    throttled_s: float = 5.0  # added after 4429 / 1013: the gateway asked for less, not for the same again
    going_away_s: float = 1.0  # after 1001 (a deploy): reconnect at once, spread over this much


#: Close codes after which reconnecting would only be refused again (or steal the device back).
TERMINAL_CODES: Final = frozenset({CloseCode.INVALID_PARAMS, CloseCode.REPLACED})
THROTTLED_CODES: Final = frozenset({CloseCode.RATE_LIMITED, CloseCode.TRY_AGAIN_LATER})
#: RFC 6455's code for a connection that ended without a close frame (also what a dead socket is reported as).
ABNORMAL_CLOSURE: Final = 1006


def reconnect_delay(code: int | None, policy: ReconnectPolicy, backoff: Backoff, *,
                    can_refresh_token: bool) -> float | None:
    """Seconds to wait before the next attempt, or None when the client must stop.

    `code` is the close code of the connection that ended (None when none was established).
    4401 is retried only when a fresh token can be fetched: the same token would be refused again."""
    if code in TERMINAL_CODES:
        return None
    if code == CloseCode.AUTH_FAILED:
        return backoff.next_delay() if can_refresh_token else None
    if code in THROTTLED_CODES:
        return policy.throttled_s + backoff.next_delay()
    if code == CloseCode.GOING_AWAY:
        return random.uniform(0.0, policy.going_away_s)
    return backoff.next_delay()


def token_refresh_at(token: str, margin_s: float, now_s: float) -> float | None:
    """When (epoch seconds) to replace `token`: `margin_s` before its exp, or half-way through
    its lifetime for tokens shorter than twice the margin. None without a readable exp.

    The claims are read without verifying the signature: the client holds no key, and only uses
    the time to plan ahead; the gateway still verifies the token."""
    exp, issued = _token_times(token)
    if exp is None:
        return None
    start = now_s if issued is None else issued
    return exp - min(margin_s, max(0.0, exp - start) / 2)


def _token_times(token: str | None) -> tuple[float | None, float | None]:
    """The token's exp and iat (epoch seconds), read without verifying it; None where unreadable."""
    if token is None:
        return None, None
    try:
        claims = jwt.decode(token, options={"verify_signature": False, "verify_exp": False})
    except jwt.PyJWTError:
        return None, None
    return _as_time(claims.get("exp")), _as_time(claims.get("iat"))


def _as_time(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _as_seq(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


# --- internals --------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Link:
    """One WebSocket and what belongs to it alone: its acks, its liveness, its token refresher."""

    silence_limit_s: float
    last_frame_at: float
    ws: WebSocketClientConnection | None = None
    closed: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    established: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    early: list[str | bytes | None] = field(default_factory=list)  # frames read before `ws` was known
    connected: ConnectedPayload | None = None
    epoch: str | None = None
    since: int | None = None  # the `since` this connection resumed from (None: it did not ask)
    recovered: bool = False  # `connected` said recovered: true: a replay from since + 1 follows
    baseline: int | None = None  # recorded seqs on this connection start above this (set by `connected`)
    last_seq: int | None = None  # the last recorded seq this connection received
    pending: dict[str, asyncio.Future[None]] = field(default_factory=dict)
    refresher: asyncio.Task[None] | None = None
    abandoned: bool = False


@dataclass(slots=True)
class _Outcome:
    code: int | None
    reason: str
    by_app: bool = False


@dataclass(slots=True)
class _Delivery:
    message: ServerMessage
    link: _Link
    history_reset: bool


@dataclass(slots=True)
class _Adopt:
    payload: ConnectedPayload
    link: _Link


@dataclass(slots=True)
class _Event:
    name: str
    value: Any


_Work = _Delivery | _Adopt | _Event | None  # None stops the dispatcher


class _Inbox:
    """One `messages()` iterator. The dispatcher waits in `deliver` until the consumer asks for the
    next message (or leaves): that is when a message counts as handled. A message the consumer never
    took (it left the loop first) does not."""

    __slots__ = ("kinds", "closed", "_queue", "_current")

    def __init__(self, kinds: frozenset[str] | None) -> None:
        self.kinds = kinds
        self.closed = False
        self._queue: asyncio.Queue[tuple[ServerMessage, asyncio.Future[bool]] | None] = asyncio.Queue()
        self._current: asyncio.Future[bool] | None = None  # the handed-out message's "handled"

    def wants(self, kind: str) -> bool:
        return not self.closed and (self.kinds is None or kind in self.kinds)

    async def deliver(self, message: ServerMessage) -> bool:
        """Waits until the consumer is done with `message`; False when it never took it."""
        handled: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((message, handled))
        return await handled

    async def next(self) -> ServerMessage | None:
        self._release()
        entry = None if self.closed and self._queue.empty() else await self._queue.get()
        if entry is None:
            return None
        message, self._current = entry
        return message

    def close(self) -> None:
        """Idempotent; may run from a weakref finalizer, possibly after the loop has closed."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(RuntimeError):
            self._release()
            while not self._queue.empty():  # delivered but never taken: let the dispatcher go on
                entry = self._queue.get_nowait()
                if entry is not None and not entry[1].done():
                    entry[1].set_result(False)
            self._queue.put_nowait(None)

    def _release(self) -> None:
        if self._current is not None and not self._current.done():
            self._current.set_result(True)
        self._current = None


async def _read_inbox(inbox: _Inbox) -> AsyncIterator[ServerMessage]:
    try:
        while (message := await inbox.next()) is not None:
            yield message
    finally:
        inbox.close()


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Write futures fail when the socket has gone; the link's close already says so."""
    if not future.cancelled():
        future.exception()


# --- the client -------------------------------------------------------------------------------


class GatewayClient:
    """A connection to the gateway that keeps itself alive: see the module docstring.

    States: disconnected (not started) -> connecting -> connected -> (connecting ...) -> closed.
    Every stop ends with a `disconnected` event whose `will_retry` is False."""

    def __init__(self, url: str, token: str | TokenProvider, user_type: UserType, device_id: str,
                 platform: Platform, *, resume_store: ResumeStore | None = None,
                 reconnect: ReconnectPolicy | None = None, ack_timeout_s: float = 10.0,
                 connect_timeout_s: float = 10.0, dead_after_intervals: float = 2.0,
                 token_refresh_margin_s: float = 60.0, token_retry_s: float = 5.0,
                 max_message_size: int = 10 * 1024 * 1024) -> None:
        if urlsplit(url).scheme not in ("ws", "wss"):
            raise ValueError(f"the gateway URL must start with ws:// or wss://, not {url!r}")
        self._url = url
        self._static_token = token if isinstance(token, str) else None
        self._token_provider = None if isinstance(token, str) else token
        self._identity = {"userType": user_type, "deviceId": device_id, "platform": platform}
        self._store = resume_store
        self._policy = reconnect or ReconnectPolicy()
        self._backoff = Backoff(self._policy.base_s, self._policy.cap_s, full_jitter=True)
        self.ack_timeout_s = ack_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.dead_after_intervals = dead_after_intervals
        self.token_refresh_margin_s = token_refresh_margin_s
        self.token_retry_s = token_retry_s
        self.max_message_size = max_message_size

        self._state: State = "disconnected"
        self._handlers: dict[str, list[Handler[Any]]] = {}
        self._inboxes: list[_Inbox] = []
        self._queue: asyncio.Queue[_Work] = asyncio.Queue()
        self._token: str | None = self._static_token
        self._token_refresh_at: float | None = None
        self._token_stale = False  # set by 4401: fetch a fresh one before the next attempt
        self._epoch: str | None = None  # resume position: the dispatcher's, i.e. what the app handled
        self._seq = 0
        self._unsent_receipts: list[str] = []
        self._ids = itertools.count(1)
        self._link: _Link | None = None
        self._attempt = 0
        self._last_disconnect: DisconnectedEvent | None = None
        self._closing: tuple[int, str] | None = None
        self._stop: asyncio.Future[None] | None = None
        self._ready: asyncio.Future[ConnectedPayload] | None = None
        self._dispatch_open = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._dispatcher: asyncio.Task[None] | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def position(self) -> ResumePosition | None:
        """The epoch and the seq of the last recorded message the app handled (what a reconnect
        resumes from)."""
        return None if self._epoch is None else ResumePosition(self._epoch, self._seq)

    async def connect(self) -> ConnectedPayload:
        """Start, and return the first `connected` payload. Transient failures are retried
        meanwhile; raises ConnectionClosed when the client stops for good before connecting."""
        if self._closing is not None and self._ready is None:
            raise ConnectionClosed(self._closing[0], "the client was closed before it connected")
        if self._ready is None:
            loop = asyncio.get_running_loop()
            self._ready, self._stop = loop.create_future(), loop.create_future()
            self._ready.add_done_callback(_retrieve)
            await self._load_position()
            self._dispatcher = asyncio.ensure_future(self._dispatch_loop())
            self._supervisor = asyncio.ensure_future(self._run())
        try:
            return await asyncio.shield(self._ready)
        finally:
            # Dispatching starts only now, so `async for m in client.messages()` written right after
            # `await client.connect()` (or `async with`) registers before the first message is handed out.
            self._dispatch_open.set()

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close the connection and stop reconnecting. Messages not yet handed to the app are dropped
        (not handled: a resume store still points before them)."""
        if self._closing is None:
            self._closing = (int(code), reason)
            for inbox in list(self._inboxes):
                inbox.close()  # a consumer that calls close() inside its loop must not block the dispatcher
            if self._stop is not None and not self._stop.done():
                self._stop.set_result(None)
            self._dispatch_open.set()
        if self._supervisor is not None:
            await asyncio.shield(self._supervisor)
        else:
            self._state = "closed"
        if self._dispatcher is not None and asyncio.current_task() is not self._dispatcher:
            await asyncio.shield(self._dispatcher)

    async def wait_closed(self) -> DisconnectedEvent | None:
        """Wait until the client has stopped for good; returns the last `disconnected` event."""
        if self._supervisor is not None:
            await asyncio.shield(self._supervisor)
        return self._last_disconnect

    async def __aenter__(self) -> GatewayClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- app side: handlers, iterators, sends -------------------------------------------------

    @overload
    def on(self, event: Literal["connecting"], handler: Handler[ConnectingEvent]) -> Unsubscribe: ...

    @overload
    def on(self, event: Literal["connected"], handler: Handler[ConnectedPayload]) -> Unsubscribe: ...

    @overload
    def on(self, event: Literal["disconnected"], handler: Handler[DisconnectedEvent]) -> Unsubscribe: ...

    @overload
    def on(self, event: Literal["resync"], handler: Handler[ResyncEvent]) -> Unsubscribe: ...

    @overload
    def on(self, event: Literal["error"], handler: Handler[ErrorPayload]) -> Unsubscribe: ...

    @overload
    def on(self, event: ServiceType | Literal["message"] | str, handler: Handler[ServerMessage]) -> Unsubscribe: ...

    def on(self, event: str, handler: Handler[Any]) -> Unsubscribe:
        """Call `handler` (sync or async) for each message of type `event` ("message": every one) or
        for a connection event. "error" gets the gateway's errors that no `send` is waiting for
        (a token about to expire, a rate limit). Returns a function that removes the handler.

        A message that asks for a receipt gets one once its handlers (and `messages()` loops) are
        done, provided at least one of them took it and none raised: with nothing registered for
        its type (nor "message", nor a loop), no receipt is sent, so Dispatch can re-offer it."""
        handlers = self._handlers.setdefault(event, [])
        handlers.append(handler)

        def unsubscribe() -> None:
            if handler in handlers:
                handlers.remove(handler)

        return unsubscribe

    def messages(self, *kinds: str) -> AsyncIterator[ServerMessage]:
        """Every message (or those of `kinds`), in order, from the moment this is called.

        A message counts as handled, and its receipt is sent, when the loop asks for the next one
        (or leaves): the iterator is a handler like the callbacks, and later messages wait for it.
        One still waiting in the iterator when the loop ends was never taken: no receipt for it."""
        inbox = _Inbox(frozenset(kinds) or None)
        if self._state == "closed":
            inbox.close()
        self._inboxes.append(inbox)
        stream = _read_inbox(inbox)
        weakref.finalize(stream, inbox.close)  # a loop left with `break` must not hold up the rest
        return stream

    @overload
    async def send(self, kind: Literal["location_update"], payload: LocationUpdatePayload,
                   id: str | None = None) -> None: ...

    @overload
    async def send(self, kind: Literal["dispatch_response"], payload: DispatchResponsePayload,
                   id: str | None = None) -> None: ...

    @overload
    async def send(self, kind: Literal["receipt"], payload: ReceiptPayload, id: str | None = None) -> None: ...

    @overload
    async def send(self, kind: Literal["token_refresh"], payload: TokenRefreshPayload,
                   id: str | None = None) -> None: ...

    @overload
    async def send(self, kind: Literal["heartbeat_ack"], payload: HeartbeatAckPayload,
                   id: str | None = None) -> None: ...

    async def send(self, kind: str, payload: Mapping[str, Any], id: str | None = None) -> None:
        """Without `id`: written and forgotten. With `id`: returns once the gateway acked it; raises
        MessageRejected (its error), AckTimeout or ConnectionLost. NotConnected when no connection
        is open: nothing is queued for later (a location from a minute ago is worth nothing)."""
        link = self._link
        if link is None or link.connected is None:
            raise NotConnected(f"not connected ({self._state}): {kind} not sent")
        await self._request(link, kind, payload, id)

    # --- the connection loop (supervisor task) ------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                outcome = await self._attempt_once()
                delay = None if outcome.by_app else reconnect_delay(
                    outcome.code, self._policy, self._backoff, can_refresh_token=self._token_provider is not None)
                if outcome.code == CloseCode.AUTH_FAILED:
                    self._token_stale = True
                self._disconnected(outcome.code, outcome.reason, delay)
                if delay is None or not await self._pause(delay):
                    break
        except Exception as exc:  # a bug here must still end in a clean stop the app hears about
            log.exception("the connection loop failed")
            self._disconnected(None, f"client error: {exc!r}", None)
        finally:
            self._shut_down()

    async def _attempt_once(self) -> _Outcome:
        self._state = "connecting"
        self._attempt += 1
        self._enqueue(_Event("connecting", ConnectingEvent(attempt=self._attempt)))
        try:
            token = await self._unless_stopped(self._token_for_attempt())
        except _Stopped:
            return self._closed_by_app()
        except Exception as exc:  # noqa: BLE001 - whatever the app's provider raises is one failed attempt
            log.warning("the token provider failed: %r", exc)
            return _Outcome(None, f"token provider failed: {exc!r}")
        loop = asyncio.get_running_loop()
        link = _Link(silence_limit_s=self.connect_timeout_s, last_frame_at=loop.time())
        link.since = self._seq if self._epoch is not None else None  # what _connect_url asks for
        request = HTTPRequest(self._connect_url(), headers={"Authorization": f"Bearer {token}"},
                              connect_timeout=self.connect_timeout_s, request_timeout=self.connect_timeout_s)
        connecting = websocket_connect(request, on_message_callback=partial(self._on_frame, link),
                                       max_message_size=self.max_message_size)
        try:
            link.ws = await self._unless_stopped(connecting, on_abandon=_close_when_connected)
        except _Stopped:
            return self._closed_by_app()
        except (OSError, HTTPClientError, WebSocketError, StreamClosedError) as exc:
            return _Outcome(None, str(exc) or type(exc).__name__)
        self._link = link
        try:
            for raw in link.early:
                self._on_frame(link, raw)
            link.early.clear()
            return await self._watch(link)
        finally:
            self._end_link(link)

    async def _watch(self, link: _Link) -> _Outcome:
        """Until the socket closes, the app closes, or nothing has come for `silence_limit_s`."""
        assert link.ws is not None and self._stop is not None
        loop = asyncio.get_running_loop()
        while True:
            remaining = link.last_frame_at + link.silence_limit_s - loop.time()
            if link.closed.done():
                code = link.ws.close_code
                return _Outcome(ABNORMAL_CLOSURE if code is None else code, link.ws.close_reason or "")
            if self._stop.done():
                return await self._close_link(link)
            if remaining <= 0:
                link.ws.close()  # best effort: the close frame will not get through a dead path either
                return _Outcome(ABNORMAL_CLOSURE, f"no frame from the gateway for {link.silence_limit_s:.1f}s")
            # `connected` shortens the silence limit from the connect timeout to the heartbeat's: re-plan then.
            waiting = [link.closed, self._stop] if link.established.done() else [link.closed, self._stop,
                                                                                  link.established]
            await asyncio.wait(waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)

    async def _close_link(self, link: _Link) -> _Outcome:
        """The app closes: send the close frame and give the gateway a moment to answer it."""
        assert link.ws is not None
        outcome = self._closed_by_app()
        link.ws.close(outcome.code, outcome.reason)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(link.closed), 2.0)
        return outcome

    def _closed_by_app(self) -> _Outcome:
        code, reason = self._closing or (CloseCode.NORMAL, "")
        return _Outcome(code, reason, by_app=True)

    def _end_link(self, link: _Link) -> None:
        link.abandoned = True
        if self._link is link:
            self._link = None
        if link.refresher is not None:
            link.refresher.cancel()
        for future in link.pending.values():
            if not future.done():
                future.set_exception(ConnectionLost("the connection closed before the ack"))
        link.pending.clear()

    async def _pause(self, delay_s: float) -> bool:
        """Sleep before the next attempt; False when the app closed meanwhile."""
        assert self._stop is not None
        self._state = "connecting" if delay_s <= 0 else "disconnected"
        await asyncio.wait([self._stop], timeout=delay_s)
        return not self._stop.done()

    def _disconnected(self, code: int | None, reason: str, delay_s: float | None) -> None:
        event = DisconnectedEvent(code=code, reason=reason, will_retry=delay_s is not None, retry_in_s=delay_s)
        self._last_disconnect = event
        self._state = "disconnected" if delay_s is not None else "closed"
        self._enqueue(_Event("disconnected", event))

    def _shut_down(self) -> None:
        if self._last_disconnect is None or self._last_disconnect["will_retry"]:
            code, reason = self._closing or (CloseCode.NORMAL, "")
            self._disconnected(code, reason, None)  # closed by the app while waiting to reconnect
        self._state = "closed"
        if self._ready is not None and not self._ready.done():
            last = self._last_disconnect
            self._ready.set_exception(ConnectionClosed(last["code"] if last else None, last["reason"] if last else ""))
        self._enqueue(None)

    async def _unless_stopped(self, awaitable: Awaitable[T],
                              on_abandon: Callable[[asyncio.Future[T]], None] | None = None) -> T:
        """`awaitable`, unless the app closes first (then _Stopped). Used for the steps that can take
        a while before a socket exists: the token provider and the handshake."""
        assert self._stop is not None
        task = asyncio.ensure_future(awaitable)
        racing: list[asyncio.Future[Any]] = [task, self._stop]
        await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        if on_abandon is None:
            task.cancel()
        else:
            task.add_done_callback(on_abandon)
        raise _Stopped

    # --- tokens -------------------------------------------------------------------------------

    async def _token_for_attempt(self) -> str:
        """The current token, or a fresh one when it is due for replacement or was refused (4401)."""
        if self._token_provider is None:
            assert self._static_token is not None
            return self._static_token
        due = self._token_refresh_at is not None and self._token_refresh_at <= time.time()
        if self._token is None or self._token_stale or due:
            self._adopt_token(await self._token_provider())
            self._token_stale = False
        assert self._token is not None
        return self._token

    def _adopt_token(self, token: str) -> None:
        self._token = token
        self._token_refresh_at = token_refresh_at(token, self.token_refresh_margin_s, time.time())

    async def _keep_token_fresh(self, link: _Link, provider: TokenProvider) -> None:
        """In-band refresh (`token_refresh`) a little before exp, so the connection never drops for it.

        Only a token that expires later than the current one is sent. A provider with nothing newer
        (it hands back its cached token) is asked again `token_retry_s` later, and so is one whose
        new token is already due for refresh: never back to back, which would flood the gateway
        with token_refresh until it closes the connection for its rate limit."""
        wait_s = self._until_token_refresh()
        while wait_s is not None:
            await asyncio.sleep(wait_s)
            current_exp = _token_times(self._token)[0]
            try:
                token = await provider()
                new_exp = _token_times(token)[0]
                if new_exp is None or (current_exp is not None and new_exp <= current_exp):
                    log.info("the token provider has no token expiring later; asking again in %.1fs",
                             self.token_retry_s)
                    wait_s = self.token_retry_s
                    continue
                await self._request(link, "token_refresh", {"token": token}, f"token-refresh-{next(self._ids)}")
            except (ConnectionLost, NotConnected):
                return
            except Exception as exc:  # noqa: BLE001 - provider or gateway refused: retry, within the grace
                log.warning("token refresh failed, retrying in %.1fs: %r", self.token_retry_s, exc)
                wait_s = self.token_retry_s
                continue
            self._adopt_token(token)
            wait_s = self._until_token_refresh()
            if wait_s is not None and wait_s <= 0:  # later, but already due itself: not at once again
                wait_s = self.token_retry_s

    def _until_token_refresh(self) -> float | None:
        return None if self._token_refresh_at is None else max(0.0, self._token_refresh_at - time.time())

    # --- frames from the gateway (tornado's read callback: never awaits, never raises) --------

    def _on_frame(self, link: _Link, raw: str | bytes | None) -> None:
        if link.abandoned:
            return
        if link.ws is None:  # tornado reads before websocket_connect's future resumes us
            link.early.append(raw)
            return
        link.last_frame_at = asyncio.get_running_loop().time()
        if raw is None:
            if not link.closed.done():
                link.closed.set_result(None)
            return
        try:
            frame = ujson.loads(raw)
        except ValueError:
            log.warning("ignoring a frame that is not JSON: %.80r", raw)
            return
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            log.warning("ignoring a frame that is not an envelope: %.80r", raw)
            return
        try:
            self._handle_frame(link, frame)
        except Exception:  # a malformed frame must not take down tornado's read loop
            log.exception("could not handle a %s frame", frame.get("type"))

    def _handle_frame(self, link: _Link, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        payload = frame.get("payload")
        payload = payload if isinstance(payload, dict) else {}
        if kind == "heartbeat":
            stamp = payload.get("timestamp")
            with contextlib.suppress(NotConnected):  # the socket is closing: the watcher takes it from here
                self._write(link, {"type": "heartbeat_ack",
                                   "payload": {"timestamp": now_ms() if _as_time(stamp) is None else stamp}})
        elif kind == "ack":
            self._settle(link, payload.get("id"), None)
        elif kind == "error":
            self._on_error(link, payload)
        elif kind == "connected":
            self._on_connected(link, payload)  # type: ignore[arg-type]
        else:
            seq = _as_seq(frame.get("seq"))
            reset = False
            if seq is not None:
                # Strictly increasing within one connection (PROTOCOL 7.2): one that is not means the
                # user's history started again (a new epoch) while this connection was open.
                line = link.last_seq if link.last_seq is not None else link.baseline
                reset = line is not None and seq <= line
                link.last_seq = seq
            self._enqueue(_Delivery(frame, link, reset))  # type: ignore[arg-type]

    def _on_connected(self, link: _Link, payload: ConnectedPayload) -> None:
        link.connected = payload
        epoch = payload.get("epoch")
        link.epoch = epoch if isinstance(epoch, str) else None
        link.recovered = payload.get("recovered") is True and link.since is not None
        if link.recovered and link.since is not None:
            link.baseline = link.since  # the replay starts at since + 1
        else:
            link.baseline = _as_seq(payload.get("seq")) or 0  # everything up to it is not sent
        interval_ms = _as_time(payload.get("heartbeatInterval"))
        if interval_ms is not None and interval_ms > 0:
            link.silence_limit_s = self.dead_after_intervals * interval_ms / 1000.0
        if not link.established.done():
            link.established.set_result(None)
        self._state = "connected"
        self._attempt = 0
        self._backoff.reset()
        self._enqueue(_Adopt(payload, link))
        receipts, self._unsent_receipts = self._unsent_receipts, []
        for message_id in receipts:
            self._send_receipt(message_id)
        if self._token_provider is not None:
            link.refresher = asyncio.ensure_future(self._keep_token_fresh(link, self._token_provider))
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(payload)

    def _on_error(self, link: _Link, payload: dict[str, Any]) -> None:
        ref = payload.get("ref")
        error = MessageRejected(str(payload.get("code")), str(payload.get("message")),
                                ref if isinstance(ref, str) else None)
        if not self._settle(link, ref, error):
            log.info("gateway error %s: %s", error.code, error.message)
            self._enqueue(_Event("error", payload))

    def _settle(self, link: _Link, ref: object, error: Exception | None) -> bool:
        future = link.pending.pop(ref, None) if isinstance(ref, str) else None
        if future is None or future.done():
            return False
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
        return True

    # --- frames to the gateway ----------------------------------------------------------------

    def _write(self, link: _Link, frame: Mapping[str, Any]) -> None:
        if link.ws is None or link.abandoned:
            raise NotConnected("the connection is closed")
        try:
            link.ws.write_message(dumps(frame)).add_done_callback(_retrieve)
        except WebSocketClosedError:
            raise NotConnected("the connection is closed") from None

    async def _request(self, link: _Link, kind: str, payload: Mapping[str, Any], ref: str | None) -> None:
        frame: dict[str, Any] = {"type": kind, "payload": dict(payload)}
        if ref is None:
            self._write(link, frame)
            return
        frame["id"] = ref
        if ref in link.pending:
            raise ValueError(f"a message with id {ref!r} is already waiting for its ack")
        acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        link.pending[ref] = acked
        try:
            self._write(link, frame)
            await asyncio.wait_for(acked, self.ack_timeout_s)
        except TimeoutError:
            raise AckTimeout(f"no ack for {kind} {ref!r} within {self.ack_timeout_s}s") from None
        finally:
            if link.pending.get(ref) is acked:
                del link.pending[ref]

    def _send_receipt(self, message_id: str) -> None:
        """Fire and forget; kept for the next connection when there is none (the message was
        handled, so it will not be replayed, and the receipt is the only trace of it)."""
        link = self._link
        try:
            if link is None or link.connected is None:
                raise NotConnected("not connected")
            self._write(link, {"type": "receipt", "payload": {"messageId": message_id}})
        except NotConnected:
            self._unsent_receipts.append(message_id)

    def _connect_url(self) -> str:
        parts = urlsplit(self._url)
        query = [*parse_qsl(parts.query), *self._identity.items()]
        if self._epoch is not None:
            query += [("since", str(self._seq)), ("epoch", self._epoch)]
        path = parts.path if parts.path not in ("", "/") else "/ws"
        return urlunsplit((parts.scheme, parts.netloc, path, urlencode(query), ""))

    # --- the dispatcher task: every app callback runs here, in order --------------------------

    def _enqueue(self, work: _Work) -> None:
        self._queue.put_nowait(work)

    async def _dispatch_loop(self) -> None:
        await self._dispatch_open.wait()
        try:
            while (work := await self._queue.get()) is not None:
                try:
                    await self._dispatch(work)
                except Exception:  # a resume store that failed: the next message saves again
                    log.exception("dispatching %s failed", type(work).__name__)
        finally:
            for inbox in list(self._inboxes):
                inbox.close()

    async def _dispatch(self, work: _Delivery | _Adopt | _Event) -> None:
        if isinstance(work, _Event):
            await self._emit(work.name, work.value)
        elif isinstance(work, _Adopt):
            await self._adopt(work)
        elif self._closing is None:
            await self._deliver(work)

    async def _adopt(self, work: _Adopt) -> None:
        """The resume position after a `connected`: kept when the gateway recovered the gap, else the
        gateway's new line (everything up to its seq was either replayed or is lost)."""
        payload = work.payload
        recovered = payload.get("recovered")
        if recovered is not True:
            seq = payload.get("seq")
            self._epoch, self._seq = work.link.epoch, seq if isinstance(seq, int) else 0
            await self._save_position()
        await self._emit("connected", payload)
        if recovered is False:
            await self._emit("resync", ResyncEvent(reason="not_recovered", epoch=self._epoch, seq=self._seq))

    async def _deliver(self, work: _Delivery) -> None:
        message = work.message
        link = work.link
        seq = _as_seq(message.get("seq"))
        tracked = seq is not None and link.epoch is not None and link.epoch == self._epoch
        if seq is not None and work.history_reset:
            # The history started again while connected: the app re-reads its state, then gets this
            # message, and the position counts on from it (under the old epoch string: see ResyncEvent).
            await self._emit("resync", ResyncEvent(reason="history_reset", epoch=None, seq=seq))
        elif tracked and link.recovered and seq is not None and seq <= self._seq:
            return  # handled already: queued or handled on the connection before, then replayed on this one
        ran, failed = await self._run_handlers(message)
        if tracked and seq is not None:
            self._seq = seq
            await self._save_position()
        if message.get("receipt") is True and isinstance(message.get("id"), str):
            if ran and not failed:
                self._send_receipt(message["id"])
            elif failed:  # so Dispatch can re-offer a ride the app failed to show
                log.warning("no receipt for %s %s: a handler raised", message["type"], message["id"])
            else:  # nobody showed it: a receipt would tell Dispatch the driver saw the offer
                log.warning("no receipt for %s %s: no handler for it", message["type"], message["id"])

    async def _run_handlers(self, message: ServerMessage) -> tuple[int, bool]:
        """Runs the message's handlers (its type's, then "message"), then hands it to the iterators
        that want it. Returns how many of them took it and whether one raised."""
        ran, failed = 0, False
        for handler in [*self._handlers.get(message["type"], ()), *self._handlers.get("message", ())]:
            ran += 1
            failed = not await _call(handler, message) or failed
        self._inboxes = [inbox for inbox in self._inboxes if not inbox.closed]  # loops that ended
        for inbox in self._inboxes:
            if inbox.wants(message["type"]) and await inbox.deliver(message):
                ran += 1
        return ran, failed

    async def _emit(self, event: str, value: Any) -> None:
        for handler in list(self._handlers.get(event, ())):
            await _call(handler, value)

    async def _load_position(self) -> None:
        if self._store is None:
            return
        try:
            stored = await self._store.load()
        except Exception:  # an unreadable store costs a resume, not the connection
            log.exception("the resume store could not be read")
            return
        if stored is not None:
            self._epoch, self._seq = str(stored[0]), int(stored[1])

    async def _save_position(self) -> None:
        if self._store is not None and self._epoch is not None:
            await self._store.save(self._epoch, self._seq)


class _Stopped(Exception):
    """The app closed the client while a step was still under way."""


def _close_when_connected(future: asyncio.Future[WebSocketClientConnection]) -> None:
    """A handshake the app gave up on may still complete: close that socket rather than leak it."""
    if not future.cancelled() and future.exception() is None:
        future.result().close()


async def _call(handler: Handler[Any], value: Any) -> bool:
    """Run one app callback; False when it raised (logged: one bad handler must not stop the rest)."""
    try:
        result = handler(value)
        if inspect.isawaitable(result):
            await result
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("handler %r raised", handler)
        return False
    return True
