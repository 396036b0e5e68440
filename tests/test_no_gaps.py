"""PROTOCOL.md 7.4, no gaps while connected: a client that stays connected while the gateway's
subscription to Redis is lost, silent or re-established gets every recorded message once, in order.

Each test owns its Redis (the tests kill pub/sub connections and restart it) and puts the gateway
behind a TCP proxy to it, so that the subscription can be slowed down or silenced from outside.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis

from tests.helpers import Client, GatewayProcess, RedisServer, eventually, received_metrics, unique
from tests.tcp_proxy import DelayingProxy


@pytest.fixture
async def link(own_redis: RedisServer) -> AsyncIterator[DelayingProxy]:
    proxy = await DelayingProxy("127.0.0.1", own_redis.port).start()
    yield proxy
    await proxy.stop()


def record(r: redis.Redis, gateway: GatewayProcess, user: str, n: int) -> int:
    """A service recording a ride request with the Redis function, straight to Redis."""
    message = {"type": "ride_request", "payload": {"requestId": f"r{n}"}}
    return int(r.fcall(f"{gateway.prefix.replace('-', '_')}_publish", 1, user, json.dumps(message)))


def subscribers(r: redis.Redis, gateway: GatewayProcess, user: str) -> int:
    channel = f"{gateway.prefix}:user:{user}"
    return int(dict(r.pubsub_numsub(channel))[channel.encode()])


async def seqs_received(client: Client, count: int, timeout: float = 10.0) -> list[int]:
    return [(await client.recv("ride_request", timeout=timeout))["seq"] for _ in range(count)]


async def drop_subscription(r: redis.Redis, gateway: GatewayProcess, user: str) -> None:
    """Kill the instance's pub/sub connection, and wait until Redis no longer delivers to it."""
    r.client_kill_filter(_type="pubsub")
    await eventually(lambda: subscribers(r, gateway, user) == 0, timeout=5)


async def test_what_was_recorded_while_the_instance_was_not_subscribed_reaches_the_connected_client(
        make_gateway: Callable[..., GatewayProcess], own_redis: RedisServer, link: DelayingProxy) -> None:
    gateway = await make_gateway(url=link.url, wait=False).until_ready()
    r = own_redis.client()
    user = unique()
    client = await gateway.connect(user)
    record(r, gateway, user, 1)
    assert await seqs_received(client, 1) == [1]

    link.delay = 1.0  # the resubscription takes a while to reach Redis
    await drop_subscription(r, gateway, user)
    for n in (2, 3, 4):
        record(r, gateway, user, n)
    assert subscribers(r, gateway, user) == 0  # nobody received these three through pub/sub
    link.delay = 0.0

    assert await seqs_received(client, 3) == [2, 3, 4]
    assert await client.no_frame("ride_request", within=0.5)
    assert client.ws.close_code is None


async def test_live_records_wait_behind_the_catch_up_so_the_order_holds(
        make_gateway: Callable[..., GatewayProcess], own_redis: RedisServer, link: DelayingProxy) -> None:
    gateway = await make_gateway(url=link.url, wait=False).until_ready()
    r = own_redis.client()
    user = unique()
    client = await gateway.connect(user)
    link.delay = 0.5  # the catch-up's read of the history, too, takes a while
    await drop_subscription(r, gateway, user)
    for n in (1, 2):
        record(r, gateway, user, n)
    await eventually(lambda: subscribers(r, gateway, user) == 1, timeout=5)
    for n in (3, 4):  # live again, arriving while the history is being read
        record(r, gateway, user, n)
    link.delay = 0.0
    assert await seqs_received(client, 4) == [1, 2, 3, 4]
    assert await client.no_frame("ride_request", within=0.5)


async def test_after_redis_restarts_empty_the_new_epochs_messages_reach_the_connected_client(
        make_gateway: Callable[..., GatewayProcess], own_redis: RedisServer) -> None:
    gateway = make_gateway(url=own_redis.url)
    user = unique()
    client = await gateway.connect(user)
    r = own_redis.client()
    record(r, gateway, user, 1)
    assert await seqs_received(client, 1) == [1]
    own_redis.stop()
    own_redis.start()  # empty: the history and the function library are gone
    await eventually(gateway.ready, timeout=10)
    await eventually(lambda: _library_loaded(r, gateway), timeout=5)
    assert [record(r, gateway, user, n) for n in (2, 3)] == [1, 2]  # numbering began again
    assert await seqs_received(client, 2) == [1, 2]
    assert client.ws.close_code is None


def _library_loaded(r: redis.Redis, gateway: GatewayProcess) -> bool:
    return bool(r.function_list(library=f"{gateway.prefix.replace('-', '_')}_history"))


async def test_a_silent_subscription_turns_ready_503_and_is_replaced(
        make_gateway: Callable[..., GatewayProcess], own_redis: RedisServer, link: DelayingProxy) -> None:
    statsd = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    statsd.bind(("127.0.0.1", 0))
    statsd.setblocking(False)
    gateway = make_gateway({"PROBE_INTERVAL": "0.3", "PROBE_TIMEOUT": "1", "STATSD_HOST": "127.0.0.1",
                            "STATSD_PORT": str(statsd.getsockname()[1]), "STATSD_PREFIX": "gw"}, url=link.url,
                           wait=False)
    await gateway.until_ready()
    r = own_redis.client()
    user = unique()
    client = await gateway.connect(user)
    assert "gw.redis.probe_ms" in await received_metrics(statsd, {"gw.redis.probe_ms"})
    opened = link.connections
    link.freeze()  # every connection to Redis stays open and goes silent
    record(r, gateway, user, 1)  # published to a subscription that no longer receives

    await eventually(lambda: _not(gateway.ready()), timeout=10)  # the frozen command link goes first (5-6 s)
    await eventually(gateway.ready, timeout=10)
    assert link.connections > opened  # a new subscriber connection
    assert await seqs_received(client, 1) == [1]
    assert client.ws.close_code is None
    assert "gw.redis.probe_failures" in await received_metrics(statsd, {"gw.redis.probe_failures"})
    statsd.close()


async def _not(check: Any) -> bool:
    return not await check
