"""Running one instance: build its components, listen, and drain on SIGTERM.

Kept apart from `main` so that the `PROCESSES=N` supervisor and the `token` command do not import
Tornado's server, redis-py and the rest: every megabyte a process imports is counted again in each
of N processes.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
import urllib.parse
from collections.abc import Callable

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from .app import make_app
from .bus import Bus, MemoryBus
from .bus_redis import Probe, RedisBus
from .bus_redis_cluster import ClusterBus
from .config import DEV_JWT_SECRET, MEMORY_URL, Settings
from .gateway import Gateway
from .history import History, MemoryHistory
from .history_redis import RedisHistory
from .metrics import Metrics
from .presence import MemoryPresence, Presence
from .presence_redis import RedisPresence
from .presence_redis_cluster import ClusterPresence
from .redis_cluster import ClusterClient, ClusterEndpoint
from .redis_endpoint import RedisEndpoint, endpoint_for
from .redis_keys import Keys
from .resp import Commands, PipelinedClient

log = logging.getLogger("tornado_gateway")


def redacted(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def run(settings: Settings) -> None:
    with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
        runner.run(serve(settings))


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (the `uvloop` extra) unless EVENT_LOOP=asyncio; Tornado runs on either."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SystemExit("tornado-gateway: EVENT_LOOP=uvloop but uvloop is not installed") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def raise_file_limit() -> int:
    """Each connection is a file descriptor: take the whole hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


Backends = tuple[Presence, Bus, History, RedisEndpoint | None]  # no endpoint: the embedded bus


def embedded_backends(settings: Settings) -> Backends:
    bus = MemoryBus()
    history = MemoryHistory(settings.history_size, settings.history_ttl_s, bus.deliver,
                            max_message_size=settings.max_message_size)
    return MemoryPresence(settings.server_id), bus, history, None


async def build_backends(settings: Settings, metrics: Metrics) -> Backends:
    if settings.redis_url == MEMORY_URL:
        return embedded_backends(settings)
    endpoint = endpoint_for(settings)  # REDIS_URL, or the primary the sentinels name
    redis = endpoint.client(socket_connect_timeout=2.0, socket_timeout=5.0, health_check_interval=30)
    if settings.dev:
        try:
            await redis.ping()
        except Exception as exc:  # noqa: BLE001 - dev mode degrades instead of failing
            log.warning("=" * 72)
            log.warning("DEVELOPMENT MODE: Redis at %s is not reachable (%s)", redacted(settings.redis_url), exc)
            log.warning("falling back to the EMBEDDED single-instance bus: no cross-instance delivery")
            log.warning("=" * 72)
            await endpoint.stop()
            return embedded_backends(settings)
    probe = Probe(settings.probe_interval_s, settings.probe_timeout_s)
    presence: Presence
    bus: Bus
    commands: Commands
    if isinstance(endpoint, ClusterEndpoint):
        keys = Keys(settings.redis_prefix, cluster=True)
        commands = ClusterClient(endpoint)
        presence = ClusterPresence(redis, commands, keys, settings.server_id, settings.instance_ttl_s)
        bus = ClusterBus(commands, endpoint, keys, settings.server_id, metrics,
                         stream_maxlen=settings.dispatch_stream_maxlen, probe=probe, event_shards=settings.event_shards)
    else:
        keys = Keys(settings.redis_prefix)
        commands = PipelinedClient(endpoint)
        presence = RedisPresence(redis, commands, keys, settings.server_id, settings.instance_ttl_s)
        bus = RedisBus(commands, endpoint, keys, settings.server_id, metrics,
                       stream_maxlen=settings.dispatch_stream_maxlen, probe=probe)
    history = RedisHistory(commands, keys, settings.history_size, settings.history_ttl_s, settings.max_message_size)
    endpoint.on_primary_moved(commands.primary_moved, bus.primary_moved)
    await endpoint.start()
    return presence, bus, history, endpoint


def log_broadcast_rule(settings: Settings) -> None:
    """Who may call POST /broadcast, said once at start: behind a proxy the answer is not obvious."""
    proxies = ", ".join(settings.trusted_proxies) or "none"
    if settings.gateway_api_key:
        log.info("broadcast rule: POST /broadcast needs GATEWAY_API_KEY (trusted proxies: %s)", proxies)
        return
    log.warning("broadcast rule: GATEWAY_API_KEY is not set: POST /broadcast is accepted from loopback "
                "callers only; a request through a proxy (forwarding headers) is refused unless a trusted "
                "proxy forwards it for a loopback client (trusted proxies: %s)", proxies)


def announce(settings: Settings, embedded: bool) -> None:
    if settings.dev and settings.jwt_secret == DEV_JWT_SECRET:
        log.warning("=" * 72)
        log.warning("DEVELOPMENT MODE: tokens are signed with a PUBLIC, INSECURE dev secret.")
        log.warning("Never expose this instance. Set JWT_SECRET and drop --dev in production.")
        log.warning("=" * 72)
    log_broadcast_rule(settings)
    port = settings.port
    log.info("instance %s listening on :%d (%s bus, %s loop)", settings.server_id, port,
             "embedded" if embedded else "Redis", type(asyncio.get_running_loop()).__module__.split(".")[0])
    if settings.dev:
        log.info("mint a token:  .venv/bin/tornado-gateway --dev token --sub u1 --user-type driver")
        log.info("connect:       ws://localhost:%d/ws?token=TOKEN&userType=driver&deviceId=d1&platform=ios", port)
        log.info("push:          curl -XPOST localhost:%d/broadcast/user/u1 "
                 "-d '{\"type\":\"notification\",\"payload\":{\"title\":\"Hi\",\"body\":\"there\"}}'", port)


async def serve(settings: Settings) -> None:
    raise_file_limit()
    metrics = Metrics(settings.statsd_host, settings.statsd_port, settings.statsd_prefix, instance=settings.server_id)
    presence, bus, history, endpoint = await build_backends(settings, metrics)
    gateway = Gateway(settings, presence, bus, metrics, history)
    await gateway.start()
    server = HTTPServer(make_app(gateway), max_body_size=max(1 << 20, 4 * settings.max_message_size),
                        idle_connection_timeout=60)
    sockets = bind_sockets(settings.port, settings.bind_address or None, reuse_port=settings.reuse_port,
                           backlog=4096)
    server.add_sockets(sockets)
    announce(settings, endpoint is None)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("shutting down: no new connections, closing clients with 1001")
    server.stop()
    await gateway.drain()
    await server.close_all_connections()
    if endpoint is not None:
        await endpoint.stop()  # and the redis-py client it made
    log.info("instance %s stopped", settings.server_id)
