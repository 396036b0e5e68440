"""Configuration: every option defined once, read from a conf file, then the environment.

Precedence (lowest first): built-in defaults, a `tornado.options` conf file
(`--conf`, or `GATEWAY_CONF`), environment variables, command-line flags. Conf
files are executed as Python by `tornado.options`, so only load files you trust.
The result is a frozen `Settings`, passed explicitly to every component; nothing
reads configuration from module globals.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import urllib.parse
import uuid
from collections.abc import Mapping
from typing import Any

from tornado.options import Error as OptionsError
from tornado.options import OptionParser

from .forwarded import header_name, parse_networks

MEMORY_URL = "memory://"
DEV_JWT_SECRET = "dev-insecure-secret-do-not-use-in-production"
LOG_FIELDS = "gateway_fields"  # LogRecord attribute: a log line's own fields, for LOG_FORMAT=json
SUPPORTED_ALGORITHMS = frozenset({"HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512"})


MAX_EVENT_SHARDS = 1024


class ConfigError(Exception):
    """The configuration cannot run safely; the message tells the operator what to set."""


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    port: int = 4010
    bind_address: str = ""
    redis_url: str = "redis://localhost:6379"
    redis_prefix: str = "gateway"
    redis_sentinels: tuple[str, ...] = ()  # host:port of each sentinel; set: the primary is asked of them
    redis_sentinel_master: str = ""  # the master name the sentinels monitor
    redis_sentinel_password: str | None = None  # the sentinels' own requirepass (REDIS_URL's is the nodes')
    redis_cluster: bool = False  # REDIS_URL names one node of a Redis Cluster; the rest is discovered
    redis_cluster_seeds: tuple[str, ...] = ()  # more host:port nodes to ask for the slot map if REDIS_URL's is down
    event_shards: int = 0  # cluster mode: client events on N sharded channels instead of one classic channel
    jwt_secret: str | None = None
    jwt_public_key_file: str | None = None
    jwt_algorithms: tuple[str, ...] = ("HS256",)
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    gateway_api_key: str | None = None
    heartbeat_interval_s: float = 30.0
    heartbeat_timeout_s: float = 75.0
    max_message_size: int = 65536
    instance_ttl_s: float = 15.0
    statsd_host: str = "localhost"
    statsd_port: int = 8125
    statsd_prefix: str = "gateway"
    server_id: str = ""
    processes: int = 1
    reuse_port: bool = False
    shutdown_drain_s: float = 5.0
    dispatch_stream_maxlen: int = 100_000
    history_size: int = 100  # recorded messages kept per user (PROTOCOL.md 7.1); 0 = no recording
    history_ttl_s: float = 300.0  # a user's history is dropped this long after its last recorded message
    probe_interval_s: float = 2.0  # the subscriber self-probe (PROTOCOL.md 7.4); 0 turns it off
    probe_timeout_s: float = 5.0  # a probe not back by then: /ready 503, subscriber connection replaced
    log_level: str = "INFO"
    log_format: str = "text"  # text, or json: one JSON object per line (main.JsonFormatter)
    # Abuse limits (0 disables a limit).
    rate_limit_per_s: float = 20.0  # inbound messages per connection, sustained
    rate_limit_burst: int = 40
    rate_limit_close_after: int = 50  # rejected messages within 10 s before closing with 4429
    connect_rate_per_ip: float = 0.0  # upgrade attempts per second per client IP; see README
    connect_burst_per_ip: int = 100
    max_devices_per_user: int = 10
    max_connections: int = 0  # 0: derived from the open-file limit
    max_outbound_buffer: int = 64 * 1024  # bytes waiting for one client before it is closed as too slow (README)
    outbound_budget: int = 0  # bytes waiting for all clients of the instance; 0: 4 KiB x max_connections
    socket_sndbuf: int = 0  # SO_SNDBUF per client socket; 0 leaves the kernel's autotuning
    token_expiry_grace_s: float = 30.0
    allowed_origins: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()  # addresses/CIDRs whose forwarding header is believed
    forwarded_header: str = "X-Forwarded-For"  # the one header they set: X-Forwarded-For, Forwarded or X-Real-IP
    compression: bool = False
    event_loop: str = "auto"  # auto (uvloop when installed), asyncio, uvloop
    dev: bool = False

    @property
    def jwt_key(self) -> str:
        """The key tokens are verified with: the HMAC secret or the PEM public key."""
        if self.jwt_public_key_file:
            with open(self.jwt_public_key_file, encoding="utf-8") as f:
                return f.read()
        return self.jwt_secret or ""


# name -> (type, environment variable). Defaults come from Settings.
_OPTIONS: dict[str, tuple[type, str]] = {
    "port": (int, "PORT"),
    "bind_address": (str, "BIND_ADDRESS"),
    "redis_url": (str, "REDIS_URL"),
    "redis_prefix": (str, "REDIS_PREFIX"),
    "redis_sentinels": (str, "REDIS_SENTINELS"),
    "redis_sentinel_master": (str, "REDIS_SENTINEL_MASTER"),
    "redis_sentinel_password": (str, "REDIS_SENTINEL_PASSWORD"),
    "redis_cluster": (bool, "REDIS_CLUSTER"),
    "redis_cluster_seeds": (str, "REDIS_CLUSTER_SEEDS"),
    "event_shards": (int, "EVENT_SHARDS"),
    "jwt_secret": (str, "JWT_SECRET"),
    "jwt_public_key_file": (str, "JWT_PUBLIC_KEY_FILE"),
    "jwt_algorithms": (str, "JWT_ALGORITHMS"),
    "jwt_issuer": (str, "JWT_ISSUER"),
    "jwt_audience": (str, "JWT_AUDIENCE"),
    "gateway_api_key": (str, "GATEWAY_API_KEY"),
    "heartbeat_interval_s": (float, "HEARTBEAT_INTERVAL"),
    "heartbeat_timeout_s": (float, "HEARTBEAT_TIMEOUT"),
    "max_message_size": (int, "MAX_MESSAGE_SIZE"),
    "instance_ttl_s": (float, "INSTANCE_TTL"),
    "statsd_host": (str, "STATSD_HOST"),
    "statsd_port": (int, "STATSD_PORT"),
    "statsd_prefix": (str, "STATSD_PREFIX"),
    "server_id": (str, "SERVER_ID"),
    "processes": (int, "PROCESSES"),
    "reuse_port": (bool, "REUSE_PORT"),
    "shutdown_drain_s": (float, "SHUTDOWN_DRAIN_SECONDS"),
    "dispatch_stream_maxlen": (int, "DISPATCH_STREAM_MAXLEN"),
    "history_size": (int, "HISTORY_SIZE"),
    "history_ttl_s": (float, "HISTORY_TTL"),
    "probe_interval_s": (float, "PROBE_INTERVAL"),
    "probe_timeout_s": (float, "PROBE_TIMEOUT"),
    "log_level": (str, "LOG_LEVEL"),
    "log_format": (str, "LOG_FORMAT"),
    "rate_limit_per_s": (float, "RATE_LIMIT_PER_SECOND"),
    "rate_limit_burst": (int, "RATE_LIMIT_BURST"),
    "rate_limit_close_after": (int, "RATE_LIMIT_CLOSE_AFTER"),
    "connect_rate_per_ip": (float, "CONNECT_RATE_PER_IP"),
    "connect_burst_per_ip": (int, "CONNECT_BURST_PER_IP"),
    "max_devices_per_user": (int, "MAX_DEVICES_PER_USER"),
    "max_connections": (int, "MAX_CONNECTIONS"),
    "max_outbound_buffer": (int, "MAX_OUTBOUND_BUFFER"),
    "outbound_budget": (int, "OUTBOUND_BUDGET"),
    "socket_sndbuf": (int, "SOCKET_SNDBUF"),
    "token_expiry_grace_s": (float, "TOKEN_EXPIRY_GRACE"),
    "allowed_origins": (str, "ALLOWED_ORIGINS"),
    "trusted_proxies": (str, "TRUSTED_PROXIES"),
    "forwarded_header": (str, "FORWARDED_HEADER"),
    "compression": (bool, "COMPRESSION"),
    "event_loop": (str, "EVENT_LOOP"),
}

#: Conf files may use the contract's short names (heartbeat_interval) too.
_CONF_ALIASES = {"heartbeat_interval": "heartbeat_interval_s", "heartbeat_timeout": "heartbeat_timeout_s",
                 "instance_ttl": "instance_ttl_s", "shutdown_drain_seconds": "shutdown_drain_s",
                 "rate_limit_per_second": "rate_limit_per_s", "token_expiry_grace": "token_expiry_grace_s",
                 "history_ttl": "history_ttl_s", "probe_interval": "probe_interval_s",
                 "probe_timeout": "probe_timeout_s"}


def env_name(option: str) -> str:
    return _OPTIONS[option][1]


#: Options where an empty value means something ("no metrics", "every interface"). Everywhere else an
#: empty value, from the environment or a conf file alike, is the same as not setting the option: an
#: empty GATEWAY_API_KEY must never become a key that an empty Authorization header matches.
_EMPTY_IS_A_VALUE = frozenset({"statsd_host", "bind_address"})


def _is_set(name: str, value: Any) -> bool:
    return value is not None and (value != "" or name in _EMPTY_IS_A_VALUE)


def _read_conf_file(path: str) -> dict[str, Any]:
    parser = OptionParser()
    for name in [*_OPTIONS, *_CONF_ALIASES]:
        kind = _OPTIONS[_CONF_ALIASES.get(name, name)][0]
        # numbers.Real so that `heartbeat_interval = 30` (an int) is accepted for a float option.
        parser.define(name, type=numbers.Real if kind is float else kind, default=None)
    try:
        parser.parse_config_file(path, final=False)
    except (OptionsError, SyntaxError, NameError, TypeError, ValueError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    values: dict[str, Any] = {}
    for name, value in parser.as_dict().items():
        target = _CONF_ALIASES.get(name, name)
        if _is_set(target, value):
            values[target] = float(value) if _OPTIONS[target][0] is float else value
    return values


def _convert(kind: type, raw: str, env: str) -> Any:
    try:
        if kind is bool:
            if raw.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if raw.strip().lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{env}={raw!r} is not a valid {kind.__name__}") from None


def _read_env(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, (kind, var) in _OPTIONS.items():
        raw = env.get(var)
        if _is_set(name, raw):
            values[name] = _convert(kind, raw, var) if raw else raw
    return values


def _normalise(values: dict[str, Any]) -> dict[str, Any]:
    for name in ("jwt_algorithms", "allowed_origins", "trusted_proxies", "redis_sentinels", "redis_cluster_seeds"):
        listed = values.get(name)
        if isinstance(listed, str):
            values[name] = tuple(a.strip() for a in listed.split(",") if a.strip())
    values["log_level"] = str(values.get("log_level", "INFO")).upper()
    values["log_format"] = str(values.get("log_format", "text")).strip().lower()
    return values


def load_settings(
    env: Mapping[str, str] | None = None,
    *,
    conf_file: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    dev: bool = False,
) -> Settings:
    """Build Settings from defaults < conf file < environment < explicit overrides (the CLI)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    conf_file = conf_file or env.get("GATEWAY_CONF") or None
    if conf_file:
        if not os.path.exists(conf_file):
            raise ConfigError(f"config file {conf_file} does not exist")
        values.update(_read_conf_file(conf_file))
    values.update(_read_env(env))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    values = _normalise(values)
    if dev:
        values["dev"] = True
        if not values.get("jwt_secret") and not values.get("jwt_public_key_file"):
            values["jwt_secret"] = DEV_JWT_SECRET
    if not values.get("server_id"):
        values["server_id"] = uuid.uuid4().hex[:12]
    settings = Settings(**values)
    validate(settings)
    return settings


