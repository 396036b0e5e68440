"""The Python SDK (`tornado_gateway.client`) against real gateway processes and the real Redis, over
real sockets: heartbeats, dead sockets, reconnects and their close codes, resume, tokens, receipts,
acked sends. A TCP proxy between client and gateway plays the network (freeze, cut, refuse)."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import jwt
import pytest
import redis.asyncio as aredis

from tests.helpers import GatewayProcess, eventually, make_token, unique
from tests.tcp_proxy import DelayingProxy
from tornado_gateway.backoff import Backoff
from tornado_gateway.client import (
    AckTimeout,
    ConnectingEvent,
    ConnectionClosed,
    DisconnectedEvent,
    GatewayClient,
    MessageRejected,
    ReconnectPolicy,
    ResyncEvent,
    ServerMessage,
    TokenProvider,
    reconnect_delay,
)
from tornado_gateway.messages import ConnectedPayload, ErrorPayload, UserType
from tornado_gateway.publisher import Publisher

FAST = {"HEARTBEAT_INTERVAL": "0.3", "HEARTBEAT_TIMEOUT": "0.9"}
QUICK_RETRY = ReconnectPolicy(base_s=0.05, cap_s=0.3, throttled_s=0.5, going_away_s=0.05)


class Seen:
    """Everything one client reported, in the order its handlers ran."""

    def __init__(self, client: GatewayClient) -> None:
        self.connecting: list[ConnectingEvent] = []
        self.connected: list[ConnectedPayload] = []
        self.disconnected: list[DisconnectedEvent] = []
        self.resyncs: list[ResyncEvent] = []
        self.errors: list[ErrorPayload] = []
        self.messages: list[ServerMessage] = []
        client.on("connecting", self.connecting.append)
        client.on("connected", self.connected.append)
        client.on("disconnected", self.disconnected.append)
        client.on("resync", self.resyncs.append)
        client.on("error", self.errors.append)
        client.on("message", self.messages.append)

    def seqs(self) -> list[int]:
        return [m["seq"] for m in self.messages if "seq" in m]


class MemoryStore:
    """A ResumeStore an app would back with its own storage."""

    def __init__(self) -> None:
        self.saved: list[tuple[str, int]] = []

    async def load(self) -> tuple[str, int] | None:
        return self.saved[-1] if self.saved else None

    async def save(self, epoch: str, seq: int) -> None:
        self.saved.append((epoch, seq))


@pytest.fixture
async def sdk() -> AsyncIterator[Callable[..., GatewayClient]]:
    """Builds SDK clients for one user's device and closes every one of them after the test."""
    made: list[GatewayClient] = []

    def build(port: int, user: str, *, user_type: UserType = "driver", device_id: str = "d1",
              token: str | TokenProvider | None = None, **options: Any) -> GatewayClient:
        options.setdefault("reconnect", QUICK_RETRY)
        client = GatewayClient(f"ws://127.0.0.1:{port}", token or make_token(user, user_type), user_type,
                               device_id, "android", **options)
        made.append(client)
        return client

    yield build
    for client in made:
        await client.close()


@pytest.fixture
async def proxied(make_gateway: Callable[..., GatewayProcess]) -> AsyncIterator[Callable[..., Any]]:
    """A gateway with `env` behind a proxy the test can freeze, cut or make refuse."""
    proxies: list[DelayingProxy] = []

    async def start(env: dict[str, str]) -> tuple[GatewayProcess, DelayingProxy]:
        gateway = make_gateway(env)
        proxy = await DelayingProxy("127.0.0.1", gateway.port).start()
        proxies.append(proxy)
        return gateway, proxy

    yield start
    for proxy in proxies:
        await proxy.stop()


async def offer(gateway: GatewayProcess, user: str, n: int, *, receipt: bool = False) -> dict[str, Any]:
    """A recorded ride_request through the broadcast API; the 202 body (messageId, seq, devices)."""
    body: dict[str, Any] = {"type": "ride_request", "payload": {"requestId": f"r{n}"}}
    if receipt:
        body["receipt"] = True
    status, answer = await gateway.http("POST", f"/broadcast/user/{user}", body)
    assert status == 202, answer
    return dict(answer)


