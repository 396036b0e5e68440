"""Fixtures: the shared Redis (or one we start), gateway processes, and cleanup after each test."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import redis
import redis.asyncio as aredis

from tests.helpers import SHARED_REDIS_URL, Client, GatewayProcess, RedisServer, module_gateway, unique
from tornado_gateway.redis_keys import Keys
from tornado_gateway.resp import PipelinedClient

pytest_plugins = ["tests.soak_plugin"]


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The Redis at TEST_REDIS_URL (default 127.0.0.1:6379); if none answers, one this session starts."""
    try:
        redis.Redis.from_url(SHARED_REDIS_URL, socket_connect_timeout=1).ping()
        yield SHARED_REDIS_URL
        return
    except redis.exceptions.ConnectionError:
        pass
    server = RedisServer()
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix per test module, deleted afterwards with the function library every gateway
    loads under it (functions outlive keys), so tests never see each other's state."""
    name = unique("gwtest")
    yield name
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{name}:*", count=1000))
    if keys:
        client.delete(*keys)
    with contextlib.suppress(redis.ResponseError):
        client.function_delete(Keys(name).history_library())
    client.close()


gateway = module_gateway()


@pytest.fixture
def make_gateway(redis_url: str, prefix: str) -> Iterator[Callable[..., GatewayProcess]]:
    """Gateways with their own settings, stopped after the test."""
    started: list[GatewayProcess] = []

    def factory(env: dict[str, str] | None = None, *, url: str | None = None, args: list[str] | None = None,
                wait_ready: bool = True, start: bool = True, wait: bool = True) -> GatewayProcess:
        process = GatewayProcess(url or redis_url, prefix, env, args)
        started.append(process)
        return process.start(wait_ready=wait_ready, wait=wait) if start else process

    yield factory
    for process in started:
        process.stop()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def running(server: RedisServer) -> Iterator[RedisServer]:
    server.start()
    yield server
    server.stop()
    server.remove_data()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of the test's own (no persistence): the test may stop and restart it, empty."""
    yield from running(RedisServer())


@pytest.fixture
def snapshotting_redis() -> Iterator[RedisServer]:
    """A Redis of the test's own that keeps only what the last SAVE wrote across a restart (RDB)."""
    yield from running(RedisServer(snapshots=True))


@pytest.fixture
def persistent_redis() -> Iterator[RedisServer]:
    """A Redis of the test's own that keeps its data on disk across a restart (AOF, fsync always)."""
    yield from running(RedisServer(persistent=True))


@pytest.fixture
async def clients() -> AsyncIterator[list[Client]]:
    """Collects clients a test opens and closes them in teardown."""
    opened: list[Client] = []
    yield opened
    for client in opened:
        client.close()


@pytest.fixture
async def redis_async(redis_url: str) -> AsyncIterator[aredis.Redis]:
    client = aredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def pipelined(redis_url: str) -> AsyncIterator[PipelinedClient]:
    """The gateway's own pipelined Redis connection (what RedisHistory and presence call through)."""
    client = PipelinedClient(redis_url)
    yield client
    await client.close()