def validate(settings: Settings) -> None:
    """Refuse settings that would run insecurely or misbehave, with the fix in the message."""
    bad_algs = set(settings.jwt_algorithms) - SUPPORTED_ALGORITHMS
    if bad_algs or not settings.jwt_algorithms:
        raise ConfigError(
            f"JWT_ALGORITHMS must list algorithms from {sorted(SUPPORTED_ALGORITHMS)}; got {settings.jwt_algorithms}"
        )
    if settings.heartbeat_interval_s <= 0 or settings.heartbeat_timeout_s <= settings.heartbeat_interval_s:
        raise ConfigError("HEARTBEAT_INTERVAL must be > 0 and HEARTBEAT_TIMEOUT greater than it")
    if settings.max_message_size < 256:
        raise ConfigError("MAX_MESSAGE_SIZE must be at least 256 bytes")
    if settings.history_size < 0 or settings.history_ttl_s <= 0:
        raise ConfigError("HISTORY_SIZE must be >= 0 (0 turns recording off) and HISTORY_TTL > 0 seconds")
    if settings.instance_ttl_s < 1:
        raise ConfigError("INSTANCE_TTL must be at least 1 second")
    if settings.probe_interval_s < 0 or (settings.probe_interval_s > 0
                                         and settings.probe_timeout_s <= settings.probe_interval_s / 2):
        raise ConfigError("PROBE_INTERVAL must be >= 0 (0 turns the probe off) and PROBE_TIMEOUT more than half of it")
    if settings.processes < 1:
        raise ConfigError("PROCESSES must be at least 1")
    validate_sentinels(settings)
    validate_cluster(settings)
    try:
        parse_networks(settings.trusted_proxies)
        header_name(settings.forwarded_header)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if settings.log_format not in ("text", "json"):
        raise ConfigError("LOG_FORMAT must be text or json")
    if settings.event_loop not in ("auto", "asyncio", "uvloop"):
        raise ConfigError("EVENT_LOOP must be auto, asyncio or uvloop")
    if min(settings.rate_limit_per_s, settings.rate_limit_burst, settings.connect_rate_per_ip,
           settings.max_devices_per_user, settings.max_connections, settings.max_outbound_buffer,
           settings.outbound_budget, settings.token_expiry_grace_s) < 0:
        raise ConfigError("limits must not be negative (0 disables a limit)")
    asymmetric = [a for a in settings.jwt_algorithms if not a.startswith("HS")]
    if asymmetric and not settings.jwt_public_key_file:
        raise ConfigError(f"JWT_ALGORITHMS={','.join(asymmetric)} needs JWT_PUBLIC_KEY_FILE (a PEM public key)")
    if settings.jwt_public_key_file and not os.path.exists(settings.jwt_public_key_file):
        raise ConfigError(f"JWT_PUBLIC_KEY_FILE {settings.jwt_public_key_file} does not exist")
    symmetric = [a for a in settings.jwt_algorithms if a.startswith("HS")]
    if symmetric and asymmetric:
        # Mixing families lets an attacker sign HS256 tokens with the public key (key confusion).
        raise ConfigError("JWT_ALGORITHMS may not mix HS* with RS*/ES* algorithms")
    if symmetric and not settings.jwt_secret:
        raise ConfigError(
            "JWT_SECRET is not set: the gateway cannot verify tokens. Set JWT_SECRET (or JWT_PUBLIC_KEY_FILE "
            "with JWT_ALGORITHMS=RS256), or run with --dev for an insecure development secret."
        )