async def next_event(pubsub: aredis.client.PubSub, user: str, timeout: float) -> dict[str, Any] | None:
    """The next section-4 event of `user` on a subscribed channel, or None within `timeout`."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=remaining)
        if message is not None:
            event: dict[str, Any] = json.loads(message["data"])
            if event["userId"] == user:
                return event
    return None


# --- heartbeats and dead sockets --------------------------------------------------------------


async def test_heartbeats_are_answered_so_the_connection_outlives_the_heartbeat_timeout(make_gateway, sdk) -> None:  # type: ignore[no-untyped-def]
    gateway = make_gateway(FAST)
    client = sdk(gateway.port, unique())
    seen = Seen(client)
    await client.connect()
    await asyncio.sleep(2.0)  # over twice HEARTBEAT_TIMEOUT
    assert client.state == "connected"
    assert (len(seen.connected), seen.disconnected, seen.errors) == (1, [], [])


async def test_a_silent_socket_is_taken_for_dead_and_replaced(proxied, sdk) -> None:  # type: ignore[no-untyped-def]
    _, proxy = await proxied({"HEARTBEAT_INTERVAL": "0.2", "HEARTBEAT_TIMEOUT": "30"})
    client = sdk(proxy.port, unique())
    seen = Seen(client)
    first = await client.connect()
    started = time.monotonic()
    proxy.freeze()  # open but silent both ways: no close frame will ever come
    await eventually(lambda: len(seen.connected) == 2, timeout=3)
    assert time.monotonic() - started < 1.5  # noticed after about two heartbeat intervals (0.4 s)
    assert seen.disconnected[0]["code"] == 1006 and seen.disconnected[0]["will_retry"]
    assert seen.connected[1]["connectionId"] != first["connectionId"]


# --- reconnects -------------------------------------------------------------------------------


async def test_the_client_reconnects_after_the_gateway_is_killed_and_restarted(make_gateway, sdk) -> None:  # type: ignore[no-untyped-def]
    gateway = make_gateway(FAST)
    client = sdk(gateway.port, unique())
    seen = Seen(client)
    await client.connect()
    assert gateway.proc is not None
    gateway.proc.kill()
    gateway.proc.wait()
    await eventually(lambda: len(seen.disconnected) >= 2, timeout=3)  # the drop, then a refused attempt
    assert all(event["will_retry"] for event in seen.disconnected)
    gateway.start()  # same port
    await eventually(lambda: len(seen.connected) == 2, timeout=5)
    assert client.state == "connected"


async def test_resume_delivers_every_recorded_message_once_and_in_order_across_a_gateway_restart(  # type: ignore[no-untyped-def]
        make_gateway, sdk, redis_async: aredis.Redis, prefix: str) -> None:
    gateway = make_gateway(FAST)
    user = unique()
    client = sdk(gateway.port, user)
    seen = Seen(client)
    await client.connect()
    for n in (1, 2):
        await offer(gateway, user, n)
    await eventually(lambda: seen.seqs() == [1, 2])
    assert gateway.proc is not None
    gateway.proc.kill()
    gateway.proc.wait()
    publisher = Publisher(redis_async, prefix)  # recording needs no live instance, only its Redis function
    assert [(await publisher.publish(user, "ride_request", {"requestId": f"r{n}"})).seq for n in (3, 4, 5)] == [3, 4, 5]
    gateway.start()
    await eventually(lambda: seen.seqs() == [1, 2, 3, 4, 5], timeout=5)
    await offer(gateway, user, 6)
    await eventually(lambda: len(seen.messages) == 6)
    await asyncio.sleep(0.2)  # time for anything delivered twice
    assert seen.seqs() == [1, 2, 3, 4, 5, 6]
    assert [m["payload"]["requestId"] for m in seen.messages] == [f"r{n}" for n in range(1, 7)]
    assert seen.connected[-1].get("recovered") is True and seen.resyncs == []


async def test_messages_replayed_after_a_reconnect_are_not_handled_twice(proxied, sdk) -> None:  # type: ignore[no-untyped-def]
    gateway, proxy = await proxied(FAST)
    user = unique()
    client = sdk(proxy.port, user)
    seen = Seen(client)
    release = asyncio.Event()
    handled: list[int] = []

    async def slow_first(message: ServerMessage) -> None:
        await release.wait()  # holds 1 while 2 and 3 queue up behind it, unhandled
        handled.append(message["seq"])

    client.on("ride_request", slow_first)
    await client.connect()
    for n in (1, 2, 3):
        await offer(gateway, user, n)
    await asyncio.sleep(0.3)
    proxy.drop()  # nothing handled yet: the reconnect resumes from seq 0, so 1-3 are replayed
    await eventually(lambda: client.state == "connected" and client.position is not None, timeout=3)
    await asyncio.sleep(0.3)  # the replay arrives behind the old copies
    release.set()
    await eventually(lambda: len(seen.connected) == 2)
    await asyncio.sleep(0.2)
    assert handled == [1, 2, 3]
    assert seen.connected[1].get("recovered") is True


async def test_the_app_is_told_to_resync_when_the_gap_cannot_be_recovered(proxied, sdk) -> None:  # type: ignore[no-untyped-def]
    gateway, proxy = await proxied({**FAST, "HISTORY_SIZE": "1"})
    user = unique()
    client = sdk(proxy.port, user)
    seen = Seen(client)
    await client.connect()
    await offer(gateway, user, 1)
    await eventually(lambda: seen.seqs() == [1])
    proxy.refusing = True
    proxy.drop()
    await eventually(lambda: seen.disconnected)
    for n in (2, 3, 4):  # seq 2 falls out of a history of one: seq 1 cannot be resumed from
        assert (await offer(gateway, user, n))["devices"] == 0
    proxy.refusing = False
    await eventually(lambda: seen.resyncs, timeout=3)
    assert seen.resyncs[0]["reason"] == "not_recovered"
    assert seen.connected[-1].get("recovered") is False
    assert client.position is not None and client.position.seq == 4  # the gateway's new line
    await offer(gateway, user, 5)
    await eventually(lambda: seen.seqs() == [1, 5])


async def test_a_history_that_starts_again_while_connected_is_handled_in_full_after_a_resync(  # type: ignore[no-untyped-def]
        proxied, sdk) -> None:
    """HISTORY_TTL passes while the client is connected: the next recorded messages start again at
    seq 1 under a new epoch, with no epoch in their envelopes. Every one of them is handled, in
    order, after a "resync"; the next reconnect, still asking for the old epoch, resyncs again."""
    gateway, proxy = await proxied({**FAST, "HISTORY_TTL": "1"})
    user = unique()
    assert (await offer(gateway, user, 1))["seq"] == 1  # before the client connects
    client = sdk(proxy.port, user)
    seen = Seen(client)
    connected = await client.connect()
    first_epoch = connected.get("epoch")
    assert isinstance(first_epoch, str) and connected.get("seq") == 1

    await asyncio.sleep(1.5)  # the history expires while connected; nothing was received on this socket yet
    assert [(await offer(gateway, user, n))["seq"] for n in (2, 3)] == [1, 2]
    await eventually(lambda: len(seen.messages) == 2, timeout=3)
    assert [(m["seq"], m["payload"]["requestId"]) for m in seen.messages] == [(1, "r2"), (2, "r3")]
    assert seen.resyncs == [ResyncEvent(reason="history_reset", epoch=None, seq=1)]
    assert client.position == (first_epoch, 2)  # the new epoch is not known: the old one is kept

    await asyncio.sleep(1.5)  # again, now after this socket received seq 2
    assert [(await offer(gateway, user, n))["seq"] for n in (4, 5, 6)] == [1, 2, 3]
    await eventually(lambda: len(seen.messages) == 5, timeout=3)
    assert [m["payload"]["requestId"] for m in seen.messages] == ["r2", "r3", "r4", "r5", "r6"]
    assert seen.seqs() == [1, 2, 1, 2, 3]
    assert [r["reason"] for r in seen.resyncs] == ["history_reset", "history_reset"]

    proxy.drop()  # resumes with the old epoch: the gateway cannot recover it
    await eventually(lambda: len(seen.connected) == 2, timeout=3)
    assert seen.connected[1].get("recovered") is False
    new_epoch = seen.connected[1].get("epoch")
    assert new_epoch != first_epoch
    await eventually(lambda: len(seen.resyncs) == 3)
    assert seen.resyncs[2] == ResyncEvent(reason="not_recovered", epoch=new_epoch, seq=3)
    await offer(gateway, user, 7)
    await eventually(lambda: len(seen.messages) == 6)
    assert seen.messages[-1]["seq"] == 4 and client.position == (new_epoch, 4)
    await asyncio.sleep(0.2)
    assert len(seen.messages) == 6 and len(seen.resyncs) == 3


async def test_a_resume_store_carries_the_position_to_the_next_client(make_gateway, sdk) -> None:  # type: ignore[no-untyped-def]
    gateway = make_gateway(FAST)
    user = unique()
    store = MemoryStore()
    first = sdk(gateway.port, user, resume_store=store)
    seen_first = Seen(first)
    await first.connect()
    for n in (1, 2):
        await offer(gateway, user, n)
    await eventually(lambda: seen_first.seqs() == [1, 2])
    await first.close()
    epoch = store.saved[-1][0]
    assert store.saved[-1] == (epoch, 2)
    assert (await offer(gateway, user, 3))["devices"] == 0  # while the app is not running
    second = sdk(gateway.port, user, resume_store=store)
    seen_second = Seen(second)
    assert (await second.connect()).get("recovered") is True
    await eventually(lambda: seen_second.seqs() == [3])
    assert store.saved[-1] == (epoch, 3)


# --- close codes ------------------------------------------------------------------------------


async def test_a_replaced_connection_does_not_reconnect(make_gateway, sdk, clients) -> None:  # type: ignore[no-untyped-def]
    gateway = make_gateway(FAST)
    user = unique()
    client = sdk(gateway.port, user, device_id="phone")
    seen = Seen(client)
    stream = client.messages()
    await client.connect()
    clients.append(await gateway.connect(user, device_id="phone"))  # the same device, connecting again
    final = await asyncio.wait_for(client.wait_closed(), 3)
    assert final is not None and (final["code"], final["will_retry"]) == (4409, False)
    await asyncio.sleep(0.3)
    assert client.state == "closed" and len(seen.connecting) == 1
    assert [m async for m in stream] == []  # iterators end with the client


async def test_connect_raises_when_the_gateway_refuses_the_parameters(make_gateway, sdk) -> None:  # type: ignore[no-untyped-def]
    gateway = make_gateway(FAST)
    client = sdk(gateway.port, unique(), device_id="not a device id")
    with pytest.raises(ConnectionClosed) as refused:
        await asyncio.wait_for(client.connect(), 3)
    assert refused.value.code == 4400


# --- tokens -----------------------------------------------------------------------------------


async def test_the_token_is_refreshed_in_band_before_it_expires(make_gateway, sdk) -> None:  # type: ignore[no-untyped-def]
    gateway = make_gateway({"HEARTBEAT_INTERVAL": "0.2", "HEARTBEAT_TIMEOUT": "30", "TOKEN_EXPIRY_GRACE": "0.3"})
    user = unique()
    fetched: list[str] = []

    async def provider() -> str:
        fetched.append(make_token(user, ttl_s=2))
        return fetched[-1]

    client = sdk(gateway.port, user, token=provider)
    seen = Seen(client)
    await client.connect()
    first_exp = jwt.decode(fetched[0], options={"verify_signature": False})["exp"]
    await asyncio.sleep(first_exp - time.time() + 1.0)  # past the first exp, its grace and a sweep
    assert len(fetched) >= 2
    assert (len(seen.connected), seen.disconnected, seen.errors) == (1, [], [])
    await client.send("location_update", {"latitude": 1.0, "longitude": 2.0, "timestamp": 0}, id="still-authorised")


async def test_a_provider_without_a_newer_token_is_asked_again_later_not_in_a_loop(make_gateway, sdk) -> None:  # type: ignore[no-untyped-def]
    gateway = make_gateway({"HEARTBEAT_INTERVAL": "0.3", "HEARTBEAT_TIMEOUT": "30"})
    user = unique()
    now = int(time.time())
    cached = make_token(user, iat=now - 3000, exp=now + 30)  # the app's cached token: due for refresh
    calls: list[float] = []

    async def provider() -> str:  # has nothing newer for its first three calls
        calls.append(time.monotonic())
        return cached if len(calls) <= 3 else make_token(user, ttl_s=3600)

    client = sdk(gateway.port, user, token=provider, token_retry_s=0.4)
    seen = Seen(client)
    await client.connect()
    await asyncio.sleep(2.0)
    # connect, then at once (still the cached token: not sent), then every 0.4 s until a newer token
    # comes; that one is sent and acked, and the next refresh is an hour away.
    assert len(calls) == 4, calls
    assert [round(later - earlier, 1) >= 0.4 for earlier, later in itertools.pairwise(calls[1:])] == [True, True]
    assert (len(seen.connected), seen.disconnected, seen.errors) == (1, [], [])
    await client.send("location_update", {"latitude": 1.0, "longitude": 2.0, "timestamp": 0}, id="not-limited")


async def test_after_4401_the_client_fetches_a_new_token_and_reconnects(make_gateway, sdk) -> None:  # type: ignore[no-untyped-def]
    gateway = make_gateway(FAST)
    user = unique()
    tokens = iter([make_token(user, ttl_s=-60), make_token(user, ttl_s=600)])  # the first has expired

    async def provider() -> str:
        return next(tokens)

    client = sdk(gateway.port, user, token=provider)
    seen = Seen(client)
    await asyncio.wait_for(client.connect(), 3)
    await eventually(lambda: seen.connected)
    assert [(e["code"], e["will_retry"]) for e in seen.disconnected] == [(4401, True)]
    assert seen.errors[0]["code"] == "AUTH_FAILED"


# --- receipts ---------------------------------------------------------------------------------


async def test_a_receipt_is_sent_once_the_handler_has_run(  # type: ignore[no-untyped-def]
        make_gateway, sdk, redis_async: aredis.Redis, prefix: str) -> None:
    gateway = make_gateway(FAST)
    user = unique()
    client = sdk(gateway.port, user)
    handled: list[str] = []

    async def show(message: ServerMessage) -> None:
        await asyncio.sleep(0.3)  # a receipt sent on arrival would reach Redis before this ends
        handled.append(message["id"])

    client.on("ride_request", show)
    await client.connect()
    async with redis_async.pubsub() as pubsub:
        await pubsub.subscribe(f"{prefix}:events:receipt")
        message_id = (await offer(gateway, user, 1, receipt=True))["messageId"]
        event = await next_event(pubsub, user, timeout=3)
        assert handled == [message_id]
    assert event is not None and event["payload"] == {"messageId": message_id}


async def test_with_the_iterator_the_receipt_is_sent_when_the_next_message_is_asked_for(  # type: ignore[no-untyped-def]
        make_gateway, sdk, redis_async: aredis.Redis, prefix: str) -> None:
    gateway = make_gateway(FAST)
    user = unique()
    client = sdk(gateway.port, user)
    await client.connect()
    stream = client.messages()
    async with redis_async.pubsub() as pubsub:
        await pubsub.subscribe(f"{prefix}:events:receipt")
        message_id = (await offer(gateway, user, 1, receipt=True))["messageId"]
        message = await asyncio.wait_for(anext(stream), 3)
        assert message["id"] == message_id and message.get("receipt") is True
        assert await next_event(pubsub, user, timeout=0.3) is None  # still being handled
        asking = asyncio.ensure_future(anext(stream))
        event = await next_event(pubsub, user, timeout=3)
        asking.cancel()
    assert event is not None and event["payload"] == {"messageId": message_id}


async def test_no_receipt_for_a_message_that_no_handler_took(  # type: ignore[no-untyped-def]
        make_gateway, sdk, redis_async: aredis.Redis, prefix: str) -> None:
    gateway = make_gateway(FAST)
    user = unique()
    client = sdk(gateway.port, user)
    client.on("notification", lambda message: None)  # a handler, but for another type
    others = client.messages("order_status")  # a loop, but for another type
    await client.connect()
    async with redis_async.pubsub() as pubsub:
        await pubsub.subscribe(f"{prefix}:events:receipt")
        await offer(gateway, user, 1, receipt=True)
        await eventually(lambda: client.position is not None and client.position.seq == 1)  # it arrived
        assert await next_event(pubsub, user, timeout=0.5) is None  # nobody showed it: no receipt

        handled: list[str] = []
        client.on("ride_request", lambda message: handled.append(message["id"]))
        message_id = (await offer(gateway, user, 2, receipt=True))["messageId"]
        event = await next_event(pubsub, user, timeout=3)
    assert event is not None and event["payload"] == {"messageId": message_id} and handled == [message_id]
    await others.aclose()


# --- sends ------------------------------------------------------------------------------------


async def test_an_acked_send_returns_once_the_gateway_has_taken_it(  # type: ignore[no-untyped-def]
        make_gateway, sdk, redis_async: aredis.Redis, prefix: str) -> None:
    gateway = make_gateway(FAST)
    user = unique()
    client = sdk(gateway.port, user)
    await client.connect()
    async with redis_async.pubsub() as pubsub:
        await pubsub.subscribe(f"{prefix}:events:location_update")
        await client.send("location_update", {"latitude": 12.97, "longitude": 77.59, "timestamp": 1}, id="loc-1")
        event = await next_event(pubsub, user, timeout=3)
    assert event is not None and (event["id"], event["payload"]["latitude"]) == ("loc-1", 12.97)


async def test_a_refused_send_raises_with_the_gateway_error_code(make_gateway, sdk) -> None:  # type: ignore[no-untyped-def]
    gateway = make_gateway(FAST)
    client = sdk(gateway.port, unique(), user_type="rider")
    await client.connect()
    with pytest.raises(MessageRejected) as refused:
        await client.send("location_update", {"latitude": 1.0, "longitude": 2.0, "timestamp": 1}, id="loc-1")
    assert (refused.value.code, refused.value.ref) == ("FORBIDDEN", "loc-1")
    assert client.state == "connected"


async def test_a_send_that_gets_no_ack_times_out(proxied, sdk) -> None:  # type: ignore[no-untyped-def]
    _, proxy = await proxied({"HEARTBEAT_INTERVAL": "1", "HEARTBEAT_TIMEOUT": "30"})
    client = sdk(proxy.port, unique(), ack_timeout_s=0.3)
    await client.connect()
    proxy.freeze()
    started = time.monotonic()
    with pytest.raises(AckTimeout):
        await client.send("location_update", {"latitude": 1.0, "longitude": 2.0, "timestamp": 1}, id="lost")
    assert 0.3 <= time.monotonic() - started < 1.0


# --- the reconnect rules, without sockets -----------------------------------------------------

POLICY = ReconnectPolicy(base_s=1.0, cap_s=8.0, throttled_s=5.0, going_away_s=0.5)


@pytest.mark.parametrize("code", [4400, 4409])
def test_no_reconnect_after_a_terminal_close_code(code: int) -> None:
    assert reconnect_delay(code, POLICY, Backoff(1.0, 8.0, full_jitter=True), can_refresh_token=True) is None


def test_4401_is_retried_only_when_a_fresh_token_can_be_fetched() -> None:
    backoff = Backoff(1.0, 8.0, full_jitter=True)
    assert reconnect_delay(4401, POLICY, backoff, can_refresh_token=False) is None
    assert reconnect_delay(4401, POLICY, backoff, can_refresh_token=True) is not None


@pytest.mark.parametrize("code", [4429, 1013])
def test_rate_limits_and_a_full_instance_wait_longer_than_the_backoff(code: int) -> None:
    delays = [reconnect_delay(code, POLICY, Backoff(1.0, 8.0, full_jitter=True), can_refresh_token=True)
              for _ in range(200)]
    assert all(d is not None and 5.0 <= d <= 6.0 for d in delays)


def test_a_shutting_down_instance_is_left_for_another_at_once() -> None:
    backoff = Backoff(1.0, 8.0, full_jitter=True)
    backoff.attempt = 10  # even deep into a backoff
    delays = [reconnect_delay(1001, POLICY, backoff, can_refresh_token=True) for _ in range(200)]
    assert all(d is not None and 0.0 <= d <= 0.5 for d in delays)


@pytest.mark.parametrize("code", [None, 1006, 4408, 4503, 1011])
def test_other_closes_back_off_exponentially_with_full_jitter_up_to_the_cap(code: int | None) -> None:
    backoff = Backoff(1.0, 8.0, full_jitter=True)
    ceilings = [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    delays = [reconnect_delay(code, POLICY, backoff, can_refresh_token=True) for _ in ceilings]
    assert all(d is not None and 0.0 <= d <= ceiling for d, ceiling in zip(delays, ceilings, strict=True))
    assert min(reconnect_delay(code, POLICY, Backoff(1.0, 8.0, full_jitter=True), can_refresh_token=True) or 0
               for _ in range(200)) < 0.5  # full jitter reaches down to zero, not just half the ceiling


def test_the_default_backoff_keeps_its_floor_of_half_the_ceiling() -> None:
    backoff = Backoff(1.0, 8.0)
    assert [ceiling / 2 <= backoff.next_delay() <= ceiling for ceiling in (1.0, 2.0, 4.0, 8.0, 8.0)] == [True] * 5
