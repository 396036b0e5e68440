"""Redis Cluster naming and routing (issue #11), without a cluster: every key of one user in the
slot of the bare userId, commands routed by the right argument, and the history function's own
idea of the channel (Lua) agreeing with Keys (Python). The cluster itself: test_redis_cluster.py."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
import redis.asyncio as aredis
from redis.crc import key_slot

from tests.helpers import unique
from tornado_gateway.errors import ValidationError
from tornado_gateway.history_redis import RedisHistory
from tornado_gateway.redis_cluster import routing_key
from tornado_gateway.redis_keys import Keys
from tornado_gateway.resp import PipelinedClient

IDS = ["u1", "driver:42", "a{b}c", "x{y", "}{z}", "ü-7"]
CLUSTER = Keys("gateway", cluster=True)


def slot(key: str) -> int:
    return key_slot(key.encode())


@pytest.mark.parametrize("user_id", IDS)
def test_every_key_of_a_user_is_in_the_slot_of_the_bare_user_id(user_id: str) -> None:
    names = [CLUSTER.user_channel(user_id), CLUSTER.presence(user_id), CLUSTER.history(user_id),
             CLUSTER.history_meta(user_id), CLUSTER.history_ids(user_id)]
    assert {slot(name) for name in names} == {slot(user_id)}, names


@pytest.mark.parametrize("server_id", ["gw-1", "host-7.3", "a{b}"])
def test_every_key_of_an_instance_is_in_the_slot_of_its_server_id(server_id: str) -> None:
    names = [CLUSTER.server(server_id), CLUSTER.server_users(server_id), CLUSTER.control(server_id)]
    assert {slot(name) for name in names} == {slot(server_id)}, names


def test_cluster_names_carry_the_hash_tag_and_single_mode_names_do_not() -> None:
    single = Keys("gateway")
    assert (CLUSTER.user_channel("u1"), CLUSTER.presence("u1"), CLUSTER.server("i1"), CLUSTER.control("i1")) == (
        "gateway:user:{u1}", "gateway:presence:{u1}", "gateway:server:{i1}", "gateway:control:{i1}")
    assert CLUSTER.server_users("i1") == "gateway:server:{i1}:users"
    assert (single.user_channel("u1"), single.presence("u1"), single.server("i1"), single.control("i1")) == (
        "gateway:user:u1", "gateway:presence:u1", "gateway:server:i1", "gateway:control:i1")


def test_a_probe_channel_is_in_the_slot_of_its_tag() -> None:
    assert slot(CLUSTER.probe("gw-{1}", "17")) == slot("17")


def test_only_a_user_id_with_a_closing_brace_and_no_hash_tag_cannot_be_recorded_in_a_cluster() -> None:
    assert [user for user in [*IDS, "a}b", "}", "{}"] if not CLUSTER.recordable(user)] == ["a}b", "}", "{}"]
    assert Keys("gateway").recordable("a}b")


@pytest.mark.parametrize(("args", "key"), [
    (("SPUBLISH", "gateway:user:{u1}", "{}"), "gateway:user:{u1}"),
    (("PUBLISH", "gateway:events:location_update", "{}"), "gateway:events:location_update"),
    (("FCALL", "gateway_publish", 1, "u1", "{}"), "u1"),
    (("FCALL_RO", "gateway_history_version", 0), None),
    (("EVALSHA", "abc", "1", "gateway:presence:{u1}", "d1"), "gateway:presence:{u1}"),
    (("XADD", "gateway:stream:receipt", "MAXLEN", "~", 10, "*", "data", "x"), "gateway:stream:receipt"),
    (("PEXPIRE", "gateway:server:{i1}", 1000), "gateway:server:{i1}"),
    (("FUNCTION", "LOAD", "REPLACE", "#!lua"), None),
    (("PING",), None),
])
def test_commands_are_routed_by_their_key(args: tuple[str | int, ...], key: str | None) -> None:
    assert routing_key(args) == key


@pytest.mark.parametrize("user_id", ["u1", "a{b}c", "x{y"])
async def test_the_cluster_function_spublishes_on_the_channel_the_gateway_ssubscribes(redis_url: str,
                                                                                      user_id: str) -> None:
    """Rendered for a cluster, the library publishes with SPUBLISH to the name Keys gives (a
    standalone Redis 7 takes SPUBLISH/SSUBSCRIBE too, so no cluster is needed to compare them)."""
    keys = Keys(unique("gwck"), cluster=True)
    commands = PipelinedClient(redis_url)
    history = RedisHistory(commands, keys, 10, 60, 65536)
    subscriber = aredis.Redis.from_url(redis_url)
    pubsub = subscriber.pubsub()
    try:
        await history.load()
        await pubsub.execute_command("SSUBSCRIBE", keys.user_channel(user_id))
        await pubsub.get_message(timeout=1.0)  # the confirmation
        message = {"type": "ride_status", "payload": {"rideId": "r1", "status": "accepted"}}
        result = await history.record(user_id, json.dumps(message))
        received = await asyncio.wait_for(_next_message(pubsub), 2.0)
        assert result.seq == 1
        assert json.loads(received)["message"] == message
    finally:
        await pubsub.aclose()
        with contextlib.suppress(Exception):
            await subscriber.function_delete(keys.history_library())
        await subscriber.delete(keys.history(user_id), keys.history_meta(user_id), keys.history_ids(user_id))
        await subscriber.aclose()
        await commands.close()


async def _next_message(pubsub: aredis.client.PubSub) -> bytes:
    while True:
        message = await pubsub.get_message(timeout=1.0)
        if message is not None and message["type"] in ("smessage", "message"):
            return bytes(message["data"])


async def test_a_user_id_the_cluster_cannot_place_is_refused_for_recording_with_the_reason(redis_url: str) -> None:
    keys = Keys(unique("gwck"), cluster=True)
    commands = PipelinedClient(redis_url)
    try:
        with pytest.raises(ValidationError, match="no hash tag"):
            await RedisHistory(commands, keys, 10, 60, 65536).record("a}b", '{"type":"notification","payload":{}}')
    finally:
        await commands.close()