def validate_sentinels(settings: Settings) -> None:
    """REDIS_SENTINELS and REDIS_SENTINEL_MASTER go together, and only with a real Redis."""
    if not settings.redis_sentinels:
        if settings.redis_sentinel_master:
            raise ConfigError("REDIS_SENTINEL_MASTER is set but REDIS_SENTINELS is not: list the sentinels "
                              "(host:port,...)")
        return
    if not settings.redis_sentinel_master:
        raise ConfigError("REDIS_SENTINELS needs REDIS_SENTINEL_MASTER: the master name the sentinels monitor")
    if settings.redis_url == MEMORY_URL:
        raise ConfigError("REDIS_SENTINELS cannot be used with REDIS_URL=memory://")
    try:
        parse_sentinels(settings.redis_sentinels)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def validate_cluster(settings: Settings) -> None:
    """A cluster has no databases but 0, no sentinels, and cannot be the embedded bus."""
    if not settings.redis_cluster:
        if settings.redis_cluster_seeds:
            raise ConfigError("REDIS_CLUSTER_SEEDS needs REDIS_CLUSTER=true")
        if settings.event_shards:
            raise ConfigError("EVENT_SHARDS needs REDIS_CLUSTER=true: sharded channels spread events over a "
                              "cluster's shards; a single Redis has one")
        return
    if not 0 <= settings.event_shards <= MAX_EVENT_SHARDS:
        raise ConfigError(f"EVENT_SHARDS must be 0 (one classic channel per event type) to {MAX_EVENT_SHARDS}")
    if settings.redis_url == MEMORY_URL:
        raise ConfigError("REDIS_CLUSTER cannot be used with REDIS_URL=memory://")
    if settings.redis_sentinels:
        raise ConfigError("REDIS_CLUSTER and REDIS_SENTINELS exclude each other: a cluster fails over by itself")
    if settings.redis_url.startswith("unix:"):
        raise ConfigError("REDIS_CLUSTER needs a redis:// or rediss:// REDIS_URL (a node's host:port)")
    try:
        parse_addresses(settings.redis_cluster_seeds, "REDIS_CLUSTER_SEEDS")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    db = urllib.parse.urlsplit(settings.redis_url).path.strip("/")
    if db not in ("", "0"):
        raise ConfigError(f"REDIS_CLUSTER: a Redis Cluster has only database 0, REDIS_URL selects {db}")


def parse_sentinels(listed: tuple[str, ...]) -> list[tuple[str, int]]:
    return parse_addresses(listed, "REDIS_SENTINELS")


def parse_addresses(listed: tuple[str, ...], setting: str) -> list[tuple[str, int]]:
    """`host:port` entries (an IPv6 host in brackets: `[::1]:26379`); ValueError names the bad one."""
    addresses: list[tuple[str, int]] = []
    for entry in listed:
        host, sep, port = entry.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{setting} entry {entry!r} is not host:port")
        addresses.append((host.strip("[]"), int(port)))
    return addresses
